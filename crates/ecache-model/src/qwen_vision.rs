//! The Qwen2-VL and Qwen2.5-VL vision towers: the 3-D patch embedding (a linear map of
//! each patch row of [`crate::qwen_image::QwenPixels`]), pre-norm blocks with 2-D rotary
//! positions, and the patch merger that folds each 2 x 2 group into one token of the
//! decoder's width. Qwen2-VL's blocks use LayerNorm and a plain MLP and attend over the
//! whole picture; Qwen2.5-VL's use RMSNorm and a gated MLP and attend within windows of
//! merge groups, except in its full-attention blocks. One image at a time.

use burn::module::Module;
use burn::nn::{LayerNorm, Linear, RmsNorm};
use burn::tensor::{Tensor, TensorData, activation, backend::Backend};

use crate::error::{ModelError, Result};
use crate::layers::{Loader, activate};
pub use crate::qwen::{HfQwenVisionConfig, QwenVisionConfig, VisionVariant};

/// A block's norm: LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL).
#[derive(Module, Debug)]
pub enum VisionNorm<B: Backend> {
    Layer(LayerNorm<B>),
    Rms(RmsNorm<B>),
}

impl<B: Backend> VisionNorm<B> {
    fn load(l: &mut Loader<'_, B>, prefix: &str, d: usize, rms: bool) -> Result<Self> {
        Ok(if rms {
            VisionNorm::Rms(l.rms_norm(prefix, d, 1e-6)?)
        } else {
            VisionNorm::Layer(l.layer_norm(prefix, d, 1e-6)?)
        })
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            VisionNorm::Layer(n) => n.forward(x),
            VisionNorm::Rms(n) => n.forward(x),
        }
    }
}

/// Qwen2-VL's MLP: `fc2(act(fc1 x))`.
#[derive(Module, Debug)]
pub struct PlainMlp<B: Backend> {
    fc1: Linear<B>,
    fc2: Linear<B>,
}

/// Qwen2.5-VL's MLP: `down(act(gate x) * up x)`.
#[derive(Module, Debug)]
pub struct GatedMlp<B: Backend> {
    gate: Linear<B>,
    up: Linear<B>,
    down: Linear<B>,
}

/// A block's MLP.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // one per block
pub enum VisionMlp<B: Backend> {
    Plain(PlainMlp<B>),
    Gated(GatedMlp<B>),
}

/// One pre-norm block.
#[derive(Module, Debug)]
pub struct QwenVisionBlock<B: Backend> {
    norm1: VisionNorm<B>,
    qkv: Linear<B>,
    proj: Linear<B>,
    norm2: VisionNorm<B>,
    mlp: VisionMlp<B>,
}

