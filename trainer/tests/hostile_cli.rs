//! Hostile and odd input, as a user would give it, through the command line: unlabelled test files, two runs on
//! one directory, reruns, damaged weights, ties, a mismatched tokenizer, unknown splits, a closed stdout, an output
//! that is an input, endless and piped files. Each case once lost data, crashed or printed a wrong answer.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use arena_judge_tests::{root, temp_dir, tokenizer_path};

use crate::train_cli::trainer;
use burn::tensor::Device;
use shared::model::Gemma2Config;

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    text(&out)
}

/// The command fails, and its stderr is returned.
fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "expected a failure:\n{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "a panic, not an error:\n{stderr}"
    );
    stderr
}

/// A random classifier as a Hugging Face directory with the Gemma tokenizer; `edit` may change its tensors.
fn model_dir(
    name: &str,
    config: &Gemma2Config,
    edit: impl FnOnce(&mut Vec<shared::export::NamedTensor>),
) -> PathBuf {
    let dir = temp_dir(name);
    let device = Device::flex();
    device.seed(5);
    let mut tensors = shared::export::hf_tensors(&config.init(&device)).unwrap();
    edit(&mut tensors);
    let bytes = shared::export::serialize(&tensors, shared::export::WeightFormat::F32).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    let json = shared::export::hf_config_json(config, "float32");
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    std::fs::copy(tokenizer_path(), dir.join("tokenizer.json")).unwrap();
    dir
}

fn small() -> Gemma2Config {
    Gemma2Config {
        num_hidden_layers: 2,
        layer_types: Gemma2Config::tiny().layer_types[..2].to_vec(),
        ..Gemma2Config::tiny()
    }
}

fn predict(model: &Path, data: &Path, out: &Path) -> Command {
    let mut c = trainer();
    // Without it, a wgpu instance would complain on stderr: `--device cpu` must never open one.
    c.env_remove("XDG_RUNTIME_DIR");
    c.args(["predict", "--device", "cpu", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out);
    c
}

fn ids_of(csv_path: &Path) -> Vec<String> {
    std::fs::read_to_string(csv_path)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().to_string())
        .collect()
}

/// 1. Kaggle's test files have no winner columns: both schemas are scored, in input order, with their ids.
#[test]
fn unlabelled_wsdm_and_lmsys_files_are_scored_in_order() {
    let model = model_dir("unlabelled-model", &small(), |_| {});
    let dir = temp_dir("unlabelled");
    let records = shared::data::load_file(
        &root().join("data/arena-sample.parquet"),
        shared::data::Format::Auto,
    )
    .unwrap()
    .records;
    // Ids in an order no sort would give, to see the output keep the input's.
    let rows: Vec<_> = records.iter().take(9).rev().collect();
    let wsdm = dir.join("test.csv");
    let mut w = csv::Writer::from_path(&wsdm).unwrap();
    w.write_record(["id", "prompt", "response_a", "response_b", "scored"])
        .unwrap();
    for r in &rows {
        w.write_record([&r.id, &r.prompt, &r.response_a, &r.response_b, "True"])
            .unwrap();
    }
    w.flush().unwrap();
    let lmsys = dir.join("lmsys-test.csv");
    let mut w = csv::Writer::from_path(&lmsys).unwrap();
    w.write_record(["id", "prompt", "response_a", "response_b"])
        .unwrap();
    for r in &rows {
        let turns = |t: &str| serde_json::to_string(&[t]).unwrap();
        w.write_record([
            r.id.clone(),
            turns(&r.prompt),
            turns(&r.response_a),
            turns(&r.response_b),
        ])
        .unwrap();
    }
    w.flush().unwrap();
    let want: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    for (data, name) in [(&wsdm, "wsdm.csv"), (&lmsys, "lmsys.csv")] {
        let out = dir.join(name);
        let stdout = ok(&mut predict(&model, data, &out));
        assert!(
            !stdout.contains("accuracy"),
            "no labels, no accuracy: {stdout}"
        );
        assert!(
            !stdout.contains("XDG_RUNTIME_DIR"),
            "wgpu was opened: {stdout}"
        );
        assert_eq!(ids_of(&out), want, "{name}");
    }
}

