//! Loading Chatbot Arena preference rows.
//!
//! Two schemas, in either container (parquet or CSV):
//! - **WSDM** (Kaggle WSDM Cup multilingual arena): `id, prompt, response_a, response_b, winner, model_a, model_b,
//!   language`, with `winner` in `model_a | model_b | tie`; `model_*` and `language` are optional.
//! - **LMSYS** (Kaggle "LMSYS Chatbot Arena Human Preference Predictions"): the texts are JSON lists of turns (which
//!   may hold `null`) and the label is one-hot over `winner_model_a, winner_model_b, winner_tie`. Turns are joined
//!   with a blank line, the way the WSDM data joins multi-turn conversations.
//!
//! Labels are optional: Kaggle's test files have no winner columns, and `predict` scores them; `prepare`, `train`
//! and `eval` require labels. Without winner columns the schema is told by the texts (JSON lists of turns mean
//! LMSYS).
//!
//! Null text becomes `""`, as in the reference recipe. Every error names the file, and the row and column where
//! there is one.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use parquet::basic::{LogicalType, Type as PhysicalType};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde::{Deserialize, Serialize};

/// Who won a comparison. Binary training uses `ModelA = 0`, `ModelB = 1`; ties are a third class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    ModelA,
    ModelB,
    Tie,
}

impl Label {
    pub const ALL: [Label; 3] = [Label::ModelA, Label::ModelB, Label::Tie];

    /// Class index: model_a = 0, model_b = 1, tie = 2.
    pub fn index(self) -> usize {
        match self {
            Label::ModelA => 0,
            Label::ModelB => 1,
            Label::Tie => 2,
        }
    }

    pub fn from_index(index: usize) -> Option<Label> {
        Label::ALL.get(index).copied()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Label::ModelA => "model_a",
            Label::ModelB => "model_b",
            Label::Tie => "tie",
        }
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One comparison, whatever file it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub prompt: String,
    pub response_a: String,
    pub response_b: String,
    /// `None` in a file without winner columns (a test set).
    pub label: Option<Label>,
    pub model_a: Option<String>,
    pub model_b: Option<String>,
    pub language: Option<String>,
}

/// Which column layout a file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Decide from the columns: `winner` means WSDM, `winner_model_a` means LMSYS; without either, texts that
    /// are JSON lists of turns mean LMSYS.
    Auto,
    Wsdm,
    Lmsys,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Format::Auto),
            "wsdm" => Ok(Format::Wsdm),
            "lmsys" => Ok(Format::Lmsys),
            other => Err(format!(
                "unknown format {other:?}; expected auto, wsdm or lmsys"
            )),
        }
    }
}

/// Where a row sits in its file, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowRef {
    /// 1-based data row (the header is not counted).
    pub row: usize,
    /// The row's `id`, when it could be read.
    pub id: Option<String>,
}

impl fmt::Display for RowRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.id {
            Some(id) => write!(f, "row {} (id {id})", self.row),
            None => write!(f, "row {}", self.row),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not a readable parquet file (truncated or corrupt?): {source}")]
    Parquet {
        file: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("{file}: CSV error at {at}: {source}")]
    Csv {
        file: String,
        at: String,
        #[source]
        source: csv::Error,
    },
    #[error("{file}: missing column {column:?} (columns found: {found})")]
    MissingColumn {
        file: String,
        column: String,
        found: String,
    },
    #[error(
        "{file}: cannot tell the schema: expected a `winner` column (WSDM) or `winner_model_a`, `winner_model_b`, `winner_tie` (LMSYS); columns found: {found}"
    )]
    UnknownSchema { file: String, found: String },
    #[error("{file}: column {column:?} has type {found}, expected {expected}")]
    ColumnType {
        file: String,
        column: String,
        expected: &'static str,
        found: String,
    },
    #[error("{file}: {at}, column {column:?}: {message}")]
    BadValue {
        file: String,
        at: RowRef,
        column: String,
        message: String,
    },
    #[error("{file}: {at}, column {column:?}: not a JSON list of turns: {message}")]
    BadTurns {
        file: String,
        at: RowRef,
        column: String,
        message: String,
    },
    #[error("{file}: {at}: unknown winner {value}; expected {expected}")]
    UnknownWinner {
        file: String,
        at: RowRef,
        value: String,
        expected: &'static str,
    },
    #[error("{file}: no rows left {reason}")]
    NoRows { file: String, reason: String },
    #[error(
        "{file}: no labels (no `winner` column, nor `winner_model_a`, `winner_model_b`, `winner_tie`): {needed}; `trainer predict` scores unlabelled rows"
    )]
    Unlabelled { file: String, needed: String },
    #[error("{file}: column {column:?} appears more than once")]
    DuplicateColumn { file: String, column: String },
    #[error("{file}: is empty")]
    Empty { file: String },
    #[error("{file}: {message}")]
    NotData { file: String, message: String },
}

