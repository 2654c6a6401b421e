//! The cue loss (training scaffolding that tells the first layer which words to carry to
//! the answer): every term points from a position that predicts an answer token at a word
//! that names the object the token is about, and the loss is minus the mean log of the
//! attention mass the supervised heads put there. Checked on conversations of every kind
//! and on hand-made attention patterns.

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use ecache_demo::language::{QuestionMix, short_question};
use ecache_demo::model_dir::{DemoShape, write_descriptors};
use ecache_demo::scene::{CELLS, COLOURS, SHAPES, Scene};
use ecache_demo::train::{Example, cue_loss, draw_conversation, make_batch};
use ecache_model::generate::SeededRng;
use ecache_model::{ImageProcessor, PromptTokenizer};

type B = Flex;

fn setup(name: &str) -> (std::path::PathBuf, PromptTokenizer, ImageProcessor, usize) {
    let dir = std::env::temp_dir().join(format!("ecache-cue-{name}-{}", std::process::id()));
    let shape = DemoShape::default();
    write_descriptors(&dir, &shape).unwrap();
    let tokenizer = PromptTokenizer::load(&dir, ecache_demo::language::IMAGE).unwrap();
    let processor = ImageProcessor::load(&dir).unwrap();
    (dir, tokenizer, processor, shape.image_tokens())
}

#[test]
fn every_cue_term_points_at_a_word_naming_the_predicted_tokens_object() {
    let (dir, tokenizer, processor, image) = setup("words");
    let mut rng = SeededRng::new(3);
    let examples: Vec<Example> = (0..6)
        .map(|_| draw_conversation(&mut rng, 4, 0.5, &QuestionMix::UNIFORM))
        .collect();
    let batch = make_batch(&examples, &tokenizer, &processor, image).unwrap();
    assert!(batch.cue_terms().len() > 20, "{}", batch.cue_terms().len());
    let id = |word: &str| tokenizer.encode_answer(word).unwrap()[0] as i64;
    for &(s, p, j, at, weight) in batch.cue_terms() {
        assert!(at < p && weight > 0.0);
        assert!(
            batch
                .answers
                .iter()
                .any(|a| a.sequence == s && a.positions.contains(&p)),
            "a cue term predicts an answer token"
        );
        let scene = &examples[s].scene;
        let cue = batch.token_at(s, at).unwrap();
        let names: Vec<i64> = scene
            .objects
            .iter()
            .flat_map(|o| {
                let mut words: Vec<&str> = CELLS[o.cell].split_whitespace().collect();
                words.extend([COLOURS[o.colour].0, SHAPES[o.shape]]);
                words.into_iter().map(id)
            })
            .collect();
        let colours: Vec<i64> = COLOURS.iter().map(|c| id(c.0)).collect();
        assert!(
            names.contains(&cue) || colours.contains(&cue),
            "sequence {s}: cue {j} at {at} is token {cue}, not a word naming an object or a colour"
        );
        assert!(j < 2, "{j}");
    }
    // Weights: each answer with cues weighs the same, and they sum to one.
    let total: f32 = batch.cue_terms().iter().map(|t| t.4).sum();
    assert!((total - 1.0).abs() < 1e-5, "{total}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cells_cue_their_row_and_column_words_in_the_question() {
    let (dir, tokenizer, processor, image) = setup("cell");
    let mut rng = SeededRng::new(7);
    let (scene, qa) = loop {
        let scene = Scene::generate(&mut rng);
        let qa = short_question(&scene, &mut rng);
        if qa.question.starts_with("what colour") {
            break (scene, qa);
        }
    };
    let cell = CELLS
        .iter()
        .find(|c| qa.question.ends_with(&format!("the {c} ?")))
        .unwrap();
    let words: Vec<&str> = cell.split_whitespace().collect();
    let batch = make_batch(
        &[Example {
            scene,
            turns: vec![qa],
        }],
        &tokenizer,
        &processor,
        image,
    )
    .unwrap();
    let terms = batch.cue_terms().to_vec();
    assert_eq!(terms.len(), 2);
    let query = batch.answers[0].positions[0];
    for (j, word) in words.iter().enumerate() {
        let (_, p, cue, at, weight) = terms[j];
        assert_eq!((p, cue, weight), (query, j, 0.5));
        assert_eq!(
            batch.token_at(0, at),
            Some(tokenizer.encode_answer(word).unwrap()[0] as i64),
            "cue {j} is the word {word:?}"
        );
    }
    // Heads 0 and 2 of 4 are supervised; put mass a on the row word in head 0 and b on the
    // column word in head 2 at the query row: the loss is -(ln a + ln b) / 2.
    let t = batch.sequence_len();
    let loss_for = |a: f32, b: f32| {
        let mut probs = vec![0f32; 4 * t * t];
        probs[query * t + terms[0].3] = a;
        probs[query * t] += 1.0 - a;
        probs[(2 * t + query) * t + terms[1].3] = b;
        probs[(2 * t + query) * t] += 1.0 - b;
        // Heads 1 and 3 look at the cue words too; they must not count.
        probs[(t + query) * t + terms[0].3] = 1.0;
        probs[(3 * t + query) * t + terms[1].3] = 1.0;
        let probs =
            Tensor::<B, 4>::from_data(TensorData::new(probs, [1, 4, t, t]), &Default::default());
        cue_loss(probs, &batch, &Default::default()).into_scalar()
    };
    for (a, b) in [(0.5f32, 0.5f32), (0.9, 0.1), (1.0, 1.0), (0.2, 0.7)] {
        let expected = -((a + 1e-6).ln() + (b + 1e-6).ln()) / 2.0;
        let loss = loss_for(a, b);
        assert!(
            (loss - expected).abs() < 1e-4,
            "a {a} b {b}: {loss} vs {expected}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
