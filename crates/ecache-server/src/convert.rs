//! From an OpenAI chat request to an engine request: every field checked, images decoded
//! from `data:` URLs (no remote fetching), the cache policy validated through the registry
//! exactly as `--set` is.

use base64::Engine as _;
use ecache_core::PolicyConfig;
use ecache_engine::{ImageInput, Message, Part, Request, Role};

use crate::error::ApiError;
use crate::openai::{ChatMessage, ChatRequest, Content, ContentPart, KvCache, Stop};

/// What the conversion needs from the server.
pub struct Defaults<'a> {
    /// The served model's id.
    pub model: &'a str,
    /// The policy of requests without `kv_cache`.
    pub policy: &'a PolicyConfig,
    /// `max_tokens` when a request gives none (cut to what the context leaves).
    pub max_tokens: usize,
}

/// A converted request, and the name the client used for its token limit.
pub struct Converted {
    pub request: Request,
    pub max_tokens_field: &'static str,
    pub include_usage: bool,
}

pub fn convert(chat: ChatRequest, defaults: &Defaults<'_>) -> Result<Converted, ApiError> {
    if let Some(model) = &chat.model
        && model != defaults.model
    {
        return Err(ApiError::unknown_model(model, defaults.model));
    }
    if chat.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is served", Some("n")));
    }
    if chat.logprobs == Some(true) {
        return Err(ApiError::invalid(
            "log-probabilities are not served",
            Some("logprobs"),
        ));
    }
    let messages = chat
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let mut request = Request::chat(messages);
    let (limit, field) = match (chat.max_completion_tokens, chat.max_tokens) {
        (Some(n), _) => (Some(n), "max_completion_tokens"),
        (None, Some(n)) => (Some(n), "max_tokens"),
        (None, None) => (None, "max_tokens"),
    };
    match limit {
        Some(n) if n < 1 => {
            return Err(ApiError::invalid(
                format!("{field} must be at least 1, got {n}"),
                Some(field),
            ));
        }
        Some(n) => request.max_new_tokens = n as usize,
        None => {
            request.max_new_tokens = defaults.max_tokens;
            request.fit_context = true;
        }
    }
    if let Some(t) = chat.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::invalid(
                format!("temperature {t} is outside [0, 2]"),
                Some("temperature"),
            ));
        }
        request.temperature = t;
    }
    if let Some(p) = chat.top_p {
        request.top_p = p;
    }
    request.seed = chat.seed.map(|s| s as u64);
    request.stop = match chat.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) if v.len() > 4 => {
            return Err(ApiError::invalid(
                format!("{} stop strings; at most 4", v.len()),
                Some("stop"),
            ));
        }
        Some(Stop::Many(v)) => v,
    };
    request.ignore_eos = chat.ignore_eos;
    request.policy = chat
        .kv_cache
        .map(|kv| policy(kv, defaults.policy))
        .transpose()?;
    Ok(Converted {
        request,
        max_tokens_field: field,
        include_usage: chat.stream_options.is_some_and(|o| o.include_usage),
    })
}

fn message(i: usize, m: ChatMessage) -> Result<Message, ApiError> {
    let field = Some("messages");
    let role = match m.role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => {
            return Err(ApiError::invalid(
                format!(
                    "message {i} has role `{other}`; this server takes system, user and assistant messages"
                ),
                field,
            ));
        }
    };
    let parts = match m.content {
        None if role == Role::Assistant => Vec::new(),
        None => {
            return Err(ApiError::invalid(
                format!("message {i} has no content"),
                field,
            ));
        }
        Some(Content::Text(text)) => vec![Part::Text(text)],
        Some(Content::Parts(parts)) => parts
            .into_iter()
            .enumerate()
            .map(|(j, p)| match p {
                ContentPart::Text { text } => Ok(Part::Text(text)),
                ContentPart::ImageUrl { image_url } => {
                    image(&image_url.url, &format!("message {i} part {j}")).map(Part::Image)
                }
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(Message { role, parts })
}

/// Decodes a `data:image/png;base64,...` or `data:image/jpeg;base64,...` URL.
fn image(url: &str, name: &str) -> Result<ImageInput, ApiError> {
    let field = Some("messages");
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ApiError::invalid(
            format!(
                "{name}: only inline images are taken (a data:image/png;base64,... or data:image/jpeg;base64,... URL); remote images are not fetched"
            ),
            field,
        ));
    };
    let (meta, payload) = rest
        .split_once(',')
        .ok_or_else(|| ApiError::invalid(format!("{name}: a data URL needs a comma"), field))?;
    let mime = meta
        .strip_suffix(";base64")
        .ok_or_else(|| ApiError::invalid(format!("{name}: the image must be base64"), field))?;
    if !matches!(mime, "image/png" | "image/jpeg" | "image/jpg") {
        return Err(ApiError::invalid(
            format!("{name}: `{mime}` images are not taken; send PNG or JPEG"),
            field,
        ));
    }
    let data = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| {
            ApiError::invalid(format!("{name}: the base64 does not decode: {e}"), field)
        })?;
    let png = data.starts_with(b"\x89PNG\r\n\x1a\n");
    let jpeg = data.starts_with(&[0xFF, 0xD8, 0xFF]);
    if !png && !jpeg {
        return Err(ApiError::invalid(
            format!("{name}: the data is neither a PNG nor a JPEG"),
            field,
        ));
    }
    Ok(ImageInput::Bytes {
        data,
        name: name.to_string(),
    })
}

/// The request's policy section. A policy other than the server's needs its budget (`full`
/// excepted); the server's own policy takes the server's budget and parameters for what
/// the request leaves out.
fn policy(kv: KvCache, default: &PolicyConfig) -> Result<PolicyConfig, ApiError> {
    let field = Some("kv_cache");
    let same = kv.policy == default.name;
    let budget = match kv.budget {
        Some(b) => b,
        None if kv.policy == "full" => 1.0,
        None if same => default.budget,
        None => {
            return Err(ApiError::invalid(
                format!("kv_cache.budget is needed for policy `{}`", kv.policy),
                field,
            ));
        }
    };
    let mut config = PolicyConfig::new(&kv.policy, budget);
    config.positions = default.positions;
    config.layer_budgets = default.layer_budgets;
    config.pyramid_beta = default.pyramid_beta;
    match kv.params {
        Some(params) => {
            for (key, value) in params {
                let v = match value {
                    serde_json::Value::Bool(b) => toml::Value::Boolean(b),
                    serde_json::Value::String(s) => toml::Value::String(s),
                    serde_json::Value::Number(n) => match n.as_i64() {
                        Some(i) => toml::Value::Integer(i),
                        None => toml::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
                    },
                    other => {
                        return Err(ApiError::invalid(
                            format!(
                                "kv_cache.params.{key} = {other}: a parameter is a number, a string or a boolean"
                            ),
                            field,
                        ));
                    }
                };
                config.params.insert(key, v);
            }
        }
        None if same => config.params = default.params.clone(),
        None => {}
    }
    Ok(config)
}