/// A cell before the schema gives it meaning.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    Text(String),
    Int(i64),
}

impl Cell {
    fn describe(&self) -> String {
        match self {
            Cell::Null => "null".into(),
            Cell::Text(s) => format!("{s:?}"),
            Cell::Int(i) => i.to_string(),
        }
    }
}

/// Loads a file from disk. The container is told by its first bytes (parquet starts with `PAR1`).
#[cfg(feature = "native")]
pub fn load_file(path: &std::path::Path, format: Format) -> Result<Dataset, DataError> {
    load_bytes(&path.display().to_string(), read_data_file(path)?, format)
}

/// The most a pipe or device is read before it counts as endless.
#[cfg(feature = "native")]
pub const MAX_STREAM_BYTES: u64 = 4 << 30;

/// A data file's bytes, read once. A regular file is read whole. A pipe or device has no size to trust and may
/// never end (`/dev/zero`): its first bytes must look like parquet or text, and it is read up to
/// [`MAX_STREAM_BYTES`].
#[cfg(feature = "native")]
pub fn read_data_file(path: &std::path::Path) -> Result<Bytes, DataError> {
    use std::io::Read;
    let file = path.display().to_string();
    let io = |source| DataError::Io {
        file: file.clone(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.is_dir() {
        return Err(DataError::NotData {
            file,
            message: "is a directory, not a data file".into(),
        });
    }
    if meta.is_file() {
        return std::fs::read(path).map(Bytes::from).map_err(io);
    }
    let mut reader = std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_STREAM_BYTES + 1);
    let mut head = Vec::with_capacity(4096);
    (&mut reader)
        .take(4096)
        .read_to_end(&mut head)
        .map_err(io)?;
    if !head.starts_with(b"PAR1") && head.contains(&0) {
        return Err(DataError::NotData {
            file,
            message: "not a regular file, and its first bytes are neither parquet nor CSV text"
                .into(),
        });
    }
    let mut bytes = head;
    reader.read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > MAX_STREAM_BYTES {
        return Err(DataError::NotData {
            file,
            message: format!(
                "not a regular file, and it goes on past {} GiB",
                MAX_STREAM_BYTES >> 30
            ),
        });
    }
    Ok(Bytes::from(bytes))
}

/// Loads rows from an in-memory file (the browser hands us bytes). `name` is used in errors and to tell the
/// container when the content is ambiguous.
pub fn load_bytes(name: &str, bytes: Bytes, format: Format) -> Result<Dataset, DataError> {
    if bytes.is_empty() {
        return Err(DataError::Empty { file: name.into() });
    }
    // The first bytes decide, whatever the name says: a CSV saved as `.parquet` is read as CSV.
    let is_parquet = bytes.starts_with(b"PAR1");
    if !is_parquet && bytes.iter().take(4096).any(|&b| b == 0) {
        return Err(DataError::NotData {
            file: name.into(),
            message: "binary data that is neither parquet (which starts with PAR1) nor CSV text"
                .into(),
        });
    }
    let table = if is_parquet {
        read_parquet(name, bytes)?
    } else {
        read_csv(name, &bytes)?
    };
    let dataset = table.into_dataset(name, format)?;
    if dataset.records.is_empty() {
        return Err(DataError::NoRows {
            file: name.into(),
            reason: "after reading: the file has no data rows".into(),
        });
    }
    Ok(dataset)
}

/// The rows of one file and the schema they were read with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// `Wsdm` or `Lmsys`, never `Auto`.
    pub format: Format,
    pub records: Vec<Record>,
    /// The file has winner columns (every record has a label).
    pub labelled: bool,
}

