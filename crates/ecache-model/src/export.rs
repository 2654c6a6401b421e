//! Writing a model back as a Hugging Face checkpoint (the published llava-hf layout), so
//! that a model trained or initialised here is loaded by the same path as any other.
//! Each module's `export` mirrors its `load`; a round-trip test holds them together.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::nn::{LayerNorm, Linear, RmsNorm};
use burn::tensor::{Tensor, backend::Backend};
use safetensors::{Dtype, tensor::TensorView};

use crate::error::{ModelError, Result};

/// Canonical prefixes and the published names they are written under.
const PUBLISHED: &[(&str, &str)] = &[
    ("decoder.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("vision.", "vision_tower.vision_model."),
    ("projector.", "multi_modal_projector."),
];

/// Tensors collected under their published names, as `(shape, f32 values)`.
#[derive(Default)]
pub struct Exporter {
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Exporter {
    /// Records a tensor under its canonical name.
    pub fn tensor<B: Backend, const D: usize>(&mut self, canonical: &str, t: Tensor<B, D>) {
        let (to, from) = PUBLISHED
            .iter()
            .find(|(c, _)| canonical.starts_with(c))
            .map(|(c, p)| (*p, c.len()))
            .expect("every canonical name has a published prefix");
        let shape = t.dims().to_vec();
        let values: Vec<f32> = t
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("converted to f32");
        self.tensors
            .insert(format!("{to}{}", &canonical[from..]), (shape, values));
    }

    /// A parameter's tensor.
    pub fn param<B: Backend, const D: usize>(&mut self, canonical: &str, p: &Param<Tensor<B, D>>) {
        self.tensor(canonical, p.val());
    }

    /// burn's `[in, out]` linear weight written as PyTorch's `[out, in]`, and its bias.
    pub fn linear<B: Backend>(&mut self, prefix: &str, l: &Linear<B>) {
        self.tensor(&format!("{prefix}.weight"), l.weight.val().transpose());
        if let Some(bias) = &l.bias {
            self.param(&format!("{prefix}.bias"), bias);
        }
    }

    /// A layer norm's weight and bias.
    pub fn layer_norm<B: Backend>(&mut self, prefix: &str, n: &LayerNorm<B>) {
        self.param(&format!("{prefix}.weight"), &n.gamma);
        if let Some(beta) = &n.beta {
            self.param(&format!("{prefix}.bias"), beta);
        }
    }

    /// An RMS norm's weight.
    pub fn rms_norm<B: Backend>(&mut self, prefix: &str, n: &RmsNorm<B>) {
        self.param(&format!("{prefix}.weight"), &n.gamma);
    }

    /// Names written so far.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Writes `model.safetensors` content to `path` in f32, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(name, (shape, values))| {
                let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (name.clone(), shape.clone(), raw)
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(name, shape, raw)| {
                TensorView::new(Dtype::F32, shape.clone(), raw)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| ModelError::Weights(format!("{name}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut metadata = std::collections::HashMap::new();
        metadata.insert("format".to_string(), "pt".to_string());
        let data = safetensors::serialize(views, Some(metadata))
            .map_err(|e| ModelError::Weights(format!("{}: {e}", path.display())))?;
        let tmp = path.with_extension("safetensors.partial");
        std::fs::write(&tmp, data).map_err(|e| ModelError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
    }
}
