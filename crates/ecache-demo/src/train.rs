//! Training the demo model with burn's autodiff on the CPU: next-token cross-entropy on the
//! answer tokens (and EOS) of freshly drawn scenes, each sequence weighted equally, AdamW
//! with warm-up and cosine decay, gradient clipping. Reproducible from a seed.

use std::path::Path;
use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::grad_clipping::GradientClippingConfig;
use burn::module::{AutodiffModule, Module};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{DType, Int, Tensor, TensorData, activation::log_softmax, backend::Backend};
use ecache_model::generate::SeededRng;
use ecache_model::layers::Rope;
use ecache_model::{Checkpoint, ImageProcessor, Llava, LlavaConfig, PromptTokenizer, chat_prompt};

use crate::DemoError;
use crate::language::{
    EOS, IMAGE, Kind, PAD, Qa, QuestionMix, description, short_question_from, template_of,
};
use crate::model_dir::{DemoShape, write_descriptors};
use crate::scene::{CELLS, COLOURS, SHAPES, SIZES, Scene};

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
        if !(self.focus_weight.is_finite() && self.focus_weight >= 0.0) {
            return Err(format!(
                "focus_weight is {}; it must be finite and at least 0",
                self.focus_weight
            ));
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

/// One drawn example: a scene and a conversation about it (one turn or several).
#[derive(Debug, Clone)]
pub struct Example {
    pub scene: Scene,
    pub turns: Vec<Qa>,
}

/// A single-turn example: the scene and one question with its answer.
pub fn draw(rng: &mut SeededRng, description_share: f64) -> Example {
    draw_conversation(rng, 1, description_share, &QuestionMix::UNIFORM)
}

/// A scene and `turns` distinct questions about it, as in LLaVA's multi-turn instruction
/// data: with probability `description_share` one of the turns (at a random place) asks for
/// the description, the others are short questions drawn with `mix`.
pub fn draw_conversation(
    rng: &mut SeededRng,
    turns: usize,
    description_share: f64,
    mix: &QuestionMix,
) -> Example {
    let scene = Scene::generate(rng);
    let describe_at = if rng.next_f64() < description_share {
        Some(((rng.next_f64() * turns as f64) as usize).min(turns - 1))
    } else {
        None
    };
    let mut qas: Vec<Qa> = Vec::with_capacity(turns);
    for turn in 0..turns {
        if describe_at == Some(turn) {
            qas.push(description(&scene));
            continue;
        }
        // A repeated question would let a later turn copy an earlier answer.
        let mut qa = short_question_from(&scene, rng, mix);
        for _ in 0..20 {
            if !qas.iter().any(|q| q.question == qa.question) {
                break;
            }
            qa = short_question_from(&scene, rng, mix);
        }
        if qas.iter().any(|q| q.question == qa.question) {
            break;
        }
        qas.push(qa);
    }
    Example { scene, turns: qas }
}

/// One answer in a batch: its sequence, the full-sequence positions whose logits predict
/// its tokens, the tokens (EOS last), and the question's kind.
#[derive(Debug, Clone)]
pub struct Answer {
    pub sequence: usize,
    pub positions: Vec<usize>,
    pub tokens: Vec<u32>,
    pub kind: Kind,
}

/// A padded batch on the host.
pub struct Batch {
    pub size: usize,
    pixels: Vec<f32>,
    side: usize,
    prefix: Vec<i64>,
    prefix_len: usize,
    rest: Vec<i64>,
    rest_len: usize,
    targets: Vec<i64>,
    weights: Vec<f32>,
    /// Every answer of every sequence.
    pub answers: Vec<Answer>,
    /// Per sequence and grid cell: colour, shape and size class (0 for an empty cell).
    cell_targets: Vec<i64>,
    /// Per sequence, image token and slot: the words whose embeddings sum to the token's
    /// oracle embedding, and whether the slot is used.
    oracle_ids: Vec<i64>,
    oracle_mask: Vec<f32>,
    image_tokens: usize,
    /// Per sequence, position and image token: 1 where the token lies in the cell the
    /// position's prediction is about (see [`Qa::focus`]), else 0; `[n, total, image_tokens]`.
    focus_cells: Vec<f32>,
    /// Per sequence and position: the weight of its focus term (0 for most positions).
    focus_weights: Vec<f32>,
}

/// Words per image token in the oracle: the cell's name (one or two words) and the
/// object's colour, shape and size.
const ORACLE_WORDS: usize = 5;

/// The grid cell (0..9, reading order) that image token `token` of a square grid of
/// `image_tokens` patches lies in.
pub fn cell_of_token(token: usize, image_tokens: usize) -> usize {
    let grid = (image_tokens as f64).sqrt().round() as usize;
    (token / grid) * 3 / grid * 3 + (token % grid) * 3 / grid
}

/// The oracle's words for every image token of `scene`, padded to [`ORACLE_WORDS`].
fn oracle_words(
    scene: &Scene,
    tokenizer: &PromptTokenizer,
    image_tokens: usize,
) -> Result<Vec<(i64, f32)>, DemoError> {
    let mut per_cell = Vec::with_capacity(9);
    for (cell, name) in CELLS.iter().enumerate() {
        let mut words = name.to_string();
        if let Some(o) = scene.at(cell) {
            words += " ";
            words += &o.noun_phrase();
        }
        let mut ids: Vec<(i64, f32)> = tokenizer
            .encode_answer(&words)?
            .into_iter()
            .map(|i| (i as i64, 1.0))
            .collect();
        ids.resize(ORACLE_WORDS, (PAD as i64, 0.0));
        per_cell.push(ids);
    }
    Ok((0..image_tokens)
        .flat_map(|t| per_cell[cell_of_token(t, image_tokens)].clone())
        .collect())
}

impl Batch {
    /// Tokens per (padded) sequence: prompt prefix, image tokens and the rest.
    pub fn sequence_len(&self) -> usize {
        self.prefix_len + self.image_tokens + self.rest_len
    }

    /// Position of the first image token.
    pub fn image_start(&self) -> usize {
        self.prefix_len
    }
}

/// Encodes examples exactly as inference will see them: the chat prompt with BOS and
/// `<image>`, the answer without specials, then EOS; later turns follow as `USER: question
/// ASSISTANT: answer</s>`.
pub fn make_batch(
    examples: &[Example],
    tokenizer: &PromptTokenizer,
    processor: &ImageProcessor,
    image_tokens: usize,
) -> Result<Batch, DemoError> {
    let mut pixels = Vec::new();
    let mut side = 0;
    let mut prefixes = Vec::new();
    let mut rests = Vec::new();
    let mut answers = Vec::new();
    let mut oracle = Vec::new();
    // (sequence, position, cell, share of its answer's focus)
    let mut focus: Vec<(usize, usize, usize, f32)> = Vec::new();
    for (sequence, example) in examples.iter().enumerate() {
        oracle.extend(oracle_words(&example.scene, tokenizer, image_tokens)?);
        let (values, [_, h, _]) =
            processor.process(&image::DynamicImage::ImageRgb8(example.scene.render()))?;
        side = h;
        pixels.extend(values);
        let ids = tokenizer.encode_prompt(&chat_prompt(&example.turns[0].question), true)?;
        let at = ids.iter().position(|&i| i == IMAGE).expect("one <image>");
        prefixes.push(ids[..at].to_vec());
        let mut rest: Vec<u32> = ids[at + 1..].to_vec();
        for (turn, qa) in example.turns.iter().enumerate() {
            if turn > 0 {
                let prompt = format!("USER: {} ASSISTANT:", qa.question);
                rest.extend(tokenizer.encode_answer(&prompt)?);
            }
            let mut tokens = tokenizer.encode_answer(&qa.answer)?;
            tokens.push(EOS);
            // The logit at the last prompt token predicts the first answer token.
            let first = at + image_tokens + rest.len() - 1;
            rest.extend(&tokens);
            let share = 1.0 / qa.focus.len().max(1) as f32;
            focus.extend(
                qa.focus
                    .iter()
                    .map(|&(i, cell)| (sequence, first + i, cell, share)),
            );
            answers.push(Answer {
                sequence,
                positions: (first..first + tokens.len()).collect(),
                tokens,
                kind: qa.kind,
            });
        }
        rests.push(rest);
    }
    let prefix_len = prefixes[0].len();
    assert!(
        prefixes.iter().all(|p| p.len() == prefix_len),
        "one chat format"
    );
    let rest_len = rests.iter().map(Vec::len).max().unwrap_or(0);
    let total = prefix_len + image_tokens + rest_len;
    let n = examples.len();
    let mut targets = vec![0i64; n * total];
    let mut weights = vec![0f32; n * total];
    // Each answer weighs the same, however long, and each sequence the same, however many
    // turns it has.
    for a in &answers {
        let turns = examples[a.sequence].turns.len() as f32;
        for (&p, &t) in a.positions.iter().zip(&a.tokens) {
            targets[a.sequence * total + p] = t as i64;
            weights[a.sequence * total + p] = 1.0 / (a.tokens.len() as f32 * turns);
        }
    }
    let mut focus_cells = vec![0f32; n * total * image_tokens];
    let mut focus_weights = vec![0f32; n * total];
    // Each answer that has focus positions weighs the same, however many it has.
    let focused_answers: f32 = focus.iter().map(|f| f.3).sum();
    for &(sequence, p, cell, share) in &focus {
        let row = (sequence * total + p) * image_tokens;
        for t in (0..image_tokens).filter(|&t| cell_of_token(t, image_tokens) == cell) {
            focus_cells[row + t] = 1.0;
        }
        focus_weights[sequence * total + p] = share / focused_answers;
    }
    Ok(Batch {
        size: n,
        pixels,
        side,
        prefix: prefixes.concat().into_iter().map(i64::from).collect(),
        prefix_len,
        rest: rests
            .iter()
            .flat_map(|r| {
                r.iter()
                    .map(|&i| i as i64)
                    .chain(std::iter::repeat_n(PAD as i64, rest_len - r.len()))
            })
            .collect(),
        rest_len,
        targets,
        weights,
        answers,
        cell_targets: examples
            .iter()
            .flat_map(|example| {
                let scene = &example.scene;
                (0..9).flat_map(move |cell| match scene.at(cell) {
                    Some(o) => [o.colour as i64 + 1, o.shape as i64 + 1, o.size as i64 + 1],
                    None => [0, 0, 0],
                })
            })
            .collect(),
        oracle_ids: oracle.iter().map(|&(i, _)| i).collect(),
        oracle_mask: oracle.iter().map(|&(_, m)| m).collect(),
        image_tokens,
        focus_cells,
        focus_weights,
    })
}

/// The oracle embedding of every image token: the sum of the decoder's embeddings of the
/// words that name the token's grid cell and the object in it (or the cell alone). In the
/// first training stage the decoder reads these in place of the tower's features, so that it
/// learns to find and read a cell while its inputs are already in its own word space (as
/// LLaVA's pretrained language model is); the tower and projector meanwhile learn to produce
/// them, and the second stage hands the decoder the real features.
///
/// # Shapes
/// - returns `[batch, image_tokens, hidden]`
pub fn oracle_embeddings<B: Backend>(
    model: &Llava<B>,
    batch: &Batch,
    device: &B::Device,
) -> Tensor<B, 3> {
    let (n, t) = (batch.size, batch.image_tokens);
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(batch.oracle_ids.clone(), [n, t * ORACLE_WORDS]),
        device,
    );
    let embeds = model.decoder.embed(ids);
    let hidden = embeds.dims()[2];
    let mask = Tensor::<B, 4>::from_data(
        TensorData::new(batch.oracle_mask.clone(), [n, t, ORACLE_WORDS, 1]),
        device,
    );
    (embeds.reshape([n, t, ORACLE_WORDS, hidden]) * mask)
        .sum_dim(2)
        .reshape([n, t, hidden])
}

