//! docs/reliability.md's image and prompt rows: each bad input makes `ecache generate` exit
//! with 2 and a message naming the problem, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llava-mha")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ecache-bad-input-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn generate(image: &Path, prompt: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ecache"))
        .args([
            "generate",
            "--policy",
            "full",
            "--budget",
            "1",
            "--max-new-tokens",
            "2",
        ])
        .arg("--model")
        .arg(fixture())
        .arg("--image")
        .arg(image)
        .arg("--prompt")
        .arg(prompt)
        .output()
        .unwrap()
}

/// Exit code 2 (bad input) and every `needle` in the message; no panic.
fn refused(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
}

/// The table of the standard CRC-32 (PNG chunks carry one).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A valid 2x2 PNG whose header then claims `width` x `height` (checksum fixed up).
fn png_claiming(path: &Path, width: u32, height: u32) {
    let mut bytes = Vec::new();
    image::RgbImage::new(2, 2)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    // Signature (8), chunk length (4), "IHDR" (4), then width and height.
    bytes[16..20].copy_from_slice(&width.to_be_bytes());
    bytes[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn unreadable_images_are_named() {
    let dir = scratch("images");
    let missing = dir.join("no-such.png");
    refused(
        &generate(&missing, "what is it ?"),
        &["no-such.png", "cannot open"],
    );

    let text = dir.join("notes.png");
    std::fs::write(&text, "these are notes, not pixels\n").unwrap();
    refused(
        &generate(&text, "what is it ?"),
        &["notes.png", "not a readable image"],
    );

    let good = std::fs::read(fixture().join("image.png")).unwrap();
    let cut = dir.join("cut.png");
    std::fs::write(&cut, &good[..good.len() / 2]).unwrap();
    refused(
        &generate(&cut, "what is it ?"),
        &["cut.png", "not a readable image"],
    );

    let zero = dir.join("zero.png");
    png_claiming(&zero, 0, 4);
    refused(&generate(&zero, "what is it ?"), &["zero.png"]);

    // 200,000 x 200,000 RGB would take 120 GB: refused from the header, nothing allocated.
    let huge = dir.join("huge.png");
    png_claiming(&huge, 200_000, 200_000);
    refused(
        &generate(&huge, "what is it ?"),
        &["huge.png", "200000 x 200000 pixels, over the limit"],
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn greyscale_and_rgba_images_are_converted() {
    let dir = scratch("modes");
    let original = image::open(fixture().join("image.png")).unwrap();
    for (name, picture) in [
        (
            "grey.png",
            image::DynamicImage::ImageLuma8(original.to_luma8()),
        ),
        (
            "rgba.png",
            image::DynamicImage::ImageRgba8(original.to_rgba8()),
        ),
    ] {
        let path = dir.join(name);
        picture.save(&path).unwrap();
        let out = generate(&path, "what is the colour of the circle ?");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("new tokens 2"), "{name}: {stdout}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_prompts_are_refused_before_any_work() {
    let image = fixture().join("image.png");
    refused(&generate(&image, "   "), &["prompt is empty"]);
    refused(
        &generate(&image, "USER: what is the colour ? ASSISTANT:"),
        &["no <image> token"],
    );
    refused(
        &generate(
            &image,
            "USER: <image> <image> which is brighter ? ASSISTANT:",
        ),
        &["2 <image> tokens"],
    );
    // The fixture's context is 256 tokens; its image takes 16.
    let long = "circle ".repeat(400);
    refused(
        &generate(&image, &long),
        &["256", "context", "(16 of them the image)"],
    );
}

#[test]
fn a_dataset_with_bad_items_stops_unless_told_to_keep_going() {
    let dir = scratch("dataset");
    std::fs::copy(fixture().join("image.png"), dir.join("image.png")).unwrap();
    let good = r#"{"image": "image.png", "question": "what is it ?", "answer": "a circle"}"#;
    let long = format!(
        r#"{{"image": "image.png", "question": "{}?", "answer": "a circle"}}"#,
        "circle ".repeat(300)
    );
    let lines = [
        good,
        r#"{"image": "image.png", "question": "what"#,
        r#"{"image": "gone.png", "question": "what is it ?", "answer": "a circle"}"#,
        &long,
        good,
    ];
    let dataset = dir.join("mixed.jsonl");
    std::fs::write(&dataset, lines.join("\n") + "\n").unwrap();
    let results = dir.join("results.json");
    let eval = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ecache"))
            .args(["eval", "ppl", "--policies", "full"])
            .arg("--model")
            .arg(fixture())
            .arg("--dataset")
            .arg(&dataset)
            .arg("--output")
            .arg(&results)
            .args(extra)
            .output()
            .unwrap()
    };
    refused(&eval(&[]), &["mixed.jsonl line 2"]);
    assert!(!results.exists(), "nothing is written when the run stops");

    let out = eval(&["--keep-going"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("skipped: dataset") && stderr.contains("line 2"),
        "{stderr}"
    );
    assert!(stderr.contains("gone.png"), "{stderr}");
    assert!(stderr.contains("model's context of 256"), "{stderr}");
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
    assert_eq!(rows[0]["items"], 2, "{rows}");
    std::fs::remove_dir_all(&dir).ok();
}