impl Dataset {
    /// The records, when the file is labelled; else an error saying what `needed` them.
    pub fn require_labels(self, file: &str, needed: &str) -> Result<Vec<Record>, DataError> {
        if self.labelled {
            Ok(self.records)
        } else {
            Err(DataError::Unlabelled {
                file: file.into(),
                needed: needed.into(),
            })
        }
    }

    /// Ids that occur more than once, each once, in file order.
    pub fn duplicate_ids(&self) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        let mut reported = std::collections::HashSet::new();
        self.records
            .iter()
            .filter(|r| !seen.insert(r.id.as_str()) && reported.insert(r.id.as_str()))
            .map(|r| r.id.clone())
            .collect()
    }
}

/// Column names and rows of cells, as read from either container.
struct Table {
    columns: Vec<String>,
    rows: Vec<Vec<Cell>>,
}

fn read_csv(file: &str, bytes: &[u8]) -> Result<Table, DataError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(bytes);
    let csv_err = |source: csv::Error| {
        let at = match source.position() {
            Some(p) => format!("line {}", p.line()),
            None => "header".into(),
        };
        DataError::Csv {
            file: file.into(),
            at,
            source,
        }
    };
    let columns: Vec<String> = reader
        .headers()
        .map_err(csv_err)?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_err)?;
        rows.push(record.iter().map(|s| Cell::Text(s.to_string())).collect());
    }
    Ok(Table { columns, rows })
}

/// What a parquet column may hold for us: text, an integer id, or only nulls (pyarrow's `null` type).
fn parquet_kind(descr: &parquet::schema::types::ColumnDescriptor) -> &'static str {
    match (descr.physical_type(), descr.logical_type_ref()) {
        (_, Some(LogicalType::Unknown)) => "null",
        (PhysicalType::BYTE_ARRAY, _) => "string",
        (PhysicalType::INT32 | PhysicalType::INT64, _) => "integer",
        (PhysicalType::BOOLEAN, _) => "boolean",
        (PhysicalType::FLOAT | PhysicalType::DOUBLE, _) => "float",
        _ => "binary",
    }
}

fn read_parquet(file: &str, bytes: Bytes) -> Result<Table, DataError> {
    let pq_err = |source| DataError::Parquet {
        file: file.into(),
        source,
    };
    let reader = SerializedFileReader::new(bytes).map_err(pq_err)?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let mut columns = Vec::new();
    let mut kinds = Vec::new();
    for descr in schema.columns() {
        // A nested column (a list or struct) has one leaf per field, with dotted paths (`prompt.list.element`):
        // it is one column of the row, named by its top level, whose type none of ours may have.
        let parts = descr.path().parts();
        let (name, nested) = (parts[0].clone(), parts.len() > 1);
        if nested && columns.last() == Some(&name) {
            continue;
        }
        columns.push(name);
        kinds.push(if nested {
            "list or struct"
        } else {
            parquet_kind(descr)
        });
    }
    let reader: Arc<dyn FileReader> = Arc::new(reader);
    let mut rows = Vec::with_capacity(reader.metadata().file_metadata().num_rows().max(0) as usize);
    for (i, row) in reader.get_row_iter(None).map_err(pq_err)?.enumerate() {
        let row = row.map_err(pq_err)?;
        let mut cells = Vec::with_capacity(columns.len());
        for (name, field) in row.get_column_iter() {
            let cell = match field {
                Field::Null => Cell::Null,
                Field::Str(s) => Cell::Text(s.clone()),
                Field::Bytes(b) => match std::str::from_utf8(b.data()) {
                    Ok(s) => Cell::Text(s.to_string()),
                    Err(e) => {
                        return Err(DataError::BadValue {
                            file: file.into(),
                            at: RowRef {
                                row: i + 1,
                                id: None,
                            },
                            column: name.clone(),
                            message: format!("not UTF-8 text: {e}"),
                        });
                    }
                },
                Field::Byte(v) => Cell::Int(i64::from(*v)),
                Field::Short(v) => Cell::Int(i64::from(*v)),
                Field::Int(v) => Cell::Int(i64::from(*v)),
                Field::Long(v) => Cell::Int(*v),
                Field::UByte(v) => Cell::Int(i64::from(*v)),
                Field::UShort(v) => Cell::Int(i64::from(*v)),
                Field::UInt(v) => Cell::Int(i64::from(*v)),
                Field::ULong(v) => Cell::Int(*v as i64),
                Field::Bool(v) => Cell::Int(i64::from(*v)),
                // Other kinds are rejected by the column type check before any cell is used.
                other => Cell::Text(other.to_string()),
            };
            cells.push(cell);
        }
        rows.push(cells);
    }
    let table = Table { columns, rows };
    table.check_parquet_types(file, &kinds)?;
    Ok(table)
}

