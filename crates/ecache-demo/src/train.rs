//! Training the demo model with burn's autodiff on the CPU: next-token cross-entropy on the
//! answer tokens (and EOS) of freshly drawn scenes, each sequence weighted equally, AdamW
//! with warm-up and cosine decay, gradient clipping. Reproducible from a seed.

use ecache_model::kernels::KernelBackend;
use std::path::Path;
use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::grad_clipping::GradientClippingConfig;
use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{DType, Int, Tensor, TensorData, activation::log_softmax, backend::Backend};
use ecache_model::generate::SeededRng;
use ecache_model::layers::Rope;
use ecache_model::{Checkpoint, ImageProcessor, Llava, LlavaConfig, PromptTokenizer};

use crate::DemoError;
use crate::language::{IMAGE, QuestionMix, template_of};
use crate::model_dir::{DemoShape, write_descriptors};

// The batch and the scaffolding live in their own modules; training's callers find them
// here too.
pub use crate::batch::{
    Answer, Batch, Example, cell_of_token, draw, draw_conversation, make_batch,
};
pub use crate::scaffold::{CellProbe, cue_loss, focus_loss, oracle_embeddings, oracle_loss};

/// Training settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainOptions {
    pub steps: usize,
    pub batch: usize,
    pub peak_lr: f64,
    pub warmup: usize,
    pub seed: u64,
    /// Fraction of sequences that are descriptions (the rest are short questions).
    pub description_share: f64,
    /// Question-answer turns per training sequence (one image, several questions).
    pub turns: usize,
    /// Weight of the cell probe's loss (see [`CellProbe`]).
    pub probe_weight: f64,
    /// Steps of the first stage, in which the decoder reads each scene's oracle embeddings
    /// instead of the tower's features (see [`oracle_embeddings`]).
    pub oracle_steps: usize,
    /// Steps after the first stage over which the decoder's input fades linearly from the
    /// oracle to the tower's features (0 switches at once; see [`TrainOptions::oracle_share`]).
    pub oracle_fade: usize,
    /// Weight of the loss that pulls the projected image features onto the oracle.
    pub oracle_weight: f64,
    /// Weight of the focus loss (see [`focus_loss`]); 0 turns it off.
    pub focus_weight: f64,
    /// The decoder layer whose first head the focus loss supervises.
    pub focus_layer: usize,
    /// Weight of the cue loss (see [`crate::scaffold::cue_loss`]); 0 turns it off.
    pub cue_weight: f64,
    /// The decoder layer whose heads the cue loss supervises.
    pub cue_layer: usize,
    /// How often each short-question template is drawn in training (held-out checks stay
    /// uniform).
    pub question_mix: QuestionMix,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            steps: 3000,
            batch: 8,
            peak_lr: 1e-3,
            warmup: 100,
            seed: 2024,
            description_share: 0.5,
            turns: 6,
            probe_weight: 0.0,
            oracle_steps: 1200,
            // The committed model switches at once; a 300-step fade with a heavier
            // size and where mix gained 1.5-3 points (docs/demo.md, "A second recipe").
            oracle_fade: 0,
            oracle_weight: 1.0,
            focus_weight: 0.5,
            focus_layer: 1,
            // Layer 0 carries the words naming the asked object to the answer; without it
            // the previous model stopped at 63% (docs/demo.md, "What held short questions
            // back").
            cue_weight: 0.5,
            cue_layer: 0,
            // Colour, shape and where are read from one cell and are learned last
            // (docs/demo.md); counts and sizes come sooner.
            question_mix: QuestionMix([1.0, 3.0, 3.0, 1.0, 2.0, 1.0]),
        }
    }
}

