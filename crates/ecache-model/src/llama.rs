//! The LLaMA decoder: RMSNorm, rotate-half RoPE at explicit positions, grouped-query
//! attention over the policy-managed cache, SwiGLU, and the LM head.

use burn::module::{Module, Param};
use burn::nn::{Linear, RmsNorm};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Int, Tensor, TensorData, activation, backend::Backend};
use ecache_core::{ImportanceAccumulator, LayerCache, SlotKind};

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::export::Exporter;
use crate::kernels::{KernelBackend, linear, rms_norm};
use crate::layers::{Loader, Rope, RopeTables};

/// One decoder layer.
#[derive(Module, Debug)]
pub struct LlamaLayer<B: Backend> {
    input_layernorm: RmsNorm<B>,
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    o_proj: Linear<B>,
    post_attention_layernorm: RmsNorm<B>,
    gate_proj: Linear<B>,
    up_proj: Linear<B>,
    down_proj: Linear<B>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// What a layer's forward hands back besides its output.
pub struct LayerOutput<B: Backend> {
    /// `[batch, tokens, hidden]`.
    pub hidden: Tensor<B, 3>,
    /// Head-mean attention column sums over this step's queries, `[batch, slots]`, when
    /// asked for (the policy's importance or decode row).
    pub scores: Option<Tensor<B, 2>>,
    /// Head-mean attention rows of the last `m` new tokens, `[batch, m, slots]`, when
    /// asked for (SnapKV's observation window).
    pub window_rows: Option<Tensor<B, 3>>,
}

/// What a ragged decode step of a layer hands back ([`LlamaLayer::forward_ragged`]).
pub struct RaggedOutput<B: Backend> {
    /// `[1, B, hidden]`.
    pub hidden: Tensor<B, 3>,
    /// Per sequence, its head-mean attention row `[1, slots]` when it was asked for.
    pub scores: Vec<Option<Tensor<B, 2>>>,
}

impl<B: Backend> LlamaLayer<B> {
    fn load(c: &LlamaConfig, l: &mut Loader<'_, B>, i: usize) -> Result<Self> {
        let p = format!("decoder.layers.{i}");
        let (h, q, kv) = (c.hidden, c.heads * c.head_dim, c.kv_heads * c.head_dim);
        Ok(Self {
            input_layernorm: l.rms_norm(&format!("{p}.input_layernorm"), h, c.rms_norm_eps)?,
            q_proj: l.linear(&format!("{p}.self_attn.q_proj"), h, q, c.qkv_bias)?,
            k_proj: l.linear(&format!("{p}.self_attn.k_proj"), h, kv, c.qkv_bias)?,
            v_proj: l.linear(&format!("{p}.self_attn.v_proj"), h, kv, c.qkv_bias)?,
            o_proj: l.linear(&format!("{p}.self_attn.o_proj"), q, h, c.attention_bias)?,
            post_attention_layernorm: l.rms_norm(
                &format!("{p}.post_attention_layernorm"),
                h,
                c.rms_norm_eps,
            )?,
            gate_proj: l.linear(&format!("{p}.mlp.gate_proj"), h, c.intermediate, c.mlp_bias)?,
            up_proj: l.linear(&format!("{p}.mlp.up_proj"), h, c.intermediate, c.mlp_bias)?,
            down_proj: l.linear(&format!("{p}.mlp.down_proj"), c.intermediate, h, c.mlp_bias)?,
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
        })
    }

