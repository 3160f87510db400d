//! Bad input gives an error that names the file, and the row id and column where there is one. Never a panic.

use std::path::{Path, PathBuf};

use arena_judge_tests::{Column, root, temp_dir, tokenizer_path, write_parquet};
use shared::cache::PrepareSettings;
use shared::data::{DataError, Format, load_file};
use shared::prepare::{PrepareError, PrepareRequest, Silent, prepare};

const LMSYS_HEADER: &str =
    "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n";

fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn load_err(path: &Path) -> (DataError, String) {
    let err = load_file(path, Format::Auto).expect_err("bad input must be an error");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "error does not name the file: {msg}"
    );
    (err, msg)
}

#[test]
fn missing_file() {
    let (err, _) = load_err(Path::new("/nonexistent/arena.parquet"));
    assert!(matches!(err, DataError::Io { .. }));
}

#[test]
fn missing_column() {
    let d = temp_dir("missing-col");
    let p = write(&d, "a.csv", b"id,prompt,response_a,winner\n1,p,a,model_a\n");
    let (err, msg) = load_err(&p);
    assert!(
        matches!(err, DataError::MissingColumn { ref column, .. } if column == "response_b"),
        "{msg}"
    );
    // Neither winner columns nor texts: no schema to read (without winner columns alone, it is a test file).
    let p = write(&d, "b.csv", b"id,question,answer\n1,p,a\n");
    let (err, msg) = load_err(&p);
    assert!(matches!(err, DataError::UnknownSchema { .. }), "{msg}");
}

#[test]
fn wrong_column_type_in_parquet() {
    let d = temp_dir("wrong-type");
    let p = d.join("t.parquet");
    write_parquet(
        &p,
        &[
            Column::Text("id", vec![Some("x1")]),
            Column::Int("prompt", vec![3]),
            Column::Text("response_a", vec![Some("a")]),
            Column::Text("response_b", vec![Some("b")]),
            Column::Text("winner", vec![Some("model_a")]),
        ],
    );
    let (err, msg) = load_err(&p);
    assert!(
        matches!(err, DataError::ColumnType { ref column, .. } if column == "prompt"),
        "{msg}"
    );
    assert!(msg.contains("integer") && msg.contains("string"), "{msg}");
}

#[test]
fn null_text_in_parquet_becomes_empty() {
    let d = temp_dir("null-text");
    let p = d.join("t.parquet");
    write_parquet(
        &p,
        &[
            Column::Int("id", vec![11, 12]),
            Column::Text("prompt", vec![Some("p"), None]),
            Column::Text("response_a", vec![None, Some("a")]),
            Column::Text("response_b", vec![Some("b"), Some("b")]),
            Column::Text("winner", vec![Some("model_a"), Some("model_b")]),
            Column::Text("language", vec![None, Some("German")]),
        ],
    );
    let rows = load_file(&p, Format::Auto).unwrap().records;
    assert_eq!(
        (rows[0].response_a.as_str(), rows[1].prompt.as_str()),
        ("", "")
    );
    assert_eq!(
        (rows[0].id.as_str(), rows[1].language.as_deref()),
        ("11", Some("German"))
    );
}

#[test]
fn unparsable_turn_list() {
    let d = temp_dir("bad-json");
    let p = write(
        &d,
        "l.csv",
        format!(
            "{LMSYS_HEADER}77,x,y,\"[\"\"ok\"\"]\",\"[\"\"unterminated]\",\"[\"\"b\"\"]\",1,0,0\n"
        )
        .as_bytes(),
    );
    let (err, msg) = load_err(&p);
    assert!(matches!(err, DataError::BadTurns { .. }), "{msg}");
    assert!(msg.contains("id 77") && msg.contains("response_a"), "{msg}");
}

#[test]
fn unknown_winner() {
    let d = temp_dir("winner");
    let p = write(
        &d,
        "w.csv",
        b"id,prompt,response_a,response_b,winner\nr1,p,a,b,model_a\nr2,p,a,b,model_c\n",
    );
    let (err, msg) = load_err(&p);
    assert!(matches!(err, DataError::UnknownWinner { .. }), "{msg}");
    assert!(
        msg.contains("row 2 (id r2)") && msg.contains("model_c"),
        "{msg}"
    );
}

#[test]
fn zero_rows_after_dropping_ties() {
    let d = temp_dir("all-ties");
    let p = write(
        &d,
        "ties.csv",
        format!("{LMSYS_HEADER}1,x,y,\"[\"\"p\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",0,0,1\n")
            .as_bytes(),
    );
    let req = PrepareRequest {
        data: p.clone(),
        tokenizer: tokenizer_path(),
        out: d.join("out"),
        settings: PrepareSettings::default(),
        force: false,
        token_cache_chunks: 0,
    };
    let err = prepare(&req, &Silent).expect_err("no rows left");
    let msg = err.to_string();
    assert!(
        matches!(err, PrepareError::Data(DataError::NoRows { .. })),
        "{msg}"
    );
    assert!(msg.contains("ties.csv") && msg.contains("1 ties"), "{msg}");
    assert!(!d.join("out/manifest.json").exists());
    let empty = write(&d, "empty.csv", LMSYS_HEADER.as_bytes());
    let (err, msg) = load_err(&empty);
    assert!(matches!(err, DataError::NoRows { .. }), "{msg}");
}

#[test]
fn truncated_parquet() {
    let d = temp_dir("truncated");
    let bytes = std::fs::read(root().join("data/arena-sample.parquet")).unwrap();
    for keep in [4, 100, bytes.len() / 2, bytes.len() - 1] {
        let p = write(&d, "cut.parquet", &bytes[..keep]);
        let (err, _) = load_err(&p);
        assert!(
            matches!(err, DataError::Parquet { .. }),
            "keep {keep}: {err}"
        );
    }
}

#[test]
fn corrupt_parquet() {
    let d = temp_dir("corrupt");
    let bytes = std::fs::read(root().join("data/arena-sample.parquet")).unwrap();
    // Overwrite stretches of page data (and, last, of the footer) with garbage.
    let n = bytes.len();
    for (at, len) in [(n / 3, 4096), (n / 2, 64), (n - 2000, 1500)] {
        let mut bad = bytes.clone();
        for (k, b) in bad[at..at + len].iter_mut().enumerate() {
            *b = (k as u8).wrapping_mul(151).wrapping_add(7);
        }
        let p = write(&d, "bad.parquet", &bad);
        let result = std::panic::catch_unwind(|| load_file(&p, Format::Auto));
        let result = result.unwrap_or_else(|_| panic!("panicked on corruption at {at}"));
        let err = result.expect_err("corrupt parquet must be an error");
        assert!(err.to_string().contains("bad.parquet"), "{err}");
    }
}

#[test]
fn bad_tokenizer_file() {
    let d = temp_dir("bad-tokenizer");
    let t = write(&d, "tokenizer.json", b"{\"model\": ");
    let req = PrepareRequest {
        data: root().join("data/arena-sample.parquet"),
        tokenizer: t,
        out: d.join("out"),
        settings: PrepareSettings::default(),
        force: false,
        token_cache_chunks: 0,
    };
    let msg = prepare(&req, &Silent)
        .expect_err("bad tokenizer")
        .to_string();
    assert!(msg.contains("tokenizer.json"), "{msg}");
}