impl TrainOptions {
    /// Checks the options a caller can get wrong, naming the field and its value.
    pub fn validate(&self) -> Result<(), String> {
        for (field, value) in [
            ("steps", self.steps),
            ("batch", self.batch),
            ("turns", self.turns),
        ] {
            if value == 0 {
                return Err(format!("{field} is 0; it must be at least 1"));
            }
        }
        for (field, value) in [
            ("focus_weight", self.focus_weight),
            ("cue_weight", self.cue_weight),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(format!(
                    "{field} is {value}; it must be finite and at least 0"
                ));
            }
        }
        self.question_mix.validate()
    }

    /// The share of the oracle in what the decoder reads at `step`: 1 during the first
    /// stage, then falling linearly over `oracle_fade` steps to 0 (the tower's features).
    pub fn oracle_share(&self, step: usize) -> f64 {
        if step < self.oracle_steps {
            return 1.0;
        }
        let into = (step - self.oracle_steps + 1) as f64;
        (1.0 - into / (self.oracle_fade + 1) as f64).max(0.0)
    }

    /// Linear warm-up, then cosine decay to a tenth of the peak.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak_lr * (step + 1) as f64 / self.warmup as f64;
        }
        let t = (step - self.warmup) as f64 / (self.steps - self.warmup).max(1) as f64;
        self.peak_lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos()))
    }
}

/// The seed stream of held-out scenes; training draws from `seed` itself.
pub fn held_out_rng(seed: u64) -> SeededRng {
    SeededRng::new(seed ^ 0x005E_ED0F_4E1D_0017)
}

/// Logits, and the projected image features. With `oracle = Some((embeddings, share))` the
/// decoder reads `share * embeddings + (1 - share) * features` in place of the features
/// (the oracle, see [`oracle_embeddings`]; a share of 1 or more reads the oracle alone).
///
/// # Shapes
/// - `oracle`: `[batch, image_tokens, hidden]`
/// - returns `[batch, sequence, vocab]` and `[batch, image_tokens, hidden]`
pub fn batch_forward<B: KernelBackend>(
    model: &Llava<B>,
    batch: &Batch,
    rope: &Rope,
    device: &B::Device,
    oracle: Option<(Tensor<B, 3>, f64)>,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let (logits, features, _) = batch_forward_probed(model, batch, rope, device, oracle, &[]);
    (logits, features)
}

/// [`batch_forward`], also handing back the attention probabilities of the layers in
/// `probes`, in that order.
///
/// # Shapes
/// - returns as [`batch_forward`] and `[batch, heads, sequence, sequence]` per probe
pub fn batch_forward_probed<B: KernelBackend>(
    model: &Llava<B>,
    batch: &Batch,
    rope: &Rope,
    device: &B::Device,
    oracle: Option<(Tensor<B, 3>, f64)>,
    probes: &[usize],
) -> (Tensor<B, 3>, Tensor<B, 3>, Vec<Tensor<B, 4>>) {
    let n = batch.size;
    let pixels = Tensor::<B, 4>::from_data(
        TensorData::new(batch.pixels.clone(), [n, 3, batch.side, batch.side]),
        device,
    );
    let ids = |v: &[i64], len: usize| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(v.to_vec(), [n, len]), device)
    };
    let features = model.image_features(pixels);
    let image = match oracle {
        Some((oracle, share)) if share >= 1.0 => oracle,
        Some((oracle, share)) if share > 0.0 => oracle * share + features.clone() * (1.0 - share),
        _ => features.clone(),
    };
    let embeds = Tensor::cat(
        vec![
            model.decoder.embed(ids(&batch.prefix, batch.prefix_len)),
            image,
            model.decoder.embed(ids(&batch.rest, batch.rest_len)),
        ],
        1,
    );
    let (logits, probs) = model.decoder.forward_causal_probs(embeds, rope, probes);
    (logits, features, probs)
}

/// The model being trained: LLaVA and the cell probe.
#[derive(Module, Debug)]
pub struct Trainee<B: Backend> {
    pub llava: Llava<B>,
    pub probe: CellProbe<B>,
}

