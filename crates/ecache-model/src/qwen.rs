//! Qwen2-VL: its `config.json`, where its multimodal RoPE places each prompt token, and
//! the image features put in place of the image pad tokens. The decoder is the LLaMA one
//! with biases on the query, key and value projections ([`crate::config::TextKind`]); the
//! vision tower is [`crate::qwen_vision`].

use std::path::Path;

use serde::Deserialize;

use crate::config::{Activation, HfLlamaConfig, LlamaConfig, TextKind};
use crate::error::{ModelError, Result};
use crate::prompt::{Content, Role, Turn};

/// A Qwen2-VL `config.json` (transformers 5 nests the decoder in `text_config`; older
/// configs keep its keys at the top level).
#[derive(Debug, Clone, Deserialize)]
struct HfQwenVlConfig {
    #[serde(default)]
    text_config: Option<HfLlamaConfig>,
    vision_config: HfQwenVisionConfig,
    #[serde(default = "d_image")]
    image_token_id: u32,
    #[serde(default = "d_start")]
    vision_start_token_id: u32,
    #[serde(default = "d_end")]
    vision_end_token_id: u32,
    #[serde(default)]
    tie_word_embeddings: bool,
}

fn d_image() -> u32 {
    151_655
}
fn d_start() -> u32 {
    151_652
}
fn d_end() -> u32 {
    151_653
}

/// The validated Qwen2-VL configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct QwenVlConfig {
    pub text: LlamaConfig,
    pub vision: QwenVisionConfig,
    pub image_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
}

impl QwenVlConfig {
    /// Reads and validates `config.json`.
    pub fn from_path(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses and validates the text of a `config.json`; `source` names it in errors.
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        let bad = |m: String| ModelError::Config(format!("{source}: {m}"));
        let raw: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let hf: HfQwenVlConfig =
            serde_json::from_value(raw.clone()).map_err(|e| bad(e.to_string()))?;
        let text_config = match hf.text_config {
            Some(t) => t,
            None => serde_json::from_value(raw).map_err(|e| bad(e.to_string()))?,
        };
        let text = text_config
            .validate(hf.tie_word_embeddings, TextKind::Qwen2Vl)
            .map_err(|e| match e {
                ModelError::Config(m) => bad(m),
                other => other,
            })?;
        let vision = hf.vision_config.validate().map_err(bad)?;
        if vision.out != text.hidden {
            return Err(bad(format!(
                "vision_config.hidden_size {} is not the decoder's width {}",
                vision.out, text.hidden
            )));
        }
        for (name, id) in [
            ("image_token_id", hf.image_token_id),
            ("vision_start_token_id", hf.vision_start_token_id),
            ("vision_end_token_id", hf.vision_end_token_id),
        ] {
            if id as usize >= text.vocab_size {
                return Err(bad(format!(
                    "{name} {id} is outside the vocabulary of {}",
                    text.vocab_size
                )));
            }
        }
        Ok(Self {
            text,
            vision,
            image_token_id: hf.image_token_id,
            vision_start_token_id: hf.vision_start_token_id,
            vision_end_token_id: hf.vision_end_token_id,
        })
    }
}

/// The system message Qwen2-VL's chat template puts first when a conversation has none.
pub const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

/// The text that stands for one picture in a rendered prompt; [`encode_prompt`] expands
/// its `<|image_pad|>` to the picture's tokens.
pub const PICTURE: &str = "<|vision_start|><|image_pad|><|vision_end|>";

/// The prompt Qwen2-VL's chat template renders for one user turn of `images` pictures
/// followed by `question`, with the assistant's turn opened.
pub fn chat_prompt(question: &str, images: usize) -> String {
    chat_template(&[Turn::question(question, images)])
}

