//! A fixed batch of sequences under one policy: prefill all, then step all together. Each
//! sequence keeps its own caches ([`Sequence`]); the [`Runner`] does the work, the same
//! that serves ragged batches in the engine.

use burn::tensor::{DType, Tensor, backend::Backend};
use ecache_core::{CachePolicy, PositionMode, SlotKind};

use crate::error::{ModelError, Result};
use crate::kernels::KernelBackend;
use crate::llama::LlamaDecoder;
use crate::model::Prompt;
use crate::sequence::{Runner, Sequence};

/// Per-batch generation state: one [`Sequence`] per row.
pub struct Session<'a, B: Backend> {
    runner: Runner<'a, B>,
    policy: &'a dyn CachePolicy,
    sequences: Vec<Sequence<B>>,
}

impl<'a, B: KernelBackend> Session<'a, B> {
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
        Self {
            runner: Runner::new(decoder, config, device),
            policy,
            sequences: (0..batch)
                .map(|_| Sequence::new(config, policy, positions, device, dtype))
                .collect(),
        }
    }

    /// The sequences, one per batch row.
    pub fn sequences(&self) -> &[Sequence<B>] {
        &self.sequences
    }

    /// The sequences, to set them up before the prefill (e.g.
    /// [`Sequence::record_prefill`]).
    pub fn sequences_mut(&mut self) -> &mut [Sequence<B>] {
        &mut self.sequences
    }

    /// Tokens processed so far per sequence (`N`).
    pub fn tokens_seen(&self) -> Vec<usize> {
        self.sequences.iter().map(Sequence::tokens_seen).collect()
    }

    /// KV bytes held by every layer of every sequence together.
    pub fn kv_bytes(&self) -> usize {
        self.sequences.iter().map(Sequence::kv_bytes).sum()
    }

    /// Runs the prompts (already embedded, image tokens spliced in; all of one length) and
    /// returns the logits of every prompt position.
    ///
    /// # Shapes
    /// - `embeds`: `[batch, T, hidden]`; `kinds`: `T` slot kinds
    /// - returns `[batch, T, vocab]`
    pub fn prefill(&mut self, embeds: Tensor<B, 3>, kinds: &[SlotKind]) -> Result<Tensor<B, 3>> {
        let hidden = self.prefill_hidden(embeds, kinds, None)?;
        Ok(self.runner.decoder().head(hidden))
    }

    /// Runs the prompts like [`Session::prefill`] but returns only the last position's
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
        let hidden = self.prefill_hidden(embeds, kinds, None)?;
        Ok(self.runner.decoder().last_logits(hidden))
    }

    /// [`Session::prefill_last`] of a prompt from the model interface
    /// ([`crate::VisionLanguageModel::prompt`]), every row at its RoPE positions if it has
    /// them.
    ///
    /// # Shapes
    /// - `prompt.embeds`: `[batch, T, hidden]` -> `[batch, vocab]`
    pub fn prefill_prompt_last(&mut self, prompt: Prompt<B>) -> Result<Tensor<B, 2>> {
        let rope = prompt.rope.as_deref();
        let hidden = self.prefill_hidden(prompt.embeds, &prompt.kinds, rope)?;
        Ok(self.runner.decoder().last_logits(hidden))
    }

    fn prefill_hidden(
        &mut self,
        embeds: Tensor<B, 3>,
        kinds: &[SlotKind],
        rope: Option<&[[usize; 3]]>,
    ) -> Result<Tensor<B, 3>> {
        let batch = embeds.dims()[0];
        if batch != self.sequences.len() {
            return Err(ModelError::Prompt(format!(
                "{batch} prompts for a batch of {}",
                self.sequences.len()
            )));
        }
        let hidden = self
            .sequences
            .iter_mut()
            .enumerate()
            .map(|(b, seq)| {
                let row = embeds.clone().narrow(0, b, 1);
                self.runner.prefill_at(seq, self.policy, row, kinds, rope)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(hidden, 0))
    }

    /// Feeds one token per sequence and returns the next-token logits.
    ///
    /// # Shapes
    /// - `tokens`: one id per sequence -> `[batch, vocab]`
    pub fn step(&mut self, tokens: &[u32]) -> Result<Tensor<B, 2>> {
        let policy = self.policy;
        let mut batch: Vec<(&mut Sequence<B>, &dyn CachePolicy)> =
            self.sequences.iter_mut().map(|s| (s, policy)).collect();
        self.runner.decode(&mut batch, tokens)
    }
}
