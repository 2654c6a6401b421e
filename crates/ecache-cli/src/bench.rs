//! `ecache bench`: the latency protocol on randomly initialised weights of a named shape.
//!
//! One invocation builds one decoder (random weights created on the device in the target
//! dtype), then runs the full cache and every requested policy and budget over the same
//! prompt: prefill, then `gen_len` greedy decode steps. The full cache always runs first,
//! so each policy's figures are ratios against a baseline measured in the same process.
//! The vision tower is not run: the prompt's embeddings are those of random token ids,
//! laid out as the architecture's chat prompt lays them out (a text head, the image's
//! tokens, the question), so that the policies see image and text slots where a real
//! prompt has them; a Qwen2-VL shape places them with multimodal RoPE as a 672 x 672
//! picture would be (24 x 24 merged cells: 576 image tokens, as LLaVA-1.5's).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::{DType, Int, Tensor, TensorData, backend::Backend};
use ecache_core::{CachePolicy, PolicyConfig, PositionMode, SlotKind};
use ecache_model::config::LlamaConfig;
use ecache_model::qwen::QwenVlConfig;
use ecache_model::{Architecture, LlavaConfig, Prompt, Session, llama::LlamaDecoder};
use serde::Serialize;

use crate::BadInput;
use crate::backend::BackendJob;
use crate::eval::{params_label, write_atomically};
use crate::policies::builtin_registry;

/// Text tokens before the image in LLaVA-1.5's prompt (`<s> USER :` and the newline).
const TEXT_HEAD: usize = 5;

/// Text tokens before the image in Qwen2-VL's chat prompt: `<|im_start|>system\nYou are
/// a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>` under its tokenizer.
const QWEN_TEXT_HEAD: usize = 15;

/// Merged cells per side of the picture a Qwen2-VL shape is measured with.
const QWEN_CELLS: usize = 24;

/// The shapes `--shape` knows by name, as Hugging Face `config.json` texts.
const SHAPES: &[(&str, &str)] = &[
    ("llava-1.5-7b", include_str!("../shapes/llava-1.5-7b.json")),
    (
        "llava-1.5-13b",
        include_str!("../shapes/llava-1.5-13b.json"),
    ),
    ("llava-mid", include_str!("../shapes/llava-mid.json")),
    // The published Qwen2-VL-7B-Instruct and Qwen2.5-VL-7B-Instruct configs (one decoder:
    // the bench does not run the towers, where they differ).
    ("qwen2-vl-7b", include_str!("../shapes/qwen2-vl-7b.json")),
    // Qwen2-VL's decoder (GQA 8:1, biases on q, k, v, multimodal RoPE, vocabulary 152,064)
    // at llava-mid's width and depth: a size whose f32 weights fit beside transformers'.
    ("qwen2-vl-mid", include_str!("../shapes/qwen2-vl-mid.json")),
    (
        "qwen2.5-vl-7b",
        include_str!("../shapes/qwen2.5-vl-7b.json"),
    ),
    // A LLaMA decoder (1024 wide, 8 layers, MHA, vocabulary 32,000) with a vision tower
    // of 4 image tokens: a text model's decode.
    (
        "llama-h1024x8",
        include_str!("../shapes/llama-h1024x8.json"),
    ),
];

/// What the protocol needs of a shape: its decoder and where a prompt puts the image.
#[derive(Debug, Clone)]
pub struct BenchShape {
    pub architecture: Architecture,
    pub text: LlamaConfig,
    /// Image slots in the prompt.
    pub image_tokens: usize,
    /// Text slots before the image.
    pub text_head: usize,
    /// Multimodal RoPE (Qwen2-VL): the picture's patch grid, the merge size and the image
    /// token's id.
    pub mrope: Option<([usize; 3], usize, u32)>,
}

