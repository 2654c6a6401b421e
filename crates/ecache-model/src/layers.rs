//! Building blocks shared by the vision tower and the decoder: loaders for burn's linear
//! and norm modules, activations, and rotate-half RoPE at explicit positions.

use burn::module::Param;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, RmsNorm};
use burn::tensor::{DType, Tensor, TensorData, activation, backend::Backend};

use crate::config::Activation;
use crate::error::Result;
use crate::kernels::KernelBackend;
use crate::weights::Checkpoint;

/// Where and how weights are loaded.
pub struct Loader<'a, B: Backend> {
    pub checkpoint: &'a mut Checkpoint,
    pub device: &'a B::Device,
    pub dtype: DType,
}

impl<B: Backend> Loader<'_, B> {
    /// A linear layer from `{prefix}.weight` (`[out, in]`) and, if `bias`, `{prefix}.bias`.
    pub fn linear(
        &mut self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<Linear<B>> {
        let weight = self.checkpoint.take_linear_weight(
            &format!("{prefix}.weight"),
            d_in,
            d_out,
            self.device,
            self.dtype,
        )?;
        let bias = if bias {
            Some(Param::from_tensor(
                self.tensor(&format!("{prefix}.bias"), [d_out])?,
            ))
        } else {
            None
        };
        Ok(Linear {
            weight: Param::from_tensor(weight),
            bias,
        })
    }

    /// A layer norm from `{prefix}.weight` and `{prefix}.bias`.
    pub fn layer_norm(&mut self, prefix: &str, d: usize, eps: f64) -> Result<LayerNorm<B>> {
        let mut norm = LayerNormConfig::new(d).with_epsilon(eps).init(self.device);
        norm.gamma = Param::from_tensor(self.tensor(&format!("{prefix}.weight"), [d])?);
        norm.beta = Some(Param::from_tensor(
            self.tensor(&format!("{prefix}.bias"), [d])?,
        ));
        Ok(norm)
    }

    /// An RMS norm from `{prefix}.weight`.
    pub fn rms_norm(&mut self, prefix: &str, d: usize, eps: f64) -> Result<RmsNorm<B>> {
        Ok(RmsNorm {
            gamma: Param::from_tensor(self.tensor(&format!("{prefix}.weight"), [d])?),
            epsilon: eps,
        })
    }

    /// Any tensor by canonical name and shape.
    pub fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Tensor<B, D>> {
        self.checkpoint.take(name, shape, self.device, self.dtype)
    }
}

/// Applies an activation.
pub fn activate<B: Backend, const D: usize>(x: Tensor<B, D>, act: Activation) -> Tensor<B, D> {
    match act {
        Activation::QuickGelu => x.clone() * activation::sigmoid(x * 1.702),
        Activation::Gelu => activation::gelu(x),
        Activation::Silu => activation::silu(x),
    }
}

/// Rotary position embedding as Hugging Face LLaMA computes it: the two halves of each head
/// rotate together (not adjacent pairs), at positions given explicitly per token.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// Frequencies for `head_dim` and `theta`, rounded to f32 as transformers does.
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Self { inv_freq }
    }

    /// Cosines and sines for each token, laid out for `head_counts` (the query and the
    /// key/value head counts; one table each, shared by every layer of a forward pass).
    ///
    /// # Shapes
    /// - `positions`: `batch` rows of `t` positions
    /// - each table: `[batch, t, heads, head_dim]`
    pub fn tables<B: Backend>(
        &self,
        positions: &[Vec<usize>],
        head_counts: &[usize],
        device: &B::Device,
        dtype: DType,
    ) -> RopeTables<B> {
        let axes: Vec<Vec<[usize; 3]>> = positions
            .iter()
            .map(|row| row.iter().map(|&p| [p; 3]).collect())
            .collect();
        let half = self.inv_freq.len();
        self.tables_sectioned(&axes, [half, 0, 0], head_counts, device, dtype)
    }

    /// Qwen2-VL's multimodal RoPE: each token has a (temporal, height, width) position and
    /// the first `sections[0]` frequencies turn with the first, the next `sections[1]`
    /// with the second, the last `sections[2]` with the third (transformers'
    /// `mrope_section`); a text token's three positions are equal, which is plain RoPE.
    ///
    /// # Shapes
    /// - `positions`: `batch` rows of `t` positions; each table `[batch, t, heads, head_dim]`
    pub fn tables_sectioned<B: Backend>(
        &self,
        positions: &[Vec<[usize; 3]>],
        sections: [usize; 3],
        head_counts: &[usize],
        device: &B::Device,
        dtype: DType,
    ) -> RopeTables<B> {
        let batch = positions.len();
        let t = positions.first().map_or(0, Vec::len);
        let half = self.inv_freq.len();
        let axis: Vec<usize> = (0..half)
            .map(|j| {
                if j < sections[0] {
                    0
                } else if j < sections[0] + sections[1] {
                    1
                } else {
                    2
                }
            })
            .collect();
        let mut cos = Vec::with_capacity(batch * t * half * 2);
        let mut sin = Vec::with_capacity(batch * t * half * 2);
        for row in positions {
            for p in row {
                let angles: Vec<f32> = self
                    .inv_freq
                    .iter()
                    .zip(&axis)
                    .map(|(f, &a)| f * p[a] as f32)
                    .collect();
                for sign in [-1.0, 1.0] {
                    cos.extend(angles.iter().map(|a| (*a as f64).cos() as f32));
                    sin.extend(angles.iter().map(|a| sign * (*a as f64).sin() as f32));
                }
            }
        }
        let shape = [batch, t, 1, half * 2];
        let one = RopeTable {
            cos: Tensor::from_data(TensorData::new(cos, shape), (device, dtype)),
            sin_signed: Tensor::from_data(TensorData::new(sin, shape), (device, dtype)),
        };
        let mut by_heads: Vec<(usize, RopeTable<B>)> = Vec::new();
        for &heads in head_counts {
            if !by_heads.iter().any(|(h, _)| *h == heads) {
                by_heads.push((heads, one.repeated(heads)));
            }
        }
        RopeTables { one, by_heads }
    }
}

