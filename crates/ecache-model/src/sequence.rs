//! Sequences of any lengths under policies of their own: one sequence's decoder state
//! ([`Sequence`]), the prefill of one prompt, and a decode step over a ragged batch
//! ([`Runner`]).
//!
//! Each sequence owns its caches (one [`LayerCache`] of batch one per layer), so a batch is
//! just the list of sequences taking the next step: one may join after its own prefill,
//! one may leave and its memory is freed when its [`Sequence`] is dropped, and no sequence
//! ever attends to another's padding. The projections and the MLP of a decode step run on
//! the whole batch at once (where a decode step's time goes); attention runs per sequence
//! over that sequence's own slots.

use burn::tensor::{DType, Int, Tensor, TensorData, backend::Backend};
use ecache_core::{
    AttentionRows, CachePolicy, CacheShape, LayerCache, Phase, PositionMode, SlotKind, StepContext,
    importance::rows_to_host,
};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::kernels::KernelBackend;
use crate::layers::Rope;
use crate::llama::LlamaDecoder;
use crate::model::Prompt;

/// Slots a fresh cache has room for before its first growth.
const INITIAL_CAPACITY: usize = 64;

/// One sequence's decoder state: its caches, one per layer, and its counts.
#[derive(Debug, Clone)]
pub struct Sequence<B: Backend> {
    caches: Vec<LayerCache<B>>,
    positions: PositionMode,
    tokens_seen: usize,
    prompt_len: usize,
    steps: usize,
    /// Capacity each layer's buffers get right after that layer's prefill decision.
    capacity_after_prefill: Option<Vec<usize>>,
    /// What each layer's prefill decision did, when asked to record it.
    prefill_records: Option<Vec<PrefillRecord>>,
    /// The next token's RoPE position minus `N` (Qwen2-VL's `rope_deltas`: an image's
    /// tokens share positions, so text after it runs behind the token count).
    rope_delta: i64,
}

/// What one layer's prefill decision did, by absolute position: what it kept and what it
/// folded into what (everything else it removed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefillRecord {
    /// Positions kept, ascending.
    pub kept: Vec<usize>,
    /// A kept position and the positions merged into it.
    pub merged: Vec<(usize, Vec<usize>)>,
}

impl<B: Backend> Sequence<B> {
    /// An empty sequence for a decoder of `config`, whose cache keeps scores if `policy`
    /// needs them.
    pub fn new(
        config: &LlamaConfig,
        policy: &dyn CachePolicy,
        positions: PositionMode,
        device: &B::Device,
        dtype: DType,
    ) -> Self {
        let shape = CacheShape {
            batch: 1,
            kv_heads: config.kv_heads,
            head_dim: config.head_dim,
        };
        let tracks = policy.needs().tracks_scores();
        Self {
            caches: (0..config.layers)
                .map(|_| LayerCache::new(shape, INITIAL_CAPACITY, tracks, dtype, device))
                .collect(),
            positions,
            tokens_seen: 0,
            prompt_len: 0,
            steps: 0,
            capacity_after_prefill: None,
            prefill_records: None,
            rope_delta: 0,
        }
    }

    /// Has the prefill record what each layer's decision keeps and merges (for pictures
    /// of the cache: `ecache inspect`); call before the prefill.
    pub fn record_prefill(&mut self) {
        self.prefill_records = Some(Vec::new());
    }

    /// The prefill's records, one per layer, if [`Sequence::record_prefill`] asked.
    pub fn prefill_records(&self) -> Option<&[PrefillRecord]> {
        self.prefill_records.as_deref()
    }

    /// The caches, one per layer (each of batch one).
    pub fn caches(&self) -> &[LayerCache<B>] {
        &self.caches
    }

    /// `N`: tokens processed so far.
    pub fn tokens_seen(&self) -> usize {
        self.tokens_seen
    }

    /// `T`: the prompt's length, image slots included (0 before the prefill).
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// KV bytes the held slots occupy, all layers.
    pub fn kv_bytes(&self) -> usize {
        self.caches.iter().map(LayerCache::bytes_used).sum()
    }

    /// KV bytes the buffers occupy, all layers, room not yet used included.
    pub fn kv_bytes_allocated(&self) -> usize {
        self.caches.iter().map(LayerCache::bytes_reserved).sum()
    }

