//! Fuzz harnesses: each feeds arbitrary bytes to one of ecache's input readers. Any input
//! may be refused with an error; none may panic, hang or allocate without bound. The same
//! functions run under libFuzzer (`cargo fuzz run NAME`, fuzz_targets/) and, over the
//! stored corpora, in the ordinary test suite (crates/ecache-cli/tests/fuzz_smoke.rs).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The repository's root: this file is compiled from `fuzz/` (by cargo fuzz) and from
/// `crates/ecache-cli/` (by the smoke test).
pub fn repository() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    [here.join(".."), here.join("../..")]
        .into_iter()
        .find(|p| p.join("fuzz/seeds").is_dir())
        .expect("run from the ecache repository")
}

/// The tiny fixture checkpoint's folder (its config, tokenizer and preprocessor).
pub fn fixture() -> PathBuf {
    repository().join("tests/fixtures/tiny-llava-mha")
}

/// A scratch folder for this process and thread.
fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ecache-fuzz-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// The TOML run-config loader and its validation.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = ecache_core::RunConfig::from_toml_str(text, "fuzz.toml") {
        let _ = ecache_cli::policies::builtin_registry()
            .expect("registry")
            .build(&config.policy);
    }
}

/// The safetensors header and tensor loader: the bytes as `model.safetensors` beside the
/// fixture's config, loaded as a whole model.
pub fn safetensors(data: &[u8]) {
    let dir = scratch().join("weights");
    std::fs::create_dir_all(&dir).expect("scratch folder");
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).expect("config");
    std::fs::write(dir.join("model.safetensors"), data).expect("scratch write");
    let _ = ecache_model::Llava::<burn::backend::Flex>::load(
        &dir,
        &Default::default(),
        burn::tensor::DType::F32,
    );
}

/// Image decoding (every format ecache reads) and CLIP preprocessing.
pub fn image(data: &[u8]) {
    static PROCESSOR: OnceLock<ecache_model::ImageProcessor> = OnceLock::new();
    let processor =
        PROCESSOR.get_or_init(|| ecache_model::ImageProcessor::load(&fixture()).expect("fixture"));
    let path = scratch().join("picture");
    std::fs::write(&path, data).expect("scratch write");
    if let Ok((values, [c, h, w])) = processor.open(&path) {
        assert_eq!(values.len(), c * h * w);
        assert!(values.iter().all(|v| v.is_finite()));
    }
}

/// The dataset reader (JSON array or JSON lines), strict and lenient.
pub fn dataset(data: &[u8]) {
    let path = scratch().join("dataset.jsonl");
    std::fs::write(&path, data).expect("scratch write");
    let strict = ecache_cli::dataset::read_with(&path, false);
    let lenient = ecache_cli::dataset::read_with(&path, true);
    if let (Ok((items, _)), Ok((read_leniently, skipped))) = (strict, lenient) {
        assert_eq!(
            items, read_leniently,
            "a clean dataset reads the same either way"
        );
        assert!(skipped.is_empty());
    }
}
