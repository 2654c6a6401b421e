//! `ecache inspect`: the pictures' colours agree with what the session's caches hold.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::Flex;
use burn::tensor::DType;
use ecache_cli::inspect::{Fate, InspectRequest, layout, read_patch_fates};
use ecache_core::{BackendKind, PolicyConfig, PositionMode, SlotKind};
use ecache_model::Session;

type B = Flex;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llava-mha")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ecache-inspect-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Per layer: positions held after the prefill, positions held at the end, and the
/// prefill's merges (anchor position, merged positions).
type Contents = (
    Vec<Vec<usize>>,
    Vec<Vec<usize>>,
    Vec<Vec<(usize, Vec<usize>)>>,
);

/// Runs the same prompt through a session of our own and reads, per layer, which prompt
/// positions each layer holds after the prefill and at the end, and the prefill's merges.
fn session_contents(
    dir: &Path,
    image: &Path,
    policy: &PolicyConfig,
    question: &str,
    fed: &[u32],
) -> Contents {
    let device = Default::default();
    let frontend = ecache_model::load_frontend(dir, Default::default()).unwrap();
    let model = ecache_model::load_model::<B>(dir, &device, DType::F32).unwrap();
    let image = ecache_model::model::open_image(image).unwrap();
    let (prompt, _) = ecache_model::image_prompt(
        frontend.as_ref(),
        model.as_ref(),
        question,
        &image,
        &device,
        DType::F32,
    )
    .unwrap();
    let built = ecache_engine::builtin_registry()
        .unwrap()
        .build(policy)
        .unwrap();
    let mut session = Session::new(
        model.decoder(),
        model.text(),
        built.as_ref(),
        PositionMode::Absolute,
        1,
        &device,
        DType::F32,
    );
    session.sequences_mut()[0].record_prefill();
    session.prefill_prompt_last(prompt).unwrap();
    let held = |s: &Session<'_, B>| -> Vec<Vec<usize>> {
        s.sequences()[0]
            .caches()
            .iter()
            .map(|c| c.table(0).unwrap().positions().to_vec())
            .collect()
    };
    let after_prefill = held(&session);
    let merges = session.sequences()[0]
        .prefill_records()
        .unwrap()
        .iter()
        .map(|r| r.merged.clone())
        .collect();
    for &token in fed {
        session.step(&[token]).unwrap();
    }
    (after_prefill, held(&session), merges)
}

/// For a LLaVA and a Qwen2-VL checkpoint (a 4 x 4 square grid, a 2 x 4 one): every
/// patch mark of every layer's picture, after the prefill and at the end, is the fate the
/// slot has in a session run separately; the LLaVA case shows all three fates.
#[test]
fn pictures_show_what_the_caches_hold() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let cases = [
        (fixture(), fixture().join("image.png"), [4, 4], true),
        (
            fixtures.join("tiny-qwen2-vl"),
            fixtures.join("qwen2-vl-images/wide.png"),
            [2, 4],
            false,
        ),
    ];
    for (dir, image, cells, all_fates) in cases {
        let out = scratch("pictures");
        let question = "what is the colour of the circle ?";
        let mut policy = PolicyConfig::new("elastic", 0.4);
        policy.set_param("offset", "2").unwrap();
        let request = InspectRequest {
            model_dir: dir.clone(),
            image: image.clone(),
            prompt: question.into(),
            policy: policy.clone(),
            max_new_tokens: 8,
            out: out.clone(),
            pad_to_square: false,
            dtype: DType::F32,
        };
        let inspection = ecache_cli::inspect::run(request, BackendKind::Flex).unwrap();
        assert_eq!(inspection.cells, cells);
        assert_eq!(
            inspection.pictures.len(),
            2,
            "one picture per decoder layer"
        );
        let fed = &inspection.tokens[..inspection.tokens.len() - 1];
        let (after_prefill, at_end, merges) =
            session_contents(&dir, &image, &policy, question, fed);
        let frontend = ecache_model::load_frontend(&dir, Default::default()).unwrap();
        let picture = frontend
            .picture(&ecache_model::model::open_image(&image).unwrap())
            .unwrap();
        let layout = layout(&inspection, picture.dimensions());
        let image: Vec<usize> = (0..inspection.kinds.len())
            .filter(|&p| inspection.kinds[p] == SlotKind::Image)
            .collect();
        assert_eq!(image.len(), cells[0] * cells[1]);
        let mut seen = std::collections::HashSet::new();
        for (layer, name) in inspection.pictures.iter().enumerate() {
            for (panel, held) in [(0, &after_prefill[layer]), (1, &at_end[layer])] {
                let drawn =
                    read_patch_fates(&out.join(name), &layout, panel, cells[1], image.len())
                        .unwrap();
                for (i, &pos) in image.iter().enumerate() {
                    let merged_into_held = merges[layer]
                        .iter()
                        .any(|(a, m)| m.contains(&pos) && held.contains(a));
                    let want = if held.contains(&pos) {
                        Fate::Kept
                    } else if merged_into_held {
                        Fate::Merged
                    } else {
                        Fate::Removed
                    };
                    assert_eq!(
                        drawn[i],
                        Some(want),
                        "{} layer {layer} panel {panel} patch {i}",
                        dir.display()
                    );
                    seen.insert(want);
                }
            }
        }
        // The LLaVA case exercises every colour.
        if all_fates {
            assert_eq!(seen.len(), 3, "{seen:?}");
        }
        let html = std::fs::read_to_string(out.join("index.html")).unwrap();
        let escaped = inspection
            .answer
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        assert!(
            html.contains("layer-01.png") && html.contains(&escaped),
            "{html}"
        );
    }
}

#[test]
fn bad_input_exits_with_2() {
    let out = scratch("bad");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ecache"))
            .arg("inspect")
            .args(args)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let model = fixture();
    let model = model.to_str().unwrap();
    for (args, needle) in [
        (vec!["--model", model, "--prompt", "hi"], "--image"),
        (
            vec![
                "--model",
                model,
                "--image",
                "/nonexistent.png",
                "--prompt",
                "hi",
            ],
            "nonexistent",
        ),
        (
            vec![
                "--model", model, "--image", "x.png", "--prompt", "hi", "--policy", "nope",
                "--budget", "0.5",
            ],
            "known policies",
        ),
    ] {
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