/// Qwen2-VL's published chat template (ChatML, `add_vision_id` off) with the assistant's
/// turn opened: [`DEFAULT_SYSTEM`] first when the first turn is not a system one, then
/// each turn as `<|im_start|>role\n`, its parts in order (a picture as [`PICTURE`]) and
/// `<|im_end|>\n`.
pub fn chat_template(turns: &[Turn]) -> String {
    let mut out = String::new();
    for (i, turn) in turns.iter().enumerate() {
        if i == 0 && turn.role != Role::System {
            out.push_str(&format!("<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"));
        }
        out.push_str(&format!("<|im_start|>{}\n", turn.role.as_str()));
        for part in &turn.parts {
            match part {
                Content::Image => out.push_str(PICTURE),
                Content::Text(t) => out.push_str(t),
            }
        }
        out.push_str("<|im_end|>\n");
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

/// Encodes a rendered prompt (no special tokens added: Qwen has no BOS) with its `i`-th
/// `<|image_pad|>` repeated `image_tokens[i]` times, as transformers' processor expands
/// it; a count of pads other than the images' is an error.
pub fn encode_prompt(
    tokenizer: &crate::PromptTokenizer,
    text: &str,
    image_token: u32,
    image_tokens: &[usize],
) -> Result<Vec<u32>> {
    let ids = tokenizer.encode(text, false)?;
    let pads = ids.iter().filter(|&&i| i == image_token).count();
    if pads != image_tokens.len() {
        return Err(ModelError::Prompt(format!(
            "the prompt has {pads} image pad token(s) for {} image(s)",
            image_tokens.len()
        )));
    }
    Ok(crate::prompt::expand_image_tokens(
        ids,
        image_token,
        image_tokens,
    ))
}

/// Where multimodal RoPE places each token of a prompt, and the offset (`rope_deltas`) at
/// which the tokens after it continue: text runs on from the last position on all three
/// axes; each run of image tokens is one image of `grids` (in order, `(t, h, w)` in
/// patches before merging), its tokens at (start, start + row, start + column) of the
/// merged grid, and the text after it starts at start + the merged grid's larger side.
/// This is transformers' `get_rope_index` for still images.
pub fn mrope_positions(
    ids: &[u32],
    image_token: u32,
    grids: &[[usize; 3]],
    merge: usize,
) -> Result<(Vec<[usize; 3]>, i64)> {
    let mut out = Vec::with_capacity(ids.len());
    let mut next = 0usize;
    let mut images = grids.iter();
    let mut i = 0;
    while i < ids.len() {
        if ids[i] != image_token {
            out.push([next; 3]);
            next += 1;
            i += 1;
            continue;
        }
        let [t, h, w] = *images.next().ok_or_else(|| {
            ModelError::Prompt(format!(
                "the prompt has more images than the {} grids given",
                grids.len()
            ))
        })?;
        let (mh, mw) = (h / merge, w / merge);
        let tokens = t * mh * mw;
        if ids[i..].len() < tokens || ids[i..i + tokens].iter().any(|&id| id != image_token) {
            return Err(ModelError::Prompt(format!(
                "an image of grid {:?} needs {tokens} image tokens in a row",
                [t, h, w]
            )));
        }
        for ti in 0..t {
            for r in 0..mh {
                for c in 0..mw {
                    out.push([next + ti, next + r, next + c]);
                }
            }
        }
        next += mh.max(mw);
        i += tokens;
    }
    if images.next().is_some() {
        return Err(ModelError::Prompt(
            "more image grids than images in the prompt".into(),
        ));
    }
    let max = out.iter().flatten().copied().max().map_or(0, |m| m + 1);
    Ok((out, max as i64 - ids.len() as i64))
}

/// `vision_config` of a Qwen2-VL or Qwen2.5-VL `config.json`, with transformers'
/// defaults. The two name the widths differently: Qwen2-VL's `embed_dim` is the tower's and
/// `hidden_size` the decoder's; Qwen2.5-VL's `hidden_size` is the tower's and
/// `out_hidden_size` the decoder's.
#[derive(Debug, Clone, Deserialize)]
pub struct HfQwenVisionConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub out_hidden_size: Option<usize>,
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    #[serde(default)]
    pub window_size: Option<usize>,
    #[serde(default)]
    pub fullatt_block_indexes: Option<Vec<usize>>,
    #[serde(default = "d_depth")]
    pub depth: usize,
    #[serde(default = "d_embed")]
    pub embed_dim: usize,
    /// The decoder's width: what the merger produces.
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "d_heads")]
    pub num_heads: usize,
    #[serde(default = "d_channels")]
    pub in_channels: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_two")]
    pub spatial_merge_size: usize,
    #[serde(default = "d_two")]
    pub temporal_patch_size: usize,
    #[serde(default)]
    pub rope_parameters: Option<HfAxialRope>,
}

