//! One model interface for every architecture: what the engine, the scheduler and the CLI
//! need from a vision-language model, so that none of them knows which one runs.
//!
//! A model comes in two halves. The [`Frontend`] needs no backend: it renders chat
//! prompts, tokenises, and preprocesses images (the engine uses it on the caller's
//! thread, to check a request before any tensor exists). The [`VisionLanguageModel`] holds
//! the weights: it turns preprocessed images into features and a prompt into the
//! decoder's input ([`Prompt`]: embeddings, slot kinds and, for multimodal RoPE, each
//! token's position). The decoder and its [`crate::Runner`] are shared by all
//! architectures, so policies see the same `LayerView` whatever runs.
//!
//! [`Architecture::of_dir`] reads `config.json` and picks the architecture;
//! [`load_frontend`] and [`load_model`] build the two halves.

use std::path::Path;

use burn::tensor::{DType, Tensor, backend::Backend};
use ecache_core::SlotKind;
use image::{DynamicImage, RgbImage};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::kernels::KernelBackend;
use crate::llama::LlamaDecoder;
use crate::preprocess::ImageLimits;
pub use crate::preprocess::open_image;
use crate::prompt::{PromptTokenizer, Turn};

/// The architectures ecache runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// LLaVA-1.5 (`llava`): CLIP, a two-layer projector, a LLaMA decoder.
    Llava,
    /// Qwen2-VL (`qwen2_vl`): a ViT with 2-D rotary positions, a 2 x 2 patch merger, a
    /// Qwen2 decoder with multimodal RoPE.
    Qwen2Vl,
    /// Qwen2.5-VL (`qwen2_5_vl`): Qwen2-VL with window attention, RMSNorm and gated MLPs
    /// in the tower.
    Qwen25Vl,
}

impl Architecture {
    /// Every supported architecture.
    pub const ALL: [Architecture; 3] = [Self::Llava, Self::Qwen2Vl, Self::Qwen25Vl];

    /// Its `model_type` in `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llava => "llava",
            Self::Qwen2Vl => "qwen2_vl",
            Self::Qwen25Vl => "qwen2_5_vl",
        }
    }

    /// Its class in `config.json`'s `architectures`.
    pub fn class(self) -> &'static str {
        match self {
            Self::Llava => "LlavaForConditionalGeneration",
            Self::Qwen2Vl => "Qwen2VLForConditionalGeneration",
            Self::Qwen25Vl => "Qwen2_5_VLForConditionalGeneration",
        }
    }

    /// The supported architectures, for error messages: `llava
    /// (LlavaForConditionalGeneration), ...`.
    pub fn supported() -> String {
        Self::ALL
            .iter()
            .map(|a| format!("{} ({})", a.model_type(), a.class()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The architecture a `config.json` describes, by its `model_type`, else by the first
    /// of its `architectures`; a config naming neither is taken as LLaVA (the demo model's
    /// and older llava-hf configs). `source` names the file in errors.
    pub fn of_json(text: &str, source: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ModelError::Config(format!("{source}: {e}")))?;
        let unsupported = |what: &str, name: &str| {
            ModelError::Config(format!(
                "{source}: {what} {name:?} is not supported; supported: {}",
                Self::supported()
            ))
        };
        if let Some(model_type) = value.get("model_type").and_then(|v| v.as_str()) {
            return Self::ALL
                .into_iter()
                .find(|a| a.model_type() == model_type)
                .ok_or_else(|| unsupported("model_type", model_type));
        }
        let class = value
            .get("architectures")
            .and_then(|v| v.as_array())
            .and_then(|a| a.first())
            .and_then(|v| v.as_str());
        match class {
            None => Ok(Self::Llava),
            Some(class) => Self::ALL
                .into_iter()
                .find(|a| a.class() == class)
                .ok_or_else(|| unsupported("architecture", class)),
        }
    }

    /// [`Architecture::of_json`] of `dir/config.json`.
    pub fn of_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        Self::of_json(&text, &path.display().to_string())
    }
}

/// A preprocessed image: the vision tower's input and where its tokens go.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    /// The tower's input values, row-major in `shape`.
    pub data: Vec<f32>,
    /// LLaVA: `[3, height, width]`; Qwen2-VL: `[patches, patch values]`.
    pub shape: Vec<usize>,
    /// `(temporal, height, width)` of the tower's patch grid (Qwen2-VL's
    /// `image_grid_thw`; LLaVA: one frame of `side x side` patches).
    pub grid: [usize; 3],
    /// Slots the image fills in the prompt.
    pub tokens: usize,
    /// How the image's slots lie over the picture, `(rows, columns)`, row by row: its last
    /// `rows x columns` slots each stand for one cell (any slot before them, such as
    /// CLIP's class token, for none).
    pub cells: [usize; 2],
}

