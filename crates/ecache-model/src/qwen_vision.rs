//! The Qwen2-VL vision tower: the 3-D patch embedding (a linear map of each patch row of
//! [`crate::qwen_image::QwenPixels`]), pre-norm blocks with 2-D rotary positions over
//! the whole picture, and the patch merger that folds each 2 x 2 group into one token of
//! the decoder's width. One image at a time (its patches attend to each other only).

use burn::module::Module;
use burn::nn::{LayerNorm, Linear};
use burn::tensor::{Tensor, TensorData, activation, backend::Backend};
use serde::Deserialize;

use crate::config::Activation;
use crate::error::{ModelError, Result};
use crate::layers::{Loader, activate};

/// `vision_config` of a Qwen2-VL `config.json`, with transformers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct HfQwenVisionConfig {
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

/// The validated vision configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct QwenVisionConfig {
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
            || !self.embed_dim.is_multiple_of(self.num_heads)
            || !(self.embed_dim / self.num_heads).is_multiple_of(4)
        {
            return Err(format!(
                "vision_config: embed_dim = {} must split into num_heads = {} heads of a multiple of 4",
                self.embed_dim, self.num_heads
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
            depth: self.depth,
            embed: self.embed_dim,
            out: self.hidden_size,
            heads: self.num_heads,
            mlp: (self.embed_dim as f64 * self.mlp_ratio) as usize,
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

/// One pre-norm block.
#[derive(Module, Debug)]
pub struct QwenVisionBlock<B: Backend> {
    norm1: LayerNorm<B>,
    qkv: Linear<B>,
    proj: Linear<B>,
    norm2: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

/// The vision tower and its merger.
#[derive(Module, Debug)]
pub struct QwenVision<B: Backend> {
    patch_embed: Linear<B>,
    blocks: Vec<QwenVisionBlock<B>>,
    ln_q: LayerNorm<B>,
    merger_in: Linear<B>,
    merger_out: Linear<B>,
    #[module(skip)]
    config: QwenVisionConfig,
}

impl<B: Backend> QwenVision<B> {
    /// Loads the tower from canonical names under `visual.` (transformers' `model.visual.`
    /// and the published checkpoints' `visual.`).
    pub fn load(c: &QwenVisionConfig, l: &mut Loader<'_, B>) -> Result<Self> {
        let e = c.embed;
        let conv = l.tensor::<5>(
            "visual.patch_embed.proj.weight",
            [e, c.channels, c.temporal, c.patch, c.patch],
        )?;
        // The Conv3d's weight [embed, C, T, P, P], flattened as a patch row is, is a
        // linear map from the row to the embedding ([in, out] for burn).
        let weight = conv.reshape([e, c.patch_values]).transpose();
        let patch_embed = Linear {
            weight: burn::module::Param::from_tensor(weight),
            bias: None,
        };
        let blocks = (0..c.depth)
            .map(|i| {
                let p = format!("visual.blocks.{i}");
                Ok(QwenVisionBlock {
                    norm1: l.layer_norm(&format!("{p}.norm1"), e, 1e-6)?,
                    qkv: l.linear(&format!("{p}.attn.qkv"), e, 3 * e, true)?,
                    proj: l.linear(&format!("{p}.attn.proj"), e, e, true)?,
                    norm2: l.layer_norm(&format!("{p}.norm2"), e, 1e-6)?,
                    fc1: l.linear(&format!("{p}.mlp.fc1"), e, c.mlp, true)?,
                    fc2: l.linear(&format!("{p}.mlp.fc2"), c.mlp, e, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let merged = e * c.merge * c.merge;
        Ok(Self {
            patch_embed,
            blocks,
            ln_q: l.layer_norm("visual.merger.ln_q", e, 1e-6)?,
            merger_in: l.linear("visual.merger.mlp.0", merged, merged, true)?,
            merger_out: l.linear("visual.merger.mlp.2", merged, c.out, true)?,
            config: c.clone(),
        })
    }

    /// The image's tokens for the decoder.
    ///
    /// # Shapes
    /// - `patches`: `[rows, patch_values]` in the image processor's order, `grid` its
    ///   `(t, h, w)` in patches
    /// - returns `[rows / merge^2, out]`
    pub fn forward(&self, patches: Tensor<B, 2>, grid: [usize; 3]) -> Result<Tensor<B, 2>> {
        let c = &self.config;
        let [rows, values] = patches.dims();
        if values != c.patch_values || rows != grid.iter().product::<usize>() {
            return Err(ModelError::Prompt(format!(
                "image patches [{rows}, {values}] do not match the grid {grid:?} and {} values a patch",
                c.patch_values
            )));
        }
        let device = patches.device();
        let (cos, sin) = self.rotary(grid, &device);
        let mut x = self.patch_embed.forward(patches);
        for block in &self.blocks {
            x = self.block(block, x, &cos, &sin);
        }
        let merged = c.embed * c.merge * c.merge;
        let x = self
            .ln_q
            .forward(x)
            .reshape([rows / (c.merge * c.merge), merged]);
        let x = activation::gelu(self.merger_in.forward(x));
        Ok(self.merger_out.forward(x))
    }

    /// # Shapes
    /// - `x`: `[rows, embed]`; `cos`, `sin`: `[heads or 1, rows, head_dim]` -> `[rows, embed]`
    fn block(
        &self,
        b: &QwenVisionBlock<B>,
        x: Tensor<B, 2>,
        cos: &Tensor<B, 3>,
        sin: &Tensor<B, 3>,
    ) -> Tensor<B, 2> {
        let c = &self.config;
        let [rows, e] = x.dims();
        let d = e / c.heads;
        let qkv = b
            .qkv
            .forward(b.norm1.forward(x.clone()))
            .reshape([rows, 3, c.heads, d]);
        let part = |i: usize| {
            qkv.clone()
                .narrow(1, i, 1)
                .reshape([rows, c.heads, d])
                .swap_dims(0, 1)
        };
        let rope = |t: Tensor<B, 3>| t.clone() * cos.clone() + rotate_half(t) * sin.clone();
        let (q, k, v) = (rope(part(0)), rope(part(1)), part(2));
        let scores = q.matmul(k.swap_dims(1, 2)) * (d as f64).powf(-0.5);
        let attn = activation::softmax(scores, 2).matmul(v);
        let attn = attn.swap_dims(0, 1).reshape([rows, e]);
        let x = x + b.proj.forward(attn);
        let h = activate(b.fc1.forward(b.norm2.forward(x.clone())), c.activation);
        x + b.fc2.forward(h)
    }

    /// The 2-D rotary tables: each patch's row and column (in the processor's patch order)
    /// times the inverse frequencies, row angles then column angles, the whole repeated
    /// for the two halves that rotate together.
    ///
    /// # Shapes
    /// - returns `cos`, `sin`: `[1, rows, head_dim]`
    fn rotary(&self, grid: [usize; 3], device: &B::Device) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let c = &self.config;
        let d = c.embed / c.heads;
        let spatial = d / 2;
        let inv: Vec<f64> = (0..spatial)
            .step_by(2)
            .map(|i| 1.0 / c.theta.powf(i as f64 / spatial as f64))
            .collect();
        let positions = patch_positions(grid, c.merge);
        let mut cos = Vec::with_capacity(positions.len() * d);
        let mut sin = Vec::with_capacity(positions.len() * d);
        for (h, w) in positions {
            let angles: Vec<f32> = inv
                .iter()
                .map(|f| (h as f64 * f) as f32)
                .chain(inv.iter().map(|f| (w as f64 * f) as f32))
                .collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        let rows = cos.len() / d;
        let table =
            |v: Vec<f32>| Tensor::<B, 3>::from_data(TensorData::new(v, [1, rows, d]), device);
        (table(cos), table(sin))
    }
}

/// `(row, column)` of each patch in the image processor's order: merge groups row by row,
/// each group's patches row by row (transformers' `get_vision_position_ids`), for every
/// frame.
pub fn patch_positions(grid: [usize; 3], merge: usize) -> Vec<(usize, usize)> {
    let [t, h, w] = grid;
    let mut out = Vec::with_capacity(t * h * w);
    for _ in 0..t {
        for bh in 0..h / merge {
            for bw in 0..w / merge {
                for mh in 0..merge {
                    for mw in 0..merge {
                        out.push((bh * merge + mh, bw * merge + mw));
                    }
                }
            }
        }
    }
    out
}

/// `[-x2, x1]` of the two halves of the last dimension.
fn rotate_half<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let d = x.dims()[2];
    let (x1, x2) = (x.clone().narrow(2, 0, d / 2), x.narrow(2, d / 2, d / 2));
    Tensor::cat(vec![x2.neg(), x1], 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_are_ordered_by_merge_group() {
        let p = patch_positions([1, 2, 4], 2);
        assert_eq!(
            p,
            vec![
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (0, 2),
                (0, 3),
                (1, 2),
                (1, 3)
            ]
        );
        assert_eq!(patch_positions([2, 2, 2], 2).len(), 8, "every frame");
    }

    #[test]
    fn bad_vision_configs_name_the_field() {
        for (json, needle) in [
            (r#"{"hidden_act": "relu"}"#, "hidden_act"),
            (r#"{"embed_dim": 30, "num_heads": 4}"#, "embed_dim"),
            (r#"{"depth": 0}"#, "depth"),
        ] {
            let config: HfQwenVisionConfig = serde_json::from_str(json).unwrap();
            let err = config.validate().unwrap_err();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }
}
