//! `prepare`: load → drop ties → subsample → split → truncate and tokenize (all cores) → write the cache.

use std::path::PathBuf;

use rayon::prelude::*;

use crate::cache::{
    CacheError, Counts, FileEntry, Manifest, PrepareSettings, PreparedSplit, RowMeta, SourceInfo,
    SplitCounts, TokenizerInfo, cache_key, sha256_file,
};
use crate::data::{DataError, Label, Record, load_bytes, load_file, read_data_file};
use crate::preprocess::{ConfigError, Example, preprocess_record};
use crate::split::{SplitError, stratified_sample, stratified_split};
use crate::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Split(#[from] SplitError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("{0}")]
    Settings(String),
    #[error(transparent)]
    Clean(#[from] crate::run_dir::RunDirError),
    #[error("{file}: row {row} (id {id}): {source}")]
    Row {
        file: String,
        row: usize,
        id: String,
        #[source]
        source: TokenizerError,
    },
}

/// The splits `prepare` writes.
pub const SPLITS: [&str; 3] = ["train", "val", "test"];

pub use crate::progress::{Progress, Silent};

#[derive(Debug, Clone)]
pub struct PrepareRequest {
    pub data: PathBuf,
    pub tokenizer: PathBuf,
    pub out: PathBuf,
    pub settings: PrepareSettings,
    /// Rebuild even when the cache is up to date.
    pub force: bool,
    /// Chunks each thread's tokenizer cache remembers (see [`Tokenizer::set_cache_capacity`]); speed only.
    pub token_cache_chunks: usize,
}

#[derive(Debug, Clone)]
pub struct Prepared {
    pub manifest: Manifest,
    /// The cache already matched the inputs and was kept as it was.
    pub reused: bool,
}

/// Runs the pipeline, or reuses `out` when its manifest has the same key (same source bytes, tokenizer bytes and
/// settings) and all its files are present.
pub fn prepare(req: &PrepareRequest, progress: &dyn Progress) -> Result<Prepared, PrepareError> {
    req.settings.preprocess.validate()?;
    req.settings.ratios.validate()?;
    let s = req.settings.sample_percent;
    if !(s > 0.0 && s <= 100.0) {
        return Err(PrepareError::Settings(format!(
            "sample percent {s} is outside (0, 100]"
        )));
    }
    // Read once: a pipe cannot be read a second time, and the hash must be of the bytes that are loaded.
    let data = read_data_file(&req.data)?;
    let source_sha = crate::cache::sha256_hex(&data);
    let source_bytes = data.len() as u64;
    let (tok_sha, _) = sha256_file(&req.tokenizer).map_err(|e| match e {
        CacheError::Io { source, .. } => PrepareError::Tokenizer(TokenizerError::Read {
            file: req.tokenizer.display().to_string(),
            message: source.to_string(),
        }),
        other => other.into(),
    })?;
    // An interrupted earlier run may have left `.NAME.tmp-PID` files behind.
    if req.out.is_dir() {
        crate::run_dir::remove_stale_temporaries(&req.out)?;
    }
    let key = cache_key(&source_sha, &tok_sha, &req.settings);
    if !req.force
        && let Ok(manifest) = Manifest::read(&req.out)
        && manifest.key == key
        && manifest.files_present(&req.out)
    {
        return Ok(Prepared {
            manifest,
            reused: true,
        });
    }

    // The manifest records where the data came from; later commands may run from another directory.
    let file = std::path::absolute(&req.data)
        .unwrap_or_else(|_| req.data.clone())
        .display()
        .to_string();
    progress.start("loading", 0);
    let clock = std::time::Instant::now();
    // Parsing the 17 MB tokenizer.json and decoding the data file are independent; do them side by side.
    let (dataset, tokenizer) = rayon::join(
        || load_bytes(&file, data, req.settings.format),
        || Tokenizer::from_file(&req.tokenizer),
    );
    let (dataset, mut tokenizer) = (dataset?, tokenizer?);
    let format = dataset.format;
    let records =
        dataset.require_labels(&file, "prepare splits by label, and training needs labels")?;
    tokenizer.set_cache_capacity(req.token_cache_chunks);
    progress.finish();
    tracing::info!(
        rows = records.len(),
        seconds = clock.elapsed().as_secs_f64(),
        "loaded data and tokenizer"
    );

    let rows_read = records.len();
    let (records, ties_dropped) = drop_ties(records, req.settings.keep_ties);
    if records.is_empty() {
        return Err(DataError::NoRows {
            file,
            reason: format!("after dropping {ties_dropped} ties"),
        }
        .into());
    }
    let (kept, splits) = choose_rows(&records, &req.settings)?;

    progress.start("tokenizing", kept.len() as u64);
    let examples: Vec<Example> =
        kept.par_iter()
            .map(|&i| {
                let r = &records[i];
                let out = preprocess_record(&tokenizer, &req.settings.preprocess, r, false)
                    .map_err(|source| PrepareError::Row {
                        file: file.clone(),
                        row: i + 1,
                        id: r.id.clone(),
                        source,
                    });
                progress.inc(1);
                out
            })
            .collect::<Result<_, _>>()?;
    progress.finish();
    tracing::info!(
        rows = examples.len(),
        seconds = clock.elapsed().as_secs_f64(),
        "tokenized"
    );

    std::fs::create_dir_all(&req.out).map_err(|source| CacheError::Io {
        path: req.out.clone(),
        source,
    })?;
    let mut files: Vec<FileEntry> = Vec::new();
    let mut split_counts = Vec::new();
    for (name, idx) in splits.named() {
        let mut split = PreparedSplit::with_capacity(idx.len());
        for &k in idx {
            let (r, e) = (&records[kept[k]], &examples[k]);
            split.push(row_meta(r, e), &e.input_ids);
        }
        let [a, b, t] = split.label_counts();
        split_counts.push((
            name.to_string(),
            SplitCounts {
                rows: split.len(),
                model_a: a,
                model_b: b,
                tie: t,
                tokens: split.total_tokens(),
                cut_at_max_length: split.rows.iter().filter(|r| r.cut).count(),
                snipped: split
                    .rows
                    .iter()
                    .filter(|r| r.snipped.iter().any(|&s| s))
                    .count(),
            },
        ));
        files.push(split.write(&req.out.join(format!("{name}.bin")))?);
    }
    let manifest = Manifest {
        version: crate::cache::CACHE_VERSION,
        key,
        source: SourceInfo {
            path: file,
            sha256: source_sha,
            bytes: source_bytes,
            format,
        },
        tokenizer: TokenizerInfo {
            path: req.tokenizer.display().to_string(),
            sha256: tok_sha,
            engine: tokenizer.engine_name().into(),
        },
        settings: req.settings.clone(),
        counts: Counts {
            rows_read,
            ties_dropped,
            rows_after_sample: kept.len(),
            splits: split_counts,
        },
        files,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    manifest.write(&req.out)?;
    tracing::info!(seconds = clock.elapsed().as_secs_f64(), "cache written");
    Ok(Prepared {
        manifest,
        reused: false,
    })
}

/// The seeded subsample (indices into `records`, ties already dropped) and its train/val/test split, indices
/// into the subsample.
fn choose_rows(
    records: &[Record],
    settings: &PrepareSettings,
) -> Result<(Vec<usize>, crate::split::Splits), PrepareError> {
    let labels: Vec<Label> = records.iter().map(label).collect();
    let kept = if settings.sample_percent < 100.0 {
        stratified_sample(&labels, settings.sample_percent, settings.seed)?
    } else {
        (0..records.len()).collect()
    };
    let kept_labels: Vec<Label> = kept.iter().map(|&i| labels[i]).collect();
    let splits = stratified_split(&kept_labels, settings.ratios, settings.seed)?;
    Ok((kept, splits))
}

/// The records of one split (`train`, `val` or `test`) of a data file, exactly the rows and order `prepare`
/// writes for the same settings. Evaluation uses it to get the text back (to score swapped pairs).
pub fn split_records(
    data: &std::path::Path,
    settings: &PrepareSettings,
    split: &str,
) -> Result<Vec<Record>, PrepareError> {
    if !SPLITS.contains(&split) {
        return Err(PrepareError::Settings(format!(
            "unknown split {split:?}; expected one of {}",
            SPLITS.join(", ")
        )));
    }
    let file = data.display().to_string();
    let records = load_file(data, settings.format)?
        .require_labels(&file, "evaluating a split needs labels")?;
    let (records, ties_dropped) = drop_ties(records, settings.keep_ties);
    if records.is_empty() {
        return Err(DataError::NoRows {
            file: data.display().to_string(),
            reason: format!("after dropping {ties_dropped} ties"),
        }
        .into());
    }
    let (kept, splits) = choose_rows(&records, settings)?;
    let idx = splits
        .named()
        .into_iter()
        .find(|(name, _)| *name == split)
        .map(|(_, idx)| idx.to_vec())
        .unwrap_or_default();
    Ok(idx.into_iter().map(|k| records[kept[k]].clone()).collect())
}

/// Removes ties unless they are kept as a class; returns the rows and how many were dropped.
pub fn drop_ties(records: Vec<Record>, keep_ties: bool) -> (Vec<Record>, usize) {
    if keep_ties {
        return (records, 0);
    }
    let before = records.len();
    let kept: Vec<Record> = records
        .into_iter()
        .filter(|r| r.label != Some(Label::Tie))
        .collect();
    let dropped = before - kept.len();
    (kept, dropped)
}

/// A record's label. `prepare` and `split_records` take only labelled files ([`crate::data::Dataset::require_labels`]),
/// so every record they see has one.
fn label(r: &Record) -> Label {
    r.label.unwrap_or(Label::Tie)
}

fn row_meta(r: &Record, e: &Example) -> RowMeta {
    RowMeta {
        id: r.id.clone(),
        label: label(r),
        language: r.language.clone(),
        model_a: r.model_a.clone(),
        model_b: r.model_b.clone(),
        field_tokens: e.field_tokens,
        snipped: e.snipped,
        cut: e.cut,
    }
}
