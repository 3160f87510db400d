//! `trainer prepare` end to end: the cache it writes holds the recipe's token ids, is reused when nothing changed,
//! and bad input fails with a message naming the file.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use arena_judge_tests::{ids_hash, recipe_fixture, root, temp_dir, tokenizer_path};
use shared::cache::Manifest;

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .arg("--tokenizer")
        .arg(tokenizer_path())
        .current_dir(root())
        .output()
        .expect("run trainer")
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "trainer failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn check_cache_against_fixture(dir: &Path, file: &str) {
    let manifest = Manifest::read(dir).unwrap();
    let expected: HashMap<&str, &str> = recipe_fixture().files[file]
        .iter()
        .filter(|r| r.winner != "tie")
        .map(|r| (r.id.as_str(), r.ids_sha.as_str()))
        .collect();
    let mut seen = 0;
    for split in ["train", "val", "test"] {
        let s = manifest.load_split(dir, split).unwrap();
        for i in 0..s.len() {
            let id = s.rows[i].id.as_str();
            assert_eq!(
                ids_hash(s.input_ids(i)),
                expected[id],
                "{file} {split}: ids of {id}"
            );
            seen += 1;
        }
    }
    assert_eq!(
        seen,
        expected.len(),
        "{file}: every non-tie row is in exactly one split"
    );
}

#[test]
fn prepare_writes_the_recipe_ids_for_both_formats() {
    let d = temp_dir("cli-prepare");
    for (file, out, schema) in [
        ("data/arena-sample.parquet", "wsdm", "Wsdm"),
        ("data/lmsys-sample.csv", "lmsys", "Lmsys"),
    ] {
        let out_dir = d.join(out);
        let stdout = ok(&trainer(&[
            "prepare",
            "--data",
            file,
            "--out",
            out_dir.to_str().unwrap(),
        ]));
        assert!(stdout.contains(&format!("({schema} schema)")), "{stdout}");
        assert!(
            stdout.contains("train") && stdout.contains("model_a"),
            "class distribution per split:\n{stdout}"
        );
        check_cache_against_fixture(&out_dir, file);
    }
    let lmsys = Manifest::read(&d.join("lmsys")).unwrap();
    assert_eq!(
        (lmsys.counts.rows_read, lmsys.counts.ties_dropped),
        (1000, 308)
    );
    assert_eq!(lmsys.settings.preprocess.max_length, 512);
    assert_eq!(lmsys.tokenizer.engine, "gemma-bpe");
}

#[test]
fn cache_is_reused_until_an_input_or_setting_changes() {
    let d = temp_dir("cli-reuse");
    let out = d.join("c");
    let args = [
        "prepare",
        "--data",
        "data/arena-sample.parquet",
        "--out",
        out.to_str().unwrap(),
        "--sample-percent",
        "50",
    ];
    assert!(ok(&trainer(&args)).contains("prepared"));
    let first = Manifest::read(&out).unwrap();
    assert_eq!(first.counts.rows_after_sample, 346);
    assert!(ok(&trainer(&args)).contains("up to date"));
    let mut reseeded = args.to_vec();
    reseeded.extend(["--seed", "7"]);
    assert!(ok(&trainer(&reseeded)).contains("prepared"));
    let second = Manifest::read(&out).unwrap();
    assert_ne!(first.key, second.key);
    assert_ne!(first.files, second.files, "another seed samples other rows");
    // A damaged split file is noticed and rebuilt.
    std::fs::write(out.join("train.bin"), b"garbage").unwrap();
    assert!(ok(&trainer(&reseeded)).contains("prepared"));
    assert_eq!(
        Manifest::read(&out).unwrap().files,
        second.files,
        "same inputs, same bytes"
    );
}

#[test]
fn bad_input_fails_with_the_file_name() {
    let d = temp_dir("cli-bad");
    let bad = d.join("bad.csv");
    std::fs::write(
        &bad,
        "id,prompt,response_a,response_b,winner\nz9,p,a,b,nobody\n",
    )
    .unwrap();
    let out = trainer(&[
        "prepare",
        "--data",
        bad.to_str().unwrap(),
        "--out",
        d.join("o").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.csv") && stderr.contains("id z9") && stderr.contains("nobody"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
