//! Run configuration in TOML: model, policy, generation and evaluation sections.
//!
//! Every section denies unknown keys. Syntax and types are checked when the file is
//! parsed; ranges by [`RunConfig::validate`]; a policy's own parameters by the registry
//! when the policy is built (the core does not know them).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::budget::LayerBudgets;
use crate::error::{Error, Result};

/// A whole run configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Which model, on which backend, in which precision.
    #[serde(default)]
    pub model: ModelConfig,
    /// The cache policy.
    pub policy: PolicyConfig,
    /// Decoding settings.
    #[serde(default)]
    pub generation: GenerationConfig,
    /// Evaluation sweeps.
    #[serde(default)]
    pub evaluation: EvaluationConfig,
}

/// Compute backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn's pure-Rust CPU backend.
    #[default]
    Flex,
    /// burn's ndarray CPU backend.
    Ndarray,
    /// NVIDIA GPUs (needs the `cuda` feature).
    Cuda,
    /// Any GPU through wgpu: Vulkan, Metal, DX12 (needs the `wgpu` feature). The same
    /// CubeCL kernels as CUDA; on a CPU-only machine Mesa's software Vulkan driver
    /// (lavapipe) runs them, slowly: a correctness path.
    Wgpu,
}

/// Floating-point precision of weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

/// The `[model]` section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A Hugging Face model directory; `None` selects the embedded demo model.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub backend: BackendKind,
    #[serde(default)]
    pub dtype: Precision,
}

/// Which RoPE position the next token gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PositionMode {
    /// The true token count `N` (correct).
    #[default]
    Absolute,
    /// The compressed cache length, reproducing the public reference code.
    Compact,
}

impl PositionMode {
    /// RoPE position of the next token, given `N` tokens processed so far and the current
    /// cache length of the layer.
    pub fn next_position(self, tokens_seen: usize, cache_len: usize) -> usize {
        match self {
            PositionMode::Absolute => tokens_seen,
            PositionMode::Compact => cache_len,
        }
    }
}

/// The `[policy]` section: a registered name, a budget, and the policy's own parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Registry name: `elastic`, `h2o`, `local`, `full`, or a plug-in's.
    pub name: String,
    /// Fraction of slots kept, in (0, 1].
    pub budget: f64,
    /// RoPE positions after eviction.
    #[serde(default)]
    pub positions: PositionMode,
    /// How the budget is spread over layers: `uniform` or `pyramid`.
    #[serde(default)]
    pub layer_budgets: LayerBudgets,
    /// The pyramid's first-to-last layer weight ratio, >= 1 (ignored when uniform).
    #[serde(default = "default_beta")]
    pub pyramid_beta: f64,
    /// Policy-specific parameters, checked by the policy's constructor.
    #[serde(default)]
    pub params: toml::Table,
}

impl PolicyConfig {
    /// A section with no parameters.
    pub fn new(name: &str, budget: f64) -> Self {
        Self {
            name: name.to_string(),
            budget,
            positions: PositionMode::default(),
            layer_budgets: LayerBudgets::Uniform,
            pyramid_beta: default_beta(),
            params: toml::Table::new(),
        }
    }

    /// Sets parameter `key` from command-line text: a TOML value (`3`, `0.5`, `true`,
    /// `"mean"`), or a bare word taken as a string.
    pub fn set_param(&mut self, key: &str, raw: &str) -> Result<()> {
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(Error::ConfigValue {
                field: "params".into(),
                value: format!("{key:?}"),
                expected: "a parameter name of letters, digits and `_`".into(),
            });
        }
        let value = match format!("v = {raw}").parse::<toml::Table>() {
            Ok(mut t) => t
                .remove("v")
                .unwrap_or_else(|| toml::Value::String(raw.to_string())),
            Err(_) => toml::Value::String(raw.to_string()),
        };
        self.params.insert(key.to_string(), value);
        Ok(())
    }
}

/// The `[generation]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationConfig {
    /// Stop after this many new tokens (or at EOS).
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// 0 selects greedy decoding.
    #[serde(default)]
    pub temperature: f64,
    /// Nucleus sampling mass, in (0, 1].
    #[serde(default = "one")]
    pub top_p: f64,
    /// Sampling seed.
    #[serde(default)]
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: default_max_new_tokens(),
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

fn default_beta() -> f64 {
    crate::budget::DEFAULT_PYRAMID_BETA
}

fn default_max_new_tokens() -> usize {
    64
}

fn one() -> f64 {
    1.0
}

/// The `[evaluation]` section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationConfig {
    /// Dataset in the LLaVA / MM-Vet JSON layout.
    #[serde(default)]
    pub dataset: Option<PathBuf>,
    /// Policies to sweep (the `[policy]` section's when empty).
    #[serde(default)]
    pub policies: Vec<String>,
    /// Budgets to sweep (the `[policy]` section's when empty).
    #[serde(default)]
    pub budgets: Vec<f64>,
    /// Evaluate at most this many items.
    #[serde(default)]
    pub max_items: Option<usize>,
    /// Where results are written as JSON.
    #[serde(default)]
    pub output: Option<PathBuf>,
}

