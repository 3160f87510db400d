//! `trainer predict` on a Hugging Face directory written by transformers reproduces transformers' probabilities.

use std::path::{Path, PathBuf};
use std::process::Command;

use arena_judge_tests::{root, temp_dir, tokenizer_path};

/// The tiny fixture model as a complete model directory (config, weights and the Gemma tokenizer).
fn model_dir(name: &str) -> PathBuf {
    let dir = temp_dir(name);
    let fixture = root().join("tests/fixtures/gemma2-tiny");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    std::fs::copy(tokenizer_path(), dir.join("tokenizer.json")).unwrap();
    dir
}

fn predict(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["predict", "--device", "cpu", "--batch-size", "4", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `id → [P(model_a), P(model_b)]` from a predictions CSV, checking its header.
fn read_predictions(path: &Path) -> std::collections::HashMap<String, [f64; 2]> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("id,winner,prob_model_a,prob_model_b"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let (a, b): (f64, f64) = (f[2].parse().unwrap(), f[3].parse().unwrap());
            assert!((a + b - 1.0).abs() < 1e-5);
            assert_eq!(f[1], if b > a { "model_b" } else { "model_a" });
            (f[0].to_string(), [a, b])
        })
        .collect()
}

#[test]
fn predict_reproduces_transformers_probabilities() {
    let model = model_dir("predict-model");
    let out = model.join("predictions.csv");
    let data = root().join("data/arena-sample.parquet");
    let stdout = predict(&model, &data, &out, &[]);
    assert!(
        stdout.contains("accuracy")
            && stdout.contains("log loss")
            && stdout.contains("692 labelled rows"),
        "{stdout}"
    );
    // The length baseline it prints beside the accuracy: counted here with plain encodes of the whole responses,
    // not through smart truncation's counts, which the command uses.
    let printed: f64 = stdout
        .split("picking the longer answer scores ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no length baseline in {stdout}"));
    let tokenizer = shared::tokenizer::Tokenizer::from_file(&model.join("tokenizer.json")).unwrap();
    let records = shared::data::load_file(&data, shared::data::Format::Auto)
        .unwrap()
        .records;
    let count = |text: &str| tokenizer.encode(text).unwrap().len();
    let right = records
        .iter()
        .filter(|r| {
            let longer_b = count(&r.response_b) > count(&r.response_a);
            r.label.map(|l| l.index()) == Some(usize::from(longer_b))
        })
        .count();
    assert_eq!(
        format!("{printed:.4}"),
        format!("{:.4}", right as f64 / 692.0)
    );
    let got = read_predictions(&out);
    assert_eq!(got.len(), 692);
    let expected: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root().join("tests/fixtures/gemma2-tiny/expected.json")).unwrap(),
    )
    .unwrap();
    for row in expected["rows"].as_array().unwrap() {
        let id = row["id"].as_str().unwrap();
        for k in 0..2 {
            let want = row["probs"][k].as_f64().unwrap();
            assert!(
                (got[id][k] - want).abs() < 1e-4,
                "{id}: {:?} vs transformers {want}",
                got[id]
            );
        }
    }
}

#[test]
fn swap_tta_is_symmetric_in_the_two_responses() {
    let model = model_dir("predict-tta");
    let data = root().join("data/arena-sample.parquet");
    let records = shared::data::load_file(&data, shared::data::Format::Auto)
        .unwrap()
        .records;
    // The first rows with their responses exchanged (and the winner with them).
    let swapped = model.join("swapped.csv");
    let mut w = csv::Writer::from_path(&swapped).unwrap();
    w.write_record(["id", "prompt", "response_a", "response_b", "winner"])
        .unwrap();
    for r in records.iter().take(12) {
        let winner = if r.label == Some(shared::data::Label::ModelA) {
            "model_b"
        } else {
            "model_a"
        };
        w.write_record([&r.id, &r.prompt, &r.response_b, &r.response_a, winner])
            .unwrap();
    }
    w.flush().unwrap();
    let original = model.join("original.csv");
    let mut w = csv::Writer::from_path(&original).unwrap();
    w.write_record(["id", "prompt", "response_a", "response_b", "winner"])
        .unwrap();
    for r in records.iter().take(12) {
        w.write_record([
            r.id.as_str(),
            &r.prompt,
            &r.response_a,
            &r.response_b,
            r.label.map_or("", |l| l.as_str()),
        ])
        .unwrap();
    }
    w.flush().unwrap();
    let (p_orig, p_swap, p_plain) = (
        model.join("o.csv"),
        model.join("s.csv"),
        model.join("p.csv"),
    );
    predict(&model, &original, &p_orig, &["--swap-tta"]);
    predict(&model, &swapped, &p_swap, &["--swap-tta"]);
    predict(&model, &original, &p_plain, &[]);
    let (o, s, p) = (
        read_predictions(&p_orig),
        read_predictions(&p_swap),
        read_predictions(&p_plain),
    );
    let mut changed = false;
    for (id, [a, b]) in &o {
        assert!(
            (a - s[id][1]).abs() < 1e-5 && (b - s[id][0]).abs() < 1e-5,
            "{id}: {:?} vs swapped {:?}",
            o[id],
            s[id]
        );
        changed |= (a - p[id][0]).abs() > 1e-4;
    }
    assert!(
        changed,
        "swap-TTA must change some probabilities of a position-biased model"
    );
}

#[test]
fn a_model_dir_without_tokenizer_is_a_clear_error() {
    let dir = temp_dir("predict-no-tokenizer");
    let fixture = root().join("tests/fixtures/gemma2-dtypes/f32");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    let output = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["predict", "--device", "cpu", "--model"])
        .arg(&dir)
        .arg("--data")
        .arg(root().join("data/arena-sample.parquet"))
        .arg("--out")
        .arg(dir.join("p.csv"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("tokenizer.json"), "{stderr}");
}
