//! Checking and preparing a request on the caller's thread: the prompt rendered and
//! tokenised, the image decoded and preprocessed, the policy built, the reservation
//! computed. Everything that can be wrong with a request is found here, before it reaches
//! the scheduler, and named with the field at fault.

use std::hash::{Hash, Hasher};
use std::time::Instant;

use ecache_core::{CachePolicy, PolicyConfig, Registry};
use ecache_model::preprocess::ImageLimits;
use ecache_model::{Content, Frontend, Role, Turn};

use crate::admission::{KvLayout, Waiting, reserved_slots};
use crate::engine::ModelInfo;
use crate::request::{Event, ImageInput, Part, Prompt, Request, SubmitError, Task};

/// Preprocessed pixels of one image and a hash of them (the key of the feature cache).
pub(crate) struct Pixels {
    pub pixels: ecache_model::Pixels,
    pub key: u64,
}

/// A checked request, ready for the scheduler.
pub(crate) struct Prepared {
    pub id: u64,
    pub ids: Vec<u32>,
    pub pixels: Option<Pixels>,
    pub prompt_tokens: usize,
    pub image_tokens: usize,
    pub policy: Box<dyn CachePolicy>,
    pub policy_config: PolicyConfig,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// The answer to score, for a score task.
    pub score: Option<Vec<u32>>,
    /// The most slots a layer can grow to, each layer's, and the bytes reserved.
    pub slots: usize,
    pub layer_slots: Vec<usize>,
    pub reservation: usize,
    pub submitted: Instant,
    pub tx: tokio::sync::mpsc::UnboundedSender<Event>,
}

impl Waiting for Prepared {
    fn reservation(&self) -> usize {
        self.reservation
    }
    fn wanted(&self) -> bool {
        !self.tx.is_closed()
    }
}

/// What checking a request needs.
pub(crate) struct Checker<'a> {
    pub frontend: &'a dyn Frontend,
    pub info: &'a ModelInfo,
    pub registry: &'a Registry,
    pub default_policy: &'a PolicyConfig,
    pub limits: &'a ImageLimits,
    pub layout: KvLayout,
    pub cap: usize,
}

impl Checker<'_> {
    pub fn prepare(
        &self,
        request: Request,
        id: u64,
        seed: u64,
        tx: tokio::sync::mpsc::UnboundedSender<Event>,
    ) -> Result<Prepared, SubmitError> {
        if request.max_new_tokens == 0 {
            return Err(SubmitError::invalid(
                "max_new_tokens must be at least 1",
                "max_new_tokens",
            ));
        }
        if !(request.temperature >= 0.0 && request.temperature.is_finite()) {
            return Err(SubmitError::invalid(
                format!("temperature {} must be 0 or more", request.temperature),
                "temperature",
            ));
        }
        if !(request.top_p > 0.0 && request.top_p <= 1.0) {
            return Err(SubmitError::invalid(
                format!("top_p {} must be in (0, 1]", request.top_p),
                "top_p",
            ));
        }
        let (text, image) = render(self.frontend, request.prompt, request.image)?;
        let pixels = image.map(|i| self.pixels(&i)).transpose()?;
        let images: Vec<&ecache_model::Pixels> = pixels.iter().map(|p| &p.pixels).collect();
        let ids = self
            .frontend
            .encode_prompt(&text, &images)
            .map_err(|e| SubmitError::invalid(e.to_string(), "prompt"))?;
        let image_tokens = images.iter().map(|p| p.tokens).sum();
        let prompt_tokens = ids.len();
        let context = self.info.context;
        let (score, max_new_tokens) = match request.task {
            Task::Generate if request.fit_context => (
                None,
                request
                    .max_new_tokens
                    .min(context.saturating_sub(prompt_tokens).max(1)),
            ),
            Task::Generate => (None, request.max_new_tokens),
            Task::Score { answer } => {
                let ids = self
                    .frontend
                    .tokenizer()
                    .encode_answer(&answer)
                    .map_err(|e| SubmitError::invalid(e.to_string(), "answer"))?;
                if ids.is_empty() {
                    return Err(SubmitError::invalid(
                        "the answer to score is empty",
                        "answer",
                    ));
                }
                let n = ids.len();
                (Some(ids), n)
            }
        };
        if prompt_tokens + max_new_tokens > context {
            let what = if score.is_some() {
                "answer tokens"
            } else {
                "new tokens"
            };
            return Err(SubmitError::invalid(
                format!(
                    "the prompt takes {prompt_tokens} tokens ({image_tokens} of them the image) and {max_new_tokens} {what} are asked for: {} tokens exceed the model's context of {context}",
                    prompt_tokens + max_new_tokens
                ),
                if prompt_tokens >= context {
                    "prompt"
                } else {
                    "max_new_tokens"
                },
            ));
        }
        let mut policy_config = self.policy_config(request.policy);
        let policy = self
            .registry
            .build(&policy_config)
            .map_err(|e| SubmitError::invalid(e.to_string(), "policy"))?;
        // A policy without a target keeps every slot: its budget is 1, whatever the
        // config said (the full cache under a config written for elastic at 0.2).
        if policy.keeps_everything() {
            policy_config.budget = 1.0;
        }
        let layer_slots = reserved_slots(
            policy.as_ref(),
            self.layout.layers,
            prompt_tokens,
            max_new_tokens,
        );
        let slots = layer_slots.iter().copied().max().unwrap_or(0);
        let reservation = self.layout.bytes_per_layer(&layer_slots);
        if reservation > self.cap {
            let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
            return Err(SubmitError::invalid(
                format!(
                    "{prompt_tokens} prompt tokens and up to {max_new_tokens} more need up to {slots} slots per layer ({:.2} MiB of KV cache) under policy `{}` at budget {}, more than the cap of {:.2} MiB",
                    mib(reservation),
                    policy_config.name,
                    policy_config.budget,
                    mib(self.cap)
                ),
                "max_new_tokens",
            ));
        }
        Ok(Prepared {
            id,
            ids,
            pixels,
            prompt_tokens,
            image_tokens,
            policy,
            policy_config,
            max_new_tokens,
            temperature: request.temperature,
            top_p: request.top_p,
            seed: request.seed.unwrap_or(seed),
            stop: request.stop,
            ignore_eos: request.ignore_eos,
            score,
            slots,
            layer_slots,
            reservation,
            submitted: Instant::now(),
            tx,
        })
    }

    /// The request's policy section: its own, else the engine's default. `full` always
    /// keeps everything (budget 1).
    fn policy_config(&self, own: Option<PolicyConfig>) -> PolicyConfig {
        let mut config = own.unwrap_or_else(|| self.default_policy.clone());
        if config.name == "full" {
            config.budget = 1.0;
        }
        config
    }

    fn pixels(&self, image: &ImageInput) -> Result<Pixels, SubmitError> {
        let pixels = match image {
            ImageInput::Path(path) => self.frontend.open(path),
            ImageInput::Bytes { data, name } => self.frontend.decode(data, name, self.limits),
        }
        .map_err(|e| SubmitError::invalid(e.to_string(), "image"))?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        pixels.shape.hash(&mut h);
        pixels.grid.hash(&mut h);
        for v in &pixels.data {
            v.to_bits().hash(&mut h);
        }
        Ok(Pixels {
            key: h.finish(),
            pixels,
        })
    }
}

