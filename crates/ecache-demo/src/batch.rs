//! Training batches: drawn conversations about seeded scenes, encoded exactly as inference
//! sees them, with the per-position targets and the scaffolding targets (oracle words,
//! focus cells, cue words) that the training losses read.

use ecache_model::generate::SeededRng;
use ecache_model::{ImageProcessor, PromptTokenizer, chat_prompt};

use crate::DemoError;
use crate::language::{
    Cue, EOS, IMAGE, Kind, PAD, Qa, QuestionMix, description, short_question_from,
};
use crate::scene::{CELLS, Scene};

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
    pub(crate) pixels: Vec<f32>,
    pub(crate) side: usize,
    pub(crate) prefix: Vec<i64>,
    pub(crate) prefix_len: usize,
    pub(crate) rest: Vec<i64>,
    pub(crate) rest_len: usize,
    pub(crate) targets: Vec<i64>,
    pub(crate) weights: Vec<f32>,
    /// Every answer of every sequence.
    pub answers: Vec<Answer>,
    /// Per sequence and grid cell: colour, shape and size class (0 for an empty cell).
    pub(crate) cell_targets: Vec<i64>,
    /// Per sequence, image token and slot: the words whose embeddings sum to the token's
    /// oracle embedding, and whether the slot is used.
    pub(crate) oracle_ids: Vec<i64>,
    pub(crate) oracle_mask: Vec<f32>,
    pub(crate) image_tokens: usize,
    /// Per sequence, position and image token: 1 where the token lies in the cell the
    /// position's prediction is about (see [`Qa::focus`]), else 0; `[n, total, image_tokens]`.
    pub(crate) focus_cells: Vec<f32>,
    /// Per sequence and position: the weight of its focus term (0 for most positions).
    pub(crate) focus_weights: Vec<f32>,
    /// The cue loss's terms: (sequence, predicting position, which cue of the token,
    /// position of the cue word, weight); see [`crate::scaffold::cue_loss`].
    pub(crate) cue_terms: Vec<(usize, usize, usize, usize, f32)>,
}

/// Words per image token in the oracle: the cell's name (one or two words) and the
/// object's colour, shape and size.
pub(crate) const ORACLE_WORDS: usize = 5;

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

    /// The token id at `position` of sequence `sequence` (`IMAGE` for an image token,
    /// `None` past the padded length).
    pub fn token_at(&self, sequence: usize, position: usize) -> Option<i64> {
        let image_end = self.prefix_len + self.image_tokens;
        match position {
            p if p < self.prefix_len => self.prefix.get(sequence * self.prefix_len + p).copied(),
            p if p < image_end => Some(IMAGE as i64),
            p if p < self.sequence_len() => self
                .rest
                .get(sequence * self.rest_len + p - image_end)
                .copied(),
            _ => None,
        }
    }

    /// The cue loss's terms: (sequence, predicting position, which cue of the token,
    /// position of the cue word, weight).
    pub fn cue_terms(&self) -> &[(usize, usize, usize, usize, f32)] {
        &self.cue_terms
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
    let mut cue_terms = Vec::new();
    let mut cued_answers = 0usize;
    let tail = tokenizer.encode_answer("ASSISTANT:")?.len();
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
            // Question word w sits `tail` tokens and the question's later words before
            // `first`; answer word w right after it.
            let question_len = tokenizer.encode_answer(&qa.question)?.len();
            let terms: usize = qa.cues.iter().map(|(_, named)| named.len()).sum();
            cued_answers += (terms > 0) as usize;
            for (i, named) in &qa.cues {
                for (j, cue) in named.iter().enumerate() {
                    let at = match *cue {
                        Cue::Question(w) => first - tail - (question_len - 1 - w),
                        Cue::Answer(w) => first + 1 + w,
                    };
                    cue_terms.push((sequence, first + i, j, at, 1.0 / terms as f32));
                }
            }
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
    // Each answer with cues weighs the same, however many it has.
    for term in &mut cue_terms {
        term.4 /= cued_answers as f32;
    }
    Ok(Batch {
        cue_terms,
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
