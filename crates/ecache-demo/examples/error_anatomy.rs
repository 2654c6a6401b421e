//! Where a demo model's short answers go wrong, on held-out scenes under teacher forcing:
//! `cargo run --release -p ecache-demo --example error_anatomy -- MODEL_DIR [COUNT] [--oracle]`.
//!
//! - For each wrong first answer word: whether it names something of another object in the
//!   scene (the model read the wrong cell) or of no object there (it misread, or answered
//!   from its prior); per kind of question and per asked cell.
//! - For questions about one cell (colour, shape, size): the attention mass each decoder
//!   head puts, at the first answer prediction, on the asked cell's image tokens, how often
//!   that cell gets more than any other (and, for layer 1 head 0, which cell won instead),
//!   and the mass on the question's row and column words.
//!
//! With `--oracle` the decoder reads the oracle in place of the tower's features, so only
//! the decoder is on trial.
use std::collections::BTreeMap;

use burn::backend::Flex;
use burn::tensor::{DType, Device, Tensor};
use ecache_demo::language::{IMAGE, QuestionMix, short_question_from, template_of};
use ecache_demo::scene::{CELLS, COLOURS, SHAPES, SIZES, Scene};
use ecache_demo::train::{
    Batch, Example, TrainOptions, batch_forward, batch_forward_probed, cell_of_token,
    greedy_tokens, held_out_rng, make_batch, oracle_embeddings,
};
use ecache_model::layers::Rope;
use ecache_model::{ImageProcessor, Llava, LlavaConfig, PromptTokenizer};

/// A loaded model and what reads its inputs.
struct Loaded {
    model: Llava<Flex>,
    config: LlavaConfig,
    tokenizer: PromptTokenizer,
    processor: ImageProcessor,
    rope: Rope,
    oracle: bool,
}

impl Loaded {
    /// A batch of `examples` and, with `--oracle`, the oracle to read instead of the
    /// features.
    fn batch(&self, examples: &[Example]) -> (Batch, Option<(Tensor<Flex, 3>, f64)>) {
        let batch = make_batch(
            examples,
            &self.tokenizer,
            &self.processor,
            self.config.image_tokens(),
        )
        .unwrap();
        let instead = self
            .oracle
            .then(|| (oracle_embeddings(&self.model, &batch, &device()), 1.0));
        (batch, instead)
    }
}

fn device() -> Device<Flex> {
    Default::default()
}