    fn export(&self, e: &mut Exporter, i: usize) {
        let p = format!("decoder.layers.{i}");
        e.rms_norm(&format!("{p}.input_layernorm"), &self.input_layernorm);
        e.linear(&format!("{p}.self_attn.q_proj"), &self.q_proj);
        e.linear(&format!("{p}.self_attn.k_proj"), &self.k_proj);
        e.linear(&format!("{p}.self_attn.v_proj"), &self.v_proj);
        e.linear(&format!("{p}.self_attn.o_proj"), &self.o_proj);
        e.rms_norm(
            &format!("{p}.post_attention_layernorm"),
            &self.post_attention_layernorm,
        );
        e.linear(&format!("{p}.mlp.gate_proj"), &self.gate_proj);
        e.linear(&format!("{p}.mlp.up_proj"), &self.up_proj);
        e.linear(&format!("{p}.mlp.down_proj"), &self.down_proj);
    }
}

impl<B: KernelBackend> LlamaLayer<B> {
    /// Attention's score scale, `1 / sqrt(head_dim)`.
    fn scale(&self) -> f64 {
        (self.head_dim as f64).powf(-0.5)
    }

    /// Runs the layer on `t` new tokens per sequence: their keys and values are appended to
    /// `cache` (keys after RoPE) and they attend to every slot the cache holds before them.
    ///
    /// # Shapes
    /// - `x`: `[batch, t, hidden]`; `rope`: tables for the `t` new tokens
    /// - `slot_positions[b]`: the `t` absolute positions recorded for the new slots
    /// - returns `hidden`: `[batch, t, hidden]`, `scores`: `[batch, slots]` if `want_scores`,
    ///   `window_rows`: `[batch, min(window_rows, t), slots]` if `window_rows > 0`
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        cache: &mut LayerCache<B>,
        slot_positions: &[&[usize]],
        kinds: &[SlotKind],
        want_scores: bool,
        window_rows: usize,
    ) -> Result<LayerOutput<B>> {
        let t = x.dims()[1];
        let (q, k, v) = self.qkv(x.clone(), rope);
        cache.append(k, v, slot_positions, kinds)?;
        let visibility = Visibility::of(cache, t);
        let (keys, values) = (cache.keys(), cache.values());
        // SnapKV's window: the last queries' softmax rows again, head-mean, after the
        // attention proper (a `m x T` product per head, never `T x T`).
        let window_rows = match window_rows.min(t) {
            0 => None,
            m => {
                let mask = Visibility::mask::<B>(cache, t, &x.device()).narrow(2, t - m, m);
                let (_, probs) = self.attention_explicit(
                    q.clone().narrow(2, t - m, m),
                    keys.clone(),
                    values.clone(),
                    Some(mask),
                    true,
                );
                probs.map(|p| {
                    let [b, _, m, slots] = p.dims();
                    p.mean_dim(1).reshape([b, m, slots])
                })
            }
        };
        // A prompt over itself with a policy's importance: one pass through the backend's
        // kernel when it has one.
        let fused_scores = (want_scores && visibility == Visibility::Causal)
            .then(|| B::causal_attention_with_sums(&q, &keys, &values, self.scale()))
            .flatten();
        let (attn, scores) = if let Some((attn, scores)) = fused_scores {
            (attn, Some(scores))
        } else if want_scores {
            let mask = Visibility::mask::<B>(cache, t, &x.device());
            let (attn, scores) = self.attention_with_scores(
                q,
                keys,
                values,
                mask,
                visibility,
                SCORE_BLOCK_ELEMENTS,
            )?;
            (attn, Some(scores))
        } else if t == 1 {
            // Decode: one query row per head. Written out, it is faster than burn-flex's
            // fused kernel here (benches/decode_layer.rs: 56 vs 73 ms per 7B layer step
            // with 1,024 slots) and its probabilities are only what attention needs.
            let mask = (visibility == Visibility::Ragged)
                .then(|| Visibility::mask::<B>(cache, t, &x.device()));
            (
                self.attention_explicit(q, keys, values, mask, false).0,
                None,
            )
        } else {
            (
                self.attention_fused(q, keys, values, visibility, cache),
                None,
            )
        };
        Ok(LayerOutput {
            hidden: self.finish(x, attn),
            scores,
            window_rows,
        })
    }

