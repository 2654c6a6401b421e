//! Long generations stay bounded: under elastic at budget 0.2 every layer holds exactly
//! `min(N, target(N))` slots after every step, positions stay strictly increasing, the KV
//! bytes follow the target, and resident memory stops growing once the cache is at its
//! budget. CI runs 600 tokens; docs/reliability.md gives the 8,000-token command
//! (`ECACHE_LONG_RUN_TOKENS=8000`) and its figures. Also: generating past the model's
//! context is refused.

mod common;

use ecache_core::TargetAt;
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{DType, Int, Tensor, TensorData};
use ecache_core::{PolicyConfig, SlotKind};
use ecache_model::{Llava, LlavaConfig};

type B = Flex;

/// The demo model's decoder shape (256 wide, 4 layers, grouped-query attention) with a
/// context of `context` tokens, written as a llava `config.json` into a scratch folder.
fn demo_sized_config(tag: &str, context: usize) -> (PathBuf, LlavaConfig) {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llava-mha");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
            .unwrap();
    let text = &mut json["text_config"];
    text["hidden_size"] = 256.into();
    text["intermediate_size"] = 688.into();
    text["num_hidden_layers"] = 4.into();
    text["num_attention_heads"] = 4.into();
    text["num_key_value_heads"] = 2.into();
    text["head_dim"] = 64.into();
    text["max_position_embeddings"] = context.into();
    let dir = std::env::temp_dir().join(format!("ecache-long-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    let config = LlavaConfig::from_path(&dir.join("config.json")).unwrap();
    (dir, config)
}

/// Resident memory of this process in bytes (Linux; `None` elsewhere).
fn resident_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn prompt(model: &Llava<B>, len: usize, vocab: usize) -> (Tensor<B, 3>, Vec<SlotKind>) {
    let ids: Vec<i64> = (0..len).map(|i| (5 + i * 7 % (vocab - 5)) as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, len]), &Default::default());
    (model.decoder.embed(ids), vec![SlotKind::Text; len])
}

fn cleanup(dir: &Path) {
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn elastic_stays_on_budget_and_in_memory_over_a_long_generation() {
    let tokens: usize = std::env::var("ECACHE_LONG_RUN_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let (dir, config) = demo_sized_config("budget", tokens + 256);
    let device = Default::default();
    let model = Llava::<B>::init(&config, &device, DType::F32, 11);
    let policy = ecache_policy_elastic::build(&PolicyConfig::new("elastic", 0.2)).unwrap();
    let mut session = common::session(&model, &config, policy.as_ref(), 1);
    let prompt_len = 100;
    let (embeds, kinds) = prompt(&model, prompt_len, config.text.vocab_size);
    let mut logits = session
        .prefill(embeds, &kinds)
        .unwrap()
        .slice([0..1, prompt_len - 1..prompt_len]);
    let per_slot = {
        let t = &config.text;
        2 * t.layers * t.kv_heads * t.head_dim * 4
    };
    let settle = (tokens / 8).max(50);
    let mut settled = None;
    let mut peak = 0;
    for step in 0..tokens {
        let n = prompt_len + step;
        let target = n.min(policy.target(TargetAt::single(prompt_len, n)).unwrap());
        for cache in session.sequences()[0].caches() {
            let table = cache.table(0).unwrap();
            assert_eq!(table.len(), target, "step {step}");
            assert!(
                table.positions().windows(2).all(|w| w[0] < w[1]),
                "step {step}: positions not increasing"
            );
        }
        assert!(session.kv_bytes() <= target * per_slot, "step {step}");
        let next = logits
            .clone()
            .reshape([1, config.text.vocab_size])
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .unwrap()[0] as u32;
        logits = session.step(&[next]).unwrap().unsqueeze_dim(1);
        if step == settle {
            settled = resident_bytes();
        }
        if step > settle {
            peak = peak.max(resident_bytes().unwrap_or(0));
        }
    }
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let full_growth = (tokens - settle) * per_slot;
    if let Some(settled) = settled {
        eprintln!(
            "{tokens} tokens: resident {:.1} MiB at token {settle}, peak {:.1} MiB after it; \
             KV at the end {:.2} MiB; a full cache would have grown by {:.1} MiB",
            mib(settled),
            mib(peak),
            mib(session.kv_bytes()),
            mib(full_growth)
        );
        // The compressed cache grows by 0.2 x per_slot per token: a few MiB at most.
        // Anything above 16 MiB beyond that would be a leak (the full cache over 8,000
        // tokens would add 30 MiB).
        let allowed = (tokens - settle) * per_slot / 5 + (16 << 20);
        assert!(
            peak.saturating_sub(settled) <= allowed,
            "resident memory grew by {:.1} MiB (allowed {:.1})",
            mib(peak.saturating_sub(settled)),
            mib(allowed)
        );
    }
    cleanup(&dir);
}

#[test]
fn generating_past_the_context_is_refused() {
    let (dir, config) = demo_sized_config("context", 24);
    let device = Default::default();
    let model = Llava::<B>::init(&config, &device, DType::F32, 3);
    let policy = ecache_policy_full::build(&PolicyConfig::new("full", 1.0)).unwrap();
    let mut session = common::session(&model, &config, policy.as_ref(), 1);
    let (embeds, kinds) = prompt(&model, 20, config.text.vocab_size);
    session.prefill(embeds, &kinds).unwrap();
    for _ in 20..24 {
        session.step(&[5]).unwrap();
    }
    let err = session.step(&[5]).expect_err("refused").to_string();
    assert!(
        err.contains("24") && err.contains("max_position_embeddings"),
        "{err}"
    );

    let (embeds, kinds) = prompt(&model, 30, config.text.vocab_size);
    let mut fresh = common::session(&model, &config, policy.as_ref(), 1);
    let err = fresh
        .prefill(embeds, &kinds)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("30") && err.contains("24"), "{err}");

    // No RoPE scaling is implemented, so a config asking for one is refused at load.
    let path = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["text_config"]["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 2.0});
    std::fs::write(&path, json.to_string()).unwrap();
    let err = LlavaConfig::from_path(&path).err().unwrap().to_string();
    assert!(err.contains("rope_scaling"), "{err}");
    cleanup(&dir);
}
