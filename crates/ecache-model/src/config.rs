//! Hugging Face `config.json` mirrored in serde structs (with transformers' defaults), and
//! the validated runtime configuration the model is built from.

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};

/// `LlavaConfig` as transformers writes it. Unknown keys are ignored: HF configs carry many.
#[derive(Debug, Clone, Deserialize)]
pub struct HfLlavaConfig {
    pub vision_config: HfClipVisionConfig,
    pub text_config: HfLlamaConfig,
    #[serde(default = "d_image_token", alias = "image_token_id")]
    pub image_token_index: u32,
    #[serde(default = "d_feature_layer")]
    pub vision_feature_layer: i64,
    #[serde(default = "d_strategy")]
    pub vision_feature_select_strategy: String,
    #[serde(default = "d_gelu")]
    pub projector_hidden_act: String,
    #[serde(default = "yes")]
    pub multimodal_projector_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

/// `CLIPVisionConfig` with transformers' defaults (the published LLaVA configs rely on them).
#[derive(Debug, Clone, Deserialize)]
pub struct HfClipVisionConfig {
    #[serde(default = "d_768")]
    pub hidden_size: usize,
    #[serde(default = "d_3072")]
    pub intermediate_size: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_12")]
    pub num_attention_heads: usize,
    #[serde(default = "d_3")]
    pub num_channels: usize,
    #[serde(default = "d_224")]
    pub image_size: usize,
    #[serde(default = "d_32")]
    pub patch_size: usize,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_1e5")]
    pub layer_norm_eps: f64,
}

/// `rope_parameters` of transformers 5 configs.
#[derive(Debug, Clone, Deserialize)]
pub struct HfRopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
    /// Qwen2-VL's multimodal RoPE: how many of the `head_dim / 2` frequencies follow the
    /// temporal, height and width positions.
    #[serde(default)]
    pub mrope_section: Option<[usize; 3]>,
}

/// `LlamaConfig` with transformers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct HfLlamaConfig {
    #[serde(default = "d_32000")]
    pub vocab_size: usize,
    #[serde(default = "d_4096")]
    pub hidden_size: usize,
    #[serde(default = "d_11008")]
    pub intermediate_size: usize,
    #[serde(default = "d_32")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_32")]
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "d_silu")]
    pub hidden_act: String,
    #[serde(default = "d_2048")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_1e6")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<HfRopeParameters>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "d_bos")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "d_eos")]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

macro_rules! defaults {
    ($($name:ident: $ty:ty = $value:expr;)*) => { $(fn $name() -> $ty { $value })* };
}
defaults! {
    d_image_token: u32 = 32000; d_feature_layer: i64 = -2; yes: bool = true;
    d_strategy: String = "default".into(); d_gelu: String = "gelu".into();
    d_quick_gelu: String = "quick_gelu".into(); d_silu: String = "silu".into();
    d_768: usize = 768; d_3072: usize = 3072; d_12: usize = 12; d_3: usize = 3;
    d_224: usize = 224; d_32: usize = 32; d_32000: usize = 32000; d_4096: usize = 4096;
    d_11008: usize = 11008; d_2048: usize = 2048; d_1e5: f64 = 1e-5; d_1e6: f64 = 1e-6;
    d_bos: Option<u32> = Some(1); d_eos: Option<serde_json::Value> = Some(2.into());
}

/// Activation functions the checkpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (CLIP).
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
    /// `x * sigmoid(x)`.
    Silu,
}

impl Activation {
    fn parse(field: &str, name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(ModelError::Config(format!(
                "{field} = {other:?} is not supported (quick_gelu, gelu, silu)"
            ))),
        }
    }
}

/// Validated CLIP vision tower dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
}

impl ClipConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patch tokens (class token excluded).
    pub fn patches(&self) -> usize {
        self.grid() * self.grid()
    }
}

/// Validated LLaMA decoder dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub max_positions: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Bias on the output projection (and, for LLaMA, on the other three).
    pub attention_bias: bool,
    /// Bias on the query, key and value projections.
    pub qkv_bias: bool,
    /// Multimodal RoPE sections (Qwen2-VL), `None` for plain RoPE.
    pub mrope_section: Option<[usize; 3]>,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub tie_word_embeddings: bool,
}

/// Which vision tokens feed the projector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureStrategy {
    /// Drop the class token.
    Default,
    /// Keep every token, class token included.
    Full,
}

