//! Running the decoder under a cache policy: prefill, decode steps, and the policy's
//! decision after every layer's forward.

use burn::tensor::{DType, Int, Tensor, TensorData, backend::Backend};
use ecache_core::{
    CachePolicy, CacheShape, LayerCache, Phase, PositionMode, SlotKind, StepContext,
    importance::rows_to_host,
};

use crate::error::{ModelError, Result};
use crate::layers::Rope;
use crate::llama::LlamaDecoder;

/// Per-batch generation state: one `LayerCache` per layer, token counts per sequence.
pub struct Session<'a, B: Backend> {
    decoder: &'a LlamaDecoder<B>,
    policy: &'a dyn CachePolicy,
    rope: Rope,
    positions: PositionMode,
    caches: Vec<LayerCache<B>>,
    tokens_seen: Vec<usize>,
    prompt_len: Vec<usize>,
    steps: usize,
    max_positions: usize,
    device: B::Device,
}

impl<'a, B: Backend> Session<'a, B> {
    /// A session for `batch` sequences.
    pub fn new(
        decoder: &'a LlamaDecoder<B>,
        config: &crate::config::LlamaConfig,
        policy: &'a dyn CachePolicy,
        positions: PositionMode,
        batch: usize,
        device: &B::Device,
        dtype: DType,
    ) -> Self {
        let shape = CacheShape {
            batch,
            kv_heads: config.kv_heads,
            head_dim: config.head_dim,
        };
        let tracks = policy.needs().tracks_scores();
        Self {
            decoder,
            policy,
            rope: Rope::new(config.head_dim, config.rope_theta),
            positions,
            caches: (0..config.layers)
                .map(|_| LayerCache::new(shape, 64, tracks, dtype, device))
                .collect(),
            tokens_seen: vec![0; batch],
            prompt_len: vec![0; batch],
            steps: 0,
            max_positions: config.max_positions,
            device: device.clone(),
        }
    }

    /// The caches, one per layer.
    pub fn caches(&self) -> &[LayerCache<B>] {
        &self.caches
    }

    /// Tokens processed so far per sequence (`N`).
    pub fn tokens_seen(&self) -> &[usize] {
        &self.tokens_seen
    }

    /// KV bytes held by every layer together.
    pub fn kv_bytes(&self) -> usize {
        self.caches.iter().map(LayerCache::bytes_used).sum()
    }

    /// Runs the prompt (already embedded, image tokens spliced in) and returns the logits of
    /// every prompt position.
    ///
    /// # Shapes
    /// - `embeds`: `[batch, T, hidden]`; `kinds`: `T` slot kinds
    /// - returns `[batch, T, vocab]`
    pub fn prefill(&mut self, embeds: Tensor<B, 3>, kinds: &[SlotKind]) -> Result<Tensor<B, 3>> {
        let hidden = self.prefill_hidden(embeds, kinds)?;
        Ok(self.decoder.head(hidden))
    }

    /// Runs the prompt like [`Session::prefill`] but returns only the last position's
    /// logits, the one generation needs: the LM head runs on one position, not `T`.
    ///
    /// # Shapes
    /// - `embeds`: `[batch, T, hidden]`; `kinds`: `T` slot kinds
    /// - returns `[batch, vocab]`
    pub fn prefill_last(
        &mut self,
        embeds: Tensor<B, 3>,
        kinds: &[SlotKind],
    ) -> Result<Tensor<B, 2>> {
        let hidden = self.prefill_hidden(embeds, kinds)?;
        let [b, t, _] = hidden.dims();
        let logits = self.decoder.head(hidden.narrow(1, t - 1, 1));
        let v = logits.dims()[2];
        Ok(logits.reshape([b, v]))
    }

