//! A checkpoint must be consumed whole and fill every parameter; anything else is an error
//! naming the tensor or file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::DType;
use ecache_model::{Llava, ModelError};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

type B = Flex;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// A scratch copy of the MHA fixture, unique per test.
fn scratch(tag: &str) -> PathBuf {
    scratch_of("tiny-llava-mha", tag)
}

/// A scratch copy of fixture `name`'s model files, unique per test.
fn scratch_of(name: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ecache-load-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
    ] {
        std::fs::copy(fixture(name).join(f), dir.join(f)).unwrap();
    }
    dir
}

/// Rewrites `model.safetensors` through `edit` (name -> (shape, f32 data)).
fn rewrite(dir: &Path, edit: impl FnOnce(&mut HashMap<String, (Vec<usize>, Vec<u8>)>)) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: HashMap<String, (Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (s, d))| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn load_err(dir: &Path) -> String {
    match Llava::<B>::load(dir, &Default::default(), DType::F32) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn both_fixture_layouts_load_completely() {
    for name in ["tiny-llava-mha", "tiny-llava-gqa"] {
        Llava::<B>::load(&fixture(name), &Default::default(), DType::F32).unwrap();
    }
}

#[test]
fn an_unexpected_tensor_is_named() {
    let dir = scratch("extra");
    rewrite(&dir, |t| {
        t.insert(
            "model.language_model.layers.7.mlp.up_proj.weight".into(),
            (vec![2], vec![0; 8]),
        );
    });
    let err = load_err(&dir);
    assert!(
        err.contains("model.language_model.layers.7.mlp.up_proj.weight"),
        "{err}"
    );
    let dir = scratch("foreign");
    rewrite(&dir, |t| {
        t.insert("text_encoder.weight".into(), (vec![2], vec![0; 8]));
    });
    assert!(load_err(&dir).contains("text_encoder.weight"));
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = scratch("missing");
    rewrite(&dir, |t| {
        t.remove("model.language_model.layers.1.self_attn.k_proj.weight");
    });
    let err = load_err(&dir);
    assert!(
        err.contains("missing tensor") && err.contains("layers.1.self_attn.k_proj.weight"),
        "{err}"
    );
}

#[test]
fn a_mis_shaped_tensor_names_both_shapes() {
    let dir = scratch("shape");
    rewrite(&dir, |t| {
        t.insert(
            "model.multi_modal_projector.linear_2.bias".into(),
            (vec![63], vec![0; 63 * 4]),
        );
    });
    let err = load_err(&dir);
    assert!(
        err.contains("linear_2.bias") && err.contains("[63]") && err.contains("[64]"),
        "{err}"
    );
}

#[test]
fn a_config_that_disagrees_with_the_weights_is_reported() {
    let dir = scratch("config");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
    )
    .unwrap();
    let err = load_err(&dir);
    assert!(err.contains("mlp") && err.contains("96"), "{err}");
}