impl BenchShape {
    /// The shape a `config.json` text describes; `source` names it in errors.
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        let bad = |e: ecache_model::ModelError| BadInput(e.to_string());
        Ok(match Architecture::of_json(text, source).map_err(bad)? {
            Architecture::Llava => {
                let c = LlavaConfig::from_json(text, source).map_err(bad)?;
                Self {
                    architecture: Architecture::Llava,
                    image_tokens: c.image_tokens(),
                    text: c.text,
                    text_head: TEXT_HEAD,
                    mrope: None,
                }
            }
            arch => {
                let c = QwenVlConfig::from_json(text, source).map_err(bad)?;
                let merge = c.vision.merge;
                let side = QWEN_CELLS * merge;
                Self {
                    architecture: arch,
                    text: c.text,
                    image_tokens: QWEN_CELLS * QWEN_CELLS,
                    text_head: QWEN_TEXT_HEAD,
                    mrope: Some(([1, side, side], merge, c.image_token_id)),
                }
            }
        })
    }

    /// Each prompt slot's multimodal RoPE position, for a Qwen2-VL shape.
    fn rope(&self, prompt_len: usize) -> Result<Option<Vec<[usize; 3]>>> {
        let Some((grid, merge, image)) = self.mrope else {
            return Ok(None);
        };
        let ids: Vec<u32> = prompt_kinds(prompt_len, self.text_head, self.image_tokens)
            .iter()
            .map(|k| if *k == SlotKind::Image { image } else { 0 })
            .collect();
        let (positions, _) = ecache_model::qwen::mrope_positions(&ids, image, &[grid], merge)?;
        Ok(Some(positions))
    }
}

/// A named shape, or the `config.json` at a path (of any supported architecture).
pub fn resolve_shape(shape: &str) -> Result<BenchShape> {
    if let Some((name, text)) = SHAPES.iter().find(|(n, _)| *n == shape) {
        return BenchShape::from_json(text, name);
    }
    let path = Path::new(shape);
    let path = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    if !path.exists() {
        let known: Vec<_> = SHAPES.iter().map(|(n, _)| *n).collect();
        return Err(BadInput(format!(
            "--shape {shape}: neither a known shape ({}) nor a config.json or model directory",
            known.join(", ")
        ))
        .into());
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| BadInput(format!("--shape {}: {e}", path.display())))?;
    BenchShape::from_json(&text, &path.display().to_string())
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchRequest {
    pub shape_name: String,
    pub shape: BenchShape,
    pub batch: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    /// Runs after the full cache (a `full` entry here is not repeated).
    pub runs: Vec<PolicyConfig>,
    pub dtype: DType,
    /// Untimed runs of the whole protocol with the full cache before the timed ones.
    pub warmup: usize,
    pub seed: u64,
}

/// One policy's figures, and its ratios against the full cache of the same invocation.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub policy: String,
    pub budget: f64,
    pub params: String,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Generated tokens per second over the decode steps, all sequences together.
    pub decode_tokens_per_second: f64,
    pub ms_per_step: f64,
    /// Keys and values held by every layer after the last step.
    pub kv_bytes_end: usize,
    /// Peak resident memory of the process during this run (CPU backends, Linux).
    pub peak_rss_bytes: Option<u64>,
    /// Full cache's ms per step over this run's (above 1: faster).
    pub decode_speedup: f64,
    /// Full cache's prefill time over this run's.
    pub prefill_speedup: f64,
    /// This run's KV bytes at the end over the full cache's.
    pub kv_ratio: f64,
    /// Bytes a decode step reads: the decoder's weights (the embedding table but the rows
    /// looked up) and the keys and values held, averaged over the steps.
    pub bytes_per_step: f64,
    /// Those bytes per step time, as a share of the machine's measured bandwidth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth_share: Option<f64>,
}

/// The whole measurement, as written to JSON.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub shape: String,
    /// Where it ran.
    pub machine: crate::machine::Machine,
    pub backend: String,
    pub dtype: String,
    pub batch: usize,
    pub prompt_len: usize,
    pub image_tokens: usize,
    pub gen_len: usize,
    pub parameters: usize,
    pub rows: Vec<BenchRow>,
}

/// Checks the protocol against the shape before any weight is created.
pub fn check_request(request: &BenchRequest) -> Result<usize> {
    let (image, head) = (request.shape.image_tokens, request.shape.text_head);
    let text = &request.shape.text;
    if request.batch == 0 || request.gen_len == 0 {
        return Err(BadInput("--batch and --gen-len must be at least 1".into()).into());
    }
    if request.prompt_len < head + image + 1 {
        return Err(BadInput(format!(
            "--prompt-len {} is shorter than the {} prompt layout: {head} text tokens, the image's {image} tokens and at least one more",
            request.prompt_len,
            request.shape.architecture.model_type()
        ))
        .into());
    }
    if request.prompt_len + request.gen_len > text.max_positions {
        return Err(BadInput(format!(
            "--prompt-len {} plus --gen-len {} exceed the shape's context of {} tokens (max_position_embeddings)",
            request.prompt_len, request.gen_len, text.max_positions
        ))
        .into());
    }
    Ok(image)
}

