//! The engine on the tiny Qwen2-VL and Qwen2.5-VL checkpoints: chat messages with a
//! picture scored as transformers scores them, and answers under policies, several in
//! flight together, equal to one sequence run through the model interface alone.

use std::path::PathBuf;

use burn::tensor::DType;
use ecache_core::{PolicyConfig, PositionMode};
use ecache_engine::{
    Engine, EngineConfig, ImageInput, Message, Part, Request, Role, SubmitError, Task,
};
use ecache_model::generate::{argmax, rows_of};
use ecache_model::{Architecture, Runner, Sequence};

type B = burn::backend::Flex;

const CHECKPOINTS: [(&str, Architecture); 2] = [
    ("tiny-qwen2-vl", Architecture::Qwen2Vl),
    ("tiny-qwen2.5-vl", Architecture::Qwen25Vl),
];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn wide_png() -> Vec<u8> {
    std::fs::read(fixture("qwen2-vl-images").join("wide.png")).unwrap()
}

fn expected(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name).join("expected_chat.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn user(parts: Vec<Part>) -> Request {
    Request::chat(vec![Message {
        role: Role::User,
        parts,
    }])
}

fn picture() -> Part {
    Part::Image(ImageInput::Bytes {
        data: wide_png(),
        name: "wide.png".into(),
    })
}

/// A user message holding the wide picture and a question, and an answer to score: the
/// engine renders the chat template, preprocesses the PNG, expands the image pad to the
/// picture's 8 slots and places them with multimodal RoPE; each answer token's NLL is
/// within 1e-4 of transformers' on the same conversation (expected_chat.json). A message
/// holding the image pad as text is refused.
#[test]
fn a_chat_with_a_picture_scores_as_transformers() {
    for (name, arch) in CHECKPOINTS {
        let engine = Engine::load(EngineConfig::new(fixture(name))).unwrap();
        assert_eq!(engine.info().architecture, arch);
        assert_eq!(engine.info().image_tokens, None);
        let scored = &expected(name)["scored"];
        let question = scored["question"].as_str().unwrap();
        let mut request = user(vec![picture(), Part::Text(question.into())]);
        request.task = Task::Score {
            answer: scored["answer"].as_str().unwrap().into(),
        };
        let handle = engine.submit(request).unwrap();
        let prompt_ids = scored["prompt_ids"].as_array().unwrap().len();
        assert_eq!(handle.prompt_tokens(), prompt_ids, "{name}");
        let done = handle.wait().unwrap();
        assert_eq!(done.stats.image_tokens, 8, "{name}");
        let want: Vec<f64> = scored["nll"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(done.nll.len(), want.len(), "{name}");
        for (i, (got, want)) in done.nll.iter().zip(&want).enumerate() {
            assert!(
                (got - want).abs() < 1e-4,
                "{name} token {i}: {got} vs {want}"
            );
        }
        let bad = user(vec![picture(), Part::Text("<|image_pad|> ?".into())]);
        match engine.submit(bad).err() {
            Some(SubmitError::Invalid { param, message }) => {
                assert_eq!(param.as_deref(), Some("messages"));
                assert!(message.contains("<|image_pad|>"), "{message}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
}

/// Greedy answers under the full cache, H2O and Elastic Cache at 0.5, submitted together
/// (they decode in one ragged batch, each at its own multimodal position): each equals
/// the answer of one sequence run through the model interface without the engine.
#[test]
fn answers_under_policies_in_flight_equal_a_lone_sequences() {
    let registry = ecache_engine::builtin_registry().unwrap();
    for (name, _) in CHECKPOINTS {
        let dir = fixture(name);
        let engine = Engine::load(EngineConfig::new(&dir)).unwrap();
        let policies = [
            PolicyConfig::new("full", 1.0),
            PolicyConfig::new("h2o", 0.5),
            PolicyConfig::new("elastic", 0.5),
        ];
        let question = "what is the colour of the circle ?";
        let handles: Vec<_> = policies
            .iter()
            .map(|p| {
                let mut r = Request::text(question);
                r.image = Some(ImageInput::Path(
                    fixture("qwen2-vl-images").join("wide.png"),
                ));
                r.policy = Some(p.clone());
                r.max_new_tokens = 6;
                r.ignore_eos = true;
                engine.submit(r).unwrap()
            })
            .collect();
        let frontend = ecache_model::load_frontend(&dir, Default::default()).unwrap();
        let device = Default::default();
        let model = ecache_model::load_model::<B>(&dir, &device, DType::F32).unwrap();
        let runner = Runner::new(model.decoder(), model.text(), &device);
        for (handle, config) in handles.into_iter().zip(&policies) {
            let got = handle.wait().unwrap().tokens;
            let policy = registry.build(config).unwrap();
            let image =
                ecache_model::model::open_image(&fixture("qwen2-vl-images").join("wide.png"))
                    .unwrap();
            let (prompt, _) = ecache_model::image_prompt(
                frontend.as_ref(),
                model.as_ref(),
                question,
                &image,
                &device,
                DType::F32,
            )
            .unwrap();
            let mut seq = Sequence::new(
                model.text(),
                policy.as_ref(),
                PositionMode::Absolute,
                &device,
                DType::F32,
            );
            let logits = runner
                .prefill_prompt_last(&mut seq, policy.as_ref(), prompt)
                .unwrap();
            let mut row = rows_of(logits).unwrap().remove(0);
            let mut want = Vec::new();
            while want.len() < 6 {
                let next = argmax(&row);
                want.push(next);
                let logits = runner
                    .decode(&mut [(&mut seq, policy.as_ref())], &[next])
                    .unwrap();
                row = rows_of(logits).unwrap().remove(0);
            }
            assert_eq!(got, want, "{name} {}", config.name);
        }
    }
}

/// A directory's own chat template is what renders the messages: one that refuses system
/// turns (`raise_exception`, as some published templates do) has such a request refused
/// naming `messages`, and serves the others with its own format.
#[test]
fn the_directorys_chat_template_renders_and_may_refuse() {
    let dir = std::env::temp_dir().join(format!("ecache-qwen-template-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture("tiny-qwen2-vl")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('system turns are not supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n",
    )
    .unwrap();
    let engine = Engine::load(EngineConfig::new(&dir)).unwrap();
    let system = Message {
        role: Role::System,
        parts: vec![Part::Text("be brief .".into())],
    };
    let question = user(vec![picture(), Part::Text("what is it ?".into())]);
    let ecache_engine::Prompt::Chat(mut messages) = question.prompt.clone() else {
        unreachable!()
    };
    messages.insert(0, system);
    match engine.submit(Request::chat(messages)).err() {
        Some(SubmitError::Invalid { param, message }) => {
            assert_eq!(param.as_deref(), Some("messages"));
            assert!(
                message.contains("system turns are not supported"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Without the default system turn the published template adds: 8 image slots and
    // the words of `<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant` (a template's
    // last newline is dropped, as Jinja does by default).
    let handle = engine.submit(question).unwrap();
    let frontend = ecache_model::load_frontend(&dir, Default::default()).unwrap();
    let rendered = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is it ?<|im_end|>\n<|im_start|>assistant";
    let ids = frontend.tokenizer().encode(rendered, false).unwrap();
    assert_eq!(handle.prompt_tokens(), ids.len() - 1 + 8);
    handle.wait().unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
