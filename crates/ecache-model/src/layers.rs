//! Building blocks shared by the vision tower and the decoder: loaders for burn's linear
//! and norm modules, activations, and rotate-half RoPE at explicit positions.

use burn::module::Param;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, RmsNorm};
use burn::tensor::{DType, Tensor, TensorData, activation, backend::Backend};

use crate::config::Activation;
use crate::error::Result;
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

    /// Cosines and sines for each token.
    ///
    /// # Shapes
    /// - `positions`: `batch` rows of `t` positions
    /// - returns two `[batch, 1, t, head_dim]` tensors
    pub fn tables<B: Backend>(
        &self,
        positions: &[Vec<usize>],
        device: &B::Device,
        dtype: DType,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let batch = positions.len();
        let t = positions.first().map_or(0, Vec::len);
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(batch * t * half * 2);
        let mut sin = Vec::with_capacity(batch * t * half * 2);
        for row in positions {
            for &p in row {
                let angles: Vec<f32> = self.inv_freq.iter().map(|f| f * p as f32).collect();
                for _ in 0..2 {
                    cos.extend(angles.iter().map(|a| (*a as f64).cos() as f32));
                    sin.extend(angles.iter().map(|a| (*a as f64).sin() as f32));
                }
            }
        }
        let shape = [batch, 1, t, half * 2];
        (
            Tensor::from_data(TensorData::new(cos, shape), (device, dtype)),
            Tensor::from_data(TensorData::new(sin, shape), (device, dtype)),
        )
    }

    /// Rotates queries or keys.
    ///
    /// # Shapes
    /// - `x`: `[batch, heads, t, head_dim]`; `cos`, `sin`: `[batch, 1, t, head_dim]`
    /// - returns `[batch, heads, t, head_dim]`
    pub fn apply<B: Backend>(
        x: Tensor<B, 4>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let [b, h, t, d] = x.dims();
        let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
        let x2 = x.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos.clone() + rotated * sin.clone()
    }
}