const TEXT_COLUMNS: [&str; 3] = ["prompt", "response_a", "response_b"];

impl Table {
    fn found(&self) -> String {
        self.columns.join(", ")
    }

    fn position(&self, file: &str, column: &str) -> Result<usize, DataError> {
        self.columns
            .iter()
            .position(|c| c == column)
            .ok_or_else(|| DataError::MissingColumn {
                file: file.into(),
                column: column.into(),
                found: self.found(),
            })
    }

    fn optional(&self, column: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == column)
    }

    /// Parquet carries types, so a wrong one is caught before any row: texts must be strings (or all null),
    /// ids strings or integers, LMSYS one-hot winners integers.
    fn check_parquet_types(&self, file: &str, kinds: &[&'static str]) -> Result<(), DataError> {
        let expect =
            |column: &str, allowed: &[&str], expected: &'static str| -> Result<(), DataError> {
                if let Some(i) = self.optional(column)
                    && !allowed.contains(&kinds[i])
                {
                    return Err(DataError::ColumnType {
                        file: file.into(),
                        column: column.into(),
                        expected,
                        found: kinds[i].into(),
                    });
                }
                Ok(())
            };
        for column in TEXT_COLUMNS
            .iter()
            .chain(&["winner", "model_a", "model_b", "language"])
        {
            expect(column, &["string", "null"], "string")?;
        }
        expect("id", &["string", "integer"], "string or integer")?;
        for column in ["winner_model_a", "winner_model_b", "winner_tie"] {
            expect(column, &["integer", "boolean"], "integer 0/1")?;
        }
        Ok(())
    }

    /// Without winner columns: LMSYS when the first non-empty prompt is a JSON list of turns.
    fn texts_are_turns(&self) -> bool {
        let Some(p) = self.optional(TEXT_COLUMNS[0]) else {
            return false;
        };
        self.rows
            .iter()
            .find_map(|row| match &row[p] {
                Cell::Text(t) if !t.trim().is_empty() => Some(t.trim()),
                _ => None,
            })
            .is_some_and(|t| t.starts_with('[') && parse_turns(t).is_ok())
    }

    fn into_dataset(self, file: &str, format: Format) -> Result<Dataset, DataError> {
        let mut names = std::collections::HashSet::new();
        if let Some(dup) = self.columns.iter().find(|c| !names.insert(c.as_str())) {
            return Err(DataError::DuplicateColumn {
                file: file.into(),
                column: dup.clone(),
            });
        }
        let has_winner = self.optional("winner").is_some();
        let has_one_hot = ["winner_model_a", "winner_model_b", "winner_tie"]
            .iter()
            .any(|c| self.optional(c).is_some());
        let format = match format {
            Format::Auto if has_winner => Format::Wsdm,
            Format::Auto if has_one_hot => Format::Lmsys,
            Format::Auto if self.optional(TEXT_COLUMNS[0]).is_none() => {
                return Err(DataError::UnknownSchema {
                    file: file.into(),
                    found: self.found(),
                });
            }
            Format::Auto if self.texts_are_turns() => Format::Lmsys,
            Format::Auto => Format::Wsdm,
            f => f,
        };
        let id = self.position(file, "id")?;
        let texts = [
            self.position(file, TEXT_COLUMNS[0])?,
            self.position(file, TEXT_COLUMNS[1])?,
            self.position(file, TEXT_COLUMNS[2])?,
        ];
        // No winner column at all is an unlabelled file; a partial one-hot set is an error.
        let winner = match format {
            Format::Lmsys if has_one_hot => Some(Winner::OneHot([
                self.position(file, "winner_model_a")?,
                self.position(file, "winner_model_b")?,
                self.position(file, "winner_tie")?,
            ])),
            Format::Wsdm if has_winner => Some(Winner::Column(self.position(file, "winner")?)),
            _ => None,
        };
        let labelled = winner.is_some();
        let (model_a, model_b, language) = (
            self.optional("model_a"),
            self.optional("model_b"),
            self.optional("language"),
        );

        let mut records = Vec::with_capacity(self.rows.len());
        for (i, row) in self.rows.into_iter().enumerate() {
            let mut row: Vec<Option<Cell>> = row.into_iter().map(Some).collect();
            let mut at = RowRef {
                row: i + 1,
                id: None,
            };
            let id = match row[id].take() {
                Some(Cell::Text(s)) if !s.trim().is_empty() => s,
                Some(Cell::Int(v)) => v.to_string(),
                _ => return Err(bad(file, &at, "id", "missing id")),
            };
            at.id = Some(id.clone());
            let mut text = |column: usize, name: &str| -> Result<String, DataError> {
                let cell = row[column].take().unwrap_or(Cell::Null);
                match format {
                    Format::Lmsys => join_turns(file, &at, name, cell),
                    _ => match cell {
                        Cell::Null => Ok(String::new()),
                        Cell::Text(s) => Ok(s),
                        Cell::Int(v) => Ok(v.to_string()),
                    },
                }
            };
            let prompt = text(texts[0], TEXT_COLUMNS[0])?;
            let response_a = text(texts[1], TEXT_COLUMNS[1])?;
            let response_b = text(texts[2], TEXT_COLUMNS[2])?;
            let label = match &winner {
                Some(w) => Some(w.label(file, &at, &mut row)?),
                None => None,
            };
            let mut optional = |column: Option<usize>| -> Option<String> {
                match column.and_then(|c| row[c].take()) {
                    Some(Cell::Text(s)) if !s.is_empty() => Some(s),
                    Some(Cell::Int(v)) => Some(v.to_string()),
                    _ => None,
                }
            };
            records.push(Record {
                id,
                prompt,
                response_a,
                response_b,
                label,
                model_a: optional(model_a),
                model_b: optional(model_b),
                language: optional(language),
            });
        }
        Ok(Dataset {
            format,
            records,
            labelled,
        })
    }
}