/// The vision tower's rotary parameters.
#[derive(Debug, Clone, Deserialize)]
pub struct HfAxialRope {
    #[serde(default = "d_theta")]
    pub rope_theta: f64,
}

fn d_depth() -> usize {
    32
}
fn d_embed() -> usize {
    1280
}
fn d_hidden() -> usize {
    3584
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_ratio() -> f64 {
    4.0
}
fn d_heads() -> usize {
    16
}
fn d_channels() -> usize {
    3
}
fn d_patch() -> usize {
    14
}
fn d_two() -> usize {
    2
}
fn d_theta() -> f64 {
    10_000.0
}

/// Which tower.
#[derive(Debug, Clone, PartialEq)]
pub enum VisionVariant {
    /// Qwen2-VL: LayerNorm, plain MLP, attention over the whole picture.
    Qwen2,
    /// Qwen2.5-VL: RMSNorm, gated MLP, attention within windows of `window` x `window`
    /// merge groups except in the `full` blocks.
    Qwen25 { window: usize, full: Vec<usize> },
}

/// The validated vision configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct QwenVisionConfig {
    pub variant: VisionVariant,
    pub depth: usize,
    pub embed: usize,
    pub out: usize,
    pub heads: usize,
    pub mlp: usize,
    pub activation: Activation,
    pub channels: usize,
    pub temporal: usize,
    pub patch: usize,
    /// Values per patch row: `channels * temporal * patch^2`.
    pub patch_values: usize,
    pub merge: usize,
    pub theta: f64,
}

