//! LLaVA: the CLIP tower, the projector and the LLaMA decoder, loaded from a Hugging Face
//! model directory.

use std::path::Path;

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{DType, Tensor, TensorData, backend::Backend};
use image::{DynamicImage, RgbImage};

use crate::clip::ClipVision;
use crate::config::{Activation, FeatureStrategy, LlamaConfig, LlavaConfig};
use crate::error::{ModelError, Result};
use crate::export::Exporter;
use crate::kernels::KernelBackend;
use crate::layers::{Loader, activate};
use crate::llama::LlamaDecoder;
use crate::model::{Architecture, Frontend, FrontendOptions, Pixels, VisionLanguageModel};
use crate::preprocess::ImageProcessor;
use crate::prompt::{PromptTokenizer, Turn, chat_template, expand_image_tokens};
use crate::template::ChatTemplate;
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
    #[module(skip)]
    text: LlamaConfig,
    #[module(skip)]
    image_token_id: u32,
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
            text: config.text.clone(),
            image_token_id: config.image_token_id,
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

impl<B: KernelBackend> VisionLanguageModel<B> for Llava<B> {
    fn decoder(&self) -> &LlamaDecoder<B> {
        &self.decoder
    }

    fn text(&self) -> &LlamaConfig {
        &self.text
    }

    fn image_token(&self) -> u32 {
        self.image_token_id
    }

    fn image_features(
        &self,
        pixels: &Pixels,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Tensor<B, 2>> {
        let &[c, h, w] = pixels.shape.as_slice() else {
            return Err(ModelError::Image(format!(
                "LLaVA takes [channels, height, width] pixels, got {:?}",
                pixels.shape
            )));
        };
        let input = Tensor::<B, 4>::from_data(
            TensorData::new(pixels.data.clone(), [1, c, h, w]),
            (device, dtype),
        );
        let features = self.image_features(input);
        let [_, n, hidden] = features.dims();
        Ok(features.reshape([n, hidden]))
    }
}

/// LLaVA's [`Frontend`]: llava-hf's chat template, the tokenizer with its `<image>` token
/// (one per picture, expanded to the picture's slots), the CLIP image processor.
pub struct LlavaFrontend {
    config: LlavaConfig,
    tokenizer: PromptTokenizer,
    processor: ImageProcessor,
    template: Option<ChatTemplate>,
}

impl LlavaFrontend {
    /// Loads `config.json`, `tokenizer.json` and `preprocessor_config.json` from `dir`.
    pub fn load(dir: &Path, options: FrontendOptions) -> Result<Self> {
        let config = LlavaConfig::from_path(&dir.join("config.json"))?;
        let tokenizer = PromptTokenizer::load(dir, config.image_token_id)?;
        let mut processor = ImageProcessor::load(dir)?;
        processor.pad_to_square = options.pad_to_square;
        Ok(Self {
            config,
            tokenizer,
            processor,
            template: ChatTemplate::load(dir)?,
        })
    }

    /// The validated `config.json`.
    pub fn config(&self) -> &LlavaConfig {
        &self.config
    }
}

impl Frontend for LlavaFrontend {
    fn architecture(&self) -> Architecture {
        Architecture::Llava
    }

    fn text(&self) -> &LlamaConfig {
        &self.config.text
    }

    fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    fn image_token(&self) -> u32 {
        self.config.image_token_id
    }

    fn image_tokens(&self) -> Option<usize> {
        Some(self.config.image_tokens())
    }

    fn question(&self, question: &str, images: usize) -> Result<String> {
        if images == 0 {
            return Ok(question.to_string());
        }
        self.chat(&[Turn::question(question, images)])
    }

    fn is_formatted(&self, prompt: &str) -> bool {
        prompt.contains("<image>") || prompt.contains("USER:")
    }

    fn chat(&self, turns: &[Turn]) -> Result<String> {
        ChatTemplate::render_or(self.template.as_ref(), turns, chat_template)
    }

    fn image_marker(&self) -> &'static str {
        "<image>"
    }

    fn picture(&self, image: &DynamicImage) -> Result<RgbImage> {
        self.processor.picture(image)
    }

    fn pixels(&self, image: &DynamicImage) -> Result<Pixels> {
        let (data, shape) = self.processor.process(image)?;
        let vision = &self.config.vision;
        let size = vision.image_size;
        if shape[1] != size || shape[2] != size {
            return Err(ModelError::Image(format!(
                "preprocessor_config.json makes {} x {} pictures but the vision tower takes {size} x {size} (vision_config.image_size)",
                shape[2], shape[1]
            )));
        }
        let side = size / vision.patch_size;
        Ok(Pixels {
            data,
            shape: shape.to_vec(),
            grid: [1, side, side],
            tokens: self.config.image_tokens(),
            cells: [side, side],
        })
    }

    fn encode_prompt(&self, text: &str, images: &[&Pixels]) -> Result<Vec<u32>> {
        if images.len() > 1 {
            return Err(ModelError::Prompt(format!(
                "{} images; LLaVA-1.5 takes one per prompt",
                images.len()
            )));
        }
        let ids = self.tokenizer.encode_prompt(text, !images.is_empty())?;
        let Some(image) = images.first() else {
            return Ok(ids);
        };
        let image_token = self.config.image_token_id;
        Ok(expand_image_tokens(ids, image_token, &[image.tokens]))
    }
}