impl RunConfig {
    /// Parses and validates TOML text; `origin` names the source in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        if text.trim().is_empty() {
            return Err(Error::ConfigEmpty {
                origin: origin.to_string(),
            });
        }
        let config: RunConfig = toml::from_str(text).map_err(|e| Error::ConfigParse {
            origin: origin.to_string(),
            message: e.to_string().trim().replace('\n', " | "),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a TOML file.
    pub fn from_path(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// A configuration with defaults everywhere but the policy.
    pub fn with_policy(policy: PolicyConfig) -> Self {
        Self {
            model: ModelConfig::default(),
            policy,
            generation: GenerationConfig::default(),
            evaluation: EvaluationConfig::default(),
        }
    }

    /// Range checks that the types cannot express.
    pub fn validate(&self) -> Result<()> {
        let value = |field: &str, value: String, expected: &str| Error::ConfigValue {
            field: field.to_string(),
            value,
            expected: expected.to_string(),
        };
        crate::budget::check_fraction(self.policy.budget)?;
        crate::budget::check_beta(self.policy.pyramid_beta)?;
        if self.policy.name.trim().is_empty() {
            return Err(value(
                "policy.name",
                "\"\"".into(),
                "a registered policy name",
            ));
        }
        let g = &self.generation;
        if g.max_new_tokens == 0 {
            return Err(value("generation.max_new_tokens", "0".into(), "at least 1"));
        }
        if !(g.temperature >= 0.0 && g.temperature.is_finite()) {
            return Err(value(
                "generation.temperature",
                g.temperature.to_string(),
                "a finite number >= 0",
            ));
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) {
            return Err(value(
                "generation.top_p",
                g.top_p.to_string(),
                "a number in (0, 1]",
            ));
        }
        for &b in &self.evaluation.budgets {
            crate::budget::check_fraction(b)
                .map_err(|_| value("evaluation.budgets", b.to_string(), "budgets in (0, 1]"))?;
        }
        if self.evaluation.max_items == Some(0) {
            return Err(value("evaluation.max_items", "0".into(), "at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RunConfig> {
        RunConfig::from_toml_str(text, "test.toml")
    }

    #[test]
    fn a_minimal_config_gets_defaults() {
        let c = parse("[policy]\nname = \"elastic\"\nbudget = 0.2\n").unwrap();
        assert_eq!(c.generation.max_new_tokens, 64);
        assert_eq!(c.policy.positions, PositionMode::Absolute);
        assert_eq!(c.model.backend, BackendKind::Flex);
    }

    #[test]
    fn each_kind_of_bad_config_names_the_problem() {
        let cases = [
            ("", "is empty"),
            (
                "[policy]\nname = \"x\"\nbudget = 0.2\ncolour = 1\n",
                "colour",
            ),
            ("[policy]\nname = \"x\"\nbudget = \"half\"\n", "budget"),
            ("[policy]\nname = \"x\"\nbudget = 1.5\n", "1.5"),
            ("[policy]\nname = \"x\"\nbudget = 0.0\n", "outside (0, 1]"),
            ("[policy]\nname = \"x\"\n", "budget"),
            (
                "[policy]\nname = \"x\"\nbudget = 0.5\n[generation]\ntop_p = 0.0\n",
                "top_p",
            ),
            (
                "[policy]\nname = \"x\"\nbudget = 0.5\n[generation]\nmax_new_tokens = 0\n",
                "max_new_tokens",
            ),
            (
                "[policy]\nname = \"x\"\nbudget = 0.5\n[evaluation]\nbudgets = [0.5, 2.0]\n",
                "evaluation.budgets",
            ),
            (
                "[policy]\nname = \"x\"\nbudget = 0.5\n[model]\nbackend = \"tpu\"\n",
                "tpu",
            ),
            (
                "[policy]\nname = \"x\"\nbudget = 0.5\npositions = \"relative\"\n",
                "relative",
            ),
            (
                "[policy]\nname = \"x\"\nbudget = 0.5\nlayer_budgets = \"cone\"\n",
                "cone",
            ),
            (
                "[policy]\nname = \"x\"\nbudget = 0.5\npyramid_beta = 0.5\n",
                "pyramid_beta",
            ),
            ("[polcy]\nname = \"x\"\n", "polcy"),
            ("[policy\nname = \"x\"\n", "test.toml"),
        ];
        for (text, needle) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn compact_positions_follow_the_cache_length() {
        assert_eq!(PositionMode::Absolute.next_position(900, 180), 900);
        assert_eq!(PositionMode::Compact.next_position(900, 180), 180);
    }

    #[test]
    fn command_line_parameters_are_typed() {
        let mut p = PolicyConfig::new("elastic", 0.5);
        p.set_param("offset", "12").unwrap();
        p.set_param("merge", "weighted").unwrap();
        p.set_param("recent_fraction", "0.25").unwrap();
        assert_eq!(p.params["offset"], toml::Value::Integer(12));
        assert_eq!(p.params["merge"], toml::Value::String("weighted".into()));
        assert_eq!(p.params["recent_fraction"], toml::Value::Float(0.25));
        assert!(p.set_param("bad key", "1").is_err());
    }
}
