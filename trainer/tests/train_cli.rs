//! `trainer train`, killed with SIGKILL mid-run and resumed, takes the same path as a run never stopped; and
//! `trainer demo` runs the whole pipeline.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arena_judge_tests::{root, temp_dir};

fn train_args(out: &Path) -> Vec<String> {
    let data = root().join("data/arena-sample.parquet");
    [
        "train",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--max-steps",
        "24",
        "--save-steps",
        "4",
        "--eval-steps",
        "8",
        "--logging-steps",
        "1",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--learning-rate",
        "1e-3",
        "--lora-r",
        "4",
        "--lora-first-layer",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--data".into(),
        data.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ])
    .collect()
}

pub(crate) fn trainer() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_trainer"));
    c.current_dir(root());
    c
}

fn run_ok(cmd: &mut Command) -> String {
    let output = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `(step, loss)` of every training log line.
fn losses(run: &Path) -> Vec<(usize, f64)> {
    let (logs, _) = shared::train::read_log(&run.join("log.jsonl")).unwrap();
    logs.iter().map(|l| (l.step, l.loss)).collect()
}

#[test]
fn a_run_killed_mid_way_resumes_to_the_same_losses() {
    let whole = temp_dir("train-whole");
    run_ok(trainer().args(train_args(&whole)));
    let expected = losses(&whole);
    assert_eq!(expected.len(), 24);

    let run = temp_dir("train-killed");
    let mut child = trainer()
        .args(train_args(&run))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while shared::train::latest_checkpoint(&run).is_none_or(|c| !c.ends_with("checkpoint-8")) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint-8 after 5 minutes"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = losses(&run);
    assert!(before.len() < 24, "killed after the end");
    assert!(!run.join("test_metrics.json").exists());

    // `--precision` is the one setting a resumed run takes (the way on after an f16 overflow). On the CPU the
    // run's `auto` is f32 already, so the path it takes is the same.
    let stdout = run_ok(trainer().args([
        "train",
        "--resume",
        "--device",
        "cpu",
        "--precision",
        "f32",
        "--out",
        run.to_str().unwrap(),
    ]));
    assert!(stdout.contains("resumed from"), "{stdout}");
    assert!(
        stdout.contains("precision: f32 from here on (the run had auto)"),
        "{stdout}"
    );
    let saved: shared::train::TrainConfig =
        serde_json::from_slice(&std::fs::read(run.join("train_config.json")).unwrap()).unwrap();
    assert_eq!(saved.precision, shared::train::Precision::F32);
    let after = losses(&run);
    assert_eq!(after.len(), 24, "{after:?}");
    for ((s1, l1), (s2, l2)) in expected.iter().zip(&after) {
        assert_eq!(s1, s2);
        assert!(
            (l1 - l2).abs() < 1e-5,
            "step {s1}: {l1} uninterrupted, {l2} resumed"
        );
    }
    // The final adapters equal too.
    let a = std::fs::read(whole.join("best/adapter.safetensors")).unwrap();
    let b = std::fs::read(run.join("best/adapter.safetensors")).unwrap();
    let (ca, cb) = (
        shared::model::weights::Checkpoint::from_files(vec![("a".into(), a)]).unwrap(),
        shared::model::weights::Checkpoint::from_files(vec![("b".into(), b)]).unwrap(),
    );
    let key = "model.layers.1.self_attn.q_proj.lora_B.weight";
    let (va, vb) = (
        ca.f32(key, &[16 * 4, 4]).unwrap(),
        cb.f32(key, &[16 * 4, 4]).unwrap(),
    );
    let d = va
        .iter()
        .zip(&vb)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(d < 1e-5, "adapters differ by {d}");
    // At most save_total_limit checkpoints are kept.
    let kept = std::fs::read_dir(&run)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("checkpoint-")
        })
        .count();
    assert_eq!(kept, 3);
}