impl HfQwenVisionConfig {
    /// Checks the numbers; errors name the field.
    pub fn validate(&self) -> std::result::Result<QwenVisionConfig, String> {
        let qwen25 = self.model_type.as_deref() == Some("qwen2_5_vl_vision")
            || self.out_hidden_size.is_some();
        // Qwen2.5-VL: the tower's width is `hidden_size`, the decoder's `out_hidden_size`.
        let (embed_dim, out) = if qwen25 {
            (
                self.hidden_size,
                self.out_hidden_size.unwrap_or(self.hidden_size),
            )
        } else {
            (self.embed_dim, self.hidden_size)
        };
        let variant = if qwen25 {
            let unit = self.patch_size * self.spatial_merge_size;
            let size = self.window_size.unwrap_or(112);
            if unit == 0 || size == 0 || !size.is_multiple_of(unit) {
                return Err(format!(
                    "vision_config.window_size = {size} is not a positive multiple of patch_size x spatial_merge_size = {unit}"
                ));
            }
            VisionVariant::Qwen25 {
                window: size / unit,
                full: self.fullatt_block_indexes.clone().unwrap_or_default(),
            }
        } else {
            VisionVariant::Qwen2
        };
        let activation = match self.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "silu" => Activation::Silu,
            other => {
                return Err(format!(
                    "vision_config.hidden_act = {other:?} is not supported"
                ));
            }
        };
        if self.num_heads == 0
            || !embed_dim.is_multiple_of(self.num_heads)
            || !(embed_dim / self.num_heads).is_multiple_of(4)
        {
            return Err(format!(
                "vision_config: embed_dim = {embed_dim} must split into num_heads = {} heads of a multiple of 4",
                self.num_heads
            ));
        }
        if [
            self.depth,
            self.spatial_merge_size,
            self.patch_size,
            self.temporal_patch_size,
            self.in_channels,
        ]
        .contains(&0)
        {
            return Err(
                "vision_config: depth, patch_size, temporal_patch_size, in_channels and spatial_merge_size must be at least 1"
                    .into(),
            );
        }
        Ok(QwenVisionConfig {
            variant,
            depth: self.depth,
            embed: embed_dim,
            out,
            heads: self.num_heads,
            mlp: self
                .intermediate_size
                .unwrap_or((embed_dim as f64 * self.mlp_ratio) as usize),
            activation,
            channels: self.in_channels,
            temporal: self.temporal_patch_size,
            patch: self.patch_size,
            patch_values: self.in_channels
                * self.temporal_patch_size
                * self.patch_size
                * self.patch_size,
            merge: self.spatial_merge_size,
            theta: self
                .rope_parameters
                .as_ref()
                .map_or(d_theta(), |r| r.rope_theta),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_vision_configs_name_the_field() {
        for (json, needle) in [
            (r#"{"hidden_act": "relu"}"#, "hidden_act"),
            (r#"{"embed_dim": 30, "num_heads": 4}"#, "embed_dim"),
            (r#"{"depth": 0}"#, "depth"),
            (
                r#"{"model_type": "qwen2_5_vl_vision", "hidden_size": 32, "num_heads": 4, "window_size": 50}"#,
                "window_size",
            ),
        ] {
            let config: HfQwenVisionConfig = serde_json::from_str(json).unwrap();
            let err = config.validate().unwrap_err();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    /// Configs written before transformers 5 (the published checkpoints'): the decoder's
    /// keys at the top level, the sections in `rope_scaling` of type "mrope" (read as
    /// transformers 5 reads them); another scaling type is refused, naming the key.
    #[test]
    fn legacy_configs_read_as_transformers_reads_them() {
        let config = |scaling: &str| {
            format!(
                r#"{{"model_type": "qwen2_vl", "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 64, "rope_theta": 1000000.0, "image_token_id": 60,
                "vision_start_token_id": 62, "vision_end_token_id": 63,
                "vision_config": {{"embed_dim": 32, "num_heads": 4, "hidden_size": 64}},
                "rope_scaling": {scaling}}}"#
            )
        };
        for kind in ["type", "rope_type"] {
            let json = config(&format!(
                r#"{{"{kind}": "mrope", "mrope_section": [2, 3, 3]}}"#
            ));
            let c = QwenVlConfig::from_json(&json, "config.json").unwrap();
            assert_eq!(c.text.mrope_section, Some([2, 3, 3]));
            assert_eq!(c.text.rope_theta, 1e6);
            assert_eq!(
                (c.text.hidden, c.text.kv_heads, c.text.head_dim),
                (64, 2, 16)
            );
        }
        let json = config(r#"{"type": "yarn", "factor": 4.0, "mrope_section": [2, 3, 3]}"#);
        let err = QwenVlConfig::from_json(&json, "config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains("rope_scaling"),
            "{err}"
        );
    }

    /// The tiny fixture's layout: 4 text tokens, a 2 x 4 merged grid, 7 text tokens.
    #[test]
    fn positions_follow_get_rope_index() {
        let ids: Vec<u32> = [1, 5, 7, 62]
            .into_iter()
            .chain([60; 8])
            .chain([63, 9, 11, 13, 20, 21, 22])
            .collect();
        let (pos, delta) = mrope_positions(&ids, 60, &[[1, 4, 8]], 2).unwrap();
        let axis = |a: usize| pos.iter().map(|p| p[a]).collect::<Vec<_>>();
        assert_eq!(
            axis(0),
            [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4, 8, 9, 10, 11, 12, 13, 14]
        );
        assert_eq!(
            axis(1),
            [0, 1, 2, 3, 4, 4, 4, 4, 5, 5, 5, 5, 8, 9, 10, 11, 12, 13, 14]
        );
        assert_eq!(
            axis(2),
            [0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
        );
        assert_eq!(delta, -4);
        assert!(mrope_positions(&ids, 60, &[], 2).is_err());
        assert!(mrope_positions(&ids, 60, &[[1, 4, 8], [1, 2, 2]], 2).is_err());
        assert!(mrope_positions(&ids[..8], 60, &[[1, 4, 8]], 2).is_err());
    }
}
