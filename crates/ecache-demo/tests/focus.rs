//! The focus loss (training scaffolding that tells one head where to look): minus the log
//! of the attention mass on the asked object's cell, averaged over answers. Checked on
//! hand-made attention patterns whose answer is known.

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use ecache_demo::language::short_question;
use ecache_demo::model_dir::{DemoShape, write_descriptors};
use ecache_demo::scene::Scene;
use ecache_demo::train::{Example, cell_of_token, focus_loss, make_batch};
use ecache_model::generate::SeededRng;
use ecache_model::{ImageProcessor, PromptTokenizer};

type B = Flex;

/// A batch of one single-turn question that is about one cell, and its layout.
fn one_focused_question(dir: &std::path::Path) -> (ecache_demo::train::Batch, usize, usize) {
    let shape = DemoShape::default();
    write_descriptors(dir, &shape).unwrap();
    let tokenizer = PromptTokenizer::load(dir, ecache_demo::language::IMAGE).unwrap();
    let processor = ImageProcessor::load(dir).unwrap();
    let mut rng = SeededRng::new(11);
    loop {
        let scene = Scene::generate(&mut rng);
        let qa = short_question(&scene, &mut rng);
        if qa.focus.len() != 1 {
            continue;
        }
        let cell = qa.focus[0].1;
        let example = Example {
            scene,
            turns: vec![qa],
        };
        let batch = make_batch(&[example], &tokenizer, &processor, shape.image_tokens()).unwrap();
        return (batch, cell, shape.image_tokens());
    }
}

#[test]
fn focus_loss_is_minus_log_of_the_mass_on_the_asked_cell() {
    let dir = std::env::temp_dir().join(format!("ecache-focus-{}", std::process::id()));
    let (batch, cell, image) = one_focused_question(&dir);
    let in_cell = |t: usize| cell_of_token(t, image) == cell;
    let t = batch.sequence_len();
    let query = batch.answers[0].positions[0];
    let prefix = batch.image_start();
    let loss_for = |mass_in_cell: f32| {
        // Every query row of head 0 spreads `mass_in_cell` evenly over the cell's image
        // tokens and the rest evenly over the other image tokens; head 1 looks elsewhere.
        let mut probs = vec![0f32; 2 * t * t];
        let cells = (0..image).filter(|&k| in_cell(k)).count() as f32;
        for k in 0..image {
            let p = if in_cell(k) {
                mass_in_cell / cells
            } else {
                (1.0 - mass_in_cell) / (image as f32 - cells)
            };
            probs[query * t + prefix + k] = p;
        }
        probs[t * t + query * t] = 1.0;
        let probs =
            Tensor::<B, 4>::from_data(TensorData::new(probs, [1, 2, t, t]), &Default::default());
        focus_loss(probs, &batch, &Default::default()).into_scalar()
    };
    for mass in [0.05f32, 0.3, 0.9, 1.0] {
        let loss = loss_for(mass);
        assert!(
            (loss - (-(mass + 1e-6).ln())).abs() < 1e-4,
            "mass {mass}: loss {loss}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
