//! The demo model's shape and the Hugging Face files that describe it: `config.json` and
//! `preprocessor_config.json` (the weights and `tokenizer.json` are written beside them).

use std::path::Path;

use serde_json::json;

use crate::DemoError;
use crate::language::{BOS, EOS, IMAGE, PAD, vocabulary};
use crate::scene::IMAGE_SIDE;

/// Sizes of the demo model. The defaults train on two CPU cores in about half an hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoShape {
    pub vision_hidden: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub patch: usize,
    pub text_hidden: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    pub text_kv_heads: usize,
    pub text_intermediate: usize,
}

impl Default for DemoShape {
    fn default() -> Self {
        Self {
            vision_hidden: 128,
            vision_layers: 4,
            vision_heads: 4,
            patch: 8,
            text_hidden: 256,
            text_layers: 4,
            text_heads: 4,
            text_kv_heads: 2,
            text_intermediate: 688,
        }
    }
}

impl DemoShape {
    /// Image tokens per picture.
    pub fn image_tokens(&self) -> usize {
        (IMAGE_SIDE as usize / self.patch).pow(2)
    }

    /// The model's `config.json` (transformers' `LlavaConfig` layout).
    pub fn config_json(&self) -> serde_json::Value {
        json!({
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "image_token_index": IMAGE,
            "image_seq_length": self.image_tokens(),
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": true,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
            "tie_word_embeddings": false,
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": self.vision_hidden,
                "intermediate_size": 4 * self.vision_hidden,
                "num_hidden_layers": self.vision_layers,
                "num_attention_heads": self.vision_heads,
                "num_channels": 3,
                "image_size": IMAGE_SIDE,
                "patch_size": self.patch,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "projection_dim": self.vision_hidden
            },
            "text_config": {
                "model_type": "llama",
                "vocab_size": vocabulary().len(),
                "hidden_size": self.text_hidden,
                "intermediate_size": self.text_intermediate,
                "num_hidden_layers": self.text_layers,
                "num_attention_heads": self.text_heads,
                "num_key_value_heads": self.text_kv_heads,
                "head_dim": self.text_hidden / self.text_heads,
                "hidden_act": "silu",
                "max_position_embeddings": 512,
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "attention_bias": false,
                "mlp_bias": false,
                "bos_token_id": BOS,
                "eos_token_id": EOS,
                "pad_token_id": PAD,
                "tie_word_embeddings": false
            }
        })
    }
}

/// The CLIP processor settings: scenes are already square at the model's size, so resize
/// and crop keep them as they are; CLIP's mean and standard deviation.
pub fn preprocessor_json() -> serde_json::Value {
    json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": true,
        "size": {"shortest_edge": IMAGE_SIDE},
        "resample": 3,
        "do_center_crop": true,
        "crop_size": {"height": IMAGE_SIDE, "width": IMAGE_SIDE},
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "do_convert_rgb": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]
    })
}

/// Writes `config.json`, `preprocessor_config.json` and `tokenizer.json` into `dir`.
pub fn write_descriptors(dir: &Path, shape: &DemoShape) -> Result<(), DemoError> {
    std::fs::create_dir_all(dir).map_err(|e| DemoError::io(dir, e))?;
    let write = |name: &str, value: serde_json::Value| {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(&value).expect("json values serialise");
        std::fs::write(&path, text + "\n").map_err(|e| DemoError::io(&path, e))
    };
    write("config.json", shape.config_json())?;
    write("preprocessor_config.json", preprocessor_json())?;
    crate::language::write_tokenizer(&dir.join("tokenizer.json"))
}