/// Mean over sequences of each sequence's mean answer-token cross-entropy.
pub fn batch_loss<B: KernelBackend>(
    logits: Tensor<B, 3>,
    batch: &Batch,
    device: &B::Device,
) -> Tensor<B, 1> {
    let [n, t, _] = logits.dims();
    let targets =
        Tensor::<B, 3, Int>::from_data(TensorData::new(batch.targets.clone(), [n, t, 1]), device);
    let weights = Tensor::<B, 2>::from_data(TensorData::new(batch.weights.clone(), [n, t]), device);
    let picked = log_softmax(logits, 2).gather(2, targets).reshape([n, t]);
    (picked * weights).sum().neg() / n as f64
}

/// The argmax token at every position, sequence after sequence.
///
/// # Shapes
/// - `logits`: `[batch, sequence, vocab]` -> `batch * sequence` ids
pub fn greedy_tokens<B: Backend>(logits: Tensor<B, 3>) -> Vec<i64> {
    let [n, t, _] = logits.dims();
    logits
        .argmax(2)
        .reshape([n * t])
        .into_data()
        .convert::<i64>()
        .into_vec()
        .expect("ints")
}

/// Per answer: whether greedy decoding reproduces it and EOS exactly (every
/// teacher-forced argmax right, which is what greedy decoding then follows), and the share
/// of its tokens predicted right.
pub fn answer_accuracy<B: Backend>(logits: Tensor<B, 3>, batch: &Batch) -> Vec<(bool, f64)> {
    let [_, t, _] = logits.dims();
    let best = greedy_tokens(logits);
    batch
        .answers
        .iter()
        .map(|a| {
            let right = a
                .positions
                .iter()
                .zip(&a.tokens)
                .filter(|&(&p, &tok)| best[a.sequence * t + p] == tok as i64)
                .count();
            (
                right == a.tokens.len(),
                right as f64 / a.tokens.len() as f64,
            )
        })
        .collect()
}

/// Held-out figures under teacher forcing (greedy-equivalent exact match).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuickCheck {
    pub short_exact: f64,
    pub description_exact: f64,
    pub description_token_accuracy: f64,
    /// The same figures with the oracle in place of the image features (first stage only).
    pub oracle: Option<(f64, f64)>,
    /// Short-question exact match per question template.
    pub by_template: Vec<(&'static str, f64)>,
}

/// Checks `count` held-out examples of each kind under teacher forcing. With `oracle` the
/// decoder reads the oracle embeddings in place of the image features.
#[allow(clippy::too_many_arguments)]
pub fn quick_check<B: KernelBackend>(
    model: &Llava<B>,
    config: &LlavaConfig,
    tokenizer: &PromptTokenizer,
    processor: &ImageProcessor,
    seed: u64,
    count: usize,
    device: &B::Device,
    oracle: bool,
) -> Result<QuickCheck, DemoError> {
    let rope = Rope::new(config.text.head_dim, config.text.rope_theta);
    let mut rng = held_out_rng(seed);
    let mut out = QuickCheck::default();
    let mut templates: std::collections::BTreeMap<&'static str, (f64, f64)> = Default::default();
    for share in [0.0, 1.0] {
        let mut exact = 0.0;
        let mut tokens = 0.0;
        for chunk in 0..count.div_ceil(16) {
            let examples: Vec<_> = (0..16.min(count - chunk * 16))
                .map(|_| draw(&mut rng, share))
                .collect();
            let batch = make_batch(&examples, tokenizer, processor, config.image_tokens())?;
            let instead = oracle.then(|| (oracle_embeddings(model, &batch, device), 1.0));
            let logits = batch_forward(model, &batch, &rope, device, instead).0;
            let accuracy = answer_accuracy(logits, &batch);
            for (example, (e, t)) in examples.iter().zip(accuracy) {
                exact += e as u8 as f64;
                tokens += t;
                let entry = templates
                    .entry(template_of(&example.turns[0].question))
                    .or_default();
                *entry = (entry.0 + e as u8 as f64, entry.1 + 1.0);
            }
        }
        if share == 0.0 {
            out.short_exact = exact / count as f64;
        } else {
            out.description_exact = exact / count as f64;
            out.description_token_accuracy = tokens / count as f64;
        }
    }
    out.by_template = templates
        .into_iter()
        .filter(|(name, _)| *name != "describe")
        .map(|(name, (right, all))| (name, right / all))
        .collect();
    Ok(out)
}