    /// Runs the layer on one new token for each of `B` sequences, each with its own cache
    /// (of batch one). The `B` tokens travel as one row of `B` tokens (`[1, B, hidden]`),
    /// so that the projections and the MLP multiply a `B x hidden` matrix by each weight
    /// once: as `[B, 1, hidden]` they would be `B` products of one row each, reading every
    /// weight `B` times. Attention runs on each sequence's own slots, written out as for any
    /// decode row. With `want_scores[i]`, sequence `i`'s head-mean attention row comes back
    /// too.
    ///
    /// # Shapes
    /// - `x`: `[1, B, hidden]`; `rope`: tables for one row of the `B` tokens' positions
    /// - `caches`: `B` caches of batch one; `slot_positions`: the `B` absolute positions
    ///   recorded for the new slots
    /// - returns `[1, B, hidden]` and, per sequence, `[1, slots]` scores if wanted
    pub fn forward_ragged(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        caches: &mut [&mut LayerCache<B>],
        slot_positions: &[usize],
        want_scores: &[bool],
    ) -> Result<RaggedOutput<B>> {
        let n = x.dims()[1];
        if x.dims()[0] != 1
            || caches.len() != n
            || slot_positions.len() != n
            || want_scores.len() != n
        {
            return Err(crate::ModelError::Prompt(format!(
                "a decode step of {n} rows got {} caches, {} positions and {} score requests",
                caches.len(),
                slot_positions.len(),
                want_scores.len()
            )));
        }
        let (q, k, v) = self.qkv(x.clone(), rope);
        let one = |t: &Tensor<B, 4>, i: usize| t.clone().narrow(2, i, 1);
        for (i, cache) in caches.iter_mut().enumerate() {
            cache.append(
                one(&k, i),
                one(&v, i),
                &[&[slot_positions[i]]],
                &[SlotKind::Text],
            )?;
        }
        let mut scores = vec![None; n];
        // Every sequence and head in one pass when the backend has the kernel and no
        // policy needs the probabilities; else written out per sequence.
        let fused = if want_scores.iter().any(|w| *w) {
            None
        } else {
            let keys: Vec<_> = caches.iter().map(|c| c.keys()).collect();
            let values: Vec<_> = caches.iter().map(|c| c.values()).collect();
            B::decode_attention(&q, &keys, &values, self.scale())
        };
        let attn = match fused {
            Some(attn) => attn,
            None => {
                let mut outputs = Vec::with_capacity(n);
                for (i, cache) in caches.iter().enumerate() {
                    let (attn, probs) = self.attention_explicit(
                        one(&q, i),
                        cache.keys(),
                        cache.values(),
                        None,
                        want_scores[i],
                    );
                    outputs.push(attn);
                    scores[i] = probs.map(ecache_core::importance::column_sums);
                }
                if n == 1 {
                    outputs.remove(0)
                } else {
                    Tensor::cat(outputs, 2)
                }
            }
        };
        Ok(RaggedOutput {
            hidden: self.finish(x, attn),
            scores,
        })
    }

    /// Runs the layer over whole sequences with a causal mask and no cache: the training
    /// path, and a reference for the cached one. With `keep_probs` it also hands back the
    /// attention probabilities (training scaffolding that supervises where a head looks).
    ///
    /// # Shapes
    /// - `x`: `[batch, t, hidden]`; `rope`: tables for positions `0..t`
    /// - `mask`: `[1, 1, t, t]`, true where attention is not allowed
    /// - returns `[batch, t, hidden]` and, if kept, `[batch, heads, t, t]`
    pub fn forward_causal(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Tensor<B, 4, Bool>,
        keep_probs: bool,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 4>>) {
        let (q, k, v) = self.qkv(x.clone(), rope);
        let (attn, probs) = self.attention_explicit(q, k, v, Some(mask), keep_probs);
        (self.finish(x, attn), probs)
    }