/// How far the projected features are from the oracle: squared error relative to the
/// oracle's mean square (the oracle is a target here and gets no gradient).
///
/// # Shapes
/// - `features`, `oracle`: `[batch, image_tokens, hidden]` -> scalar
pub fn oracle_loss<B: Backend>(features: Tensor<B, 3>, oracle: Tensor<B, 3>) -> Tensor<B, 1> {
    let oracle = oracle.detach();
    let scale = oracle.clone().powi_scalar(2).mean().detach();
    (features - oracle).powi_scalar(2).mean() / scale
}

/// Logits, and the projected image features. With `oracle = Some((embeddings, share))` the
/// decoder reads `share * embeddings + (1 - share) * features` in place of the features
/// (the oracle, see [`oracle_embeddings`]; a share of 1 or more reads the oracle alone).
///
/// # Shapes
/// - `oracle`: `[batch, image_tokens, hidden]`
/// - returns `[batch, sequence, vocab]` and `[batch, image_tokens, hidden]`
pub fn batch_forward<B: Backend>(
    model: &Llava<B>,
    batch: &Batch,
    rope: &Rope,
    device: &B::Device,
    oracle: Option<(Tensor<B, 3>, f64)>,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let (logits, features, _) = batch_forward_probed(model, batch, rope, device, oracle, None);
    (logits, features)
}