/// Parameters of the decoder (embeddings and LM head included).
pub fn decoder_parameters(t: &LlamaConfig) -> usize {
    let (h, q, kv) = (t.hidden, t.heads * t.head_dim, t.kv_heads * t.head_dim);
    let bias = if t.qkv_bias { q + 2 * kv } else { 0 };
    let layer = h * q * 2 + h * kv * 2 + 3 * h * t.intermediate + 2 * h + bias;
    let head = if t.tie_word_embeddings {
        0
    } else {
        t.vocab_size * h
    };
    t.layers * layer + t.vocab_size * h + head + h
}

impl BackendJob for BenchRequest {
    type Output = BenchReport;

    fn run<B: ecache_model::kernels::KernelBackend>(
        self,
        device: &B::Device,
    ) -> Result<BenchReport> {
        let image_tokens = check_request(&self)?;
        // Measured before any weight exists, so the triad has the memory to itself.
        let machine = crate::machine::Machine::measured();
        let registry = builtin_registry()?;
        let mut configs = vec![PolicyConfig::new("full", 1.0)];
        configs.extend(self.runs.iter().filter(|r| r.name != "full").cloned());
        let policies = configs
            .iter()
            .map(|c| {
                registry
                    .build(c)
                    .map_err(|e| BadInput(e.to_string()).into())
            })
            .collect::<Result<Vec<Box<dyn CachePolicy>>>>()?;
        let text = &self.shape.text;
        let decoder = LlamaDecoder::<B>::init(text, device, self.dtype, self.seed);
        let kinds = prompt_kinds(self.prompt_len, self.shape.text_head, image_tokens);
        let rope = self.shape.rope(self.prompt_len)?;
        let ids = random_ids(self.batch, self.prompt_len, text.vocab_size, self.seed);
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids, [self.batch, self.prompt_len]),
            device,
        );
        for _ in 0..self.warmup {
            let prompt = (&ids, &kinds[..], rope.as_deref());
            run_once(&self, &decoder, policies[0].as_ref(), prompt, device)?;
        }
        let mut rows: Vec<BenchRow> = Vec::new();
        for (config, policy) in configs.iter().zip(&policies) {
            let prompt = (&ids, &kinds[..], rope.as_deref());
            let mut row = run_once(&self, &decoder, policy.as_ref(), prompt, device)?;
            row.budget = config.budget;
            row.params = params_label(config);
            let (ms, prefill, kv) = rows.first().map_or(
                (row.ms_per_step, row.prefill_seconds, row.kv_bytes_end),
                |f| (f.ms_per_step, f.prefill_seconds, f.kv_bytes_end),
            );
            row.decode_speedup = ms / row.ms_per_step;
            row.prefill_speedup = prefill / row.prefill_seconds;
            row.kv_ratio = row.kv_bytes_end as f64 / kv.max(1) as f64;
            let weights =
                (decoder_parameters(text) - text.vocab_size * text.hidden) * self.dtype.size();
            row.bytes_per_step += weights as f64;
            row.bandwidth_share = machine
                .bandwidth_gb_s
                .map(|gb_s| row.bytes_per_step / (row.ms_per_step * 1e-3) / (gb_s * 1e9));
            tracing::info!(policy = %row.policy, budget = row.budget, ms_per_step = row.ms_per_step, "bench run");
            rows.push(row);
        }
        Ok(BenchReport {
            shape: self.shape_name.clone(),
            machine: machine.clone(),
            backend: std::any::type_name::<B>()
                .rsplit("::")
                .next()
                .unwrap_or("?")
                .to_string(),
            dtype: format!("{:?}", self.dtype),
            batch: self.batch,
            prompt_len: self.prompt_len,
            image_tokens,
            gen_len: self.gen_len,
            parameters: decoder_parameters(text),
            rows,
        })
    }
}

/// The prompt's token ids, slot kinds and multimodal RoPE positions (if any).
type BenchPrompt<'a, B> = (
    &'a Tensor<B, 2, Int>,
    &'a [SlotKind],
    Option<&'a [[usize; 3]]>,
);