    /// Queries, keys (both after RoPE) and values, heads split out.
    fn qkv(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, t, _] = x.dims();
        let d = self.head_dim;
        let h = rms_norm(&self.input_layernorm, x);
        let q = rope.apply(linear(&self.q_proj, h.clone()).reshape([b, t, self.heads, d]));
        let k = rope.apply(linear(&self.k_proj, h.clone()).reshape([b, t, self.kv_heads, d]));
        let v = linear(&self.v_proj, h)
            .reshape([b, t, self.kv_heads, d])
            .swap_dims(1, 2);
        (q, k, v)
    }

    /// Attention through the backend's fused kernel (flash-style on `flex`): no
    /// probabilities are materialised beyond what the kernel needs.
    ///
    /// # Shapes
    /// - `q`: `[batch, heads, t, d]`; `keys`, `values`: `[batch, kv_heads, slots, d]`
    /// - returns `[batch, heads, t, d]`
    fn attention_fused(
        &self,
        q: Tensor<B, 4>,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
        visibility: Visibility,
        cache: &LayerCache<B>,
    ) -> Tensor<B, 4> {
        let rep = self.heads / self.kv_heads;
        let [b, h, t, _] = q.dims();
        let slots = keys.dims()[2];
        let (mask, is_causal) = match visibility {
            Visibility::All => (None, false),
            Visibility::Causal => (None, true),
            Visibility::Ragged => {
                let mask = Visibility::mask::<B>(cache, t, &q.device());
                (Some(mask.expand([b, h, t, slots])), false)
            }
        };
        if mask.is_none()
            && let Some(out) = B::grouped_attention(&q, &keys, &values, is_causal, self.scale())
        {
            return out;
        }
        let options = AttentionModuleOptions {
            scale: Some(self.scale()),
            softcap: None,
            is_causal,
        };
        attention(
            q,
            repeat_kv(keys, rep),
            repeat_kv(values, rep),
            mask,
            None,
            options,
        )
    }

    /// Attention with the head-mean column sums of its probabilities (the policy's
    /// importance or decode row), computed over blocks of query rows so that a prefill
    /// holds at most `block_elements` probabilities at once (or one query row's).
    ///
    /// Under [`Visibility::Causal`] the cache holds exactly the new tokens, in rows `0..t`
    /// in order (appends fill rows at the end, as the mask assumes), so a block of rows
    /// `start..start + n` sees only rows `0..start + n`: the block attends to that prefix
    /// alone, and a prefill is cut into at least [`CAUSAL_SCORE_BLOCKS`] blocks so that
    /// about half of the `t x t` products and softmax work is never done.
    ///
    /// # Shapes
    /// - `q`: `[batch, heads, t, d]`; `keys`, `values`: `[batch, kv_heads, slots, d]`
    /// - `mask`: `[batch, 1, t, slots]`, true where attention is not allowed
    /// - returns `[batch, heads, t, d]` and scores `[batch, slots]`
    fn attention_with_scores(
        &self,
        q: Tensor<B, 4>,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
        mask: Tensor<B, 4, Bool>,
        visibility: Visibility,
        block_elements: usize,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 2>)> {
        let [b, h, t, _] = q.dims();
        let slots = keys.dims()[2];
        let q_device = q.device();
        let causal = visibility == Visibility::Causal && slots == t;
        let mut rows = (block_elements / (b * h * slots).max(1)).clamp(1, t);
        if causal {
            rows = rows.min(t.div_ceil(CAUSAL_SCORE_BLOCKS));
        }
        let mut importance = ImportanceAccumulator::new();
        let mut blocks = Vec::with_capacity(t.div_ceil(rows));
        for start in (0..t).step_by(rows) {
            let n = rows.min(t - start);
            let seen = if causal { start + n } else { slots };
            let (attn, probs) = self.attention_explicit(
                q.clone().narrow(2, start, n),
                keys.clone().narrow(2, 0, seen),
                values.clone().narrow(2, 0, seen),
                Some(mask.clone().narrow(2, start, n).narrow(3, 0, seen)),
                true,
            );
            importance.add_leading_block(probs.expect("asked for"), slots)?;
            blocks.push(attn);
        }
        let scores = importance.into_sums(b, slots, &q_device);
        Ok((Tensor::cat(blocks, 2), scores))
    }

    /// Softmax attention written out in f32, and its probabilities when `keep_probs`: the
    /// training path, and the scored path's inner step.
    ///
    /// Grouped-query heads are handled by folding each key/value head's query heads into
    /// its rows (`[batch, kv_heads, rep * t, d]`), so the keys and values are read where
    /// they lie instead of being copied `rep` times: at decode, copying them was over half
    /// of a step of the demo model.
    ///
    /// # Shapes
    /// - `q`: `[batch, heads, t, d]`; `keys`, `values`: `[batch, kv_heads, slots, d]`
    ///   (`heads` a multiple of `kv_heads`)
    /// - `mask`: `[batch or 1, 1, t, slots]`, true where attention is not allowed (none:
    ///   every slot visible)
    /// - returns `[batch, heads, t, d]` and, if `keep_probs`, `[batch, heads, t, slots]`
    fn attention_explicit(
        &self,
        q: Tensor<B, 4>,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
        mask: Option<Tensor<B, 4, Bool>>,
        keep_probs: bool,
    ) -> (Tensor<B, 4>, Option<Tensor<B, 4>>) {
        let d = self.head_dim;
        let [b, h, t, _] = q.dims();
        let [_, kv, slots, _] = keys.dims();
        let rep = h / kv;
        // Query head `g * rep + r` becomes rows `r * t .. (r + 1) * t` of group `g`.
        let q = q.reshape([b, kv, rep * t, d]);
        let dtype = q.dtype();
        let logits = (B::attention_matmul(q, keys.swap_dims(2, 3)) * self.scale()).cast(DType::F32);
        let logits = match mask {
            Some(mask) if rep > 1 => logits.mask_fill(mask.repeat_dim(2, rep), f32::NEG_INFINITY),
            Some(mask) => logits.mask_fill(mask, f32::NEG_INFINITY),
            None => logits,
        };
        let probs = activation::softmax(logits, 3);
        let kept = keep_probs.then(|| probs.clone().reshape([b, h, t, slots]));
        let out = B::attention_matmul(probs.cast(dtype), values).reshape([b, h, t, d]);
        (out, kept)
    }

    /// The attention output projection, the residual, and the MLP.
    ///
    /// # Shapes
    /// - `x`: `[batch, t, hidden]`; `attn`: `[batch, heads, t, d]` -> `[batch, t, hidden]`
    fn finish(&self, x: Tensor<B, 3>, attn: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let attn = attn
            .swap_dims(1, 2)
            .reshape([b, t, self.heads * self.head_dim]);
        let x = x + linear(&self.o_proj, attn);
        let h = rms_norm(&self.post_attention_layernorm, x.clone());
        let mlp = B::swiglu(linear(&self.gate_proj, h.clone()), linear(&self.up_proj, h));
        x + linear(&self.down_proj, mlp)
    }
}