/// A prompt as the decoder takes it.
///
/// # Shapes
/// - `embeds`: `[1, T, hidden]`; `kinds`: `T`; `rope`: `T` (temporal, height, width)
///   positions when the architecture places tokens itself (multimodal RoPE), else `None`
///   (token `i` at position `i`)
#[derive(Debug, Clone)]
pub struct Prompt<B: Backend> {
    pub embeds: Tensor<B, 3>,
    pub kinds: Vec<SlotKind>,
    pub rope: Option<Vec<[usize; 3]>>,
}

/// What loading a frontend can be told.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrontendOptions {
    /// LLaVA only: pad a picture to a square of the mean colour before resizing (the
    /// original LLaVA-1.5 evaluation), as llava-hf's processor does not.
    pub pad_to_square: bool,
}

/// The backend-free half of a model: its configuration, chat format, tokenizer and image
/// preprocessing.
pub trait Frontend: Send + Sync {
    /// Which architecture this is.
    fn architecture(&self) -> Architecture;

    /// The decoder's configuration (layers, KV heads, context, end-of-sequence ids).
    fn text(&self) -> &LlamaConfig;

    /// The tokenizer (answers are encoded and tokens decoded with it).
    fn tokenizer(&self) -> &PromptTokenizer;

    /// The id of the token each image slot holds in an encoded prompt.
    fn image_token(&self) -> u32;

    /// Slots every image fills when that is fixed (LLaVA); `None` when it follows each
    /// picture's size (Qwen2-VL: [`Pixels::tokens`]).
    fn image_tokens(&self) -> Option<usize>;

    /// The prompt for a bare `question` about `images` pictures, in the model's chat format
    /// with the assistant's turn opened.
    fn question(&self, question: &str, images: usize) -> Result<String>;

    /// Whether `prompt` is already in the model's format (then it is used as given).
    fn is_formatted(&self, prompt: &str) -> bool;

    /// `prompt` as the model sees it: as given when [`Frontend::is_formatted`], else
    /// [`Frontend::question`] around it.
    fn formatted(&self, prompt: &str, images: usize) -> Result<String> {
        if self.is_formatted(prompt) {
            Ok(prompt.to_string())
        } else {
            self.question(prompt, images)
        }
    }

    /// The model's chat template over `turns`, with the assistant's turn opened: the one
    /// its directory ships ([`crate::template::ChatTemplate`]), else the architecture's
    /// published one built in. A template may refuse a conversation (`raise_exception`).
    fn chat(&self, turns: &[Turn]) -> Result<String>;

    /// Text a message may not contain: it marks an image's place in a rendered prompt.
    fn image_marker(&self) -> &'static str;

    /// The picture the vision tower sees, before rescaling and normalisation.
    fn picture(&self, image: &DynamicImage) -> Result<RgbImage>;

    /// Preprocesses a decoded image.
    fn pixels(&self, image: &DynamicImage) -> Result<Pixels>;

    /// Encodes a rendered prompt with each image's marker expanded to its slots (one id
    /// per slot: the result's length is the prompt's `T`); `images` are the prompt's
    /// pictures in order, and their count must match the markers'.
    fn encode_prompt(&self, text: &str, images: &[&Pixels]) -> Result<Vec<u32>>;

    /// Opens and preprocesses an image file.
    fn open(&self, path: &Path) -> Result<Pixels> {
        self.pixels(&open_image(path)?)
    }

    /// Decodes an encoded image held in memory within `limits` and preprocesses it; `name`
    /// says where it came from in errors.
    fn decode(&self, bytes: &[u8], name: &str, limits: &ImageLimits) -> Result<Pixels> {
        self.pixels(&crate::preprocess::decode_image(bytes, name, limits)?)
    }
}

/// The half of a model that holds weights, on a backend.
pub trait VisionLanguageModel<B: KernelBackend> {
    /// The decoder every architecture shares.
    fn decoder(&self) -> &LlamaDecoder<B>;

    /// The decoder's configuration.
    fn text(&self) -> &LlamaConfig;