enum Winner {
    Column(usize),
    OneHot([usize; 3]),
}

impl Winner {
    fn label(&self, file: &str, at: &RowRef, row: &mut [Option<Cell>]) -> Result<Label, DataError> {
        match *self {
            Winner::Column(c) => {
                let cell = row[c].take().unwrap_or(Cell::Null);
                if let Cell::Text(s) = &cell {
                    match s.trim() {
                        "model_a" => return Ok(Label::ModelA),
                        "model_b" => return Ok(Label::ModelB),
                        "tie" | "tie (bothbad)" => return Ok(Label::Tie),
                        _ => {}
                    }
                }
                Err(DataError::UnknownWinner {
                    file: file.into(),
                    at: at.clone(),
                    value: cell.describe(),
                    expected: "model_a, model_b or tie",
                })
            }
            Winner::OneHot(columns) => {
                let mut flags = [false; 3];
                let mut shown = Vec::with_capacity(3);
                for (k, &c) in columns.iter().enumerate() {
                    let cell = row[c].take().unwrap_or(Cell::Null);
                    flags[k] = match &cell {
                        Cell::Int(1) => true,
                        Cell::Int(0) => false,
                        Cell::Text(s) if matches!(s.trim(), "1" | "1.0" | "True" | "true") => true,
                        Cell::Text(s) if matches!(s.trim(), "0" | "0.0" | "False" | "false") => {
                            false
                        }
                        _ => {
                            return Err(DataError::BadValue {
                                file: file.into(),
                                at: at.clone(),
                                column: ["winner_model_a", "winner_model_b", "winner_tie"][k]
                                    .into(),
                                message: format!("expected 0 or 1, found {}", cell.describe()),
                            });
                        }
                    };
                    shown.push(format!("{}={}", ["a", "b", "tie"][k], u8::from(flags[k])));
                }
                match flags {
                    [true, false, false] => Ok(Label::ModelA),
                    [false, true, false] => Ok(Label::ModelB),
                    [false, false, true] => Ok(Label::Tie),
                    _ => Err(DataError::UnknownWinner {
                        file: file.into(),
                        at: at.clone(),
                        value: format!("({})", shown.join(", ")),
                        expected: "exactly one of winner_model_a, winner_model_b, winner_tie set to 1",
                    }),
                }
            }
        }
    }
}

