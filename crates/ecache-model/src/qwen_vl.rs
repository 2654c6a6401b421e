//! Qwen2-VL and Qwen2.5-VL behind the model interface ([`crate::model`]): the vision
//! tower ([`crate::qwen_vision`]) and the Qwen2 decoder loaded from a Hugging Face
//! directory, and the frontend with the ChatML template, the tokenizer and the
//! `smart_resize` image processor ([`crate::qwen_image`]).

use std::path::Path;

use burn::tensor::{DType, Tensor, TensorData};
use image::{DynamicImage, RgbImage};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::kernels::KernelBackend;
use crate::layers::Loader;
use crate::llama::LlamaDecoder;
use crate::model::{Architecture, Frontend, FrontendOptions, Pixels, VisionLanguageModel};
use crate::prompt::{PromptTokenizer, Turn};
use crate::qwen::{self, QwenVlConfig};
use crate::qwen_image::QwenImageProcessor;
use crate::qwen_vision::QwenVision;
use crate::template::ChatTemplate;
use crate::weights::Checkpoint;

/// A Qwen2-VL or Qwen2.5-VL model: the vision tower (its merger included) and the
/// decoder.
#[derive(Debug)]
pub struct QwenVl<B: KernelBackend> {
    pub vision: QwenVision<B>,
    pub decoder: LlamaDecoder<B>,
    pub config: QwenVlConfig,
}

impl<B: KernelBackend> QwenVl<B> {
    /// Loads `config.json` and the weights of a Hugging Face directory in `dtype`. Every
    /// checkpoint tensor must be used and every parameter found.
    pub fn load(dir: &Path, device: &B::Device, dtype: DType) -> Result<Self> {
        let config = QwenVlConfig::from_path(&dir.join("config.json"))?;
        let mut checkpoint = Checkpoint::open(dir)?;
        let model = Self::from_checkpoint(config, &mut checkpoint, device, dtype)?;
        checkpoint.finish()?;
        Ok(model)
    }

    /// A model of `config` with random weights (see [`Checkpoint::random`]); `seed` seeds
    /// the backend's generator first.
    pub fn init(config: QwenVlConfig, device: &B::Device, dtype: DType, seed: u64) -> Self {
        B::seed(device, seed);
        Self::from_checkpoint(config, &mut Checkpoint::random(0.02), device, dtype)
            .expect("a random checkpoint has every tensor")
    }

    /// Builds the model from an opened checkpoint (tensors are taken from it).
    pub fn from_checkpoint(
        config: QwenVlConfig,
        checkpoint: &mut Checkpoint,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut l = Loader {
            checkpoint,
            device,
            dtype,
        };
        let vision = QwenVision::load(&config.vision, &mut l)?;
        let decoder = LlamaDecoder::load(&config.text, &mut l)?;
        Ok(Self {
            vision,
            decoder,
            config,
        })
    }
}

impl<B: KernelBackend> VisionLanguageModel<B> for QwenVl<B> {
    fn decoder(&self) -> &LlamaDecoder<B> {
        &self.decoder
    }

    fn text(&self) -> &LlamaConfig {
        &self.config.text
    }

    fn image_token(&self) -> u32 {
        self.config.image_token_id
    }

    fn image_features(
        &self,
        pixels: &Pixels,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Tensor<B, 2>> {
        let &[rows, row_len] = pixels.shape.as_slice() else {
            return Err(ModelError::Image(format!(
                "Qwen2-VL takes [patches, patch values] pixels, got {:?}",
                pixels.shape
            )));
        };
        let input = Tensor::<B, 2>::from_data(
            TensorData::new(pixels.data.clone(), [rows, row_len]),
            (device, dtype),
        );
        self.vision.forward(input, pixels.grid)
    }

    fn rope_positions(&self, ids: &[u32], grids: &[[usize; 3]]) -> Result<Option<Vec<[usize; 3]>>> {
        let (positions, _) = qwen::mrope_positions(
            ids,
            self.config.image_token_id,
            grids,
            self.config.vision.merge,
        )?;
        Ok(Some(positions))
    }
}

/// Qwen2-VL's [`Frontend`]: the ChatML template, `tokenizer.json` (no BOS; one
/// `<|image_pad|>` per picture, expanded to its tokens) and the `smart_resize` processor,
/// whose grid sets each picture's token count.
pub struct QwenFrontend {
    architecture: Architecture,
    config: QwenVlConfig,
    tokenizer: PromptTokenizer,
    processor: QwenImageProcessor,
    template: Option<ChatTemplate>,
}

impl QwenFrontend {
    /// Loads `config.json`, `tokenizer.json` and `preprocessor_config.json` from `dir`.
    pub fn load(dir: &Path, architecture: Architecture, options: FrontendOptions) -> Result<Self> {
        if options.pad_to_square {
            return Err(ModelError::Config(format!(
                "pad_to_square is LLaVA's; {} keeps each picture's aspect ratio",
                architecture.model_type()
            )));
        }
        let config = QwenVlConfig::from_path(&dir.join("config.json"))?;
        let tokenizer = PromptTokenizer::load(dir, config.image_token_id)?;
        let processor = QwenImageProcessor::load(dir)?;
        if processor.merge_size() != config.vision.merge {
            return Err(ModelError::Config(format!(
                "{}: merge_size {} is not the tower's spatial_merge_size {}",
                dir.join("preprocessor_config.json").display(),
                processor.merge_size(),
                config.vision.merge
            )));
        }
        Ok(Self {
            architecture,
            config,
            tokenizer,
            processor,
            template: ChatTemplate::load(dir)?,
        })
    }

    /// The validated `config.json`.
    pub fn config(&self) -> &QwenVlConfig {
        &self.config
    }
}

impl Frontend for QwenFrontend {
    fn architecture(&self) -> Architecture {
        self.architecture
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
        None
    }

    fn question(&self, question: &str, images: usize) -> Result<String> {
        self.chat(&[Turn::question(question, images)])
    }

    fn is_formatted(&self, prompt: &str) -> bool {
        prompt.contains("<|im_start|>") || prompt.contains(qwen::PICTURE)
    }

    fn chat(&self, turns: &[Turn]) -> Result<String> {
        ChatTemplate::render_or(self.template.as_ref(), turns, qwen::chat_template)
    }

    fn image_marker(&self) -> &'static str {
        "<|image_pad|>"
    }

    fn picture(&self, image: &DynamicImage) -> Result<RgbImage> {
        self.processor.picture(image)
    }

    fn pixels(&self, image: &DynamicImage) -> Result<Pixels> {
        let p = self.processor.process(image)?;
        let merge = self.config.vision.merge;
        let tokens = self.processor.image_tokens(p.grid);
        Ok(Pixels {
            shape: vec![p.rows(), p.row_len],
            grid: p.grid,
            tokens,
            cells: [p.grid[1] / merge, p.grid[2] / merge],
            data: p.patches,
        })
    }

    fn encode_prompt(&self, text: &str, images: &[&Pixels]) -> Result<Vec<u32>> {
        if text.trim().is_empty() {
            return Err(ModelError::Prompt("the prompt is empty".into()));
        }
        let counts: Vec<usize> = images.iter().map(|p| p.tokens).collect();
        qwen::encode_prompt(&self.tokenizer, text, self.config.image_token_id, &counts)
    }
}
