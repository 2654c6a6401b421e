//! Decoding: greedy and seeded temperature / top-p sampling, stopping at EOS or a token
//! budget, and teacher-forced scoring of a reference answer (the paper's PPL protocol).

use std::time::Instant;

use burn::tensor::{Tensor, backend::Backend};
use ecache_core::SlotKind;

use crate::error::Result;
use crate::kernels::KernelBackend;
use crate::session::Session;

/// How tokens are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// 0 selects greedy decoding.
    pub temperature: f64,
    /// Nucleus mass in (0, 1].
    pub top_p: f64,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// SplitMix64. Written here rather than taken from `rand` so that a seed gives the same
/// tokens on every platform and every dependency version (a reproducibility promise).
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A uniform number in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The greedy choice: the highest logit, the lowest id on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], sampling: &Sampling, rng: &mut SeededRng) -> u32 {
    if sampling.temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i, ((x as f64 - max) / sampling.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| {
        b.1.partial_cmp(&a.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.0.cmp(&b.0))
    });
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1 / total;
        if mass >= sampling.top_p {
            break;
        }
    }
    let nucleus = &probs[..kept];
    let nucleus_total: f64 = nucleus.iter().map(|p| p.1).sum();
    let mut u = rng.next_f64() * nucleus_total;
    for &(i, p) in nucleus {
        if u < p {
            return i as u32;
        }
        u -= p;
    }
    nucleus[kept - 1].0 as u32
}

/// What a generation produced and cost.
#[derive(Debug, Clone)]
pub struct Generation {
    /// New tokens, EOS included if it was produced.
    pub tokens: Vec<u32>,
    /// Prompt slots (text and image).
    pub prompt_tokens: usize,
    /// Image slots of the prompt.
    pub image_tokens: usize,
    /// Slots each layer holds at the end.
    pub slots_per_layer: Vec<usize>,
    /// Image slots each layer holds right after the prefill (after the policy's prefill
    /// decision), and at the end.
    pub image_slots_after_prefill: Vec<usize>,
    pub image_slots_at_end: Vec<usize>,
    /// KV bytes held at the end, all layers (this sequence's share in a batch).
    pub kv_bytes: usize,
    /// Seconds spent in prefill.
    pub prefill_seconds: f64,
    /// Seconds spent in decode steps.
    pub decode_seconds: f64,
}

/// Generates for one sequence: prefill the prompt, then sample until EOS or the budget.
/// `on_token` sees each new token as it is chosen.
pub fn generate<B: KernelBackend>(
    session: &mut Session<'_, B>,
    embeds: Tensor<B, 3>,
    kinds: &[SlotKind],
    sampling: &Sampling,
    eos: &[u32],
    mut on_token: impl FnMut(u32),
) -> Result<Generation> {
    let mut all = generate_batch(session, embeds, kinds, sampling, eos, |_, t| on_token(t))?;
    Ok(all.remove(0))
}

/// Generates for a batch of equal-length prompts, one [`Generation`] per sequence. Sequence
/// `b` samples with seed `sampling.seed + b`, so a batch of one is [`generate`]. A sequence
/// that has stopped is fed its EOS until every sequence has stopped; what it is fed then is
/// not part of its answer. `on_token(b, token)` sees each sequence's tokens as chosen.
///
/// # Shapes
/// - `embeds`: `[batch, prompt, hidden]`; `kinds`: one per prompt slot
pub fn generate_batch<B: KernelBackend>(
    session: &mut Session<'_, B>,
    embeds: Tensor<B, 3>,
    kinds: &[SlotKind],
    sampling: &Sampling,
    eos: &[u32],
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Generation>> {
    let batch = embeds.dims()[0];
    let mut rngs: Vec<SeededRng> = (0..batch as u64)
        .map(|b| SeededRng::new(sampling.seed.wrapping_add(b)))
        .collect();
    let start = Instant::now();
    let mut rows = rows_of(session.prefill_last(embeds, kinds)?)?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    let after_prefill = (0..batch)
        .map(|b| Ok(held(session, b)?.1))
        .collect::<Result<Vec<_>>>()?;
    let start = Instant::now();
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); batch];
    let mut done = vec![sampling.max_new_tokens == 0; batch];
    let mut finals: Vec<Option<(Vec<usize>, Vec<usize>)>> = vec![None; batch];
    loop {
        let mut feed = Vec::with_capacity(batch);
        for b in 0..batch {
            if done[b] {
                feed.push(
                    *tokens[b]
                        .last()
                        .unwrap_or(&eos.first().copied().unwrap_or(0)),
                );
                continue;
            }
            let next = sample(&rows[b], sampling, &mut rngs[b]);
            tokens[b].push(next);
            on_token(b, next);
            done[b] = eos.contains(&next) || tokens[b].len() == sampling.max_new_tokens;
            if done[b] {
                // What this sequence holds when it stops (later feeds only keep the batch
                // in step), as a run of its own would end.
                finals[b] = Some(held(session, b)?);
            }
            feed.push(next);
        }
        if done.iter().all(|d| *d) {
            break;
        }
        rows = step_rows(session, &feed)?;
    }
    let decode_seconds = start.elapsed().as_secs_f64();
    let kv_bytes = session.kv_bytes() / batch.max(1);
    let mut out = Vec::with_capacity(batch);
    for (b, tokens) in tokens.into_iter().enumerate() {
        // Every sequence that generated has its snapshot; with no tokens to generate, the
        // state after the prefill is the end.
        let (slots, images) = match finals[b].take() {
            Some(f) => f,
            None => held(session, b)?,
        };
        out.push(Generation {
            tokens,
            prompt_tokens: kinds.len(),
            image_tokens: kinds.iter().filter(|k| **k == SlotKind::Image).count(),
            slots_per_layer: slots,
            image_slots_after_prefill: after_prefill[b].clone(),
            image_slots_at_end: images,
            kv_bytes,
            prefill_seconds,
            decode_seconds,
        });
    }
    Ok(out)
}