/// What training reports as it goes.
#[derive(Debug, Clone)]
pub struct Progress {
    pub step: usize,
    pub loss: f64,
    /// Mean relative squared distance of the features from the oracle (0 when not trained).
    pub oracle_fit: f64,
    /// Mean focus loss over the stretch (0 when it is off).
    pub focus: f64,
    /// Mean cue loss over the stretch (0 when it is off).
    pub cue: f64,
    pub lr: f64,
    pub seconds: f64,
    /// Held-out figures, at checkpoints.
    pub check: Option<QuickCheck>,
}

/// Trains a demo model from scratch and writes it to `dir` as a Hugging Face directory.
/// `on_progress` sees the mean loss of each stretch of `log_every` steps; every
/// `checkpoint_every` steps the weights are written (so an interrupted run leaves a usable
/// model) and a small held-out check is reported. Returns the final held-out check and
/// the log.
pub fn train(
    dir: &Path,
    shape: &DemoShape,
    options: &TrainOptions,
    log_every: usize,
    checkpoint_every: usize,
    mut on_progress: impl FnMut(Progress),
) -> Result<(QuickCheck, Vec<Progress>), DemoError> {
    type Ad = Autodiff<Flex>;
    options.validate().map_err(DemoError::Option)?;
    write_descriptors(dir, shape)?;
    let config = LlavaConfig::from_path(&dir.join("config.json"))?;
    let tokenizer = PromptTokenizer::load(dir, IMAGE)?;
    let processor = ImageProcessor::load(dir)?;
    let device = Default::default();
    let rope = Rope::new(config.text.head_dim, config.text.rope_theta);
    // Vision position embeddings start as large as the patch embeddings (about 0.5 per
    // component for these scenes) instead of 0.02: with 0.02 the image tokens barely say
    // where they are, and a first run sat on the language-only plateau for 500 steps.
    let random = Checkpoint::random(0.02).with_std("embeddings.position_embedding", 0.5);
    let llava = Llava::<Ad>::init_from(&config, random, &device, DType::F32, options.seed);
    let mut model = Trainee {
        probe: CellProbe::init(config.text.hidden, &device),
        llava,
    };
    // PyTorch's epsilon rather than burn's default 1e-5: the vision tower's gradients are
    // small (they reach it through attention averaged over many image tokens, then global
    // clipping), and an epsilon of 1e-5 can dominate their Adam denominators
    // (docs/demo.md gives the measurement, which is suggestive rather than controlled).
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .with_grad_clipping(Some(GradientClippingConfig::Norm(1.0)))
        .init::<Ad, Trainee<Ad>>();
    let mut rng = SeededRng::new(options.seed);
    let start = Instant::now();
    let mut log = Vec::new();
    let mut stretch = 0.0;
    let mut oracle_stretch = 0.0;
    let mut focus_stretch = 0.0;
    let mut cue_stretch = 0.0;
    for step in 0..options.steps {
        let examples: Vec<_> = (0..options.batch)
            .map(|_| {
                draw_conversation(
                    &mut rng,
                    options.turns,
                    options.description_share,
                    &options.question_mix,
                )
            })
            .collect();
        let batch = make_batch(&examples, &tokenizer, &processor, config.image_tokens())?;
        let share = options.oracle_share(step);
        let oracle = (share > 0.0 || options.oracle_weight > 0.0)
            .then(|| oracle_embeddings(&model.llava, &batch, &device));
        let instead = oracle.clone().filter(|_| share > 0.0).map(|o| (o, share));
        let focus_on = options.focus_weight > 0.0;
        let cue_on = options.cue_weight > 0.0;
        let probes: Vec<usize> = [
            focus_on.then_some(options.focus_layer),
            cue_on.then_some(options.cue_layer),
        ]
        .into_iter()
        .flatten()
        .collect();
        let (logits, features, mut probs) =
            batch_forward_probed(&model.llava, &batch, &rope, &device, instead, &probes);
        let answer_loss = batch_loss(logits, &batch, &device);
        stretch += answer_loss.clone().into_scalar() as f64;
        let mut loss = answer_loss;
        if cue_on && let Some(probs) = probs.pop() {
            let cue = cue_loss(probs, &batch, &device);
            cue_stretch += cue.clone().into_scalar() as f64;
            loss = loss + cue * options.cue_weight;
        }
        if focus_on && let Some(probs) = probs.pop() {
            let focus = focus_loss(probs, &batch, &device);
            focus_stretch += focus.clone().into_scalar() as f64;
            loss = loss + focus * options.focus_weight;
        }
        if options.probe_weight > 0.0 {
            loss =
                loss + model.probe.loss(features.clone(), &batch, &device) * options.probe_weight;
        }
        if let Some(oracle) = oracle.filter(|_| options.oracle_weight > 0.0) {
            let fit = oracle_loss(features, oracle);
            oracle_stretch += fit.clone().into_scalar() as f64;
            loss = loss + fit * options.oracle_weight;
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lr = options.lr(step);
        model = optim.step(lr, model, grads);
        if (step + 1) % log_every == 0 || step + 1 == options.steps {
            let done = (step % log_every) + 1;
            let check = if (step + 1) % checkpoint_every == 0 && step + 1 < options.steps {
                let inner = model.valid().llava;
                inner.export().save(&dir.join("model.safetensors"))?;
                let mut check = quick_check(
                    &inner,
                    &config,
                    &tokenizer,
                    &processor,
                    options.seed,
                    64,
                    &device,
                    false,
                )?;
                if step < options.oracle_steps {
                    // Only the two headline figures: `by_template` stays that of the real
                    // features.
                    let with_oracle = quick_check(
                        &inner,
                        &config,
                        &tokenizer,
                        &processor,
                        options.seed,
                        64,
                        &device,
                        true,
                    )?;
                    check.oracle = Some((
                        with_oracle.short_exact,
                        with_oracle.description_token_accuracy,
                    ));
                }
                Some(check)
            } else {
                None
            };
            let p = Progress {
                step: step + 1,
                loss: stretch / done as f64,
                oracle_fit: oracle_stretch / done as f64,
                focus: focus_stretch / done as f64,
                cue: cue_stretch / done as f64,
                lr,
                seconds: start.elapsed().as_secs_f64(),
                check,
            };
            stretch = 0.0;
            oracle_stretch = 0.0;
            focus_stretch = 0.0;
            cue_stretch = 0.0;
            on_progress(p.clone());
            log.push(p);
        }
    }
    let model = model.valid().llava;
    model.export().save(&dir.join("model.safetensors"))?;
    let check = quick_check(
        &model,
        &config,
        &tokenizer,
        &processor,
        options.seed,
        128,
        &device,
        false,
    )?;
    Ok((check, log))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_options_are_refused_by_name() {
        assert_eq!(TrainOptions::default().validate(), Ok(()));
        let turns = TrainOptions {
            turns: 0,
            ..Default::default()
        };
        assert!(turns.validate().unwrap_err().starts_with("turns is 0"));
        let focus = TrainOptions {
            focus_weight: -1.0,
            ..Default::default()
        };
        assert!(
            focus
                .validate()
                .unwrap_err()
                .starts_with("focus_weight is -1")
        );
        let mix = TrainOptions {
            question_mix: QuestionMix([0.0; 6]),
            ..Default::default()
        };
        assert!(mix.validate().unwrap_err().contains("all zero"));
    }

    #[test]
    fn the_oracle_share_is_one_then_fades_linearly_to_zero() {
        let options = TrainOptions {
            oracle_steps: 10,
            oracle_fade: 3,
            ..Default::default()
        };
        let shares: Vec<f64> = (8..16).map(|s| options.oracle_share(s)).collect();
        assert_eq!(shares, [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]);
        let switch = TrainOptions {
            oracle_fade: 0,
            ..options
        };
        assert_eq!(switch.oracle_share(9), 1.0);
        assert_eq!(switch.oracle_share(10), 0.0);
    }
}
