//! Safetensors checkpoints (single file or sharded with an index), with the one table that
//! maps Hugging Face tensor names onto the model, and an account of what was consumed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Distribution, Tensor, TensorData, backend::Backend};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors, tensor::TensorInfo};

use crate::error::{ModelError, Result};

/// Checkpoint name prefixes and the canonical prefix each maps to. Both layouts in use are
/// here: the published llava-hf checkpoints (`language_model.model.*`,
/// `vision_tower.vision_model.*`) and what transformers 5 writes (`model.language_model.*`).
/// Longer prefixes first.
const NAME_MAP: &[(&str, &str)] = &[
    ("language_model.model.", "decoder."),
    ("model.language_model.", "decoder."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    // Qwen2-VL: the vision tower (transformers 5's and the published name), and the
    // published layout of the decoder, which transformers 5 also writes for it.
    ("model.visual.", "visual."),
    ("visual.", "visual."),
    ("model.layers.", "decoder.layers."),
    ("model.embed_tokens.", "decoder.embed_tokens."),
    ("model.norm.", "decoder.norm."),
    ("multi_modal_projector.", "projector."),
];

/// Canonical names a checkpoint may carry that the model does not use.
fn is_known_unused(canonical: &str) -> bool {
    canonical.starts_with("vision.post_layernorm.")
        || canonical.ends_with("position_ids")
        || canonical.ends_with("rotary_emb.inv_freq")
}

/// Maps a checkpoint tensor name to its canonical name, if it belongs to a LLaVA model.
pub fn canonical_name(name: &str) -> Option<String> {
    NAME_MAP
        .iter()
        .find(|(from, _)| name.starts_with(from))
        .map(|(from, to)| format!("{to}{}", &name[from.len()..]))
}

struct Entry {
    file: usize,
    original: String,
    info: TensorInfo,
}

/// An opened checkpoint. [`Checkpoint::take`] hands out each tensor once;
/// [`Checkpoint::finish`] fails if any tensor was left unused.
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap, usize)>,
    entries: BTreeMap<String, Entry>,
    taken: BTreeSet<String>,
    /// Set for [`Checkpoint::random`]: the standard deviation of initial weights.
    random_std: Option<f64>,
    /// Per-tensor standard deviations overriding `random_std` (name fragment, std).
    random_overrides: Vec<(String, f64)>,
}

