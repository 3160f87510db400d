//! Helpers for the cross-crate tests: paths, the tokenizer, the recipe fixture, and a small parquet writer for
//! bad-input files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use shared::tokenizer::{EnginePreference, Tokenizer};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn tokenizer_path() -> PathBuf {
    let p = root().join(shared::tokenizer::DEFAULT_TOKENIZER);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/setup.sh first",
        p.display()
    );
    p
}

fn load(preference: EnginePreference) -> Tokenizer {
    let path = tokenizer_path();
    let bytes = std::fs::read(&path).expect("read tokenizer.json");
    Tokenizer::from_json_bytes(&path.display().to_string(), &bytes, preference)
        .expect("load tokenizer")
}

/// The Gemma tokenizer on our fast engine.
pub fn gemma() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let t = load(EnginePreference::Fastest);
        assert_eq!(
            t.engine_name(),
            "gemma-bpe",
            "the Gemma tokenizer must take the fast engine"
        );
        t
    })
}

/// The Gemma tokenizer on Hugging Face `tokenizers` (the reference).
pub fn gemma_hf() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| load(EnginePreference::HuggingFace))
}

/// `tests/fixtures/recipe_preprocess.json`, written by `scripts/make_preprocess_fixture.py`.
#[derive(Debug, Deserialize)]
pub struct RecipeFixture {
    pub tokenizer_sha256: String,
    pub files: std::collections::BTreeMap<String, Vec<FixtureRow>>,
    pub truncation: Vec<TruncationCase>,
    pub encode: Vec<EncodeCase>,
}

#[derive(Debug, Deserialize)]
pub struct FixtureRow {
    pub id: String,
    pub winner: String,
    pub text_sha: String,
    pub ids_sha: String,
    pub n_ids: usize,
    #[serde(default)]
    pub ids: Option<Vec<u32>>,
}

#[derive(Debug, Deserialize)]
pub struct TruncationCase {
    pub text: String,
    pub budget: usize,
    pub out: String,
}

#[derive(Debug, Deserialize)]
pub struct EncodeCase {
    pub text: String,
    pub ids: Vec<u32>,
}

pub fn recipe_fixture() -> &'static RecipeFixture {
    static F: OnceLock<RecipeFixture> = OnceLock::new();
    F.get_or_init(|| {
        let path = root().join("tests/fixtures/recipe_preprocess.json");
        let bytes = std::fs::read(&path).expect("read recipe fixture");
        serde_json::from_slice(&bytes).expect("parse recipe fixture")
    })
}

/// The fixture's short hash: sha256 of the UTF-8 text, first 16 hex digits.
pub fn short_hash(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The fixture's hash of an id list: [`short_hash`] of the ids joined by commas.
pub fn ids_hash(ids: &[u32]) -> String {
    short_hash(&ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
}

/// A fresh empty directory under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("arena-judge-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// A column for [`write_parquet`].
pub enum Column<'a> {
    Text(&'a str, Vec<Option<&'a str>>),
    Int(&'a str, Vec<i64>),
}

/// Writes a one-row-group parquet file (optional UTF-8 strings, required INT64s).
pub fn write_parquet(path: &Path, columns: &[Column<'_>]) {
    use parquet::data_type::ByteArray;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let fields: Vec<String> = columns
        .iter()
        .map(|c| match c {
            Column::Text(name, _) => format!("OPTIONAL BYTE_ARRAY {name} (UTF8);"),
            Column::Int(name, _) => format!("REQUIRED INT64 {name};"),
        })
        .collect();
    let schema = Arc::new(
        parse_message_type(&format!("message schema {{ {} }}", fields.join(" "))).expect("schema"),
    );
    let file = std::fs::File::create(path).expect("create parquet");
    let mut writer = SerializedFileWriter::new(file, schema, Default::default()).expect("writer");
    let mut group = writer.next_row_group().expect("row group");
    for column in columns {
        let mut col = group
            .next_column()
            .expect("column")
            .expect("a column per schema field");
        match column {
            Column::Text(_, values) => {
                let defs: Vec<i16> = values.iter().map(|v| i16::from(v.is_some())).collect();
                let data: Vec<ByteArray> = values
                    .iter()
                    .flatten()
                    .map(|s| ByteArray::from(*s))
                    .collect();
                col.typed::<parquet::data_type::ByteArrayType>()
                    .write_batch(&data, Some(&defs), None)
                    .expect("write");
            }
            Column::Int(_, values) => {
                col.typed::<parquet::data_type::Int64Type>()
                    .write_batch(values, None, None)
                    .expect("write");
            }
        }
        col.close().expect("close column");
    }
    group.close().expect("close row group");
    writer.close().expect("close file");
}
