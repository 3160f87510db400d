//! The prepared-data cache written by `trainer prepare` and read by later commands.
//!
//! A cache directory holds `manifest.json` and one `<split>.bin` per split. A split file is
//! `MAGIC`, a little-endian `u64` length and that many bytes of JSON row metadata, then `u64` row count, `u64`
//! offsets (`rows + 1`) and the `u32` token ids of all rows back to back. Every file is written to a temporary
//! name and renamed, and the manifest goes last: a directory with a manifest is complete.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::{Format, Label};
use crate::preprocess::PreprocessConfig;
use crate::split::SplitRatios;
use crate::tokenizer::hex;

const MAGIC: &[u8; 8] = b"AJPREP01";
pub const MANIFEST: &str = "manifest.json";
/// Bumped whenever the cache layout or the preprocessing changes meaning.
pub const CACHE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid prepared-data file: {message}")]
    Corrupt { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Everything that decides a cache's content besides the two input files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareSettings {
    pub format: Format,
    /// Percent of each class kept before splitting (100 keeps all).
    pub sample_percent: f64,
    pub seed: u64,
    pub ratios: SplitRatios,
    pub preprocess: PreprocessConfig,
    /// Keep ties as a third class instead of dropping them (binary training drops them).
    pub keep_ties: bool,
}

impl Default for PrepareSettings {
    fn default() -> Self {
        Self {
            format: Format::Auto,
            sample_percent: 100.0,
            seed: 42,
            ratios: SplitRatios::default(),
            preprocess: PreprocessConfig::default(),
            keep_ties: false,
        }
    }
}

/// Per-row metadata kept beside the token ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowMeta {
    pub id: String,
    pub label: Label,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_a: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_b: Option<String>,
    /// Tokens of prompt, response A, response B before truncation.
    pub field_tokens: [usize; 3],
    pub snipped: [bool; 3],
    /// The templated text exceeded `max_length`.
    pub cut: bool,
}

/// One split in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PreparedSplit {
    pub rows: Vec<RowMeta>,
    offsets: Vec<u64>,
    ids: Vec<u32>,
}

impl PreparedSplit {
    pub fn with_capacity(rows: usize) -> Self {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        Self {
            rows: Vec::with_capacity(rows),
            offsets,
            ids: Vec::new(),
        }
    }

    pub fn push(&mut self, meta: RowMeta, input_ids: &[u32]) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        self.rows.push(meta);
        self.ids.extend_from_slice(input_ids);
        self.offsets.push(self.ids.len() as u64);
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Input ids of row `i` (BOS … EOS).
    pub fn input_ids(&self, i: usize) -> &[u32] {
        &self.ids[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    pub fn total_tokens(&self) -> usize {
        self.ids.len()
    }

    pub fn label_counts(&self) -> [usize; 3] {
        crate::data::label_counts(self.rows.iter().map(|r| &r.label))
    }

    pub fn write(&self, path: &Path) -> Result<FileEntry, CacheError> {
        let meta = serde_json::to_vec(&self.rows).map_err(|e| CacheError::Corrupt {
            path: path.into(),
            message: e.to_string(),
        })?;
        let mut buf = Vec::with_capacity(
            8 + 8 + meta.len() + 8 + self.offsets.len() * 8 + self.ids.len() * 4,
        );
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        buf.extend_from_slice(&meta);
        buf.extend_from_slice(&(self.rows.len() as u64).to_le_bytes());
        for o in &self.offsets {
            buf.extend_from_slice(&o.to_le_bytes());
        }
        for id in &self.ids {
            buf.extend_from_slice(&id.to_le_bytes());
        }
        write_atomic(path, &buf)?;
        Ok(FileEntry {
            file: path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes: buf.len() as u64,
            sha256: hex(&Sha256::digest(&buf)),
        })
    }

    pub fn read(path: &Path) -> Result<Self, CacheError> {
        let buf = std::fs::read(path).map_err(io(path))?;
        Self::from_bytes(path, &buf)
    }

    /// Parses a split file's bytes; `path` only names it in errors.
    pub fn from_bytes(path: &Path, buf: &[u8]) -> Result<Self, CacheError> {
        let corrupt = |message: &str| CacheError::Corrupt {
            path: path.into(),
            message: message.into(),
        };
        let mut r = Reader { buf, pos: 0 };
        if r.take(8).ok_or_else(|| corrupt("too short"))? != MAGIC {
            return Err(corrupt("wrong magic bytes"));
        }
        let meta_len = r.u64().ok_or_else(|| corrupt("truncated header"))? as usize;
        let meta = r
            .take(meta_len)
            .ok_or_else(|| corrupt("truncated row metadata"))?;
        let rows: Vec<RowMeta> =
            serde_json::from_slice(meta).map_err(|e| corrupt(&e.to_string()))?;
        let n = r.u64().ok_or_else(|| corrupt("truncated row count"))? as usize;
        if n != rows.len() {
            return Err(corrupt("row count does not match the metadata"));
        }
        let offsets: Vec<u64> = (0..=n)
            .map(|_| r.u64())
            .collect::<Option<_>>()
            .ok_or_else(|| corrupt("truncated offsets"))?;
        let total = *offsets.last().unwrap_or(&0) as usize;
        if offsets.first() != Some(&0) || offsets.windows(2).any(|w| w[0] > w[1]) {
            return Err(corrupt("offsets are not increasing"));
        }
        let raw = r
            .take(total * 4)
            .ok_or_else(|| corrupt("truncated token ids"))?;
        if r.pos != buf.len() {
            return Err(corrupt("trailing bytes"));
        }
        let ids = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Self { rows, offsets, ids })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }
}

/// A file of the cache, as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
    /// The schema actually found (`wsdm` or `lmsys`).
    pub format: Format,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    pub path: String,
    pub sha256: String,
    pub engine: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCounts {
    pub rows: usize,
    pub model_a: usize,
    pub model_b: usize,
    pub tie: usize,
    pub tokens: usize,
    /// Rows whose templated text was cut at `max_length`.
    pub cut_at_max_length: usize,
    /// Rows with at least one field snipped by smart truncation.
    pub snipped: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub rows_read: usize,
    pub ties_dropped: usize,
    pub rows_after_sample: usize,
    pub splits: Vec<(String, SplitCounts)>,
}

/// `manifest.json`: what the cache was made from and what it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// Hash of version, source hash, tokenizer hash and settings: equal keys mean an equal cache.
    pub key: String,
    pub source: SourceInfo,
    pub tokenizer: TokenizerInfo,
    pub settings: PrepareSettings,
    pub counts: Counts,
    pub files: Vec<FileEntry>,
    pub created_unix: u64,
}