/// 2. Two runs on one directory: the second fails at once and names the first one's pid; the lock dies with
/// its holder.
#[test]
fn a_second_run_on_the_same_directory_is_refused() {
    let out = temp_dir("locked-run");
    let data = root().join("data/arena-sample.parquet");
    let mut first = trainer()
        .args([
            "train",
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--max-steps",
            "100000",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !out.join("run.json").is_file() {
        assert!(first.try_wait().unwrap().is_none(), "the first run ended");
        assert!(started.elapsed() < Duration::from_secs(120), "no run.json");
        std::thread::sleep(Duration::from_millis(20));
    }
    let stderr = fails(
        trainer()
            .args(["train", "--resume", "--device", "cpu", "--out"])
            .arg(&out),
    );
    assert!(
        stderr.contains("in use") && stderr.contains(&first.id().to_string()),
        "{stderr}"
    );
    first.kill().unwrap(); // SIGKILL: no chance to clean up
    first.wait().unwrap();
    // The lock went with the process: resuming is refused only for want of a checkpoint, not for the lock.
    let stderr = fails(
        trainer()
            .args(["train", "--resume", "--device", "cpu", "--out"])
            .arg(&out),
    );
    assert!(!stderr.contains("in use"), "{stderr}");
}

/// 3. A finished run is not clobbered by a second `train` into it; `--overwrite` starts over on purpose.
#[test]
fn a_used_run_directory_needs_resume_or_overwrite() {
    let out = temp_dir("rerun");
    let data = root().join("data/arena-sample.parquet");
    let args = |extra: &[&str]| {
        let mut c = trainer();
        c.args([
            "train",
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--max-steps",
            "1",
        ])
        .args(extra)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out);
        c
    };
    ok(&mut args(&[]));
    let log = std::fs::read(out.join("log.jsonl")).unwrap();
    let stderr = fails(&mut args(&[]));
    assert!(
        stderr.contains("already holds") && stderr.contains("--overwrite"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(out.join("log.jsonl")).unwrap(),
        log,
        "the run was touched"
    );
    ok(&mut args(&["--overwrite"]));
    assert!(out.join("test_metrics.json").is_file());
}

/// 4. Non-finite weights are named at load time; finite weights whose output overflows fail at the first row.
#[test]
fn nan_weights_and_non_finite_probabilities_are_errors() {
    let dir = temp_dir("nan-data");
    let data = root().join("data/lmsys-sample.csv");
    let nan = model_dir("nan-model", &small(), |t| {
        let (_, _, values) = t
            .iter_mut()
            .find(|(name, _, _)| name == "model.layers.1.mlp.up_proj.weight")
            .unwrap();
        values[7] = f32::NAN;
    });
    let stderr = fails(&mut predict(&nan, &data, &dir.join("p.csv")));
    assert!(
        stderr.contains("model.layers.1.mlp.up_proj.weight") && stderr.contains("non-finite"),
        "{stderr}"
    );
    let huge = model_dir("huge-model", &small(), |t| {
        let (_, _, values) = t
            .iter_mut()
            .find(|(name, _, _)| name == "score.weight")
            .unwrap();
        values.iter_mut().for_each(|v| *v = 3e38);
    });
    let stderr = fails(&mut predict(&huge, &data, &dir.join("p.csv")));
    assert!(
        stderr.contains("row 1 (id") && stderr.contains("not finite"),
        "{stderr}"
    );
    assert!(
        !dir.join("p.csv").exists(),
        "no predictions file for a failed run"
    );
}

/// A base whose activations pass f16's largest value (65504) in its first layer's feed-forward block, though
/// every weight fits f16 (Gemma 3 does this in f16; whether gemma-2-2b does is unmeasured): an f16 run stops at
/// its first step, names the rows, and says how to go on in f32, instead of halving the loss scale 17 times and
/// blaming the gradients.
#[test]
fn an_f16_overflow_stops_training_and_says_how_to_go_on() {
    let model = model_dir("f16-overflow-model", &small(), |t| {
        for (name, _, values) in t.iter_mut() {
            match name.as_str() {
                "model.layers.0.pre_feedforward_layernorm.weight" => values.fill(999.0),
                "model.layers.0.mlp.up_proj.weight" => values.iter_mut().for_each(|v| *v *= 1e3),
                _ => {}
            }
        }
    });
    let run = temp_dir("f16-overflow-run");
    let stderr = fails(trainer().args([
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        root().join("data/arena-sample.parquet").to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--device",
        "cpu",
        "--precision",
        "f16",
        "--max-steps",
        "2",
        "--lora-first-layer",
        "0",
    ]));
    assert!(
        stderr.contains("step 1: the loss is not finite in f16 (rows "),
        "{stderr}"
    );
    assert!(
        stderr.contains("run the same command again with --overwrite --precision f32"),
        "{stderr}"
    );
}

/// 5. A cache prepared with `--keep-ties` cannot train a two-class model: a clear error, not an index panic.
#[test]
fn training_on_ties_is_refused_clearly() {
    let dir = temp_dir("ties");
    let prepared = dir.join("prepared");
    ok(trainer()
        .args(["prepare", "--keep-ties", "--data"])
        .arg(root().join("data/lmsys-sample.csv"))
        .arg("--out")
        .arg(&prepared)
        .arg("--tokenizer")
        .arg(tokenizer_path()));
    let stderr = fails(
        trainer()
            .args([
                "train",
                "--preset",
                "tiny",
                "--device",
                "cpu",
                "--max-steps",
                "1",
            ])
            .arg("--prepared")
            .arg(&prepared)
            .arg("--out")
            .arg(dir.join("run")),
    );
    assert!(
        stderr.contains("tie") && stderr.contains("--keep-ties"),
        "{stderr}"
    );
}

/// 6. A tokenizer whose ids the model's vocabulary does not cover: a warning, then an error naming the row.
#[test]
fn token_ids_past_the_vocabulary_are_caught_before_the_forward_pass() {
    let config = Gemma2Config {
        vocab_size: 1000,
        ..small()
    };
    let model = model_dir("small-vocab", &config, |_| {});
    let dir = temp_dir("small-vocab-out");
    let stderr = fails(&mut predict(
        &model,
        &root().join("data/arena-sample.parquet"),
        &dir.join("p.csv"),
    ));
    assert!(
        stderr.contains("256000 tokens") && stderr.contains("vocabulary of 1000"),
        "{stderr}"
    );
    assert!(
        stderr.contains("row ") && stderr.contains("token id"),
        "{stderr}"
    );
}

/// 7. An unknown split, and data with no labels, are errors that leave an existing report alone.
#[test]
fn eval_refuses_unknown_splits_and_unlabelled_data() {
    let model = model_dir("eval-model", &small(), |_| {});
    let dir = temp_dir("eval-unlabelled");
    let data = dir.join("test.csv");
    std::fs::write(&data, "id,prompt,response_a,response_b\n1,p,a,b\n").unwrap();
    let report = model.join("eval/report.json");
    std::fs::create_dir_all(report.parent().unwrap()).unwrap();
    std::fs::write(&report, b"{\"kept\": true}").unwrap();
    let stderr = fails(
        trainer()
            .args(["eval", "--device", "cpu", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&data),
    );
    assert!(stderr.contains("no label"), "{stderr}");
    assert_eq!(std::fs::read(&report).unwrap(), b"{\"kept\": true}");
    let settings = shared::cache::PrepareSettings::default();
    let e = shared::prepare::split_records(
        &root().join("data/arena-sample.parquet"),
        &settings,
        "bogus",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("unknown split \"bogus\""), "{e}");
}

/// 8. A closed stdout (`trainer ... | head -1`) loses the output, not the work.
#[test]
fn a_closed_stdout_does_not_abort_training() {
    let out = temp_dir("closed-stdout");
    let mut child = trainer()
        .args([
            "train",
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--max-steps",
            "2",
        ])
        .arg("--data")
        .arg(root().join("data/arena-sample.parquet"))
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    drop(stdout); // `head -1` exits
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?} after {first:?}");
    assert!(out.join("test_metrics.json").is_file());
}

/// 9. `--out` equal to `--data` would replace the input with predictions.
#[test]
fn predictions_never_overwrite_an_input() {
    let model = model_dir("out-is-input", &small(), |_| {});
    let dir = temp_dir("out-is-input-data");
    let data = dir.join("data.csv");
    std::fs::copy(root().join("data/lmsys-sample.csv"), &data).unwrap();
    let before = std::fs::read(&data).unwrap();
    let stderr = fails(&mut predict(&model, &data, &data));
    assert!(stderr.contains("refusing to overwrite"), "{stderr}");
    assert_eq!(std::fs::read(&data).unwrap(), before);
    let stderr = fails(&mut predict(&model, &data, &model.join("config.json")));
    assert!(stderr.contains("refusing to overwrite"), "{stderr}");
}

/// 10. An endless device is refused at once; a pipe is read once, and its rows prepared.
#[test]
fn endless_devices_are_refused_and_pipes_are_read_once() {
    let dir = temp_dir("dev-zero");
    let mut child = trainer()
        .args(["prepare", "--data", "/dev/zero", "--out"])
        .arg(dir.join("zero"))
        .arg("--tokenizer")
        .arg(tokenizer_path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("prepare --data /dev/zero still runs after a minute");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("/dev/zero"),
        "{stderr}"
    );

    let mut child = trainer()
        .args(["prepare", "--data", "/dev/stdin", "--out"])
        .arg(dir.join("piped"))
        .arg("--tokenizer")
        .arg(tokenizer_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let bytes = std::fs::read(root().join("data/lmsys-sample.csv")).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&bytes).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let manifest = shared::cache::Manifest::read(&dir.join("piped")).unwrap();
    assert_eq!(manifest.counts.rows_read, 1000);
}

/// Settings a user could mistype: zero steps, a sample over 100%, NaN.
#[test]
fn out_of_range_settings_are_errors() {
    let dir = temp_dir("settings");
    let data = root().join("data/arena-sample.parquet");
    for percent in ["101", "NaN", "0"] {
        let stderr = fails(
            trainer()
                .args(["prepare", "--sample-percent", percent, "--data"])
                .arg(&data)
                .arg("--out")
                .arg(dir.join("p"))
                .arg("--tokenizer")
                .arg(tokenizer_path()),
        );
        assert!(stderr.contains("sample percent"), "{percent}: {stderr}");
    }
    let stderr = fails(
        trainer()
            .args([
                "train",
                "--preset",
                "tiny",
                "--device",
                "cpu",
                "--max-steps",
                "0",
            ])
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(dir.join("run")),
    );
    assert!(stderr.contains("max_steps must be at least 1"), "{stderr}");
}