/// One timed pass of the protocol under `policy`.
fn run_once<B: ecache_model::kernels::KernelBackend>(
    request: &BenchRequest,
    decoder: &LlamaDecoder<B>,
    policy: &dyn CachePolicy,
    (ids, kinds, rope): BenchPrompt<'_, B>,
    device: &B::Device,
) -> Result<BenchRow> {
    let mut session = Session::new(
        decoder,
        &request.shape.text,
        policy,
        PositionMode::Absolute,
        request.batch,
        device,
        request.dtype,
    );
    reset_peak_rss();
    let start = Instant::now();
    let prompt = Prompt {
        embeds: decoder.embed(ids.clone()),
        kinds: kinds.to_vec(),
        rope: rope.map(<[_]>::to_vec),
    };
    let mut next = greedy(session.prefill_prompt_last(prompt)?)?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    let kv_after_prefill = session.kv_bytes();
    let start = Instant::now();
    for _ in 0..request.gen_len {
        next = greedy(session.step(&next)?)?;
    }
    let decode_seconds = start.elapsed().as_secs_f64();
    let steps = request.gen_len as f64;
    Ok(BenchRow {
        policy: policy.name().to_string(),
        budget: 1.0,
        params: String::new(),
        prefill_seconds,
        decode_seconds,
        decode_tokens_per_second: steps * request.batch as f64 / decode_seconds,
        ms_per_step: decode_seconds * 1e3 / steps,
        kv_bytes_end: session.kv_bytes(),
        peak_rss_bytes: peak_rss(),
        decode_speedup: 1.0,
        prefill_speedup: 1.0,
        kv_ratio: 1.0,
        // The caller adds the weights; the keys and values read, averaged over the steps.
        bytes_per_step: (kv_after_prefill + session.kv_bytes()) as f64 / 2.0,
        bandwidth_share: None,
    })
}

/// Argmax of each row, read back to the host (which waits for the device).
///
/// # Shapes
/// - `logits`: `[batch, vocab]`
fn greedy<B: Backend>(logits: Tensor<B, 2>) -> Result<Vec<u32>> {
    let data = logits.argmax(1).into_data().convert::<i64>();
    let ids = data
        .into_vec::<i64>()
        .map_err(|e| anyhow::anyhow!("reading argmax: {e:?}"))?;
    Ok(ids.into_iter().map(|i| i as u32).collect())
}

/// A chat prompt's layout: `text_head` text slots, the image's slots, then text.
pub fn prompt_kinds(prompt_len: usize, text_head: usize, image_tokens: usize) -> Vec<SlotKind> {
    (0..prompt_len)
        .map(|i| {
            if (text_head..text_head + image_tokens).contains(&i) {
                SlotKind::Image
            } else {
                SlotKind::Text
            }
        })
        .collect()
}

/// Reproducible token ids in `0..vocab` (a small LCG: the values only need to vary).
fn random_ids(batch: usize, len: usize, vocab: usize, seed: u64) -> Vec<i64> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..batch * len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % vocab as u64) as i64
        })
        .collect()
}

/// Resets the kernel's peak-RSS counter of this process (Linux; elsewhere a no-op).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory since the last reset (`VmHWM`), where the OS reports it.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A markdown table of the report.
pub fn table(report: &BenchReport) -> String {
    let m = &report.machine;
    let mut out = format!(
        "{} ({} threads, {}), memory bandwidth {} (triad)\n",
        m.cpu,
        m.threads,
        m.simd,
        m.bandwidth_gb_s
            .map_or("not measured".to_string(), |b| format!("{b:.1} GB/s"))
    );
    out += &format!(
        "shape {} ({:.1} M decoder parameters), {} {}, batch {}, prompt {} ({} image tokens), {} decode steps\n\n",
        report.shape,
        report.parameters as f64 / 1e6,
        report.backend,
        report.dtype,
        report.batch,
        report.prompt_len,
        report.image_tokens,
        report.gen_len
    );
    out.push_str("| policy | budget | params | prefill s | decode tok/s | ms/step | GB read per step | share of bandwidth | KV MiB at end | peak RSS MiB | decode vs full | prefill vs full | KV vs full |\n");
    out.push_str("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in &report.rows {
        let rss = r
            .peak_rss_bytes
            .map_or("-".to_string(), |b| format!("{:.0}", b as f64 / 1048576.0));
        out.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.2} | {:.2} | {:.3} | {} | {:.1} | {rss} | {:.2}x | {:.2}x | {:.2} |\n",
            r.policy,
            r.budget,
            r.params,
            r.prefill_seconds,
            r.decode_tokens_per_second,
            r.ms_per_step,
            r.bytes_per_step / 1e9,
            r.bandwidth_share
                .map_or("-".to_string(), |s| format!("{:.0}%", s * 100.0)),
            r.kv_bytes_end as f64 / 1048576.0,
            r.decode_speedup,
            r.prefill_speedup,
            r.kv_ratio
        ));
    }
    out
}