/// The cache key for these inputs.
pub fn cache_key(
    source_sha256: &str,
    tokenizer_sha256: &str,
    settings: &PrepareSettings,
) -> String {
    let mut h = Sha256::new();
    h.update(CACHE_VERSION.to_le_bytes());
    h.update(source_sha256.as_bytes());
    h.update(tokenizer_sha256.as_bytes());
    h.update(serde_json::to_vec(settings).unwrap_or_default());
    hex(&h.finalize())
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Self, CacheError> {
        let path = dir.join(MANIFEST);
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        serde_json::from_slice(&bytes).map_err(|e| CacheError::Corrupt {
            path,
            message: e.to_string(),
        })
    }

    pub fn write(&self, dir: &Path) -> Result<(), CacheError> {
        let path = dir.join(MANIFEST);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| CacheError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&path, &bytes)
    }

    /// Whether every file the manifest lists is present with its recorded size.
    pub fn files_present(&self, dir: &Path) -> bool {
        self.files
            .iter()
            .all(|f| std::fs::metadata(dir.join(&f.file)).is_ok_and(|m| m.len() == f.bytes))
    }

    /// Reads one split (`train`, `val` or `test`), checking its hash against the manifest.
    pub fn load_split(&self, dir: &Path, split: &str) -> Result<PreparedSplit, CacheError> {
        let name = format!("{split}.bin");
        let path = dir.join(&name);
        let entry =
            self.files
                .iter()
                .find(|f| f.file == name)
                .ok_or_else(|| CacheError::Corrupt {
                    path: dir.join(MANIFEST),
                    message: format!("no split {split:?} in the manifest"),
                })?;
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        if hex(&Sha256::digest(&bytes)) != entry.sha256 {
            return Err(CacheError::Corrupt {
                path,
                message: "content does not match the manifest's sha256".into(),
            });
        }
        PreparedSplit::from_bytes(&path, &bytes)
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory, flushed before the rename, so readers
/// see the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io(path))
}

/// sha256 of bytes in memory, as hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<(String, u64), CacheError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
    Ok((hex(&h.finalize()), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str) -> RowMeta {
        RowMeta {
            id: id.into(),
            label: Label::ModelB,
            language: None,
            model_a: None,
            model_b: None,
            field_tokens: [1, 2, 3],
            snipped: [false; 3],
            cut: false,
        }
    }

    #[test]
    fn split_file_round_trips_and_detects_truncation() {
        let dir = std::env::temp_dir().join(format!("aj-cache-{}", std::process::id()));
        let mut s = PreparedSplit::with_capacity(2);
        s.push(meta("a"), &[2, 10, 11, 1]);
        s.push(meta("b"), &[2, 1]);
        let path = dir.join("train.bin");
        let entry = s.write(&path).unwrap();
        assert_eq!(entry.bytes, std::fs::metadata(&path).unwrap().len());
        let back = PreparedSplit::read(&path).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.input_ids(1), &[2, 1]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = PreparedSplit::read(&path).unwrap_err().to_string();
        assert!(
            err.contains("train.bin") && err.contains("truncated"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