    /// One image's features, one row per slot it fills.
    ///
    /// # Shapes
    /// - returns `[pixels.tokens, hidden]`
    fn image_features(
        &self,
        pixels: &Pixels,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Tensor<B, 2>>;

    /// Each prompt token's (temporal, height, width) RoPE position when the architecture
    /// places tokens itself; `grids` are the prompt's images' [`Pixels::grid`], in order.
    /// `None` (the default): token `i` at `i`.
    fn rope_positions(&self, ids: &[u32], grids: &[[usize; 3]]) -> Result<Option<Vec<[usize; 3]>>> {
        let _ = (ids, grids);
        Ok(None)
    }

    /// The id of the token each image slot holds in an encoded prompt.
    fn image_token(&self) -> u32;

    /// The decoder's input for an encoded prompt ([`Frontend::encode_prompt`]) whose
    /// images have the features `features` (one tensor per image, in order) and the grids
    /// `grids`: each image slot's embedding is the next feature row.
    ///
    /// # Shapes
    /// - `ids`: `T`; `features[i]`: `[tokens of image i, hidden]` -> a [`Prompt`] of `T`
    fn prompt(
        &self,
        ids: &[u32],
        features: Vec<Tensor<B, 2>>,
        grids: &[[usize; 3]],
        device: &B::Device,
    ) -> Result<Prompt<B>> {
        if features.len() != grids.len() {
            return Err(ModelError::Prompt(format!(
                "{} images' features for {} grids",
                features.len(),
                grids.len()
            )));
        }
        let features = (!features.is_empty()).then(|| Tensor::cat(features, 0));
        let (embeds, kinds) = crate::prompt::embed_with_images(
            self.decoder(),
            ids,
            self.image_token(),
            features,
            device,
        )?;
        let rope = self.rope_positions(ids, grids)?;
        Ok(Prompt {
            embeds,
            kinds,
            rope,
        })
    }
}

/// The decoder's input for `text` about one picture: the text in the model's chat format
/// ([`Frontend::formatted`]), encoded, the picture preprocessed and
/// its features in its slots; and the picture's [`Pixels`].
pub fn image_prompt<B: KernelBackend>(
    frontend: &dyn Frontend,
    model: &dyn VisionLanguageModel<B>,
    text: &str,
    image: &DynamicImage,
    device: &B::Device,
    dtype: DType,
) -> Result<(Prompt<B>, Pixels)> {
    let pixels = frontend.pixels(image)?;
    let ids = frontend.encode_prompt(&frontend.formatted(text, 1)?, &[&pixels])?;
    let features = model.image_features(&pixels, device, dtype)?;
    let prompt = model.prompt(&ids, vec![features], &[pixels.grid], device)?;
    Ok((prompt, pixels))
}

/// Loads the frontend of the model in `dir`, whatever its architecture.
pub fn load_frontend(dir: &Path, options: FrontendOptions) -> Result<Box<dyn Frontend>> {
    Ok(match Architecture::of_dir(dir)? {
        Architecture::Llava => Box::new(crate::llava::LlavaFrontend::load(dir, options)?),
        arch @ (Architecture::Qwen2Vl | Architecture::Qwen25Vl) => {
            Box::new(crate::qwen_vl::QwenFrontend::load(dir, arch, options)?)
        }
    })
}

/// Loads the weights of the model in `dir` on `device` in `dtype`, whatever its
/// architecture; every checkpoint tensor must be used and every parameter found.
pub fn load_model<B: KernelBackend>(
    dir: &Path,
    device: &B::Device,
    dtype: DType,
) -> Result<Box<dyn VisionLanguageModel<B>>> {
    Ok(match Architecture::of_dir(dir)? {
        Architecture::Llava => Box::new(crate::llava::Llava::<B>::load(dir, device, dtype)?.0),
        Architecture::Qwen2Vl | Architecture::Qwen25Vl => {
            Box::new(crate::qwen_vl::QwenVl::<B>::load(dir, device, dtype)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architecture_from_model_type_or_class() {
        let of = |json: &str| Architecture::of_json(json, "config.json");
        assert_eq!(
            of(r#"{"model_type": "qwen2_vl"}"#).unwrap(),
            Architecture::Qwen2Vl
        );
        assert_eq!(
            of(r#"{"architectures": ["Qwen2_5_VLForConditionalGeneration"]}"#).unwrap(),
            Architecture::Qwen25Vl
        );
        assert_eq!(of("{}").unwrap(), Architecture::Llava);
        // model_type wins over the class list.
        assert_eq!(
            of(r#"{"model_type": "llava", "architectures": ["Qwen2VLForConditionalGeneration"]}"#)
                .unwrap(),
            Architecture::Llava
        );
        let e = of(r#"{"model_type": "idefics3"}"#).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains("\"idefics3\""),
            "{e}"
        );
        for a in Architecture::ALL {
            assert!(e.contains(a.model_type()) && e.contains(a.class()), "{e}");
        }
        let e = of(r#"{"architectures": ["MllamaForConditionalGeneration"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("MllamaForConditionalGeneration"), "{e}");
    }
}
