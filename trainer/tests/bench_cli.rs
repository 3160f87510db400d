//! `trainer bench`: the JSON line that the benchmark scripts (bench/) read, in the precisions they ask for.

use std::process::{Command, Output};

use arena_judge_tests::root;

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap()
}

/// The last line of a successful run's stdout, parsed.
fn json(output: Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap()
}

fn positive(v: &serde_json::Value, key: &str) -> f64 {
    let x = v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"));
    assert!(x.is_finite() && x > 0.0, "{key} = {x} in {v}");
    x
}

#[test]
fn bench_forward_and_train_report_their_rates_in_half_precision() {
    // Random weights everywhere (the gemma2-tiny fixture's token table is zero outside the ids its test rows use,
    // and the benchmark's random ids would meet only zero rows).
    let model = root().join("tests/fixtures/gemma2-dtypes/f32");
    let model = model.to_str().unwrap();

    let forward = json(bench(&["forward", model, "cpu", "2", "16", "2", "f16"]));
    positive(&forward, "rows_per_s");
    positive(&forward, "flops_per_token");
    assert_eq!(forward["precision"], "f16");
    assert_eq!(forward["batch"], 2);

    // f16 scales the loss: the warm-up runs until a step no longer overflows, and says how long that took.
    let train = json(bench(&["train", model, "cpu", "16", "2", "f16", "2"]));
    let tokens = positive(&train, "tokens_per_s");
    let per_step = positive(&train, "seconds_per_step");
    assert!(
        (tokens * per_step - 32.0).abs() < 1e-6,
        "2 rows of 16 tokens per step: {train}"
    );
    positive(&train, "flops_per_token");
    assert_eq!(train["precision"], "f16");
    let warmup = train["warmup_steps"].as_u64().unwrap();
    assert!((1..=17).contains(&warmup), "{train}");
    assert!(train["timed_overflows"].as_u64().unwrap() <= 2, "{train}");

    // The other precisions a user can pick, and the default device (wgpu: lavapipe here).
    let train = json(bench(&["train", model, "cpu", "16", "1", "bf16"]));
    assert_eq!(train["precision"], "bf16");
    positive(&train, "tokens_per_s");
    let forward = json(bench(&["forward", model, "cpu", "1", "16", "1"]));
    assert_eq!(forward["precision"], "f32");
    let forward = json(bench(&["forward", model, "wgpu", "1", "16", "1", "f16"]));
    assert_eq!(forward["precision"], "f16");
    positive(&forward, "rows_per_s");

    // `auto`, as `trainer train --precision` takes it, resolves to f32 on the CPU.
    let auto = json(bench(&["train", model, "cpu", "16", "1", "auto"]));
    assert_eq!(auto["precision"], "f32");
    assert_eq!(auto["warmup_steps"], 1);
}

#[test]
fn bench_refuses_what_it_cannot_run_with_a_clear_error() {
    let out = bench(&["train", "/nonexistent-model", "cpu"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent-model/config.json"), "{err}");

    let model = root().join("tests/fixtures/gemma2-dtypes/f32");
    let out = bench(&[
        "forward",
        model.to_str().unwrap(),
        "cpu",
        "2",
        "16",
        "1",
        "bf16",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not bf16"));

    let out = bench(&["train", model.to_str().unwrap(), "cpu", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("'0'"));
}
