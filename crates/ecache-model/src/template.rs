//! A model directory's own chat template (the Jinja text transformers' `apply_chat_template`
//! renders), rendered with `minijinja` and its Python-compatibility methods (`.upper()`,
//! `.strip()`, ...): a fine-tuned checkpoint's template is used as it ships, not our copy
//! of the base model's.
//!
//! transformers 5 saves the template as `chat_template.jinja`; earlier versions as
//! `chat_template.json` (`{"chat_template": ...}`) or under `chat_template` in
//! `tokenizer_config.json` (a string, or a list of named templates of which `default` is
//! taken). A template that does not compile, or fails on a plain conversation, is refused
//! when the model loads, naming the file.

use std::path::{Path, PathBuf};

use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::json;

use crate::error::{ModelError, Result};
use crate::prompt::{Content, Role, Turn};

/// A directory's chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    path: PathBuf,
}

impl ChatTemplate {
    /// The template `dir` ships, if any.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let Some((source, path)) = find(dir)? else {
            return Ok(None);
        };
        let template = Self::from_source(source, path);
        // A plain conversation must render: a template that fails on it would fail every
        // request.
        template.render(&[Turn {
            role: Role::User,
            parts: vec![Content::Image, Content::Text("hello".into())],
        }])?;
        Ok(Some(template))
    }

    /// A template from its text; `path` names it in errors.
    pub fn from_source(source: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            source: without_generation_tags(&source.into()),
            path: path.into(),
        }
    }

    /// `template`'s rendering of `turns` when there is one, else `built_in`'s (the
    /// architecture's published template).
    pub fn render_or(
        template: Option<&Self>,
        turns: &[Turn],
        built_in: fn(&[Turn]) -> String,
    ) -> Result<String> {
        match template {
            Some(template) => template.render(turns),
            None => Ok(built_in(turns)),
        }
    }

    /// The file it came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renders `turns` with the assistant's turn opened (`add_generation_prompt`). Each
    /// turn is a message whose content is a list of parts, `{"type": "image"}` or
    /// `{"type": "text", "text": ...}`, in order, as transformers' processors pass them.
    pub fn render(&self, turns: &[Turn]) -> Result<String> {
        let messages: Vec<serde_json::Value> = turns
            .iter()
            .map(|turn| {
                let content: Vec<serde_json::Value> = turn
                    .parts
                    .iter()
                    .map(|part| match part {
                        Content::Image => json!({"type": "image"}),
                        Content::Text(t) => json!({"type": "text", "text": t}),
                    })
                    .collect();
                json!({"role": turn.role.as_str(), "content": content})
            })
            .collect();
        let bad = |e: Error| {
            let mut message = format!("chat template {}: {e}", self.path.display());
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            ModelError::Prompt(message)
        };
        // As transformers compiles templates: blocks trim the newline after them and the
        // indentation before them; `break` and `continue` are allowed.
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        let template = env.template_from_str(&self.source).map_err(bad)?;
        template
            .render(minijinja::context! {
                messages => Value::from_serialize(&messages),
                add_generation_prompt => true,
            })
            .map_err(bad)
    }
}

/// The template without transformers' `{% generation %}` / `{% endgeneration %}` tags
/// (an extension of its own that marks the assistant's text for training masks and
/// renders nothing; llava-hf's template uses it), which plain Jinja does not parse.
fn without_generation_tags(source: &str) -> String {
    let mut out = source.to_string();
    for tag in ["generation", "endgeneration"] {
        for (open, close) in [("{%", "%}"), ("{%-", "%}"), ("{%", "-%}"), ("{%-", "-%}")] {
            for space in ["", " "] {
                out = out.replace(&format!("{open}{space}{tag}{space}{close}"), "");
            }
        }
    }
    out
}

/// The template text and the file it is in.
fn find(dir: &Path) -> Result<Option<(String, PathBuf)>> {
    let read = |path: &Path| std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e));
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return Ok(Some((read(&jinja)?, jinja)));
    }
    for name in ["chat_template.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&read(&path)?)
            .map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
        let template = match value.get("chat_template") {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string)
                .ok_or_else(|| {
                    ModelError::Config(format!(
                        "{}: chat_template lists no template named \"default\"",
                        path.display()
                    ))
                })?,
            Some(other) => {
                return Err(ModelError::Config(format!(
                    "{}: chat_template is {other}, not a string",
                    path.display()
                )));
            }
        };
        return Ok(Some((template, path)));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turns() -> Vec<Vec<Turn>> {
        let text = |t: &str| Content::Text(t.into());
        let turn = |role, parts| Turn { role, parts };
        vec![
            vec![turn(Role::User, vec![Content::Image, text("what is it ?")])],
            vec![
                turn(Role::System, vec![text("be brief .")]),
                turn(Role::User, vec![text("in"), Content::Image, text("this ?")]),
                turn(Role::Assistant, vec![text("a circle .")]),
                turn(Role::User, vec![text("and ?")]),
            ],
            vec![turn(Role::User, vec![text("no picture")])],
        ]
    }

    /// Qwen2-VL's published template (the tiny fixtures ship it) renders every
    /// conversation as the built-in `qwen::chat_template` does.
    #[test]
    fn the_published_qwen_template_renders_as_the_built_in_one() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-qwen2-vl");
        let template = ChatTemplate::load(&dir).unwrap().unwrap();
        assert!(template.path().ends_with("chat_template.jinja"));
        for t in turns() {
            assert_eq!(template.render(&t).unwrap(), crate::qwen::chat_template(&t));
        }
    }

    /// llava-hf's published template (`llava-1.5-7b-hf`: `.upper()`, `selectattr`, and
    /// transformers' `{% generation %}` tag) renders as the built-in `chat_template`.
    #[test]
    fn the_published_llava_template_renders_as_the_built_in_one() {
        let source = "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";
        let template = ChatTemplate::from_source(source, "chat_template.json");
        for t in turns() {
            assert_eq!(
                template.render(&t).unwrap(),
                crate::prompt::chat_template(&t)
            );
        }
    }

    /// Python string methods (pycompat), `raise_exception`, and the other places a
    /// template is kept; a template that does not compile is refused naming its file.
    #[test]
    fn templates_are_found_and_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("ecache-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(ChatTemplate::load(&dir).unwrap().is_none());
        let shouting = "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'].strip() }}{% else %}<image>{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}";
        std::fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::to_string(
                &json!({"chat_template": [{"name": "default", "template": shouting}]}),
            )
            .unwrap(),
        )
        .unwrap();
        let t = ChatTemplate::load(&dir).unwrap().unwrap();
        assert_eq!(
            t.render(&turns()[0]).unwrap(),
            // The newline after `{% endfor %}` goes (trim_blocks), as Jinja2 renders it in
            // transformers.
            "USER: <image>what is it ?ASSISTANT:"
        );
        std::fs::write(
            dir.join("chat_template.json"),
            r#"{"chat_template": "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}ok"}"#,
        )
        .unwrap();
        let t = ChatTemplate::load(&dir).unwrap().unwrap();
        assert!(t.path().ends_with("chat_template.json"));
        let e = t.render(&turns()[1]).unwrap_err().to_string();
        assert!(
            e.contains("no system turns") && e.contains("chat_template.json"),
            "{e}"
        );
        std::fs::write(dir.join("chat_template.jinja"), "{% for m in messages %}").unwrap();
        let e = ChatTemplate::load(&dir).unwrap_err().to_string();
        assert!(e.contains("chat_template.jinja"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