/// The prompt text and its one image, if any.
fn render(
    frontend: &dyn Frontend,
    prompt: Prompt,
    image: Option<ImageInput>,
) -> Result<(String, Option<ImageInput>), SubmitError> {
    match prompt {
        Prompt::Text(text) => {
            if text.trim().is_empty() {
                return Err(SubmitError::invalid("the prompt is empty", "prompt"));
            }
            // A bare question gets the model's chat format (LLaVA leaves one without an
            // image as it is).
            let text = frontend
                .formatted(&text, usize::from(image.is_some()))
                .map_err(|e| SubmitError::invalid(e.to_string(), "prompt"))?;
            Ok((text, image))
        }
        Prompt::Chat(messages) => {
            if image.is_some() {
                return Err(SubmitError::invalid(
                    "a chat request carries its image in a message part",
                    "image",
                ));
            }
            if messages.is_empty() {
                return Err(SubmitError::invalid("no messages", "messages"));
            }
            if !messages.iter().any(|m| m.role == Role::User) {
                return Err(SubmitError::invalid("no user message", "messages"));
            }
            let mut images = Vec::new();
            let mut turns = Vec::with_capacity(messages.len());
            let marker = frontend.image_marker();
            for (i, message) in messages.into_iter().enumerate() {
                let mut turn = Turn {
                    role: message.role,
                    parts: Vec::new(),
                };
                for part in message.parts {
                    match part {
                        Part::Text(t) if t.contains(marker) => {
                            return Err(SubmitError::invalid(
                                format!(
                                    "message {i} contains the text `{marker}`, which this model reserves for the image; send the image as an image part"
                                ),
                                "messages",
                            ));
                        }
                        Part::Text(t) => turn.parts.push(Content::Text(t)),
                        Part::Image(image) => {
                            turn.parts.push(Content::Image);
                            images.push(image);
                        }
                    }
                }
                turns.push(turn);
            }
            if images.len() > 1 {
                return Err(SubmitError::invalid(
                    format!(
                        "{} images were sent; this model takes one image per request",
                        images.len()
                    ),
                    "messages",
                ));
            }
            if turns.iter().all(|t| t.texts().all(|x| x.trim().is_empty())) {
                return Err(SubmitError::invalid(
                    "the messages hold no text",
                    "messages",
                ));
            }
            let text = frontend
                .chat(&turns)
                .map_err(|e| SubmitError::invalid(e.to_string(), "messages"))?;
            Ok((text, images.pop()))
        }
    }
}