fn bad(file: &str, at: &RowRef, column: &str, message: &str) -> DataError {
    DataError::BadValue {
        file: file.into(),
        at: at.clone(),
        column: column.into(),
        message: message.into(),
    }
}

/// Separator between the turns of a multi-turn conversation.
pub const TURN_SEPARATOR: &str = "\n\n";

/// Parses an LMSYS JSON list of turns and joins it into one text; `null` turns become `""`.
fn join_turns(file: &str, at: &RowRef, column: &str, cell: Cell) -> Result<String, DataError> {
    let raw = match cell {
        Cell::Text(s) => s,
        Cell::Null => return Ok(String::new()),
        Cell::Int(v) => {
            return Err(DataError::BadTurns {
                file: file.into(),
                at: at.clone(),
                column: column.into(),
                message: format!("found the number {v}"),
            });
        }
    };
    let turns = parse_turns(&raw).map_err(|message| DataError::BadTurns {
        file: file.into(),
        at: at.clone(),
        column: column.into(),
        message,
    })?;
    Ok(turns
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect::<Vec<_>>()
        .join(TURN_SEPARATOR))
}

fn parse_turns(raw: &str) -> Result<Vec<Option<String>>, String> {
    match serde_json::from_str::<Vec<Option<String>>>(raw) {
        Ok(turns) => Ok(turns),
        Err(e) => {
            // Some scraped Arena texts hold a lone UTF-16 surrogate escape (half an emoji). Python's json accepts
            // it; serde_json refuses. Replace such halves with U+FFFD rather than losing the row.
            let repaired = replace_lone_surrogates(raw);
            if repaired == raw {
                return Err(e.to_string());
            }
            serde_json::from_str(&repaired).map_err(|_| e.to_string())
        }
    }
}

/// Rewrites `\uD800`..`\uDFFF` escapes that do not form a high+low pair into `\uFFFD`.
fn replace_lone_surrogates(raw: &str) -> String {
    fn escape_at(b: &[u8], i: usize) -> Option<u16> {
        if b.len() >= i + 6 && b[i] == b'\\' && b[i + 1] == b'u' {
            std::str::from_utf8(&b[i + 2..i + 6])
                .ok()
                .and_then(|h| u16::from_str_radix(h, 16).ok())
        } else {
            None
        }
    }
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    let mut last = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            // Count the backslash run: an escaped backslash is not the start of an escape.
            if i + 1 < b.len() && b[i + 1] == b'\\' {
                i += 2;
                continue;
            }
            if let Some(u) = escape_at(b, i) {
                let high = (0xD800..0xDC00).contains(&u);
                let low = (0xDC00..0xE000).contains(&u);
                if high && escape_at(b, i + 6).is_some_and(|v| (0xDC00..0xE000).contains(&v)) {
                    i += 12;
                    continue;
                }
                if high || low {
                    out.push_str(&raw[last..i]);
                    out.push_str("\\uFFFD");
                    i += 6;
                    last = i;
                    continue;
                }
            }
        }
        i += 1;
    }
    out.push_str(&raw[last..]);
    out
}

