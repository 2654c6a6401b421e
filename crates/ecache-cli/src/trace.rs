//! `ecache trace`: a policy's decisions on given attention scores, as JSON.

use std::path::Path;

use anyhow::{Context, Result};

use crate::BadInput;
use ecache_core::CachePolicy;
use ecache_core::SlotKind;
use ecache_core::trace::{LayerOf, LayerScores, LayerTrace, trace_layer_kinds};
use serde::{Deserialize, Serialize};

/// The input file: a prompt length, a step count, per-layer scores and, optionally, each
/// prompt slot's kind (`"text"` or `"image"`; absent: all text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceInput {
    pub prompt_len: usize,
    #[serde(default)]
    pub decode_steps: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<SlotKind>>,
    pub layers: Vec<LayerScores>,
}

/// The output: one trace per layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceOutput {
    pub layers: Vec<LayerTrace>,
}

impl TraceInput {
    /// Reads and parses a trace input file.
    pub fn from_path(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| BadInput(format!("cannot read trace input {}", path.display())))?;
        let input: TraceInput = serde_json::from_str(&text)
            .with_context(|| BadInput(format!("invalid trace input {}", path.display())))?;
        if input.layers.is_empty() {
            return Err(BadInput(format!("trace input {} has no layers", path.display())).into());
        }
        if input.prompt_len == 0 {
            return Err(BadInput(format!(
                "trace input {}: prompt_len must be at least 1",
                path.display()
            ))
            .into());
        }
        if let Some(kinds) = &input.kinds
            && kinds.len() != input.prompt_len
        {
            return Err(BadInput(format!(
                "trace input {}: kinds has {} entries, prompt_len is {}",
                path.display(),
                kinds.len(),
                input.prompt_len
            ))
            .into());
        }
        Ok(input)
    }
}

/// Runs `policy` over every layer of `input`.
pub fn run(policy: &dyn CachePolicy, input: &TraceInput) -> Result<TraceOutput> {
    let kinds = match &input.kinds {
        Some(kinds) => kinds.clone(),
        None => vec![SlotKind::Text; input.prompt_len],
    };
    if kinds.len() != input.prompt_len {
        return Err(BadInput(format!(
            "kinds has {} entries, prompt_len is {}",
            kinds.len(),
            input.prompt_len
        ))
        .into());
    }
    let layers = input
        .layers
        .iter()
        .enumerate()
        .map(|(layer, scores)| {
            trace_layer_kinds(
                policy,
                LayerOf {
                    layer,
                    layers: input.layers.len(),
                },
                &kinds,
                input.decode_steps,
                scores,
            )
            .with_context(|| format!("layer {layer}"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(TraceOutput { layers })
}

impl TraceOutput {
    /// JSON with one line per field of each layer, so that position lists stay readable.
    pub fn to_json(&self) -> Result<String> {
        let mut out = String::from("{\n  \"layers\": [\n");
        for (i, layer) in self.layers.iter().enumerate() {
            out += &format!(
                "    {{\n      \"after_prefill\": {},\n      \"merged_into\": {},\n      \"after_step\": [",
                serde_json::to_string(&layer.after_prefill)?,
                serde_json::to_string(&layer.merged_into)?,
            );
            for (k, step) in layer.after_step.iter().enumerate() {
                let sep = if k == 0 { "\n" } else { ",\n" };
                out += &format!("{sep}        {}", serde_json::to_string(step)?);
            }
            let close = if layer.after_step.is_empty() {
                "]"
            } else {
                "\n      ]"
            };
            let comma = if i + 1 < self.layers.len() { "," } else { "" };
            out += &format!("{close}\n    }}{comma}\n");
        }
        out += "  ]\n}\n";
        Ok(out)
    }
}