/// The validated LLaVA configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaConfig {
    pub vision: ClipConfig,
    pub text: LlamaConfig,
    pub image_token_id: u32,
    /// Encoder layers to run: `hidden_states[feature_layers]` feeds the projector.
    pub feature_layers: usize,
    pub feature_strategy: FeatureStrategy,
    pub projector_activation: Activation,
    pub projector_bias: bool,
}

impl LlavaConfig {
    /// Image tokens one image becomes in the prompt.
    pub fn image_tokens(&self) -> usize {
        match self.feature_strategy {
            FeatureStrategy::Default => self.vision.patches(),
            FeatureStrategy::Full => self.vision.patches() + 1,
        }
    }

    /// Reads and validates `config.json`.
    pub fn from_path(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses and validates the text of a `config.json`; `source` names it in errors.
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        check_architecture(text, source)?;
        let hf: HfLlavaConfig =
            serde_json::from_str(text).map_err(|e| ModelError::Config(format!("{source}: {e}")))?;
        Self::try_from(hf).map_err(|e| match e {
            ModelError::Config(m) => ModelError::Config(format!("{source}: {m}")),
            other => other,
        })
    }
}

/// Refuses a `config.json` of another architecture (or of none supported, naming the
/// supported ones) instead of failing later on a field it lacks.
fn check_architecture(text: &str, source: &str) -> Result<()> {
    match crate::model::Architecture::of_json(text, source)? {
        crate::model::Architecture::Llava => Ok(()),
        other => Err(ModelError::Config(format!(
            "{source}: model_type {:?} is not LLaVA (load it with ecache_model::model::load_model)",
            other.model_type()
        ))),
    }
}

/// Which decoder a text config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKind {
    /// LLaMA (LLaVA's decoder).
    Llama,
    /// Qwen2 with multimodal RoPE (Qwen2-VL's decoder).
    Qwen2Vl,
}

impl HfLlamaConfig {
    /// The validated decoder dimensions; `tie_word_embeddings` is the outer config's.
    pub fn validate(&self, tie_word_embeddings: bool, kind: TextKind) -> Result<LlamaConfig> {
        let bad = |m: String| Err(ModelError::Config(m));
        let t = self;
        let kv_heads = t.num_key_value_heads.unwrap_or(t.num_attention_heads);
        if t.num_attention_heads == 0
            || kv_heads == 0
            || !t.num_attention_heads.is_multiple_of(kv_heads)
        {
            return bad(format!(
                "text_config.num_attention_heads {} is not a multiple of num_key_value_heads {kv_heads}",
                t.num_attention_heads
            ));
        }
        let head_dim = t.head_dim.unwrap_or(t.hidden_size / t.num_attention_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return bad(format!(
                "text_config.head_dim {head_dim} must be even and positive"
            ));
        }
        if Activation::parse("text_config.hidden_act", &t.hidden_act)? != Activation::Silu {
            return bad(format!(
                "text_config.hidden_act = {:?}: LLaMA uses silu",
                t.hidden_act
            ));
        }
        // Qwen2-VL configs written before transformers 5 (the published checkpoints') keep
        // the sections in `rope_scaling` with the type "mrope" (or "default"); transformers
        // reads them as these `rope_parameters`.
        let legacy = match (kind, t.rope_scaling.as_ref()) {
            (TextKind::Qwen2Vl, Some(serde_json::Value::Object(o)))
                if t.rope_parameters.is_none() =>
            {
                let kind = o.get("rope_type").or_else(|| o.get("type"));
                match kind.and_then(|k| k.as_str()) {
                    Some("mrope" | "default") => Some(HfRopeParameters {
                        rope_theta: None,
                        rope_type: None,
                        mrope_section: o
                            .get("mrope_section")
                            .map(|v| serde_json::from_value(v.clone()))
                            .transpose()
                            .map_err(|e| {
                                ModelError::Config(format!(
                                    "text_config.rope_scaling.mrope_section: {e}"
                                ))
                            })?,
                    }),
                    _ => None,
                }
            }
            _ => None,
        };
        if let Some(scaling) = t
            .rope_scaling
            .as_ref()
            .filter(|s| !s.is_null() && legacy.is_none())
        {
            return bad(format!(
                "text_config.rope_scaling = {scaling} is not supported"
            ));
        }
        let rope_parameters = t.rope_parameters.as_ref().or(legacy.as_ref());
        let rope_type = rope_parameters.and_then(|p| p.rope_type.clone());
        let mrope_section = rope_parameters.and_then(|p| p.mrope_section);
        let mrope_section = match (kind, mrope_section) {
            (TextKind::Llama, None) => None,
            (TextKind::Llama, Some(_)) => {
                return bad(
                    "text_config.rope_parameters.mrope_section is a Qwen2-VL key, not LLaMA's"
                        .into(),
                );
            }
            (TextKind::Qwen2Vl, None) => {
                return bad(
                    "text_config.rope_parameters.mrope_section is missing (Qwen2-VL)".into(),
                );
            }
            (TextKind::Qwen2Vl, Some(s)) if s.iter().sum::<usize>() != head_dim / 2 => {
                return bad(format!(
                    "text_config.rope_parameters.mrope_section {s:?} must sum to head_dim / 2 = {}",
                    head_dim / 2
                ));
            }
            (TextKind::Qwen2Vl, Some(s)) => Some(s),
        };
        if let Some(kind) = rope_type.filter(|k| k != "default") {
            return bad(format!(
                "text_config.rope_parameters.rope_type = {kind:?} is not supported (default)"
            ));
        }
        let rope_theta = rope_parameters
            .and_then(|p| p.rope_theta)
            .or(t.rope_theta)
            .unwrap_or(10000.0);
        let eos_token_ids = match &t.eos_token_id {
            None => Vec::new(),
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            Some(other) => {
                return bad(format!(
                    "text_config.eos_token_id = {other} is not a token id or list"
                ));
            }
        };
        let text = LlamaConfig {
            vocab_size: t.vocab_size,
            hidden: t.hidden_size,
            intermediate: t.intermediate_size,
            layers: t.num_hidden_layers,
            heads: t.num_attention_heads,
            kv_heads,
            head_dim,
            max_positions: t.max_position_embeddings,
            rms_norm_eps: t.rms_norm_eps,
            rope_theta,
            // LLaMA's attention_bias covers all four projections; Qwen2 has biases on the
            // query, key and value projections only.
            attention_bias: t.attention_bias && kind == TextKind::Llama,
            qkv_bias: t.attention_bias || kind == TextKind::Qwen2Vl,
            mrope_section,
            mlp_bias: t.mlp_bias,
            bos_token_id: t.bos_token_id,
            eos_token_ids,
            tie_word_embeddings: t.tie_word_embeddings || tie_word_embeddings,
        };
        Ok(text)
    }
}