/// Most attention probabilities the scored path holds at once (16 Mi f32, 64 MiB).
pub const SCORE_BLOCK_ELEMENTS: usize = 1 << 24;

/// Fewest blocks a causal scored prefill is cut into: block `i` of `k` reads the first
/// `(i + 1) / k` of the keys, so `k` blocks do `(k + 1) / 2k` of the whole product (8:
/// 56%).
pub const CAUSAL_SCORE_BLOCKS: usize = 8;

/// Which cache slots the `t` new tokens may see, by the cheapest description that holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Visibility {
    /// Every slot (one new token per sequence, all sequences the same length).
    All,
    /// The cache holds exactly the new tokens of every sequence: a causal mask.
    Causal,
    /// Anything else (sequences of different lengths): an explicit mask.
    Ragged,
}

impl Visibility {
    fn of<B: Backend>(cache: &LayerCache<B>, t: usize) -> Self {
        let batch = cache.shape().batch;
        let len = cache.len(0);
        if (1..batch).any(|b| cache.len(b) != len) {
            Visibility::Ragged
        } else if t == 1 {
            Visibility::All
        } else if len == t {
            Visibility::Causal
        } else {
            Visibility::Ragged
        }
    }

    /// True where attention is *not* allowed: the `t` new tokens of sequence `b` sit at
    /// cache indices `len_b - t ..len_b`, and token `i` sees slots `0..=len_b - t + i`.
    ///
    /// # Shapes
    /// - returns `[batch, 1, t, max_len]`
    fn mask<B: Backend>(cache: &LayerCache<B>, t: usize, device: &B::Device) -> Tensor<B, 4, Bool> {
        let batch = cache.shape().batch;
        let slots = cache.max_len();
        let mut hidden = Vec::with_capacity(batch * t * slots);
        for b in 0..batch {
            let first = cache.len(b) - t;
            for i in 0..t {
                hidden.extend((0..slots).map(|j| j > first + i));
            }
        }
        Tensor::from_data(TensorData::new(hidden, [batch, 1, t, slots]), device)
    }
}