/// [`batch_forward`], also handing back layer `probe`'s attention probabilities.
///
/// # Shapes
/// - returns as [`batch_forward`] and `[batch, heads, sequence, sequence]`
pub fn batch_forward_probed<B: Backend>(
    model: &Llava<B>,
    batch: &Batch,
    rope: &Rope,
    device: &B::Device,
    oracle: Option<(Tensor<B, 3>, f64)>,
    probe: Option<usize>,
) -> (Tensor<B, 3>, Tensor<B, 3>, Option<Tensor<B, 4>>) {
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
    let (logits, probs) = model.decoder.forward_causal_probs(embeds, rope, probe);
    (logits, features, probs)
}

/// The focus loss: at every position whose prediction is about one object (its size,
/// colour or shape in a description; the answer to a question about one cell or object),
/// minus the log of the attention mass that the first head of the probed layer puts on the
/// image tokens of that object's cell; averaged so that every answer with such positions
/// weighs the same, however many it has. Training
/// scaffolding, like the oracle: it tells the decoder where to look, which plain
/// next-token loss did not teach it within the training budget (docs/demo.md).
///
/// # Shapes
/// - `probs`: `[batch, heads, sequence, sequence]` -> scalar
pub fn focus_loss<B: Backend>(
    probs: Tensor<B, 4>,
    batch: &Batch,
    device: &B::Device,
) -> Tensor<B, 1> {
    let [n, _, t, _] = probs.dims();
    let (from, image) = (batch.prefix_len, batch.image_tokens);
    let head = probs
        .slice([0..n, 0..1, 0..t, from..from + image])
        .reshape([n, t, image]);
    let cells = Tensor::<B, 3>::from_data(
        TensorData::new(batch.focus_cells.clone(), [n, t, image]),
        device,
    );
    let weights =
        Tensor::<B, 2>::from_data(TensorData::new(batch.focus_weights.clone(), [n, t]), device);
    let mass = (head * cells).sum_dim(2).reshape([n, t]);
    (mass.add_scalar(1e-6).log() * weights).sum().neg()
}