impl TryFrom<HfLlavaConfig> for LlavaConfig {
    type Error = ModelError;

    fn try_from(hf: HfLlavaConfig) -> Result<Self> {
        let bad = |m: String| Err(ModelError::Config(m));
        let v = &hf.vision_config;
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return bad(format!(
                "vision_config.image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return bad(format!(
                "vision_config.hidden_size {} is not divisible by num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        let vision = ClipConfig {
            hidden: v.hidden_size,
            intermediate: v.intermediate_size,
            layers: v.num_hidden_layers,
            heads: v.num_attention_heads,
            channels: v.num_channels,
            image_size: v.image_size,
            patch_size: v.patch_size,
            activation: Activation::parse("vision_config.hidden_act", &v.hidden_act)?,
            layer_norm_eps: v.layer_norm_eps,
        };
        let text = hf
            .text_config
            .validate(hf.tie_word_embeddings, TextKind::Llama)?;
        let layers = vision.layers as i64;
        let feature_layers = if hf.vision_feature_layer < 0 {
            layers + 1 + hf.vision_feature_layer
        } else {
            hf.vision_feature_layer
        };
        if !(0..=layers).contains(&feature_layers) {
            return bad(format!(
                "vision_feature_layer {} is outside a tower of {layers} layers",
                hf.vision_feature_layer
            ));
        }
        let feature_strategy = match hf.vision_feature_select_strategy.as_str() {
            "default" => FeatureStrategy::Default,
            "full" => FeatureStrategy::Full,
            other => {
                return bad(format!(
                    "vision_feature_select_strategy = {other:?} is not supported (default, full)"
                ));
            }
        };
        if hf.image_token_index as usize >= text.vocab_size {
            return bad(format!(
                "image_token_index {} is outside the vocabulary of {}",
                hf.image_token_index, text.vocab_size
            ));
        }
        Ok(LlavaConfig {
            vision,
            text,
            image_token_id: hf.image_token_index,
            feature_layers: feature_layers as usize,
            feature_strategy,
            projector_activation: Activation::parse(
                "projector_hidden_act",
                &hf.projector_hidden_act,
            )?,
            projector_bias: hf.multimodal_projector_bias,
        })
    }
}
