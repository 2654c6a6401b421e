//! LLaVA: the CLIP tower, the projector and the LLaMA decoder, loaded from a Hugging Face
//! model directory.

use std::path::Path;

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{DType, Tensor, backend::Backend};

use crate::clip::ClipVision;
use crate::config::{Activation, FeatureStrategy, LlavaConfig};
use crate::error::Result;
use crate::export::Exporter;
use crate::layers::{Loader, activate};
use crate::llama::LlamaDecoder;
use crate::weights::Checkpoint;

/// `linear_1`, activation, `linear_2`.
#[derive(Module, Debug)]
pub struct Projector<B: Backend> {
    linear_1: Linear<B>,
    linear_2: Linear<B>,
    #[module(skip)]
    activation: Activation,
}

impl<B: Backend> Projector<B> {
    /// # Shapes
    /// - `x`: `[batch, tokens, vision_hidden]` -> `[batch, tokens, text_hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.linear_2
            .forward(activate(self.linear_1.forward(x), self.activation))
    }
}

/// The whole model.
#[derive(Module, Debug)]
pub struct Llava<B: Backend> {
    pub vision: ClipVision<B>,
    pub projector: Projector<B>,
    pub decoder: LlamaDecoder<B>,
    drop_class_token: bool,
}

impl<B: Backend> Llava<B> {
    /// Loads `config.json` and the weights of a Hugging Face LLaVA directory in `dtype`.
    /// Every checkpoint tensor must be used and every parameter found.
    pub fn load(dir: &Path, device: &B::Device, dtype: DType) -> Result<(Self, LlavaConfig)> {
        let config = LlavaConfig::from_path(&dir.join("config.json"))?;
        let mut checkpoint = Checkpoint::open(dir)?;
        let model = Self::from_checkpoint(&config, &mut checkpoint, device, dtype)?;
        checkpoint.finish()?;
        Ok((model, config))
    }

    /// A model of `config` with freshly initialised weights (see [`Checkpoint::random`]),
    /// created on `device` in `dtype`; `seed` seeds the backend's generator first.
    pub fn init(config: &LlavaConfig, device: &B::Device, dtype: DType, seed: u64) -> Self {
        Self::init_from(config, Checkpoint::random(0.02), device, dtype, seed)
    }

    /// [`Llava::init`] from a random checkpoint of one's own settings.
    pub fn init_from(
        config: &LlavaConfig,
        mut random: Checkpoint,
        device: &B::Device,
        dtype: DType,
        seed: u64,
    ) -> Self {
        B::seed(device, seed);
        Self::from_checkpoint(config, &mut random, device, dtype)
            .expect("a random checkpoint has every tensor")
    }

    /// Builds the model from an opened checkpoint (tensors are taken from it).
    pub fn from_checkpoint(
        config: &LlavaConfig,
        checkpoint: &mut Checkpoint,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut l = Loader {
            checkpoint,
            device,
            dtype,
        };
        let vision = ClipVision::load(&config.vision, config.feature_layers, &mut l)?;
        let (vh, th, bias) = (
            config.vision.hidden,
            config.text.hidden,
            config.projector_bias,
        );
        let projector = Projector {
            linear_1: l.linear("projector.linear_1", vh, th, bias)?,
            linear_2: l.linear("projector.linear_2", th, th, bias)?,
            activation: config.projector_activation,
        };
        let decoder = LlamaDecoder::load(&config.text, &mut l)?;
        Ok(Self {
            vision,
            projector,
            decoder,
            drop_class_token: config.feature_strategy == FeatureStrategy::Default,
        })
    }

    /// All tensors under their published llava-hf names; `save` them as `model.safetensors`.
    pub fn export(&self) -> Exporter {
        let mut e = Exporter::default();
        self.vision.export(&mut e);
        e.linear("projector.linear_1", &self.projector.linear_1);
        e.linear("projector.linear_2", &self.projector.linear_2);
        self.decoder.export(&mut e);
        e
    }

    /// Projected image features, one row per image token.
    ///
    /// # Shapes
    /// - `pixels`: `[batch, channels, size, size]` -> `[batch, image_tokens, text_hidden]`
    pub fn image_features(&self, pixels: Tensor<B, 4>) -> Tensor<B, 3> {
        let hidden = self.vision.forward(pixels);
        let [b, n, h] = hidden.dims();
        let selected = if self.drop_class_token {
            hidden.slice([0..b, 1..n, 0..h])
        } else {
            hidden
        };
        self.projector.forward(selected)
    }
}