    /// Slots held per layer, and image slots held per layer.
    pub fn held(&self) -> (Vec<usize>, Vec<usize>) {
        self.caches
            .iter()
            .map(|c| {
                let kinds = c.table(0).map(|t| t.kinds()).unwrap_or(&[]);
                (
                    kinds.len(),
                    kinds.iter().filter(|k| **k == SlotKind::Image).count(),
                )
            })
            .unzip()
    }

    /// Has the prefill size layer `l`'s buffers to exactly `slots[l]` right after that
    /// layer's decision (layers past the list keep its last entry): the uncompressed
    /// prompt is then held by one layer at a time, and the sequence never allocates again
    /// if `slots` is what each layer can grow to.
    pub fn set_capacity_after_prefill(&mut self, slots: Vec<usize>) {
        self.capacity_after_prefill = (!slots.is_empty()).then_some(slots);
    }

    /// Sizes every layer's buffers to exactly `slots` (see [`LayerCache::set_capacity`]):
    /// what the sequence can grow to, so that it never allocates again and its memory is
    /// what was reserved for it.
    pub fn set_capacity(&mut self, slots: usize) -> Result<()> {
        for cache in &mut self.caches {
            cache.set_capacity(slots)?;
        }
        Ok(())
    }
}

/// Runs a decoder over [`Sequence`]s.
pub struct Runner<'a, B: Backend> {
    decoder: &'a LlamaDecoder<B>,
    rope: Rope,
    /// Multimodal RoPE sections (Qwen2-VL), `None` for plain RoPE.
    mrope: Option<[usize; 3]>,
    max_positions: usize,
    device: B::Device,
}

impl<'a, B: KernelBackend> Runner<'a, B> {
    /// A runner of `decoder` (built from `config`) on `device`.
    pub fn new(decoder: &'a LlamaDecoder<B>, config: &LlamaConfig, device: &B::Device) -> Self {
        Self {
            decoder,
            rope: Rope::new(config.head_dim, config.rope_theta),
            mrope: config.mrope_section,
            max_positions: config.max_positions,
            device: device.clone(),
        }
    }

