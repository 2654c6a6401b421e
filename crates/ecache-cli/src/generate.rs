//! `ecache generate`: one image, one prompt, one policy; streams the answer and prints a
//! summary line.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use burn::tensor::{DType, Tensor, TensorData, backend::Backend};
use ecache_core::{CachePolicy, RunConfig};

use crate::backend::{BackendJob, dtype, on_backend};
use ecache_model::{
    Generation, ImageProcessor, Llava, LlavaConfig, PromptTokenizer, Sampling, Session,
    chat_prompt, generate, splice,
};

use crate::BadInput;

/// Everything one generation needs, resolved from flags and config.
pub struct GenerateRequest {
    pub model_dir: PathBuf,
    pub image: Option<PathBuf>,
    pub prompt: String,
    pub config: RunConfig,
    pub pad_to_square: bool,
}

/// Runs the request on the configured backend; with `full`, the same prompt is answered
/// again under the full cache and the memory each used is compared.
pub fn run(
    request: &GenerateRequest,
    policy: &dyn CachePolicy,
    full: Option<&dyn CachePolicy>,
) -> Result<()> {
    on_backend(
        request.config.model.backend,
        Job {
            request,
            policy,
            full,
        },
    )
}

struct Job<'a> {
    request: &'a GenerateRequest,
    policy: &'a dyn CachePolicy,
    full: Option<&'a dyn CachePolicy>,
}

impl BackendJob for Job<'_> {
    type Output = ();
    fn run<B: Backend>(self, device: &B::Device) -> Result<()> {
        run_on::<B>(self.request, self.policy, self.full, device)
    }
}

/// The prompt as the model sees it: the chat format around a bare question, or the text
/// as given when it already holds `<image>` or `USER:`.
pub fn format_prompt(prompt: &str, with_image: bool) -> String {
    if prompt.contains("<image>") || prompt.contains("USER:") || !with_image {
        prompt.to_string()
    } else {
        chat_prompt(prompt)
    }
}

/// Loads a model directory's weights and tokenizer; problems are the user's input.
pub fn load_model<B: Backend>(
    dir: &Path,
    device: &B::Device,
    dtype: DType,
) -> Result<(Llava<B>, LlavaConfig, PromptTokenizer)> {
    let (model, config) = Llava::<B>::load(dir, device, dtype)
        .map_err(|e| BadInput(format!("model {}: {e}", dir.display())))?;
    let tokenizer =
        PromptTokenizer::load(dir, config.image_token_id).map_err(|e| BadInput(e.to_string()))?;
    Ok((model, config, tokenizer))
}