/// A training-only probe that reads each grid cell's colour, shape and size (or "empty")
/// from the image feature at the cell's centre. It plays the part that a pretrained CLIP
/// plays in LLaVA: without it the tower trained from scratch collapsed to features that
/// were the same for every picture (the decoder learned the answers' language first and
/// the image tokens turned into constant attention sinks). Not exported.
#[derive(Module, Debug)]
pub struct CellProbe<B: Backend> {
    colour: Linear<B>,
    shape: Linear<B>,
    size: Linear<B>,
    cell: Linear<B>,
}

impl<B: Backend> CellProbe<B> {
    /// A probe over features of width `hidden`.
    pub fn init(hidden: usize, device: &B::Device) -> Self {
        let head = |classes| LinearConfig::new(hidden, classes).init(device);
        Self {
            colour: head(COLOURS.len() + 1),
            shape: head(SHAPES.len() + 1),
            size: head(SIZES.len() + 1),
            cell: head(9),
        }
    }

    /// Mean cross-entropy of the three attributes over every cell, and of every token's cell.
    ///
    /// # Shapes
    /// - `features`: `[batch, grid * grid, hidden]` -> scalar
    pub fn loss(&self, features: Tensor<B, 3>, batch: &Batch, device: &B::Device) -> Tensor<B, 1> {
        let [n, tokens, hidden] = features.dims();
        let grid = (tokens as f64).sqrt().round() as usize;
        let centre = |k: usize| k * grid / 3 + grid / 6;
        let index: Vec<i64> = (0..9)
            .map(|cell| (centre(cell / 3) * grid + centre(cell % 3)) as i64)
            .collect();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [9]), device);
        let cells = features.clone().select(1, index).reshape([n * 9, hidden]);
        let targets = Tensor::<B, 2, Int>::from_data(
            TensorData::new(batch.cell_targets.clone(), [n * 9, 3]),
            device,
        );
        let mut total = None;
        for (k, head) in [&self.colour, &self.shape, &self.size]
            .into_iter()
            .enumerate()
        {
            let logp = log_softmax(head.forward(cells.clone()), 1);
            let t = targets.clone().slice([0..n * 9, k..k + 1]);
            let loss = logp.gather(1, t).mean().neg();
            total = Some(match total {
                None => loss,
                Some(sum) => sum + loss,
            });
        }
        // Every token also says which cell it lies in, so that the decoder can find a
        // cell by content rather than by counting positions.
        let where_: Vec<i64> = (0..n)
            .flat_map(|_| {
                (0..tokens).map(|t| ((t / grid) * 3 / grid * 3 + (t % grid) * 3 / grid) as i64)
            })
            .collect();
        let where_ =
            Tensor::<B, 2, Int>::from_data(TensorData::new(where_, [n * tokens, 1]), device);
        let logp = log_softmax(self.cell.forward(features.reshape([n * tokens, hidden])), 1);
        let position = logp.gather(1, where_).mean().neg();
        (total.expect("three heads") + position) / 4.0
    }
}

