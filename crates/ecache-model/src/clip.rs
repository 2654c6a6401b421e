//! The CLIP vision tower as LLaVA uses it: patch embedding, class token, learned positions,
//! pre-layernorm and encoder layers; features come from an intermediate layer.

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::{Tensor, activation::softmax, backend::Backend};

use crate::config::{Activation, ClipConfig};
use crate::error::Result;
use crate::export::Exporter;
use crate::layers::{Loader, activate};

/// One pre-norm encoder layer.
#[derive(Module, Debug)]
pub struct ClipLayer<B: Backend> {
    layer_norm1: LayerNorm<B>,
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    out_proj: Linear<B>,
    layer_norm2: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
    heads: usize,
    #[module(skip)]
    activation: Activation,
}

impl<B: Backend> ClipLayer<B> {
    fn load(c: &ClipConfig, l: &mut Loader<'_, B>, prefix: &str) -> Result<Self> {
        let h = c.hidden;
        Ok(Self {
            layer_norm1: l.layer_norm(&format!("{prefix}.layer_norm1"), h, c.layer_norm_eps)?,
            q_proj: l.linear(&format!("{prefix}.self_attn.q_proj"), h, h, true)?,
            k_proj: l.linear(&format!("{prefix}.self_attn.k_proj"), h, h, true)?,
            v_proj: l.linear(&format!("{prefix}.self_attn.v_proj"), h, h, true)?,
            out_proj: l.linear(&format!("{prefix}.self_attn.out_proj"), h, h, true)?,
            layer_norm2: l.layer_norm(&format!("{prefix}.layer_norm2"), h, c.layer_norm_eps)?,
            fc1: l.linear(&format!("{prefix}.mlp.fc1"), h, c.intermediate, true)?,
            fc2: l.linear(&format!("{prefix}.mlp.fc2"), c.intermediate, h, true)?,
            heads: c.heads,
            activation: c.activation,
        })
    }

    fn export(&self, e: &mut Exporter, prefix: &str) {
        e.layer_norm(&format!("{prefix}.layer_norm1"), &self.layer_norm1);
        e.linear(&format!("{prefix}.self_attn.q_proj"), &self.q_proj);
        e.linear(&format!("{prefix}.self_attn.k_proj"), &self.k_proj);
        e.linear(&format!("{prefix}.self_attn.v_proj"), &self.v_proj);
        e.linear(&format!("{prefix}.self_attn.out_proj"), &self.out_proj);
        e.layer_norm(&format!("{prefix}.layer_norm2"), &self.layer_norm2);
        e.linear(&format!("{prefix}.mlp.fc1"), &self.fc1);
        e.linear(&format!("{prefix}.mlp.fc2"), &self.fc2);
    }

    /// # Shapes
    /// - `x`: `[batch, tokens, hidden]` -> `[batch, tokens, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, hidden] = x.dims();
        let d = hidden / self.heads;
        let split = |y: Tensor<B, 3>| y.reshape([b, t, self.heads, d]).swap_dims(1, 2);
        let h = self.layer_norm1.forward(x.clone());
        let q = split(self.q_proj.forward(h.clone())) * (d as f64).powf(-0.5);
        let k = split(self.k_proj.forward(h.clone()));
        let v = split(self.v_proj.forward(h));
        let probs = softmax(q.matmul(k.swap_dims(2, 3)), 3);
        let attn = probs.matmul(v).swap_dims(1, 2).reshape([b, t, hidden]);
        let x = x + self.out_proj.forward(attn);
        let h = activate(
            self.fc1.forward(self.layer_norm2.forward(x.clone())),
            self.activation,
        );
        x + self.fc2.forward(h)
    }
}

/// The vision tower up to the feature layer LLaVA reads.
#[derive(Module, Debug)]
pub struct ClipVision<B: Backend> {
    /// Patch embedding as a matrix: `[channels * patch * patch, hidden]` (no bias).
    patch_weight: Param<Tensor<B, 2>>,
    class_embedding: Param<Tensor<B, 1>>,
    position_embedding: Param<Tensor<B, 2>>,
    pre_layrnorm: LayerNorm<B>,
    layers: Vec<ClipLayer<B>>,
    patch: usize,
    channels: usize,
}