    /// The decoder run.
    pub fn decoder(&self) -> &'a LlamaDecoder<B> {
        self.decoder
    }

    /// Runs a fresh sequence's prompt (already embedded, image features spliced in) and
    /// returns the hidden states of every prompt position; `policy` decides after every
    /// layer.
    ///
    /// # Shapes
    /// - `embeds`: `[1, T, hidden]`; `kinds`: `T` slot kinds
    /// - returns `[1, T, hidden]` (the final norm and LM head not applied)
    pub fn prefill(
        &self,
        seq: &mut Sequence<B>,
        policy: &dyn CachePolicy,
        embeds: Tensor<B, 3>,
        kinds: &[SlotKind],
    ) -> Result<Tensor<B, 3>> {
        self.prefill_at(seq, policy, embeds, kinds, None)
    }

    /// [`Runner::prefill`] with each prompt token's RoPE position given as (temporal,
    /// height, width), as Qwen2-VL's multimodal RoPE places them (`None`: token `i` at
    /// `i` on every axis). The sequence's later tokens continue from the largest position
    /// plus one (`rope_deltas`); slots keep recording the token index, which is what
    /// policies see.
    ///
    /// # Shapes
    /// - `embeds`: `[1, T, hidden]`; `kinds` and `rope_positions`: `T` entries
    /// - returns `[1, T, hidden]`
    pub fn prefill_at(
        &self,
        seq: &mut Sequence<B>,
        policy: &dyn CachePolicy,
        embeds: Tensor<B, 3>,
        kinds: &[SlotKind],
        rope_positions: Option<&[[usize; 3]]>,
    ) -> Result<Tensor<B, 3>> {
        let [batch, t, _] = embeds.dims();
        if batch != 1 {
            return Err(ModelError::Prompt(format!(
                "a sequence's prompt is one row, got {batch}"
            )));
        }
        if t == 0 {
            return Err(ModelError::Prompt("the prompt is empty".into()));
        }
        if seq.tokens_seen > 0 {
            return Err(ModelError::Prompt(
                "prefill called twice on one sequence".into(),
            ));
        }
        if t > self.max_positions {
            return Err(ModelError::Prompt(format!(
                "the prompt has {t} tokens but the model's context is {} (max_position_embeddings)",
                self.max_positions
            )));
        }
        if kinds.len() != t {
            return Err(ModelError::Prompt(format!(
                "{} slot kinds for a prompt of {t}",
                kinds.len()
            )));
        }
        let positions: Vec<usize> = (0..t).collect();
        let heads = self.decoder.head_counts();
        let rope = match rope_positions {
            None => self.rope.tables::<B>(
                std::slice::from_ref(&positions),
                &heads,
                &self.device,
                embeds.dtype(),
            ),
            Some(given) => {
                if given.len() != t {
                    return Err(ModelError::Prompt(format!(
                        "{} RoPE positions for a prompt of {t}",
                        given.len()
                    )));
                }
                let half = self.decoder.head_dim() / 2;
                let sections = self.mrope.unwrap_or([half, 0, 0]);
                let next = given.iter().flatten().copied().max().map_or(0, |m| m + 1);
                seq.rope_delta = next as i64 - t as i64;
                self.rope.tables_sectioned::<B>(
                    &[given.to_vec()],
                    sections,
                    &heads,
                    &self.device,
                    embeds.dtype(),
                )
            }
        };
        let needs = policy.needs();
        seq.prompt_len = t;
        let layers = self.decoder.layers.len();
        let mut x = embeds;
        for (layer, block) in self.decoder.layers.iter().enumerate() {
            let cache = &mut seq.caches[layer];
            let out = block.forward(
                x,
                &rope,
                cache,
                &[&positions],
                kinds,
                needs.prefill_importance,
                needs.prefill_rows,
            )?;
            x = out.hidden;
            if let Some(scores) = out.scores {
                accumulate(cache, scores)?;
            }
            let rows = out.window_rows.map(|r| window_rows(cache, r)).transpose()?;
            let ctx = StepContext {
                layer,
                layers,
                phase: Phase::Prefill,
                tokens_seen: t,
                prompt_len: t,
            };
            let rows = rows.as_deref().and_then(|r| AttentionRows::new(r, t));
            let plan = cache.table(0)?.decide_with_rows(policy, ctx, rows)?;
            if let Some(records) = &mut seq.prefill_records {
                let positions = cache.table(0)?.positions();
                records.push(PrefillRecord {
                    kept: plan.kept().iter().map(|&k| positions[k]).collect(),
                    merged: plan.merges_at(positions),
                });
            }
            cache.apply(0, &plan)?;
            if let Some(slots) = &seq.capacity_after_prefill {
                let n = slots[layer.min(slots.len() - 1)];
                cache.set_capacity(n)?;
            }
        }
        seq.tokens_seen = t;
        Ok(x)
    }

    /// [`Runner::prefill`] followed by the final norm and LM head on the last position:
    /// the logits of the first generated token.
    ///
    /// # Shapes
    /// - `embeds`: `[1, T, hidden]` -> `[1, vocab]`
    pub fn prefill_last(
        &self,
        seq: &mut Sequence<B>,
        policy: &dyn CachePolicy,
        embeds: Tensor<B, 3>,
        kinds: &[SlotKind],
    ) -> Result<Tensor<B, 2>> {
        let hidden = self.prefill(seq, policy, embeds, kinds)?;
        Ok(self.decoder.last_logits(hidden))
    }

    /// [`Runner::prefill_last`] of a prompt from the model interface
    /// ([`crate::VisionLanguageModel::prompt`]), at its RoPE positions if it has them.
    ///
    /// # Shapes
    /// - `prompt.embeds`: `[1, T, hidden]` -> `[1, vocab]`
    pub fn prefill_prompt_last(
        &self,
        seq: &mut Sequence<B>,
        policy: &dyn CachePolicy,
        prompt: Prompt<B>,
    ) -> Result<Tensor<B, 2>> {
        let rope = prompt.rope.as_deref();
        let hidden = self.prefill_at(seq, policy, prompt.embeds, &prompt.kinds, rope)?;
        Ok(self.decoder.last_logits(hidden))
    }

    /// One decode step of a ragged batch: sequence `i` is fed `tokens[i]` at its own next
    /// position and attends to its own slots; its policy decides after every layer. The
    /// sequences may have any lengths, policies and step counts.
    ///
    /// # Shapes
    /// - `batch`: `B` sequences with their policies; `tokens`: `B` ids -> `[B, vocab]`
    pub fn decode(
        &self,
        batch: &mut [(&mut Sequence<B>, &dyn CachePolicy)],
        tokens: &[u32],
    ) -> Result<Tensor<B, 2>> {
        let n = batch.len();
        if tokens.len() != n || n == 0 {
            return Err(ModelError::Prompt(format!(
                "{} tokens for a batch of {n} sequences",
                tokens.len()
            )));
        }
        for (seq, _) in batch.iter() {
            if seq.tokens_seen == 0 {
                return Err(ModelError::Prompt(
                    "a sequence decodes only after its prefill".into(),
                ));
            }
            if seq.tokens_seen >= self.max_positions {
                return Err(ModelError::Prompt(format!(
                    "generating past position {} exceeds the model's context of {} (max_position_embeddings)",
                    seq.tokens_seen, self.max_positions
                )));
            }
        }
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        // The batch's tokens travel as one row ([1, B, hidden]): see
        // `LlamaLayer::forward_ragged`.
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &self.device);
        let mut x = self.decoder.embed(ids);
        let slot_positions: Vec<usize> = batch.iter().map(|(s, _)| s.tokens_seen).collect();
        let rope_positions: Vec<usize> = batch
            .iter()
            .map(|(s, _)| {
                let p = s.positions.next_position(s.tokens_seen, s.caches[0].len(0)) as i64;
                (p + s.rope_delta).max(0) as usize
            })
            .collect();
        let heads = self.decoder.head_counts();
        let rope = self
            .rope
            .tables::<B>(&[rope_positions], &heads, &self.device, x.dtype());
        let want: Vec<bool> = batch
            .iter()
            .map(|(_, p)| p.needs().decode_attention)
            .collect();
        for s in batch.iter_mut() {
            s.0.steps += 1;
        }
        for (layer, block) in self.decoder.layers.iter().enumerate() {
            let mut caches: Vec<&mut LayerCache<B>> = batch
                .iter_mut()
                .map(|(s, _)| &mut s.caches[layer])
                .collect();
            let out = block.forward_ragged(x, &rope, &mut caches, &slot_positions, &want)?;
            x = out.hidden;
            for ((seq, policy), scores) in batch.iter_mut().zip(out.scores) {
                let cache = &mut seq.caches[layer];
                if let Some(scores) = scores {
                    accumulate(cache, scores)?;
                }
                let ctx = StepContext {
                    layer,
                    layers: self.decoder.layers.len(),
                    phase: Phase::Decode { step: seq.steps },
                    tokens_seen: seq.tokens_seen + 1,
                    prompt_len: seq.prompt_len,
                };
                let plan = cache.table(0)?.decide(*policy, ctx)?;
                cache.apply(0, &plan)?;
            }
        }
        for s in batch.iter_mut() {
            s.0.tokens_seen += 1;
        }
        let logits = self.decoder.head(x);
        let v = logits.dims()[2];
        Ok(logits.reshape([n, v]))
    }
}

/// A sequence's window rows (`[1, m, slots]`, buffer-row order) on the host, row after
/// row, each in slot order.
fn window_rows<B: Backend>(cache: &LayerCache<B>, rows: Tensor<B, 3>) -> Result<Vec<f32>> {
    let [_, m, slots] = rows.dims();
    let by_row = rows_to_host(rows.reshape([m, slots]), &vec![slots; m])?;
    let order = cache.rows(0)?;
    Ok(by_row
        .iter()
        .flat_map(|row| order.iter().map(|&r| row[r]))
        .collect())
}

/// Adds a sequence's score row (`[1, slots]`, buffer-row order) to its slot scores.
fn accumulate<B: Backend>(cache: &mut LayerCache<B>, scores: Tensor<B, 2>) -> Result<()> {
    let len = cache.len(0);
    let row = rows_to_host(scores, &[len])?.remove(0);
    cache.accumulate_rows(0, &row)?;
    Ok(())
}