/// `count` single-question examples on held-out scenes (a stream of their own), drawn with
/// `mix`.
fn held_out_questions(count: usize, mix: &QuestionMix) -> Vec<Example> {
    let mut rng = held_out_rng(TrainOptions::default().seed ^ 0xA1A7);
    (0..count)
        .map(|_| {
            let scene = Scene::generate(&mut rng);
            let qa = short_question_from(&scene, &mut rng, mix);
            Example {
                scene,
                turns: vec![qa],
            }
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = std::path::PathBuf::from(&args[0]);
    let count: usize = args.get(1).map_or(480, |c| c.parse().expect("a count"));
    let device = Default::default();
    let (model, config) = Llava::<Flex>::load(&dir, &device, DType::F32).expect("loads");
    let loaded = Loaded {
        rope: Rope::new(config.text.head_dim, config.text.rope_theta),
        tokenizer: PromptTokenizer::load(&dir, IMAGE).expect("tokenizer"),
        processor: ImageProcessor::load(&dir).expect("processor"),
        model,
        config,
        oracle: args.iter().any(|a| a == "--oracle"),
    };
    println!(
        "input: {}",
        if loaded.oracle {
            "oracle"
        } else {
            "tower features"
        }
    );
    wrong_answers(&loaded, count);
    cell_attention(&loaded, count / 2);
}

/// Wrong first answer words by kind: another object's word or no object's.
fn wrong_answers(loaded: &Loaded, count: usize) {
    let examples = held_out_questions(count, &QuestionMix::UNIFORM);
    // kind -> (right, wrong: another object's, wrong: no object's)
    let mut by_kind: BTreeMap<&str, [usize; 3]> = BTreeMap::new();
    // kind -> asked cell -> (right, all)
    let mut by_cell: BTreeMap<&str, [[usize; 2]; 9]> = BTreeMap::new();
    let mut samples: Vec<String> = Vec::new();
    for chunk in examples.chunks(16) {
        let (batch, instead) = loaded.batch(chunk);
        let logits = batch_forward(&loaded.model, &batch, &loaded.rope, &device(), instead).0;
        let t = logits.dims()[1];
        let best = greedy_tokens(logits);
        for (example, answer) in chunk.iter().zip(&batch.answers) {
            let qa = &example.turns[0];
            let kind = template_of(&qa.question);
            let p = answer.positions[0];
            let said = loaded
                .tokenizer
                .decode(&[best[answer.sequence * t + p] as u32])
                .unwrap();
            let want = qa.answer.split_whitespace().next().unwrap().to_string();
            let scene = &example.scene;
            let words_of = |o: &ecache_demo::scene::Object| {
                let mut w = vec![
                    COLOURS[o.colour].0.to_string(),
                    SHAPES[o.shape].to_string(),
                    SIZES[o.size].to_string(),
                ];
                w.extend(CELLS[o.cell].split_whitespace().map(String::from));
                w
            };
            // The object asked about (none for counts): the one the focus loss looks at.
            let asked = qa.focus.first().and_then(|&(_, cell)| scene.at(cell));
            let entry = by_kind.entry(kind).or_default();
            let right = said.trim() == want;
            if right {
                entry[0] += 1;
            } else if scene
                .objects
                .iter()
                .filter(|o| Some(*o) != asked)
                .any(|o| words_of(o).contains(&said.trim().to_string()))
            {
                entry[1] += 1;
            } else {
                entry[2] += 1;
            }
            if let Some(o) = asked {
                let cell = &mut by_cell.entry(kind).or_insert([[0; 2]; 9])[o.cell];
                cell[0] += right as usize;
                cell[1] += 1;
            }
            if !right && samples.len() < 12 {
                samples.push(format!(
                    "{} -> said {:?}, want {:?}; scene: {}",
                    qa.question,
                    said.trim(),
                    want,
                    scene
                        .objects
                        .iter()
                        .map(|o| format!("{}: {}", CELLS[o.cell], o.noun_phrase()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    println!("kind | right | wrong, another object's word | wrong, no object's word");
    for (kind, [r, a, b]) in &by_kind {
        println!("{kind} | {r} | {a} | {b}");
    }
    println!("right / asked, per asked cell (reading order)");
    for (kind, cells) in &by_cell {
        let row: Vec<String> = cells.iter().map(|[r, a]| format!("{r}/{a}")).collect();
        println!("{kind}: {}", row.join("  "));
    }
    for s in samples {
        println!("  {s}");
    }
}

/// Attention of every decoder head on the asked cell, for questions about one cell.
fn cell_attention(loaded: &Loaded, count: usize) {
    // Colour, shape and size questions only (each names one cell).
    let examples = held_out_questions(count, &QuestionMix([0.0, 1.0, 1.0, 1.0, 0.0, 0.0]));
    // The asked cell: where the focus loss would look.
    let cells: Vec<usize> = examples.iter().map(|e| e.turns[0].focus[0].1).collect();
    let config = &loaded.config;
    let image_tokens = config.image_tokens();
    let layers = config.text.layers;
    let heads = config.text.heads;
    // [layer][head] -> (mass on the asked cell, times it is the top cell)
    let mut stats = vec![vec![(0.0f64, 0usize); heads]; layers];
    // layer 1 head 0's wrong top cell: same row, same column, neither
    let mut confusions = [0usize; 3];
    // [layer][head] -> mass on the question's row word and column word
    let mut words = vec![vec![(0.0f64, 0.0f64); heads]; layers];
    for (chunk, cells) in examples.chunks(16).zip(cells.chunks(16)) {
        let (batch, instead) = loaded.batch(chunk);
        for (layer, row) in stats.iter_mut().enumerate() {
            let probs = batch_forward_probed(
                &loaded.model,
                &batch,
                &loaded.rope,
                &device(),
                instead.clone(),
                &[layer],
            )
            .2
            .remove(0);
            let [n, h, t, _] = probs.dims();
            let values: Vec<f32> = probs.into_data().convert::<f32>().into_vec().unwrap();
            for (s, (cell, answer)) in cells.iter().zip(&batch.answers).enumerate().take(n) {
                let p = answer.positions[0];
                for (head, entry) in row.iter_mut().enumerate().take(h) {
                    let base = ((s * h + head) * t + p) * t + batch.image_start();
                    let mut per_cell = [0.0f64; 9];
                    for i in 0..image_tokens {
                        per_cell[cell_of_token(i, image_tokens)] += values[base + i] as f64;
                    }
                    entry.0 += per_cell[*cell];
                    let top = (0..9)
                        .max_by(|&a, &b| per_cell[a].total_cmp(&per_cell[b]))
                        .unwrap();
                    entry.1 += (top == *cell) as usize;
                    // The question's row and column words: the answer's cue words.
                    let row_start = base - batch.image_start();
                    for &(_, _, cue, at, _) in
                        batch.cue_terms().iter().filter(|c| (c.0, c.1) == (s, p))
                    {
                        let mass = values[row_start + at] as f64;
                        match cue {
                            0 => words[layer][head].0 += mass,
                            _ => words[layer][head].1 += mass,
                        }
                    }
                    if layer == 1 && head == 0 && top != *cell {
                        let kind = if top / 3 == cell / 3 {
                            0
                        } else if top % 3 == cell % 3 {
                            1
                        } else {
                            2
                        };
                        confusions[kind] += 1;
                    }
                }
            }
        }
    }
    println!("{count} questions about one cell");
    println!(
        "layer 1 head 0 wrong top cell: same row {}, same column {}, neither {}",
        confusions[0], confusions[1], confusions[2]
    );
    println!(
        "layer head | mass on the asked cell | asked cell on top | on the row word | on the column word"
    );
    for (layer, row) in stats.iter().enumerate() {
        for (head, (mass, top)) in row.iter().enumerate() {
            println!(
                "{layer} {head} | {:.3} | {:.0}% | {:.3} | {:.3}",
                mass / count as f64,
                100.0 * *top as f64 / count as f64,
                words[layer][head].0 / count as f64,
                words[layer][head].1 / count as f64,
            );
        }
    }
}