fn run_on<B: Backend>(
    request: &GenerateRequest,
    policy: &dyn CachePolicy,
    full: Option<&dyn CachePolicy>,
    device: &B::Device,
) -> Result<()> {
    let dir = &request.model_dir;
    let dtype = dtype(request.config.model.dtype);
    let (model, config, tokenizer) = load_model::<B>(dir, device, dtype)?;
    let prompt = format_prompt(&request.prompt, request.image.is_some());
    let ids = tokenizer
        .encode_prompt(&prompt, request.image.is_some())
        .map_err(|e| BadInput(e.to_string()))?;
    // Refuse a prompt the model cannot hold before any work is done.
    let image_tokens = if request.image.is_some() {
        config.image_tokens()
    } else {
        0
    };
    let prompt_tokens = tokenizer.sequence_len(&ids, image_tokens);
    if prompt_tokens > config.text.max_positions {
        return Err(BadInput(format!(
            "the prompt takes {prompt_tokens} tokens ({image_tokens} of them the image) but the model's context is {} tokens (max_position_embeddings)",
            config.text.max_positions
        ))
        .into());
    }
    let features = match &request.image {
        Some(path) => Some(image_features(
            &model,
            &image_processor(dir, request.pad_to_square)?,
            path,
            device,
            dtype,
        )?),
        None => None,
    };
    let (embeds, kinds) = splice(&model, &ids, config.image_token_id, features, device);
    let g = &request.config.generation;
    let sampling = Sampling {
        max_new_tokens: g.max_new_tokens,
        temperature: g.temperature,
        top_p: g.top_p,
        seed: g.seed,
    };
    if full.is_some() {
        if let Some(image) = &request.image {
            println!("image:    {}", image.display());
        }
        println!("question: {}", request.prompt);
    }
    let answer = |policy: &dyn CachePolicy, budget: f64| -> Result<Generation> {
        let mut session = Session::new(
            &model.decoder,
            &config.text,
            policy,
            request.config.policy.positions,
            1,
            device,
            dtype,
        );
        if full.is_some() {
            print!("{} (budget {budget}): ", policy.name());
        }
        let mut printed = String::new();
        let mut tokens = Vec::new();
        let mut stdout = std::io::stdout();
        let result = generate(
            &mut session,
            embeds.clone(),
            &kinds,
            &sampling,
            &config.text.eos_token_ids,
            |t| {
                tokens.push(t);
                if let Ok(text) = tokenizer.decode(&tokens) {
                    if let Some(new) = text.strip_prefix(printed.as_str()) {
                        let _ = write!(stdout, "{new}");
                        let _ = stdout.flush();
                    }
                    printed = text;
                }
            },
        )
        .map_err(|e| BadInput(e.to_string()))?;
        println!();
        println!("{}", summary(policy.name(), budget, &result));
        Ok(result)
    };
    let ours = answer(policy, request.config.policy.budget)?;
    if let Some(full) = full {
        let reference = answer(full, 1.0)?;
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        // Compare at the same number of tokens: the two answers may differ in length.
        let per_slot = reference.kv_bytes as f64 / reference.slots_per_layer[0].max(1) as f64;
        let seen = ours.prompt_tokens + ours.tokens.len().saturating_sub(1);
        let full_bytes = per_slot * seen as f64;
        println!(
            "memory: after the same {seen} tokens, {} holds {:.3} MiB of KV cache and the full cache {:.3} MiB: {:.0}% saved",
            policy.name(),
            mib(ours.kv_bytes),
            full_bytes / (1024.0 * 1024.0),
            100.0 * (1.0 - ours.kv_bytes as f64 / full_bytes.max(1.0))
        );
    }
    Ok(())
}

/// The one-line account of a generation.
fn summary(policy: &str, budget: f64, result: &Generation) -> String {
    let slots = &result.slots_per_layer;
    let (lo, hi) = (
        slots.iter().min().unwrap_or(&0),
        slots.iter().max().unwrap_or(&0),
    );
    let per_second = if result.decode_seconds > 0.0 {
        result.tokens.len() as f64 / result.decode_seconds
    } else {
        0.0
    };
    format!(
        "[{policy} budget {budget}] prompt tokens {} (image {}), new tokens {}, slots per layer {}{}, KV {:.2} MiB, prefill {:.2} s, {:.1} tokens/s",
        result.prompt_tokens,
        result.image_tokens,
        result.tokens.len(),
        lo,
        if lo == hi {
            String::new()
        } else {
            format!("..{hi}")
        },
        result.kv_bytes as f64 / (1024.0 * 1024.0),
        result.prefill_seconds,
        per_second,
    )
}

/// The model directory's image processor, padding to a square or not.
pub fn image_processor(dir: &Path, pad_to_square: bool) -> Result<ImageProcessor> {
    let mut processor = ImageProcessor::load(dir).map_err(|e| BadInput(e.to_string()))?;
    processor.pad_to_square = pad_to_square;
    Ok(processor)
}

/// Preprocesses an image file and runs the vision tower and projector.
pub fn image_features<B: Backend>(
    model: &Llava<B>,
    processor: &ImageProcessor,
    image: &Path,
    device: &B::Device,
    dtype: DType,
) -> Result<Tensor<B, 3>> {
    let (pixels, [c, h, w]) = processor.open(image).map_err(|e| BadInput(e.to_string()))?;
    let pixels = Tensor::<B, 4>::from_data(TensorData::new(pixels, [1, c, h, w]), (device, dtype));
    Ok(model.image_features(pixels))
}
