//! Every shipped config loads and builds its policy; bad configs fail naming the problem.

use std::path::PathBuf;

use ecache_cli::policies::builtin_registry;
use ecache_core::RunConfig;

fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

#[test]
fn every_example_config_loads_and_builds() {
    let registry = builtin_registry().unwrap();
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(configs_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let config =
                RunConfig::from_path(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let policy = registry
                .build(&config.policy)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen.push(policy.name().to_string());
        }
    }
    seen.sort();
    assert_eq!(seen, ["elastic", "full", "h2o", "local", "snapkv"]);
}

#[test]
fn bad_policy_sections_name_the_problem() {
    let registry = builtin_registry().unwrap();
    let cases = [
        (
            "[policy]\nname = \"streaming\"\nbudget = 0.2\n",
            "known policies: elastic, full, h2o, local, snapkv",
        ),
        (
            "[policy]\nname = \"elastic\"\nbudget = 0.2\n[policy.params]\nwindow = 4\n",
            "window",
        ),
        (
            "[policy]\nname = \"elastic\"\nbudget = 0.2\n[policy.params]\noffset = \"far\"\n",
            "far",
        ),
        (
            "[policy]\nname = \"elastic\"\nbudget = 0.2\n[policy.params]\nmerge = \"median\"\n",
            "median",
        ),
        (
            "[policy]\nname = \"h2o\"\nbudget = 0.2\n[policy.params]\nrecent_fraction = 1.5\n",
            "recent_fraction",
        ),
        (
            "[policy]\nname = \"local\"\nbudget = 0.2\n[policy.params]\nsinks = -1\n",
            "sinks",
        ),
        (
            "[policy]\nname = \"full\"\nbudget = 1.0\n[policy.params]\noffset = 3\n",
            "offset",
        ),
    ];
    for (text, needle) in cases {
        let config = RunConfig::from_toml_str(text, "case.toml").unwrap();
        let err = registry.build(&config.policy).err().unwrap().to_string();
        assert!(err.contains(needle), "{text:?}: {err}");
    }
}

#[test]
fn a_missing_file_is_named() {
    let err = RunConfig::from_path(&configs_dir().join("nope.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.toml"), "{err}");
}
