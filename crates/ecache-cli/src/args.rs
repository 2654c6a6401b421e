//! Command-line arguments shared by several commands: the model, the device, the policy.

use std::path::PathBuf;

use anyhow::Result;
use ecache_core::{PolicyConfig, RunConfig};

use crate::BadInput;

/// Model selection shared by generate and eval.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// A Hugging Face model directory, LLaVA-1.5, Qwen2-VL or Qwen2.5-VL (config.json, weights,
    /// tokenizer.json, preprocessor_config.json).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Pad images to a square with the mean colour first (LLaVA-1.5 evaluation setting;
    /// LLaVA only).
    #[arg(long)]
    pub pad_to_square: bool,
}

/// Backend and precision, shared by the commands that run a model.
#[derive(clap::Args)]
pub struct DeviceArgs {
    /// flex | ndarray | cuda | wgpu (overrides the config's).
    #[arg(long)]
    pub backend: Option<String>,
    /// f32 | f16 | bf16 (overrides the config's).
    #[arg(long)]
    pub dtype: Option<String>,
}

impl DeviceArgs {
    /// Applies the overrides to the config's [model] section.
    pub fn apply(&self, config: &mut RunConfig) -> Result<()> {
        if let Some(b) = &self.backend {
            config.model.backend = parse_value("backend", b)?;
        }
        if let Some(d) = &self.dtype {
            config.model.dtype = parse_value("dtype", d)?;
        }
        Ok(())
    }
}

impl ModelArgs {
    /// Applies the overrides to the config's [model] section and returns the model directory.
    pub fn apply(&self, config: &mut RunConfig) -> Result<PathBuf> {
        self.device.apply(config)?;
        Ok(self
            .model
            .clone()
            .or_else(|| config.model.path.clone())
            .ok_or_else(|| BadInput("give --model DIR (or [model] path in --config)".into()))?)
    }
}

/// Policy selection shared by the commands.
#[derive(clap::Args)]
pub struct PolicyArgs {
    /// Policy name (overrides the config's).
    #[arg(long)]
    pub policy: Option<String>,
    /// Fraction of slots kept, in (0, 1] (overrides the config's).
    #[arg(long)]
    pub budget: Option<f64>,
    /// A policy parameter, `key=value` (repeatable; overrides the config's).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// How the budget is spread over layers: `uniform` or `pyramid` (overrides the
    /// config's `layer_budgets`).
    #[arg(long, value_name = "uniform|pyramid")]
    pub layer_budgets: Option<String>,
    /// The pyramid's first-to-last layer ratio, >= 1 (overrides the config's).
    #[arg(long)]
    pub pyramid_beta: Option<f64>,
    /// A run config (TOML).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub fn run_config(
    args: &PolicyArgs,
    default_policy: &str,
    default_budget: f64,
) -> Result<RunConfig> {
    let mut config = match &args.config {
        Some(path) => RunConfig::from_path(path)?,
        None => RunConfig::with_policy(PolicyConfig::new(default_policy, default_budget)),
    };
    if let Some(name) = &args.policy {
        config.policy.name.clone_from(name);
    }
    if let Some(budget) = args.budget {
        config.policy.budget = budget;
    }
    if let Some(spread) = &args.layer_budgets {
        config.policy.layer_budgets = parse_value("--layer-budgets", spread)?;
    }
    if let Some(beta) = args.pyramid_beta {
        config.policy.pyramid_beta = beta;
    }
    for pair in &args.set {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| BadInput(format!("--set {pair:?}: expected KEY=VALUE")))?;
        match key.trim() {
            // Keys of the `[policy]` section itself, beside `budget`.
            "layer_budgets" => {
                config.policy.layer_budgets = parse_value("--set layer_budgets", value)?
            }
            "pyramid_beta" => {
                config.policy.pyramid_beta = value.trim().parse().map_err(|_| {
                    BadInput(format!(
                        "--set pyramid_beta={value}: expected a number >= 1"
                    ))
                })?
            }
            _ => config.policy.set_param(key, value)?,
        }
    }
    config.validate()?;
    Ok(config)
}

pub fn parse_value<T: serde::de::DeserializeOwned>(flag: &str, value: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(value.to_string())).map_err(|_| {
        BadInput(format!(
            "--{flag} {value:?} is not one of the accepted values"
        ))
        .into()
    })
}