/// One pair of RoPE tables: cosines, and sines with the first half negated (so that the
/// rotation needs no negation of its own).
#[derive(Debug, Clone)]
struct RopeTable<B: Backend> {
    cos: Tensor<B, 4>,
    sin_signed: Tensor<B, 4>,
}

impl<B: Backend> RopeTable<B> {
    /// The table copied across `heads` (a real copy: element-wise products between
    /// same-shaped contiguous tensors take the backends' fast paths, where a broadcast over
    /// the head axis made `flex` walk elements one by one, 9-21x slower: `rope_cost`).
    fn repeated(&self, heads: usize) -> Self {
        Self {
            cos: self.cos.clone().repeat_dim(2, heads),
            sin_signed: self.sin_signed.clone().repeat_dim(2, heads),
        }
    }
}

/// RoPE tables of one forward pass ([`Rope::tables`]).
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    one: RopeTable<B>,
    by_heads: Vec<(usize, RopeTable<B>)>,
}

impl<B: Backend> RopeTables<B> {
    /// Rotates queries or keys and moves the head axis before the token axis. Rotating
    /// in token-major layout, before the heads are split out, keeps every operand
    /// contiguous.
    ///
    /// # Shapes
    /// - `x`: `[batch, t, heads, head_dim]` (a projection's output, reshaped)
    /// - returns `[batch, heads, t, head_dim]`
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4>
    where
        B: KernelBackend,
    {
        if let Some(out) = B::rope(&x, &self.one.cos, &self.one.sin_signed) {
            return out;
        }
        let [b, t, h, d] = x.dims();
        let built;
        let table = match self.by_heads.iter().find(|(heads, _)| *heads == h) {
            Some((_, table)) => table,
            None => {
                built = self.one.repeated(h);
                &built
            }
        };
        let x1 = x.clone().slice([0..b, 0..t, 0..h, 0..d / 2]);
        let x2 = x.clone().slice([0..b, 0..t, 0..h, d / 2..d]);
        let rotated = Tensor::cat(vec![x2, x1], 3);
        (x * table.cos.clone() + rotated * table.sin_signed.clone()).swap_dims(1, 2)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;

    /// Rotate-half by hand: `out[i] = x[i] cos a_i - x[i + d/2] sin a_i` and
    /// `out[i + d/2] = x[i + d/2] cos a_i + x[i] sin a_i`, `a_i = p * theta^(-2i/d)`.
    #[test]
    fn rope_rotates_halves_at_each_tokens_position() {
        let device = Default::default();
        let (d, theta) = (4, 100.0f64);
        let rope = Rope::new(d, theta);
        let positions = vec![vec![3, 7]];
        let values: Vec<f32> = (0..2 * 2 * d).map(|i| i as f32 * 0.25 - 1.0).collect();
        let x =
            Tensor::<Flex, 4>::from_data(TensorData::new(values.clone(), [1, 2, 2, d]), &device);
        // Tables for 2 heads, and none for 2 (built on the fly): the same result.
        for counts in [&[2][..], &[5][..]] {
            let tables = rope.tables::<Flex>(&positions, counts, &device, DType::F32);
            let out = tables.apply(x.clone()); // [1, heads, t, d]
            let got: Vec<f32> = out.into_data().to_vec().unwrap();
            for (ti, &p) in positions[0].iter().enumerate() {
                for h in 0..2 {
                    let xs = &values[(ti * 2 + h) * d..(ti * 2 + h + 1) * d];
                    for i in 0..d / 2 {
                        let a = p as f64 * theta.powf(-2.0 * i as f64 / d as f64);
                        let (c, s) = (a.cos(), a.sin());
                        let lo = xs[i] as f64 * c - xs[i + d / 2] as f64 * s;
                        let hi = xs[i + d / 2] as f64 * c + xs[i] as f64 * s;
                        let at = |j: usize| got[(h * 2 + ti) * d + j] as f64;
                        assert!((at(i) - lo).abs() < 1e-5, "token {ti} head {h} dim {i}");
                        assert!((at(i + d / 2) - hi).abs() < 1e-5, "token {ti} head {h}");
                    }
                }
            }
        }
    }
}