#[test]
fn truncated_files_and_absent_shards_are_named() {
    let dir = scratch("truncated");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );

    let dir = std::env::temp_dir().join(format!("ecache-load-shard-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let gqa = fixture("tiny-llava-gqa");
    for f in [
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ] {
        std::fs::copy(gqa.join(f), dir.join(f)).unwrap();
    }
    let err = load_err(&dir);
    assert!(
        err.contains("model-00002-of-00003.safetensors") && err.contains("does not exist"),
        "{err}"
    );

    let empty = std::env::temp_dir().join(format!("ecache-load-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    match Llava::<B>::load(&empty, &Default::default(), DType::F32) {
        Err(ModelError::Io { path, .. }) => assert!(path.ends_with("config.json")),
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn absent_weights_and_tokenizer_are_named() {
    let dir = scratch("absent-weights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("model.safetensors"), "{err}");

    let dir = scratch("absent-tokenizer");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let err = ecache_model::PromptTokenizer::load(&dir, 3)
        .err()
        .expect("no tokenizer")
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn a_tensor_of_an_unsupported_dtype_is_named() {
    let dir = scratch("dtype");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let name = "model.multi_modal_projector.linear_2.bias";
    let views: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let dtype = if n == name { Dtype::I32 } else { v.dtype() };
            let view = TensorView::new(dtype, v.shape().to_vec(), v.data()).unwrap();
            (n, view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let err = load_err(&dir);
    assert!(err.contains(name) && err.contains("I32"), "{err}");
}

/// A directory of another architecture is refused by its `model_type`, naming what is
/// supported (not with a complaint about a field it happens to lack).
#[test]
fn an_unsupported_architecture_names_the_supported_ones() {
    // A Qwen directory is not LLaVA's: LLaVA's loader says so, the interface loads it.
    for (dir, needle) in [
        ("tiny-qwen2-vl", "\"qwen2_vl\""),
        ("tiny-qwen2.5-vl", "\"qwen2_5_vl\""),
    ] {
        let err = Llava::<B>::load(&fixture(dir), &Default::default(), DType::F32)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(needle) && err.contains("not LLaVA"),
            "{dir}: {err}"
        );
        assert!(
            ecache_model::load_model::<B>(&fixture(dir), &Default::default(), DType::F32).is_ok()
        );
    }
    let dir = scratch("gemma3");
    std::fs::write(dir.join("config.json"), r#"{"model_type": "gemma3"}"#).unwrap();
    for err in [
        ecache_model::load_model::<B>(&dir, &Default::default(), DType::F32)
            .err()
            .unwrap()
            .to_string(),
        ecache_model::load_frontend(&dir, Default::default())
            .err()
            .unwrap()
            .to_string(),
    ] {
        assert!(
            err.contains("\"gemma3\"")
                && err.contains("config.json")
                && err.contains("llava (LlavaForConditionalGeneration)")
                && err.contains("qwen2_vl")
                && err.contains("qwen2_5_vl"),
            "{err}"
        );
    }
}

/// A Qwen2-VL checkpoint under the published names (`model.layers.*`, `model.embed_tokens`,
/// `visual.*`, as the Qwen/Qwen2-VL-*-Instruct files have them) instead of what
/// transformers 5 writes (`model.language_model.*`, `model.visual.*`) loads whole and
/// gives the same image features and logits.
#[test]
fn qwen_published_names_load_as_transformers_5_names_do() {
    for name in ["tiny-qwen2-vl", "tiny-qwen2.5-vl"] {
        let dir = scratch_of(name, "qwen-names");
        rewrite(&dir, |t| {
            let renamed: HashMap<String, (Vec<usize>, Vec<u8>)> = t
                .drain()
                .map(|(n, v)| {
                    let n = n
                        .replace("model.language_model.", "model.")
                        .replace("model.visual.", "visual.");
                    (n, v)
                })
                .collect();
            assert!(renamed.keys().any(|n| n.starts_with("visual.blocks.")));
            assert!(renamed.keys().any(|n| n.starts_with("model.layers.")));
            *t = renamed;
        });
        let device = Default::default();
        let outputs = |dir: &Path| {
            let frontend = ecache_model::load_frontend(dir, Default::default()).unwrap();
            let model = ecache_model::load_model::<B>(dir, &device, DType::F32).unwrap();
            let pixels = frontend
                .open(&fixture("qwen2-vl-images").join("wide.png"))
                .unwrap();
            let features = model.image_features(&pixels, &device, DType::F32).unwrap();
            let ids = frontend
                .encode_prompt(&frontend.question("what is it ?", 1).unwrap(), &[&pixels])
                .unwrap();
            let prompt = model
                .prompt(&ids, vec![features.clone()], &[pixels.grid], &device)
                .unwrap();
            let full =
                ecache_policy_full::build(&ecache_core::PolicyConfig::new("full", 1.0)).unwrap();
            let mut seq = ecache_model::Sequence::new(
                model.text(),
                full.as_ref(),
                ecache_core::PositionMode::Absolute,
                &device,
                DType::F32,
            );
            let logits = ecache_model::Runner::new(model.decoder(), model.text(), &device)
                .prefill_prompt_last(&mut seq, full.as_ref(), prompt)
                .unwrap();
            let f: Vec<f32> = features.into_data().into_vec().unwrap();
            let l: Vec<f32> = logits.into_data().into_vec().unwrap();
            (f, l)
        };
        assert_eq!(outputs(&dir), outputs(&fixture(name)), "{name}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