/// The vision tower and its merger.
#[derive(Module, Debug)]
pub struct QwenVision<B: Backend> {
    patch_embed: Linear<B>,
    blocks: Vec<QwenVisionBlock<B>>,
    ln_q: VisionNorm<B>,
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
        // The Conv3d's weight [embed, C, T, P, P], flattened as a patch row is, is a
        // linear map from the row to the embedding ([in, out] for burn).
        let weight = l.checkpoint.take_flattened_weight(
            "visual.patch_embed.proj.weight",
            &[e, c.channels, c.temporal, c.patch, c.patch],
            l.device,
            l.dtype,
        )?;
        let patch_embed = Linear {
            weight: burn::module::Param::from_tensor(weight),
            bias: None,
        };
        let rms = matches!(c.variant, VisionVariant::Qwen25 { .. });
        let blocks = (0..c.depth)
            .map(|i| {
                let p = format!("visual.blocks.{i}");
                let mlp = if rms {
                    VisionMlp::Gated(GatedMlp {
                        gate: l.linear(&format!("{p}.mlp.gate_proj"), e, c.mlp, true)?,
                        up: l.linear(&format!("{p}.mlp.up_proj"), e, c.mlp, true)?,
                        down: l.linear(&format!("{p}.mlp.down_proj"), c.mlp, e, true)?,
                    })
                } else {
                    VisionMlp::Plain(PlainMlp {
                        fc1: l.linear(&format!("{p}.mlp.fc1"), e, c.mlp, true)?,
                        fc2: l.linear(&format!("{p}.mlp.fc2"), c.mlp, e, true)?,
                    })
                };
                Ok(QwenVisionBlock {
                    norm1: VisionNorm::load(l, &format!("{p}.norm1"), e, rms)?,
                    qkv: l.linear(&format!("{p}.attn.qkv"), e, 3 * e, true)?,
                    proj: l.linear(&format!("{p}.attn.proj"), e, e, true)?,
                    norm2: VisionNorm::load(l, &format!("{p}.norm2"), e, rms)?,
                    mlp,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let merged = e * c.merge * c.merge;
        Ok(Self {
            patch_embed,
            blocks,
            ln_q: VisionNorm::load(l, "visual.merger.ln_q", e, rms)?,
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
        let unit = c.merge * c.merge;
        let merged = c.embed * unit;
        let groups = rows / unit;
        let windows = match &c.variant {
            VisionVariant::Qwen2 => None,
            VisionVariant::Qwen25 { window, full } => {
                Some((window_order(grid, c.merge, *window), full.clone()))
            }
        };
        // Qwen2.5-VL: the merge groups reordered window by window (rows and rotary tables
        // alike), attention kept within each window outside the full-attention blocks.
        let (cos, sin, window_mask) = match &windows {
            None => (cos, sin, None),
            Some(((order, lengths), _)) => {
                let rows_order: Vec<i64> = order
                    .iter()
                    .flat_map(|&g| (0..unit).map(move |u| (g * unit + u) as i64))
                    .collect();
                let index = Tensor::<B, 1, burn::tensor::Int>::from_data(
                    TensorData::new(rows_order, [rows]),
                    &device,
                );
                x = x.select(0, index.clone());
                let permute = |t: Tensor<B, 3>| t.select(1, index.clone());
                let mask = block_mask::<B>(lengths, unit, rows, &device);
                (permute(cos), permute(sin), Some(mask))
            }
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let mask = match (&windows, &window_mask) {
                (Some((_, full)), Some(mask)) if !full.contains(&i) => Some(mask),
                _ => None,
            };
            x = self.block(block, x, &cos, &sin, mask);
        }
        let x = self.ln_q.forward(x).reshape([groups, merged]);
        let x = activation::gelu(self.merger_in.forward(x));
        let x = self.merger_out.forward(x);
        Ok(match &windows {
            None => x,
            Some(((order, _), _)) => {
                // Back to the merge groups' own order.
                let mut inverse = vec![0i64; groups];
                for (at, &g) in order.iter().enumerate() {
                    inverse[g] = at as i64;
                }
                let index = Tensor::<B, 1, burn::tensor::Int>::from_data(
                    TensorData::new(inverse, [groups]),
                    &device,
                );
                x.select(0, index)
            }
        })
    }

    /// # Shapes
    /// - `x`: `[rows, embed]`; `cos`, `sin`: `[heads or 1, rows, head_dim]` -> `[rows, embed]`
    fn block(
        &self,
        b: &QwenVisionBlock<B>,
        x: Tensor<B, 2>,
        cos: &Tensor<B, 3>,
        sin: &Tensor<B, 3>,
        mask: Option<&Tensor<B, 3, burn::tensor::Bool>>,
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
        let scores = match mask {
            Some(mask) => scores.mask_fill(
                mask.clone().expand([c.heads, rows, rows]),
                f32::NEG_INFINITY,
            ),
            None => scores,
        };
        let attn = activation::softmax(scores, 2).matmul(v);
        let attn = attn.swap_dims(0, 1).reshape([rows, e]);
        let x = x + b.proj.forward(attn);
        let h = b.norm2.forward(x.clone());
        let mlp = match &b.mlp {
            VisionMlp::Plain(m) => m.fc2.forward(activate(m.fc1.forward(h), c.activation)),
            VisionMlp::Gated(m) => {
                let gate = activate(m.gate.forward(h.clone()), c.activation);
                m.down.forward(gate * m.up.forward(h))
            }
        };
        x + mlp
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

/// Qwen2.5-VL's windows: the merge groups (numbered row by row over the merged grid, per
/// frame) in window order, each window `window` x `window` groups of the merged grid
/// padded up to a multiple of it, windows row by row, groups within a window row by row;
/// and each window's number of groups (transformers' `get_vision_window_index`).
pub fn window_order(grid: [usize; 3], merge: usize, window: usize) -> (Vec<usize>, Vec<usize>) {
    let [t, h, w] = grid;
    let (mh, mw) = (h / merge, w / merge);
    let (wh, ww) = (mh.div_ceil(window), mw.div_ceil(window));
    let mut order = Vec::with_capacity(t * mh * mw);
    let mut lengths = Vec::new();
    for f in 0..t {
        for bh in 0..wh {
            for bw in 0..ww {
                let before = order.len();
                for r in bh * window..((bh + 1) * window).min(mh) {
                    for col in bw * window..((bw + 1) * window).min(mw) {
                        order.push(f * mh * mw + r * mw + col);
                    }
                }
                if order.len() > before {
                    lengths.push(order.len() - before);
                }
            }
        }
    }
    (order, lengths)
}

/// True where attention is not allowed: between rows of different windows (`lengths` in
/// merge groups of `unit` rows each).
///
/// # Shapes
/// - returns `[1, rows, rows]`
fn block_mask<B: Backend>(
    lengths: &[usize],
    unit: usize,
    rows: usize,
    device: &B::Device,
) -> Tensor<B, 3, burn::tensor::Bool> {
    let mut window_of = Vec::with_capacity(rows);
    for (w, &len) in lengths.iter().enumerate() {
        window_of.extend(std::iter::repeat_n(w, len * unit));
    }
    let hidden: Vec<bool> = (0..rows)
        .flat_map(|i| (0..rows).map(move |j| (i, j)))
        .map(|(i, j)| window_of[i] != window_of[j])
        .collect();
    Tensor::from_data(TensorData::new(hidden, [1, rows, rows]), device)
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

    /// A merged grid of 2 x 4 in windows of 3 x 3: padded to 3 x 6, two windows of 2 x 3
    /// and 2 x 1 groups.
    #[test]
    fn windows_pad_the_merged_grid() {
        let (order, lengths) = window_order([1, 4, 8], 2, 3);
        assert_eq!(order, vec![0, 1, 2, 4, 5, 6, 3, 7]);
        assert_eq!(lengths, vec![6, 2]);
        let (order, lengths) = window_order([1, 4, 4], 2, 3);
        assert_eq!((order, lengths), (vec![0, 1, 2, 3], vec![4]));
    }
}
