//! Qwen2-VL: its `config.json`, where its multimodal RoPE places each prompt token, and
//! the image features put in place of the image pad tokens. The decoder is the LLaMA one
//! with biases on the query, key and value projections ([`crate::config::TextKind`]); the
//! vision tower is [`crate::qwen_vision`].

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use ecache_core::SlotKind;
use serde::Deserialize;

use crate::config::{HfLlamaConfig, LlamaConfig, TextKind};
use crate::error::{ModelError, Result};
use crate::llama::LlamaDecoder;
use crate::qwen_vision::{HfQwenVisionConfig, QwenVisionConfig};

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
        let source = path.display().to_string();
        let bad = |m: String| ModelError::Config(format!("{source}: {m}"));
        let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let hf: HfQwenVlConfig =
            serde_json::from_value(raw.clone()).map_err(|e| bad(e.to_string()))?;
        let text_config = match hf.text_config {
            Some(t) => t,
            None => serde_json::from_value(raw).map_err(|e| bad(e.to_string()))?,
        };
        let text = text_config.validate(hf.tie_word_embeddings, TextKind::Qwen2Vl)?;
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

/// The prompt's embeddings with each image pad token's row replaced by the next row of
/// `features`, and each slot's kind.
///
/// # Shapes
/// - `ids`: `T` token ids; `features`: `[image tokens, hidden]` -> `[1, T, hidden]`
pub fn embed_with_images<B: Backend>(
    decoder: &LlamaDecoder<B>,
    ids: &[u32],
    image_token: u32,
    features: Option<Tensor<B, 2>>,
    device: &B::Device,
) -> Result<(Tensor<B, 3>, Vec<SlotKind>)> {
    let t = ids.len();
    let kinds: Vec<SlotKind> = ids
        .iter()
        .map(|&id| {
            if id == image_token {
                SlotKind::Image
            } else {
                SlotKind::Text
            }
        })
        .collect();
    let rows = kinds.iter().filter(|k| **k == SlotKind::Image).count();
    let ids_tensor = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids.iter().map(|&i| i as i64).collect(), [1, t]),
        device,
    );
    let embeds = decoder.embed(ids_tensor);
    let Some(features) = features else {
        return if rows == 0 {
            Ok((embeds, kinds))
        } else {
            Err(ModelError::Prompt(format!(
                "{rows} image tokens and no image features"
            )))
        };
    };
    let [n, hidden] = features.dims();
    if n != rows {
        return Err(ModelError::Prompt(format!(
            "{rows} image tokens for {n} image features"
        )));
    }
    // Runs of text and image rows, concatenated in order.
    let mut parts = Vec::new();
    let (mut i, mut f) = (0, 0);
    while i < t {
        let kind = kinds[i];
        let len = kinds[i..].iter().take_while(|k| **k == kind).count();
        parts.push(match kind {
            SlotKind::Text => embeds.clone().narrow(1, i, len),
            SlotKind::Image => features.clone().narrow(0, f, len).reshape([1, len, hidden]),
        });
        if kind == SlotKind::Image {
            f += len;
        }
        i += len;
    }
    Ok((Tensor::cat(parts, 1), kinds))
}

#[cfg(test)]
mod tests {
    use super::*;

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