/// What sequence `b` holds now: slots per layer, and image slots per layer.
fn held<B: KernelBackend>(session: &Session<'_, B>, b: usize) -> Result<(Vec<usize>, Vec<usize>)> {
    Ok(session.sequences()[b].held())
}

/// Feeds one token per sequence and returns each sequence's next-token logits.
fn step_rows<B: KernelBackend>(
    session: &mut Session<'_, B>,
    feed: &[u32],
) -> Result<Vec<Vec<f32>>> {
    rows_of(session.step(feed)?)
}

/// One host row of logits per sequence.
///
/// # Shapes
/// - `logits`: `[batch, vocab]`
pub fn rows_of<B: Backend>(logits: Tensor<B, 2>) -> Result<Vec<Vec<f32>>> {
    let v = logits.dims()[1];
    let flat: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("converted to f32");
    Ok(flat.chunks(v).map(<[f32]>::to_vec).collect())
}

/// `-log softmax(row)[target]`, computed in f64: one answer token's negative
/// log-likelihood.
pub fn nll(row: &[f32], target: u32) -> f64 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_sum = row
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    log_sum - row[target as usize] as f64
}

/// Teacher-forced negative log-likelihood of `answer` after the prompt: the prefill predicts
/// answer token 0, each decode step feeds token `t` and predicts `t + 1`; the policy acts
/// after every forward. Returns one NLL per answer token (natural log).
pub fn answer_nll<B: KernelBackend>(
    session: &mut Session<'_, B>,
    embeds: Tensor<B, 3>,
    kinds: &[SlotKind],
    answer: &[u32],
) -> Result<Vec<f64>> {
    let mut all = answer_nll_batch(session, embeds, kinds, &[answer.to_vec()])?;
    Ok(all.remove(0))
}

/// [`answer_nll`] for a batch of equal-length prompts with answers of any lengths. A
/// sequence whose answer has ended is fed its last token until the longest answer ends;
/// its caches are its own, so this does not change its scores.
///
/// # Shapes
/// - `embeds`: `[batch, prompt, hidden]`; `answers`: one per sequence
pub fn answer_nll_batch<B: KernelBackend>(
    session: &mut Session<'_, B>,
    embeds: Tensor<B, 3>,
    kinds: &[SlotKind],
    answers: &[Vec<u32>],
) -> Result<Vec<Vec<f64>>> {
    if embeds.dims()[0] != answers.len() {
        return Err(crate::ModelError::Prompt(format!(
            "{} answers for a batch of {} prompts",
            answers.len(),
            embeds.dims()[0]
        )));
    }
    let mut rows = rows_of(session.prefill_last(embeds, kinds)?)?;
    let longest = answers.iter().map(Vec::len).max().unwrap_or(0);
    let mut nll: Vec<Vec<f64>> = answers
        .iter()
        .map(|a| Vec::with_capacity(a.len()))
        .collect();
    for i in 0..longest {
        for (b, answer) in answers.iter().enumerate() {
            if let Some(&a) = answer.get(i) {
                nll[b].push(self::nll(&rows[b], a));
            }
        }
        if i + 1 < longest {
            let feed: Vec<u32> = answers
                .iter()
                .map(|a| a.get(i).or(a.last()).copied().unwrap_or(0))
                .collect();
            rows = step_rows(session, &feed)?;
        }
    }
    Ok(nll)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus_and_seeds_repeat() {
        let logits = [5.0f32, 4.0, -10.0, -10.0];
        let s = Sampling {
            max_new_tokens: 1,
            temperature: 1.0,
            top_p: 0.5,
            seed: 7,
        };
        let mut rng = SeededRng::new(7);
        assert!(
            (0..200).all(|_| sample(&logits, &s, &mut rng) == 0),
            "top-1 mass 0.73 >= 0.5"
        );
        let s = Sampling { top_p: 1.0, ..s };
        let draws = |seed| {
            let mut rng = SeededRng::new(seed);
            (0..500)
                .map(|_| sample(&logits, &s, &mut rng))
                .collect::<Vec<_>>()
        };
        let a = draws(3);
        assert_eq!(a, draws(3));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / 500.0;
        // P(1) = e^4 / (e^5 + e^4) = 0.269.
        assert!((ones - 0.269).abs() < 0.06, "{ones}");
    }
}