impl Checkpoint {
    /// Opens `model.safetensors`, or the shards named by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths = if index.exists() {
            shard_paths(&index)?
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ModelError::Weights(format!(
                "no model.safetensors or model.safetensors.index.json in {}",
                dir.display()
            )));
        };
        let mut checkpoint = Checkpoint {
            random_std: None,
            random_overrides: Vec::new(),
            files: Vec::new(),
            entries: BTreeMap::new(),
            taken: BTreeSet::new(),
        };
        for path in paths {
            checkpoint.add_file(path)?;
        }
        Ok(checkpoint)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        // SAFETY: the file is opened read-only and only read through this mapping; a
        // concurrent writer could change bytes under us, as with any reader of the file.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
        let (header, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
            ModelError::Weights(format!(
                "{} is not a valid safetensors file: {e}",
                path.display()
            ))
        })?;
        let id = self.files.len();
        for (name, info) in metadata.tensors() {
            let Some(canonical) = canonical_name(&name) else {
                return Err(ModelError::Weights(format!(
                    "unexpected tensor {name} in {}: not part of a LLaVA or Qwen2-VL checkpoint",
                    path.display()
                )));
            };
            if let Some(previous) = self.entries.get(&canonical) {
                return Err(ModelError::Weights(format!(
                    "tensor {name} appears twice (also as {} in {})",
                    previous.original,
                    self.files[previous.file].0.display()
                )));
            }
            self.entries.insert(
                canonical,
                Entry {
                    file: id,
                    original: name,
                    info: info.clone(),
                },
            );
        }
        self.files.push((path, map, 8 + header));
        Ok(())
    }

    /// A checkpoint with no files that hands out freshly initialised tensors, created on the
    /// device in the requested dtype (seed the backend first for reproducible weights):
    /// norm weights are ones, biases zeros, everything else normal with `std` (GPT-2 and
    /// LLaMA's `initializer_range`). Loading through it builds a random model of any config
    /// with the same code that loads a real one.
    pub fn random(std: f64) -> Self {
        Self {
            files: Vec::new(),
            entries: BTreeMap::new(),
            taken: BTreeSet::new(),
            random_std: Some(std),
            random_overrides: Vec::new(),
        }
    }

    /// Gives the random tensors whose canonical name contains `fragment` another standard
    /// deviation (for example larger vision position embeddings, so that image tokens say
    /// clearly where they are from the first step of training).
    pub fn with_std(mut self, fragment: &str, std: f64) -> Self {
        self.random_overrides.push((fragment.to_string(), std));
        self
    }

    fn std_for(&self, canonical: &str) -> Option<f64> {
        let base = self.random_std?;
        Some(
            self.random_overrides
                .iter()
                .find(|(f, _)| canonical.contains(f.as_str()))
                .map_or(base, |(_, s)| *s),
        )
    }

    fn random_tensor<B: Backend, const D: usize>(
        std: f64,
        canonical: &str,
        shape: [usize; D],
        device: &B::Device,
        dtype: DType,
    ) -> Tensor<B, D> {
        let leaf = canonical.rsplit('.').nth(1).unwrap_or("");
        if canonical.ends_with(".bias") {
            Tensor::zeros(shape, (device, dtype))
        } else if leaf.contains("norm") || leaf.contains("layrnorm") {
            Tensor::ones(shape, (device, dtype))
        } else {
            Tensor::random(shape, Distribution::Normal(0.0, std), (device, dtype))
        }
    }

    /// Whether the checkpoint has a tensor under this canonical name.
    pub fn contains(&self, canonical: &str) -> bool {
        self.entries.contains_key(canonical)
    }

    /// Takes the tensor `canonical` as f32 host data, checking its shape.
    pub fn take_data(&mut self, canonical: &str, shape: &[usize]) -> Result<TensorData> {
        let entry = self.entries.get(canonical).ok_or_else(|| {
            ModelError::Weights(format!("missing tensor {}", display_name(canonical)))
        })?;
        if entry.info.shape != shape {
            return Err(ModelError::Weights(format!(
                "tensor {} has shape {:?}, the config needs {:?}",
                entry.original, entry.info.shape, shape
            )));
        }
        let (path, map, data_start) = &self.files[entry.file];
        let (start, end) = entry.info.data_offsets;
        let bytes = map
            .get(data_start + start..data_start + end)
            .ok_or_else(|| {
                ModelError::Weights(format!(
                    "tensor {} lies past the end of {}",
                    entry.original,
                    path.display()
                ))
            })?;
        let values = decode(bytes, entry.info.dtype).ok_or_else(|| {
            ModelError::Weights(format!(
                "tensor {} has unsupported dtype {:?} (F32, F16, BF16)",
                entry.original, entry.info.dtype
            ))
        })?;
        self.taken.insert(canonical.to_string());
        Ok(TensorData::new(values, shape.to_vec()))
    }

    /// Takes a tensor onto `device` in `dtype`.
    pub fn take<B: Backend, const D: usize>(
        &mut self,
        canonical: &str,
        shape: [usize; D],
        device: &B::Device,
        dtype: DType,
    ) -> Result<Tensor<B, D>> {
        if let Some(std) = self.std_for(canonical) {
            return Ok(Self::random_tensor(std, canonical, shape, device, dtype));
        }
        let data = self.take_data(canonical, &shape)?;
        Ok(Tensor::from_data(data, (device, dtype)))
    }

    /// Takes a PyTorch `[out, in]` linear weight as burn's `[in, out]`.
    pub fn take_linear_weight<B: Backend>(
        &mut self,
        canonical: &str,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Tensor<B, 2>> {
        self.take_flattened_weight(canonical, &[d_out, d_in], device, dtype)
    }

    /// Takes a PyTorch weight of shape `stored` (`[out, ...]`, e.g. a convolution's whose
    /// kernel covers its whole input) as the linear map from its flattened trailing
    /// dimensions, burn's `[in, out]`. The reshape and transpose are done here, on the
    /// host: Qwen2-VL's 5-D patch-embedding weight reshaped and transposed on the device
    /// gave wrong products as a `Linear` weight on burn 0.21's wgpu backend (0.5 off on
    /// the tiny tower; `tests/qwen.rs` on wgpu), while the same values copied did not.
    pub fn take_flattened_weight<B: Backend>(
        &mut self,
        canonical: &str,
        stored: &[usize],
        device: &B::Device,
        dtype: DType,
    ) -> Result<Tensor<B, 2>> {
        let d_out = stored.first().copied().unwrap_or(0);
        let d_in = stored.iter().skip(1).product::<usize>();
        if let Some(std) = self.std_for(canonical) {
            return Ok(Self::random_tensor(
                std,
                canonical,
                [d_in, d_out],
                device,
                dtype,
            ));
        }
        let data = self.take_data(canonical, stored)?;
        let values: Vec<f32> = data.into_vec().expect("decoded as f32");
        let mut transposed = vec![0.0f32; values.len()];
        for o in 0..d_out {
            for i in 0..d_in {
                transposed[i * d_out + o] = values[o * d_in + i];
            }
        }
        Ok(Tensor::from_data(
            TensorData::new(transposed, [d_in, d_out]),
            (device, dtype),
        ))
    }

    /// Marks a tensor as read without loading it (weights the model does not compute with).
    pub fn skip(&mut self, canonical: &str) {
        if self.entries.contains_key(canonical) {
            self.taken.insert(canonical.to_string());
        }
    }

    /// Fails naming every tensor that was neither taken nor known to be unused.
    pub fn finish(self) -> Result<()> {
        let unused: Vec<&str> = self
            .entries
            .iter()
            .filter(|(c, _)| !self.taken.contains(*c) && !is_known_unused(c))
            .map(|(_, e)| e.original.as_str())
            .collect();
        if unused.is_empty() {
            Ok(())
        } else {
            Err(ModelError::Weights(format!(
                "{} tensor(s) in the checkpoint are not used by a model of this config: {}",
                unused.len(),
                unused.join(", ")
            )))
        }
    }
}

fn display_name(canonical: &str) -> String {
    let published = NAME_MAP.iter().find(|(_, to)| canonical.starts_with(to));
    match published {
        Some((from, to)) => format!("{from}{} (canonical {canonical})", &canonical[to.len()..]),
        None => canonical.to_string(),
    }
}

fn shard_paths(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Weights(format!("{}: {e}", index.display())))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            ModelError::Weights(format!("{} has no weight_map object", index.display()))
        })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = BTreeSet::new();
    for (tensor, file) in map {
        let name = file
            .as_str()
            .filter(|f| !f.contains('/') && !f.contains('\\'))
            .ok_or_else(|| {
                ModelError::Weights(format!(
                    "{}: tensor {tensor} names an invalid shard {file}",
                    index.display()
                ))
            })?;
        files.insert(name.to_string());
    }
    let paths: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = paths.iter().find(|p| !p.exists()) {
        return Err(ModelError::Weights(format!(
            "shard {} named in {} does not exist",
            missing.display(),
            index.display()
        )));
    }
    Ok(paths)
}

fn decode(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}