/// Writes the report as JSON (atomically) when `output` is given.
pub fn write(report: &BenchReport, output: Option<&PathBuf>) -> Result<()> {
    if let Some(path) = output {
        let text = serde_json::to_string_pretty(report)?;
        write_atomically(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_shapes_match_the_published_sizes() {
        let seven = resolve_shape("llava-1.5-7b").unwrap();
        assert_eq!(seven.image_tokens, 576);
        // LLaVA-1.5-7B's language model: 6.74 B parameters with its 32,064-token vocabulary.
        let p = decoder_parameters(&seven.text) as f64 / 1e9;
        assert!((p - 6.74).abs() < 0.01, "{p}");
        let thirteen = resolve_shape("llava-1.5-13b").unwrap();
        let p = decoder_parameters(&thirteen.text) as f64 / 1e9;
        assert!((p - 13.02).abs() < 0.02, "{p}");
        // Qwen2-VL-7B's language model: 7.62 B parameters (Qwen2-7B's count: biases on q, k
        // and v, an untied 152,064-token head), read from the published config.
        for (name, arch) in [
            ("qwen2-vl-7b", Architecture::Qwen2Vl),
            ("qwen2.5-vl-7b", Architecture::Qwen25Vl),
        ] {
            let qwen = resolve_shape(name).unwrap();
            assert_eq!(qwen.architecture, arch);
            assert_eq!(qwen.text.mrope_section, Some([16, 24, 24]));
            assert_eq!((qwen.text.kv_heads, qwen.text.head_dim), (4, 128));
            assert_eq!(qwen.text.rope_theta, 1e6);
            assert_eq!(qwen.image_tokens, 576);
            let p = decoder_parameters(&qwen.text) as f64 / 1e9;
            assert!((p - 7.62).abs() < 0.01, "{name}: {p}");
        }
    }

    #[test]
    fn prompt_layout_puts_the_image_after_the_text_head() {
        let kinds = prompt_kinds(10, 5, 3);
        let image: Vec<usize> = (0..10).filter(|&i| kinds[i] == SlotKind::Image).collect();
        assert_eq!(image, vec![5, 6, 7]);
    }

    /// A Qwen2-VL shape's prompt: 15 text slots at 0..15 on every axis, the 24 x 24 cells
    /// at (15, 15 + row, 15 + column), the text after them from 15 + 24 on.
    #[test]
    fn a_qwen_prompt_places_the_picture_with_multimodal_rope() {
        let shape = resolve_shape("qwen2-vl-7b").unwrap();
        let rope = shape.rope(600).unwrap().unwrap();
        assert_eq!(rope.len(), 600);
        assert_eq!(rope[14], [14; 3]);
        assert_eq!(rope[15], [15, 15, 15]);
        assert_eq!(rope[15 + 24 + 5], [15, 16, 20]);
        assert_eq!(rope[15 + 576 - 1], [15, 38, 38]);
        assert_eq!(rope[15 + 576], [39; 3]);
        assert_eq!(rope[599], [39 + 8; 3]);
        assert!(
            resolve_shape("llava-mid")
                .unwrap()
                .rope(600)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_protocol_longer_than_the_context_is_refused_naming_both_numbers() {
        let request = BenchRequest {
            shape_name: "llava-1.5-7b".into(),
            shape: resolve_shape("llava-1.5-7b").unwrap(),
            batch: 1,
            prompt_len: 4000,
            gen_len: 512,
            runs: vec![],
            dtype: DType::F16,
            warmup: 0,
            seed: 0,
        };
        let e = check_request(&request).unwrap_err().to_string();
        assert!(e.contains("4000") && e.contains("4096"), "{e}");
        let short = BenchRequest {
            prompt_len: 100,
            ..request
        };
        let e = check_request(&short).unwrap_err().to_string();
        assert!(e.contains("576"), "{e}");
    }

    #[test]
    fn an_unknown_shape_lists_the_known_ones() {
        let e = resolve_shape("llava-9b").unwrap_err().to_string();
        assert!(e.contains("llava-1.5-7b") && e.contains("llava-9b"), "{e}");
    }
}
