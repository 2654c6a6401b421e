//! What a request asks for and what comes back.

use std::path::PathBuf;

use ecache_core::PolicyConfig;
pub use ecache_model::Role;

/// One request to the engine.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Prompt,
    /// The image a [`Prompt::Text`] asks about (chat messages carry their own).
    pub image: Option<ImageInput>,
    /// Most new tokens (EOS included); at least 1.
    pub max_new_tokens: usize,
    /// Lower `max_new_tokens` to what the model's context leaves after the prompt, instead
    /// of refusing the request (for a limit the client did not choose).
    pub fit_context: bool,
    /// 0 selects greedy decoding.
    pub temperature: f64,
    /// Nucleus mass in (0, 1].
    pub top_p: f64,
    /// Seed of this request's sampler; `None` draws one (see [`crate::Engine`]).
    pub seed: Option<u64>,
    /// Generation stops when the text contains one of these; the answer ends before it.
    pub stop: Vec<String>,
    /// Keep generating past EOS until `max_new_tokens` (fixed-length benchmarks).
    pub ignore_eos: bool,
    /// This request's cache policy; `None` takes the engine's default.
    pub policy: Option<PolicyConfig>,
    pub task: Task,
}

impl Request {
    /// A generation request for `prompt` with the defaults: greedy, 64 new tokens, the
    /// engine's policy.
    pub fn text(prompt: impl Into<String>) -> Self {
        Self::new(Prompt::Text(prompt.into()))
    }

    /// A generation request for chat messages with the defaults.
    pub fn chat(messages: Vec<Message>) -> Self {
        Self::new(Prompt::Chat(messages))
    }

    fn new(prompt: Prompt) -> Self {
        Self {
            prompt,
            image: None,
            max_new_tokens: 64,
            fit_context: false,
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
            stop: Vec::new(),
            ignore_eos: false,
            policy: None,
            task: Task::Generate,
        }
    }
}

/// The prompt of a request.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// As `ecache generate --prompt`: a bare question is put in the model's chat format
    /// when an image is given; text that already holds `<image>` or `USER:` is taken as it
    /// is, and so is any text without an image.
    Text(String),
    /// Chat turns, rendered by the model's chat template.
    Chat(Vec<Message>),
}

/// One chat turn.
#[derive(Debug, Clone)]
pub struct Message {
    pub role: Role,
    pub parts: Vec<Part>,
}

impl Message {
    /// A turn of plain text.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            parts: vec![Part::Text(text.into())],
        }
    }
}

/// A piece of a chat turn.
#[derive(Debug, Clone)]
pub enum Part {
    Text(String),
    Image(ImageInput),
}

/// An image: a file, or encoded bytes (PNG, JPEG, ...) with a name for errors.
#[derive(Debug, Clone)]
pub enum ImageInput {
    Path(PathBuf),
    Bytes { data: Vec<u8>, name: String },
}

/// What the engine does with the prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Generate an answer.
    Generate,
    /// Score `answer` teacher-forced after the prompt (the paper's perplexity protocol):
    /// the completion's `nll` holds one negative log-likelihood per answer token.
    Score { answer: String },
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_new_tokens` reached (or every answer token scored).
    Length,
}

impl FinishReason {
    /// OpenAI's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token counts, as OpenAI reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt slots, image tokens included.
    pub prompt_tokens: usize,
    /// Tokens generated (EOS included when produced).
    pub completion_tokens: usize,
}

/// What a request held and cost.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// The policy it ran under, and its budget.
    pub policy: String,
    pub budget: f64,
    /// Image slots of the prompt.
    pub image_tokens: usize,
    /// Slots each layer held at the end.
    pub slots_per_layer: Vec<usize>,
    /// Image slots each layer held after the prefill, and at the end.
    pub image_slots_after_prefill: Vec<usize>,
    pub image_slots_at_end: Vec<usize>,
    /// KV bytes held at the end, and reserved for the request while it ran.
    pub kv_bytes: usize,
    pub kv_reserved: usize,
    /// Seconds waiting in the queue, in the prefill, and decoding.
    pub queued_seconds: f64,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Seconds from submission to the first token.
    pub first_token_seconds: f64,
}

/// A finished request.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The answer's text, cut before a stop string.
    pub text: String,
    /// The generated tokens (for a score task, none).
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    /// For a score task, one negative log-likelihood (natural log) per answer token.
    pub nll: Vec<f64>,
    pub stats: Stats,
}

/// What a request's stream yields.
#[derive(Debug, Clone)]
pub enum Event {
    /// A generated token and the text it adds; empty while text is held back (an
    /// incomplete character, or what may be the start of a stop string).
    Token { id: u32, text: String },
    /// The request finished; no event follows.
    Done(Box<Completion>),
    /// The request failed while running; no event follows.
    Failed(String),
}

/// Why a request was refused at submission.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    /// The request cannot be served as given; `param` names the field at fault.
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<String>,
    },
    /// The queue holds `max_queue` requests already.
    #[error("the queue is full ({0} requests waiting); try again later")]
    QueueFull(usize),
    /// The engine no longer accepts requests.
    #[error("the engine is shutting down")]
    ShuttingDown,
}

impl SubmitError {
    pub(crate) fn invalid(message: impl Into<String>, param: &str) -> Self {
        SubmitError::Invalid {
            message: message.into(),
            param: (!param.is_empty()).then(|| param.to_string()),
        }
    }
}

/// Errors of the engine as a whole.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model, tokenizer, image processor or configuration could not be loaded.
    #[error("{0}")]
    Load(String),
    /// A request was refused.
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// A request failed while running, or its stream ended without an answer.
    #[error("{0}")]
    Failed(String),
}