#[test]
fn resume_without_a_checkpoint_says_so() {
    let run = temp_dir("train-no-ckpt");
    let output = trainer()
        .args([
            "train",
            "--resume",
            "--device",
            "cpu",
            "--out",
            run.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("run.json") || stderr.contains("--resume"),
        "{stderr}"
    );
}

#[test]
fn demo_runs_the_whole_pipeline() {
    let out = temp_dir("demo");
    let stdout =
        run_ok(trainer().args(["demo", "--out", out.to_str().unwrap(), "--max-steps", "6"]));
    assert!(stdout.contains("learns little"), "{stdout}");
    assert!(stdout.contains("trainable params:"), "{stdout}");
    for f in [
        "eval/report.json",
        "eval/report.txt",
        "eval/confusion.svg",
        "curves.svg",
        "confusion_val.svg",
        "test_metrics.json",
        "export/hf/config.json",
        "export/hf/model.safetensors",
        "export/web/manifest.json",
        "export/web/model.int8.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing\n{stdout}");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("eval/report.json")).unwrap()).unwrap();
    assert_eq!(report["rows"], 139, "the sample's test split");
    // The length baseline of the test split, from the prepared data's token counts (training's test) and from
    // the rows preprocessed again (the evaluation): the same rows, so the same figure.
    let test: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("test_metrics.json")).unwrap()).unwrap();
    let baseline = report["longer_answer_accuracy"].as_f64().unwrap();
    assert!(baseline > 0.0 && baseline < 1.0, "{report}");
    assert_eq!(test["longer_answer_accuracy"].as_f64(), Some(baseline));
    assert!(
        std::fs::read_to_string(out.join("curves.svg"))
            .unwrap()
            .contains("pick the longer answer")
    );
    shared::export::verify_bundle(&out.join("export/web")).unwrap();
    // The export predicts through `trainer predict`, like any Hugging Face directory.
    let preds = out.join("preds.csv");
    let stdout = run_ok(trainer().args([
        "predict",
        "--device",
        "cpu",
        "--model",
        out.join("export/hf").to_str().unwrap(),
        "--data",
        root().join("data/lmsys-sample.csv").to_str().unwrap(),
        "--out",
        preds.to_str().unwrap(),
    ]));
    assert!(stdout.contains("accuracy"), "{stdout}");
}

/// `trainer train` as the README gives it, with default settings: wgpu (lavapipe here) in `auto` precision,
/// which is f16 there as on a real GPU, and the CPU in f16 when asked. Both panicked at the first step once.
#[test]
fn train_with_default_settings_runs_in_half_precision_on_wgpu_and_cpu() {
    let data = root().join("data/arena-sample.parquet");
    for (name, extra) in [
        ("train-default-wgpu", &[][..]),
        (
            "train-f16-cpu",
            &["--device", "cpu", "--precision", "f16"][..],
        ),
        (
            "train-bf16-cpu",
            &["--device", "cpu", "--precision", "bf16"][..],
        ),
    ] {
        let out = temp_dir(name);
        let stdout = run_ok(
            trainer()
                .args([
                    "train",
                    "--preset",
                    "tiny",
                    "--max-steps",
                    "2",
                    "--logging-steps",
                    "1",
                ])
                .args(extra)
                .args([
                    "--data",
                    data.to_str().unwrap(),
                    "--out",
                    out.to_str().unwrap(),
                ]),
        );
        let bf16 = name.contains("bf16");
        let said = if bf16 {
            "precision: bf16 base"
        } else {
            "precision: f16 base with dynamic loss scaling"
        };
        assert!(stdout.contains(said), "{name}: {stdout}");
        let (logs, evals) = shared::train::read_log(&out.join("log.jsonl")).unwrap();
        assert_eq!(logs.len(), 2, "{name}");
        // f16 logs its loss scale; bf16 needs none.
        assert!(
            logs.iter()
                .all(|l| l.loss_scale.is_some_and(|s| s >= 1.0) != bf16),
            "{name}: {logs:?}"
        );
        assert!(
            logs.iter()
                .all(|l| l.loss.is_finite() && l.tokens_per_second > 0.0),
            "{name}: {logs:?}"
        );
        assert!(
            evals.iter().all(|e| e.loss.is_finite()),
            "{name}: {evals:?}"
        );
        assert!(out.join("test_metrics.json").is_file(), "{name}");
    }
}