/// Counts per label, in [`Label::ALL`] order.
pub fn label_counts<'a>(labels: impl IntoIterator<Item = &'a Label>) -> [usize; 3] {
    let mut counts = [0; 3];
    for label in labels {
        counts[label.index()] += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(text: &str) -> Result<Vec<Record>, DataError> {
        load_bytes("t.csv", Bytes::from(text.to_string()), Format::Auto).map(|d| d.records)
    }

    #[test]
    fn lmsys_turns_join_with_blank_line_and_null_is_empty() {
        let rows = csv(
            "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n\
             7,x,y,\"[\"\"hi\"\",\"\"again\"\"]\",\"[null,\"\"b\"\"]\",\"[\"\"c\"\"]\",0,0,1\n",
        )
        .unwrap();
        assert_eq!(rows[0].prompt, "hi\n\nagain");
        assert_eq!(rows[0].response_a, "\n\nb");
        assert_eq!(rows[0].label, Some(Label::Tie));
        assert_eq!(rows[0].id, "7");
        assert_eq!(rows[0].language, None);
    }

    #[test]
    fn wsdm_csv_with_optional_columns_absent() {
        let rows = csv("id,prompt,response_a,response_b,winner\na1,p,,b,model_b\n").unwrap();
        assert_eq!(rows[0].response_a, "");
        assert_eq!(rows[0].label, Some(Label::ModelB));
        assert_eq!(rows[0].model_a, None);
    }

    #[test]
    fn unlabelled_test_files_of_both_schemas_load_in_order() {
        let wsdm = load_bytes(
            "test.csv",
            Bytes::from("id,prompt,response_a,response_b,scored\nz9,p,a,b,False\na1,q,c,d,True\n"),
            Format::Auto,
        )
        .unwrap();
        assert_eq!((wsdm.format, wsdm.labelled), (Format::Wsdm, false));
        assert_eq!(wsdm.records[0].id, "z9");
        assert_eq!(wsdm.records[1].label, None);
        let lmsys = load_bytes(
            "test.csv",
            Bytes::from(
                "id,prompt,response_a,response_b\n7,\"[\"\"hi\"\"]\",\"[\"\"a\"\"]\",\"[null]\"\n",
            ),
            Format::Auto,
        )
        .unwrap();
        assert_eq!((lmsys.format, lmsys.labelled), (Format::Lmsys, false));
        assert_eq!(lmsys.records[0].prompt, "hi");
        let e = lmsys
            .require_labels("test.csv", "training needs labels")
            .unwrap_err()
            .to_string();
        assert!(e.contains("test.csv") && e.contains("no labels"), "{e}");
    }

    #[test]
    fn duplicate_columns_empty_files_and_binary_data_are_refused() {
        let dup = csv("id,prompt,prompt,response_a,response_b,winner\n1,p,p,a,b,model_a\n")
            .unwrap_err()
            .to_string();
        assert!(dup.contains("\"prompt\" appears more than once"), "{dup}");
        let empty = load_bytes("e.csv", Bytes::new(), Format::Auto).unwrap_err();
        assert!(empty.to_string().contains("e.csv: is empty"), "{empty}");
        let zeros = load_bytes("z.parquet", Bytes::from(vec![0u8; 100]), Format::Auto).unwrap_err();
        assert!(zeros.to_string().contains("neither parquet"), "{zeros}");
        // A CSV named .parquet is read as the CSV it is.
        let rows = load_bytes(
            "x.parquet",
            Bytes::from("id,prompt,response_a,response_b,winner\n1,p,a,b,model_a\n"),
            Format::Auto,
        )
        .unwrap();
        assert_eq!(rows.records.len(), 1);
    }

    #[test]
    fn duplicate_ids_are_listed_once() {
        let d = load_bytes(
            "d.csv",
            Bytes::from("id,prompt,response_a,response_b,winner\n1,p,a,b,model_a\n1,q,a,b,model_b\n1,r,a,b,tie\n2,s,a,b,tie\n"),
            Format::Auto,
        )
        .unwrap();
        assert_eq!(d.duplicate_ids(), vec!["1".to_string()]);
    }

    #[test]
    fn lone_surrogates_become_replacement_characters() {
        let turns = parse_turns(r#"["a\ud83d b", "\ud83d\ude0a", "\\ud83d"]"#).unwrap();
        assert_eq!(turns[0].as_deref(), Some("a\u{FFFD} b"));
        assert_eq!(turns[1].as_deref(), Some("😊"));
        assert_eq!(turns[2].as_deref(), Some("\\ud83d"));
    }

    #[test]
    fn one_hot_with_two_winners_is_rejected() {
        let err = csv(
            "id,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n\
             5,\"[\"\"p\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",1,1,0\n",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("t.csv")
                && msg.contains("row 1 (id 5)")
                && msg.contains("a=1, b=1, tie=0"),
            "{msg}"
        );
    }
}