    fn prefill_hidden(&mut self, embeds: Tensor<B, 3>, kinds: &[SlotKind]) -> Result<Tensor<B, 3>> {
        let [batch, t, _] = embeds.dims();
        if t == 0 {
            return Err(ModelError::Prompt("the prompt is empty".into()));
        }
        if self.tokens_seen.iter().any(|&n| n > 0) {
            return Err(ModelError::Prompt(
                "prefill called twice on one session".into(),
            ));
        }
        if t > self.max_positions {
            return Err(ModelError::Prompt(format!(
                "the prompt has {t} tokens but the model's context is {} (max_position_embeddings)",
                self.max_positions
            )));
        }
        let positions: Vec<Vec<usize>> = vec![(0..t).collect(); batch];
        let rope_positions = positions.clone();
        self.prompt_len = vec![t; batch];
        self.run_layers(embeds, &positions, &rope_positions, kinds, Phase::Prefill)
    }

    /// Feeds one token per sequence and returns the next-token logits.
    ///
    /// # Shapes
    /// - `tokens`: one id per sequence -> `[batch, vocab]`
    pub fn step(&mut self, tokens: &[u32]) -> Result<Tensor<B, 2>> {
        let batch = self.tokens_seen.len();
        if tokens.len() != batch {
            return Err(ModelError::Prompt(format!(
                "{} tokens for a batch of {batch}",
                tokens.len()
            )));
        }
        if let Some(&n) = self.tokens_seen.iter().find(|&&n| n >= self.max_positions) {
            return Err(ModelError::Prompt(format!(
                "generating past position {n} exceeds the model's context of {} (max_position_embeddings)",
                self.max_positions
            )));
        }
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, 1]), &self.device);
        let embeds = self.decoder.embed(ids);
        let positions: Vec<Vec<usize>> = self.tokens_seen.iter().map(|&n| vec![n]).collect();
        let rope_positions: Vec<Vec<usize>> = (0..batch)
            .map(|b| {
                vec![
                    self.positions
                        .next_position(self.tokens_seen[b], self.caches[0].len(b)),
                ]
            })
            .collect();
        self.steps += 1;
        let phase = Phase::Decode { step: self.steps };
        let hidden = self.run_layers(
            embeds,
            &positions,
            &rope_positions,
            &[SlotKind::Text],
            phase,
        )?;
        let logits = self.decoder.head(hidden);
        let [b, _, v] = logits.dims();
        Ok(logits.reshape([b, v]))
    }

    fn run_layers(
        &mut self,
        mut x: Tensor<B, 3>,
        positions: &[Vec<usize>],
        rope_positions: &[Vec<usize>],
        kinds: &[SlotKind],
        phase: Phase,
    ) -> Result<Tensor<B, 3>> {
        let needs = self.policy.needs();
        let want_scores = match phase {
            Phase::Prefill => needs.prefill_importance,
            Phase::Decode { .. } => needs.decode_attention,
        };
        let heads = self.decoder.head_counts();
        let rope = self
            .rope
            .tables::<B>(rope_positions, &heads, &x.device(), x.dtype());
        let refs: Vec<&[usize]> = positions.iter().map(Vec::as_slice).collect();
        let t = kinds.len();
        for (layer, (block, cache)) in self.decoder.layers.iter().zip(&mut self.caches).enumerate()
        {
            let out = block.forward(x, &rope, cache, &refs, kinds, want_scores)?;
            x = out.hidden;
            let batch = cache.shape().batch;
            if let Some(scores) = out.scores {
                let lens: Vec<usize> = (0..batch).map(|b| cache.len(b)).collect();
                for (b, row) in rows_to_host(scores, &lens)?.into_iter().enumerate() {
                    cache.accumulate_rows(b, &row)?;
                }
            }
            for b in 0..batch {
                let ctx = StepContext {
                    layer,
                    phase,
                    tokens_seen: self.tokens_seen[b] + t,
                    prompt_len: self.prompt_len[b],
                };
                let plan = cache.table(b)?.decide(self.policy, ctx)?;
                cache.apply(b, &plan)?;
            }
        }
        for n in &mut self.tokens_seen {
            *n += t;
        }
        Ok(x)
    }
}
