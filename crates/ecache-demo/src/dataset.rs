//! Held-out evaluation sets in the LLaVA / MM-Vet layout: scene PNGs and a JSONL file with
//! `image`, `question`, `answer` and the question's `kind`.

use std::path::Path;

use serde::Serialize;

use crate::DemoError;
use crate::language::{Kind, Qa, description, short_question};
use crate::scene::Scene;
use crate::train::held_out_rng;

#[derive(Serialize)]
struct Line<'a> {
    id: String,
    image: String,
    question: &'a str,
    answer: &'a str,
    kind: &'static str,
}

/// The held-out set's scenes with their description and short question, in order: what
/// [`write_held_out`] writes for `seed` (never drawn by training with the same seed).
pub fn held_out_items(count: usize, seed: u64) -> Vec<(Scene, [Qa; 2])> {
    let mut rng = held_out_rng(seed.wrapping_add(1));
    (0..count)
        .map(|_| {
            let scene = Scene::generate(&mut rng);
            let qas = [description(&scene), short_question(&scene, &mut rng)];
            (scene, qas)
        })
        .collect()
}

/// The held-out scenes' pictures as PNG files in memory, in [`held_out_items`]' order
/// (requests for servers and benchmarks).
pub fn held_out_pngs(count: usize, seed: u64) -> Vec<Vec<u8>> {
    held_out_items(count, seed)
        .into_iter()
        .map(|(scene, _)| {
            let mut png = Vec::new();
            scene
                .render()
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .expect("a picture encodes to memory");
            png
        })
        .collect()
}

/// Writes `count` held-out scenes (never drawn by training with the same seed) to `dir`:
/// `scene-NNNN.png` each, and `dataset.jsonl` with one description and one short question
/// per scene. Returns the dataset path.
pub fn write_held_out(
    dir: &Path,
    count: usize,
    seed: u64,
) -> Result<std::path::PathBuf, DemoError> {
    std::fs::create_dir_all(dir).map_err(|e| DemoError::io(dir, e))?;
    let mut lines = String::new();
    for (i, (scene, qas)) in held_out_items(count, seed).into_iter().enumerate() {
        let name = format!("scene-{i:04}.png");
        let path = dir.join(&name);
        scene.render().save(&path).map_err(|e| DemoError::Image {
            path: path.clone(),
            message: e.to_string(),
        })?;
        for (n, qa) in qas.iter().enumerate() {
            let line = Line {
                id: format!("{i:04}-{n}"),
                image: name.clone(),
                question: &qa.question,
                answer: &qa.answer,
                kind: match qa.kind {
                    Kind::Description => "description",
                    Kind::Short => "short",
                },
            };
            lines += &serde_json::to_string(&line).expect("serialises");
            lines.push('\n');
        }
    }
    let path = dir.join("dataset.jsonl");
    std::fs::write(&path, lines).map_err(|e| DemoError::io(&path, e))?;
    Ok(path)
}