/// `[batch, kv_heads, slots, d]` -> `[batch, kv_heads * rep, slots, d]`, query head `i`
/// reading KV head `i / rep` (transformers' `repeat_kv`).
pub(crate) fn repeat_kv<B: Backend>(x: Tensor<B, 4>, rep: usize) -> Tensor<B, 4> {
    if rep == 1 {
        return x;
    }
    let [b, h, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .repeat_dim(2, rep)
        .reshape([b, h * rep, s, d])
}

/// The decoder: embeddings, layers, final norm and LM head.
#[derive(Module, Debug)]
pub struct LlamaDecoder<B: Backend> {
    embed_tokens: Param<Tensor<B, 2>>,
    pub(crate) layers: Vec<LlamaLayer<B>>,
    norm: RmsNorm<B>,
    lm_head: Linear<B>,
}

impl<B: Backend> LlamaDecoder<B> {
    /// Query and key/value head counts (the RoPE tables a forward pass needs).
    pub fn head_counts(&self) -> [usize; 2] {
        self.layers
            .first()
            .map_or([0, 0], |l| [l.heads, l.kv_heads])
    }

    /// Each head's width.
    pub fn head_dim(&self) -> usize {
        self.layers.first().map_or(0, |l| l.head_dim)
    }

    /// Loads the decoder; a tied LM head reuses the embeddings when the checkpoint has none.
    pub fn load(c: &LlamaConfig, l: &mut Loader<'_, B>) -> Result<Self> {
        let embed: Tensor<B, 2> =
            l.tensor("decoder.embed_tokens.weight", [c.vocab_size, c.hidden])?;
        let layers = (0..c.layers)
            .map(|i| LlamaLayer::load(c, l, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = l.rms_norm("decoder.norm", c.hidden, c.rms_norm_eps)?;
        let lm_head = if c.tie_word_embeddings && !l.checkpoint.contains("lm_head.weight") {
            Linear {
                weight: Param::from_tensor(embed.clone().transpose()),
                bias: None,
            }
        } else {
            l.linear("lm_head", c.hidden, c.vocab_size, false)?
        };
        Ok(Self {
            embed_tokens: Param::from_tensor(embed),
            layers,
            norm,
            lm_head,
        })
    }

    /// A decoder of `config` with freshly initialised weights (normal, std 0.02), created
    /// directly on `device` in `dtype`; `seed` seeds the backend's generator first. For
    /// benchmarks at published shapes without a checkpoint.
    pub fn init(config: &LlamaConfig, device: &B::Device, dtype: DType, seed: u64) -> Self {
        B::seed(device, seed);
        let mut random = crate::weights::Checkpoint::random(0.02);
        let mut loader = Loader {
            checkpoint: &mut random,
            device,
            dtype,
        };
        Self::load(config, &mut loader).expect("a random checkpoint has every tensor")
    }

    /// The decoder layers.
    pub fn layers(&self) -> &[LlamaLayer<B>] {
        &self.layers
    }

    /// Writes the decoder's tensors (the LM head always, tied or not).
    pub fn export(&self, e: &mut Exporter) {
        e.param("decoder.embed_tokens.weight", &self.embed_tokens);
        for (i, layer) in self.layers.iter().enumerate() {
            layer.export(e, i);
        }
        e.rms_norm("decoder.norm", &self.norm);
        e.linear("lm_head", &self.lm_head);
    }

    /// Token embeddings.
    ///
    /// # Shapes
    /// - `ids`: `[batch, t]` -> `[batch, t, hidden]`
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = ids.dims();
        let hidden = self.embed_tokens.dims()[1];
        self.embed_tokens
            .val()
            .select(0, ids.reshape([b * t]))
            .reshape([b, t, hidden])
    }
}

impl<B: KernelBackend> LlamaDecoder<B> {
    /// Final norm and LM head.
    ///
    /// # Shapes
    /// - `x`: `[batch, t, hidden]` -> logits `[batch, t, vocab]`
    pub fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        linear(&self.lm_head, rms_norm(&self.norm, x))
    }

    /// [`LlamaDecoder::head`] on each row's last position only: the next token's logits.
    ///
    /// # Shapes
    /// - `x`: `[batch, t, hidden]` -> logits `[batch, vocab]`
    pub fn last_logits(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, t, _] = x.dims();
        let logits = self.head(x.narrow(1, t - 1, 1));
        let v = logits.dims()[2];
        logits.reshape([b, v])
    }

    /// Logits of every position of whole sequences under a causal mask, at positions
    /// `0..t` (no cache, no policy): the training forward.
    ///
    /// # Shapes
    /// - `embeds`: `[batch, t, hidden]` -> `[batch, t, vocab]`
    pub fn forward_causal(&self, embeds: Tensor<B, 3>, rope: &Rope) -> Tensor<B, 3> {
        self.forward_causal_probs(embeds, rope, &[]).0
    }

    /// [`Self::forward_causal`], also handing back the attention probabilities of the
    /// layers in `probes`, in that order (training scaffolding that supervises where heads
    /// look). A layer out of range gives no entry.
    ///
    /// # Shapes
    /// - `embeds`: `[batch, t, hidden]` -> `[batch, t, vocab]` and `[batch, heads, t, t]` each
    pub fn forward_causal_probs(
        &self,
        embeds: Tensor<B, 3>,
        rope: &Rope,
        probes: &[usize],
    ) -> (Tensor<B, 3>, Vec<Tensor<B, 4>>) {
        let [_, t, _] = embeds.dims();
        let device = embeds.device();
        let heads = self.head_counts();
        let tables = rope.tables::<B>(&[(0..t).collect()], &heads, &device, embeds.dtype());
        let causal: Vec<bool> = (0..t).flat_map(|i| (0..t).map(move |j| j > i)).collect();
        let mask = Tensor::<B, 4, Bool>::from_data(TensorData::new(causal, [1, 1, t, t]), &device);
        let mut x = embeds;
        let mut kept: Vec<(usize, Tensor<B, 4>)> = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let (y, probs) = layer.forward_causal(x, &tables, mask.clone(), probes.contains(&i));
            x = y;
            kept.extend(probs.map(|p| (i, p)));
        }
        let probs = probes
            .iter()
            .filter_map(|want| kept.iter().find(|(i, _)| i == want).map(|(_, p)| p.clone()))
            .collect();
        (self.head(x), probs)
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

#[cfg(test)]
#[path = "llama_tests.rs"]
mod tests;