impl<B: Backend> ClipVision<B> {
    /// Loads the tower; layers past `run_layers` are skipped (marked read, never computed).
    pub fn load(c: &ClipConfig, run_layers: usize, l: &mut Loader<'_, B>) -> Result<Self> {
        let (h, p) = (c.hidden, c.patch_size);
        let conv: Tensor<B, 4> = l.tensor(
            "vision.embeddings.patch_embedding.weight",
            [h, c.channels, p, p],
        )?;
        let patch_weight = conv.reshape([h, c.channels * p * p]).transpose();
        let layers = (0..run_layers)
            .map(|i| ClipLayer::load(c, l, &format!("vision.encoder.layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        for i in run_layers..c.layers {
            for name in [
                "layer_norm1",
                "layer_norm2",
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.out_proj",
                "mlp.fc1",
                "mlp.fc2",
            ] {
                for part in ["weight", "bias"] {
                    l.checkpoint
                        .skip(&format!("vision.encoder.layers.{i}.{name}.{part}"));
                }
            }
        }
        Ok(Self {
            patch_weight: Param::from_tensor(patch_weight),
            class_embedding: Param::from_tensor(
                l.tensor("vision.embeddings.class_embedding", [h])?,
            ),
            position_embedding: Param::from_tensor(l.tensor(
                "vision.embeddings.position_embedding.weight",
                [c.patches() + 1, h],
            )?),
            pre_layrnorm: l.layer_norm("vision.pre_layrnorm", h, c.layer_norm_eps)?,
            layers,
            patch: p,
            channels: c.channels,
        })
    }

    /// Writes the tower's tensors (only the layers it runs: export a model whose feature
    /// layer is the last one to get a complete checkpoint).
    pub fn export(&self, e: &mut Exporter) {
        let [k, h] = self.patch_weight.dims();
        let p = self.patch;
        e.tensor(
            "vision.embeddings.patch_embedding.weight",
            self.patch_weight
                .val()
                .transpose()
                .reshape([h, self.channels, p, p]),
        );
        debug_assert_eq!(k, self.channels * p * p);
        e.param("vision.embeddings.class_embedding", &self.class_embedding);
        e.param(
            "vision.embeddings.position_embedding.weight",
            &self.position_embedding,
        );
        e.layer_norm("vision.pre_layrnorm", &self.pre_layrnorm);
        for (i, layer) in self.layers.iter().enumerate() {
            layer.export(e, &format!("vision.encoder.layers.{i}"));
        }
        // CLIP's post-layernorm is not on LLaVA's path; written as identity so that
        // transformers finds every tensor it expects.
        e.tensor(
            "vision.post_layernorm.weight",
            Tensor::<B, 1>::ones([h], &self.patch_weight.device()),
        );
        e.tensor(
            "vision.post_layernorm.bias",
            Tensor::<B, 1>::zeros([h], &self.patch_weight.device()),
        );
    }

    /// Hidden states after the last loaded layer (class token first).
    ///
    /// # Shapes
    /// - `pixels`: `[batch, channels, size, size]` (normalised)
    /// - returns `[batch, patches + 1, hidden]`
    pub fn forward(&self, pixels: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, c, height, width] = pixels.dims();
        let p = self.patch;
        let (gh, gw) = (height / p, width / p);
        debug_assert_eq!(c, self.channels);
        let patches = pixels
            .reshape([b, c, gh, p, gw, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, gh * gw, c * p * p]);
        let embedded = patches.matmul(self.patch_weight.val().unsqueeze::<3>());
        let hidden = embedded.dims()[2];
        let class = self
            .class_embedding
            .val()
            .reshape([1, 1, hidden])
            .repeat_dim(0, b);
        let x =
            Tensor::cat(vec![class, embedded], 1) + self.position_embedding.val().unsqueeze::<3>();
        let mut x = self.pre_layrnorm.forward(x);
        for layer in &self.layers {
            x = layer.forward(x);
        }
        x
    }
}