/// The model being trained: LLaVA and the cell probe.
#[derive(Module, Debug)]
pub struct Trainee<B: Backend> {
    pub llava: Llava<B>,
    pub probe: CellProbe<B>,
}

/// Mean over sequences of each sequence's mean answer-token cross-entropy.
pub fn batch_loss<B: Backend>(
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

/// Per answer: whether greedy decoding reproduces it and EOS exactly (every
/// teacher-forced argmax right, which is what greedy decoding then follows), and the share
/// of its tokens predicted right.
pub fn answer_accuracy<B: Backend>(logits: Tensor<B, 3>, batch: &Batch) -> Vec<(bool, f64)> {
    let [n, t, _] = logits.dims();
    let best: Vec<i64> = logits
        .argmax(2)
        .reshape([n * t])
        .into_data()
        .convert::<i64>()
        .into_vec()
        .expect("ints");
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
pub fn quick_check<B: Backend>(
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
        let probe = (options.focus_weight > 0.0).then_some(options.focus_layer);
        let (logits, features, probs) =
            batch_forward_probed(&model.llava, &batch, &rope, &device, instead, probe);
        let answer_loss = batch_loss(logits, &batch, &device);
        stretch += answer_loss.clone().into_scalar() as f64;
        let mut loss = answer_loss;
        if let Some(probs) = probs {
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
                lr,
                seconds: start.elapsed().as_secs_f64(),
                check,
            };
            stretch = 0.0;
            oracle_stretch = 0.0;
            focus_stretch = 0.0;
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
