//! Reading Hugging Face safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`; f32, bf16 or f16 (converted to f32 on the way in), or the web bundle's packed
//! forms (see [`super::quant`]): int8 with a per-row scale (`key` holds i8 values and `key_scale` one f16 or f32
//! scale per row) and q4 (`key` holds u32 words of eight 4-bit values, `key_scale` one f16 per block of 32).

use std::collections::BTreeMap;

use safetensors::Dtype;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{file}: cannot read: {message}")]
    Io { file: String, message: String },
    #[error("{file}: not a valid safetensors file: {message}")]
    Safetensors { file: String, message: String },
    #[error("{file}: not a valid index: {message}")]
    Index { file: String, message: String },
    #[error("{file}: the bundle has no {format} weights (it has {listed})")]
    NoFormat {
        file: String,
        format: String,
        listed: String,
    },
    #[error("{dir}: no model.safetensors and no model.safetensors.index.json")]
    NoWeights { dir: String },
    #[error("checkpoint is missing tensor {key:?} (expected shape {expected:?})")]
    Missing { key: String, expected: Vec<usize> },
    #[error("checkpoint has unexpected tensor(s): {keys}")]
    Unexpected { keys: String },
    #[error("tensor {key:?} has shape {actual:?}, expected {expected:?}")]
    Shape {
        key: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error(
        "tensor {key:?} holds {count} non-finite value(s) (the first, at flat index {index}, is {value}): the checkpoint is damaged or training diverged"
    )]
    NonFinite {
        key: String,
        count: usize,
        index: usize,
        value: f32,
    },
    #[error(
        "{file}: tensor {key:?} has dtype {dtype}, expected F32, BF16, F16, or I8 or U32 (q4) with a _scale"
    )]
    Dtype {
        file: String,
        key: String,
        dtype: String,
    },
}

/// Fails on the first NaN or infinity of `values`: a model with one would score every row NaN.
pub fn check_finite(key: &str, values: impl IntoIterator<Item = f32>) -> Result<(), WeightsError> {
    let mut first = None;
    let mut count = 0;
    for (i, v) in values.into_iter().enumerate() {
        if !v.is_finite() {
            count += 1;
            first.get_or_insert((i, v));
        }
    }
    match first {
        None => Ok(()),
        Some((index, value)) => Err(WeightsError::NonFinite {
            key: key.into(),
            count,
            index,
            value,
        }),
    }
}

/// Suffix of the per-row scale of an int8 tensor.
pub const SCALE_SUFFIX: &str = "_scale";

/// The tensors of a checkpoint, by Hugging Face key.
pub struct Checkpoint {
    shards: Vec<Shard>,
    /// Key → shard index.
    keys: BTreeMap<String, usize>,
}

/// One safetensors file: its bytes and its parsed header.
struct Shard {
    file: String,
    bytes: Vec<u8>,
    tensors: BTreeMap<String, Entry>,
    /// Where the data section starts (after the 8-byte length and the JSON header).
    data_start: usize,
}

/// A tensor's entry in a safetensors header.
#[derive(serde::Deserialize)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range within the data section.
    data_offsets: [u64; 2],
}

/// A tensor's dtype, shape and bytes.
struct View<'a> {
    dtype: Dtype,
    data: &'a [u8],
}

impl Shard {
    /// Parses the header of a safetensors file: an 8-byte little-endian length, then a JSON object of tensor
    /// entries (and an optional `__metadata__`). Our own reader rather than the `safetensors` crate's: that one
    /// counts a tensor's size in bits in a `usize`, which overflows on wasm32 for a tensor of over 512M values
    /// (gemma-2-2b's embedding has 590M). Sizes here are counted in u64.
    fn parse(file: String, bytes: Vec<u8>) -> Result<Self, WeightsError> {
        let bad = |message: String| WeightsError::Safetensors {
            file: file.clone(),
            message,
        };
        let len: [u8; 8] = bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("shorter than its 8-byte header length".into()))?;
        let header_len = u64::from_le_bytes(len);
        let data_start = 8u64
            .checked_add(header_len)
            .filter(|&end| end <= bytes.len() as u64)
            .ok_or_else(|| {
                bad(format!(
                    "header length {header_len} runs past the file's end"
                ))
            })? as usize;
        let data_len = (bytes.len() - data_start) as u64;
        let tensors = parse_header(&file, &bytes[8..data_start], Some(data_len))?;
        Ok(Self {
            file,
            bytes,
            tensors,
            data_start,
        })
    }
}

/// The tensor entries of a safetensors JSON header, each checked: its byte count matches its shape and dtype, and
/// (when the data section's length is known) it lies inside the data section.
fn parse_header(
    file: &str,
    header: &[u8],
    data_len: Option<u64>,
) -> Result<BTreeMap<String, Entry>, WeightsError> {
    let bad = |message: String| WeightsError::Safetensors {
        file: file.into(),
        message,
    };
    let mut values: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    values.remove("__metadata__");
    let mut tensors = BTreeMap::new();
    for (name, value) in values {
        let entry: Entry =
            serde_json::from_value(value).map_err(|e| bad(format!("tensor {name:?}: {e}")))?;
        let [start, end] = entry.data_offsets;
        if start > end || data_len.is_some_and(|len| end > len) {
            return Err(bad(format!(
                "tensor {name:?}: data {start}..{end} is outside the {}-byte data section",
                data_len.unwrap_or(0)
            )));
        }
        if let Some(size) = dtype_bytes(entry.dtype) {
            let want = entry
                .shape
                .iter()
                .try_fold(size, |n, &d| n.checked_mul(d as u64));
            if want != Some(end - start) {
                return Err(bad(format!(
                    "tensor {name:?}: {} bytes for shape {:?} of {:?}",
                    end - start,
                    entry.shape,
                    entry.dtype
                )));
            }
        }
        tensors.insert(name, entry);
    }
    Ok(tensors)
}

/// A tensor as a safetensors file stores it: the input of [`super::load::Loader`].
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub key: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// A safetensors header larger than this is taken for damage (gemma-2-2b's packed header is about 40 KB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Reads a safetensors file as it arrives, chunk by chunk, and hands out each tensor as soon as its last byte is
/// in: a download never has to be held whole. Tensors come out in the order of their data.
pub struct StreamReader {
    file: String,
    /// Bytes before the data section (length and header) while it is incomplete.
    head: Vec<u8>,
    header_read: bool,
    /// The tensors in data order, once the header is read, and the next one to fill.
    entries: Vec<(String, Entry)>,
    next: usize,
    /// Bytes of the data section consumed so far.
    pos: u64,
    /// The tensor being filled.
    current: Vec<u8>,
}

impl StreamReader {
    pub fn new(file: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            head: Vec::new(),
            header_read: false,
            entries: Vec::new(),
            next: 0,
            pos: 0,
            current: Vec::new(),
        }
    }

    fn bad(&self, message: String) -> WeightsError {
        WeightsError::Safetensors {
            file: self.file.clone(),
            message,
        }
    }

    /// Takes the next chunk of the file; returns the tensors it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<RawTensor>, WeightsError> {
        if self.header_read {
            return self.push_data(chunk);
        }
        // Still in the length or the header.
        self.head.extend_from_slice(chunk);
        let Some(len) = self.head.get(..8) else {
            return Ok(Vec::new());
        };
        let header_len = u64::from_le_bytes(len.try_into().unwrap_or([0; 8]));
        if header_len > MAX_HEADER_BYTES {
            return Err(self.bad(format!("header length {header_len} is not plausible")));
        }
        let data_start = 8 + header_len as usize;
        if self.head.len() < data_start {
            return Ok(Vec::new());
        }
        let tensors = parse_header(&self.file, &self.head[8..data_start], None)?;
        let mut entries: Vec<(String, Entry)> = tensors.into_iter().collect();
        entries.sort_by_key(|(_, e)| e.data_offsets);
        for pair in entries.windows(2) {
            if pair[1].1.data_offsets[0] < pair[0].1.data_offsets[1] {
                return Err(self.bad(format!(
                    "tensors {:?} and {:?} overlap",
                    pair[0].0, pair[1].0
                )));
            }
        }
        self.entries = entries;
        self.header_read = true;
        let rest = std::mem::take(&mut self.head).split_off(data_start);
        self.push_data(&rest)
    }

    fn push_data(&mut self, mut chunk: &[u8]) -> Result<Vec<RawTensor>, WeightsError> {
        let mut done = Vec::new();
        while !chunk.is_empty() {
            let Some((name, entry)) = self.entries.get(self.next) else {
                // Bytes after the last tensor: ignored, as a whole-file reader would.
                self.pos += chunk.len() as u64;
                break;
            };
            let [start, end] = entry.data_offsets;
            if self.pos < start {
                // A gap before this tensor.
                let skip = (start - self.pos).min(chunk.len() as u64) as usize;
                self.pos += skip as u64;
                chunk = &chunk[skip..];
                continue;
            }
            if self.current.capacity() == 0 {
                self.current = Vec::with_capacity((end - start) as usize);
            }
            let take = (end - self.pos).min(chunk.len() as u64) as usize;
            self.current.extend_from_slice(&chunk[..take]);
            self.pos += take as u64;
            chunk = &chunk[take..];
            if self.pos == end {
                done.push(RawTensor {
                    key: name.clone(),
                    dtype: entry.dtype,
                    shape: entry.shape.clone(),
                    bytes: std::mem::take(&mut self.current),
                });
                self.next += 1;
            }
        }
        Ok(done)
    }

    /// Checks that the file held every tensor its header lists.
    pub fn finish(self) -> Result<(), WeightsError> {
        if !self.header_read {
            return Err(self.bad(if self.head.len() < 8 {
                "shorter than its 8-byte header length".into()
            } else {
                "ends inside its header".into()
            }));
        }
        match self.entries.get(self.next) {
            Some((name, entry)) => Err(self.bad(format!(
                "ends at data byte {} inside tensor {name:?} ({}..{})",
                self.pos, entry.data_offsets[0], entry.data_offsets[1]
            ))),
            None => Ok(()),
        }
    }
}

/// Bytes per value of the dtypes a checkpoint may hold (`None`: not one we read).
fn dtype_bytes(dtype: Dtype) -> Option<u64> {
    match dtype {
        Dtype::F64 | Dtype::I64 | Dtype::U64 => Some(8),
        Dtype::F32 | Dtype::I32 | Dtype::U32 => Some(4),
        Dtype::F16 | Dtype::BF16 | Dtype::I16 | Dtype::U16 => Some(2),
        Dtype::I8 | Dtype::U8 | Dtype::BOOL => Some(1),
        _ => None,
    }
}

/// The `weight_map` of a sharded checkpoint's index.
#[cfg(feature = "native")]
#[derive(serde::Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Reads `dir/model.safetensors`, or every shard named by `dir/model.safetensors.index.json`, or a web
    /// bundle's weights: those in `format` (`f16`, `int8`, `q4`), or the first its `manifest.json` lists.
    #[cfg(feature = "native")]
    pub fn open_dir(dir: &std::path::Path, format: Option<&str>) -> Result<Self, WeightsError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| WeightsError::Io {
                file: p.display().to_string(),
                message: e.to_string(),
            })
        };
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::from_files(vec![(single.display().to_string(), read(&single)?)]);
        }
        let index_path = dir.join("model.safetensors.index.json");
        // A web bundle (`trainer export`'s web/): the weights in `format`, or the first its manifest lists.
        let manifest = dir.join(crate::bundle::BUNDLE_MANIFEST);
        if !index_path.is_file() && manifest.is_file() {
            let bundle: crate::bundle::BundleManifest = serde_json::from_slice(&read(&manifest)?)
                .map_err(|e| WeightsError::Index {
                file: manifest.display().to_string(),
                message: e.to_string(),
            })?;
            let listed = || {
                let names: Vec<&str> = bundle.weights.iter().map(|w| w.format.name()).collect();
                names.join(", ")
            };
            let picked = match format {
                Some(f) => bundle
                    .weights
                    .iter()
                    .find(|w| w.format.name() == f)
                    .ok_or_else(|| WeightsError::NoFormat {
                        file: manifest.display().to_string(),
                        format: f.into(),
                        listed: listed(),
                    })?,
                None => bundle.weights.first().ok_or_else(|| WeightsError::Index {
                    file: manifest.display().to_string(),
                    message: "lists no weights".into(),
                })?,
            };
            let p = dir.join(&picked.file);
            return Self::from_files(vec![(p.display().to_string(), read(&p)?)]);
        }
        if format.is_some() {
            return Err(WeightsError::NoWeights {
                dir: format!(
                    "{} (a weight format is chosen only in a web bundle, which has a manifest.json)",
                    dir.display()
                ),
            });
        }
        if !index_path.is_file() {
            return Err(WeightsError::NoWeights {
                dir: dir.display().to_string(),
            });
        }
        let index: Index =
            serde_json::from_slice(&read(&index_path)?).map_err(|e| WeightsError::Index {
                file: index_path.display().to_string(),
                message: e.to_string(),
            })?;
        let files: std::collections::BTreeSet<&String> = index.weight_map.values().collect();
        let mut shards = Vec::new();
        for f in files {
            let p = dir.join(f);
            shards.push((p.display().to_string(), read(&p)?));
        }
        let checkpoint = Self::from_files(shards)?;
        for (key, file) in &index.weight_map {
            if !checkpoint.keys.contains_key(key) {
                return Err(WeightsError::Index {
                    file: index_path.display().to_string(),
                    message: format!("{key:?} is listed in {file} but not stored there"),
                });
            }
        }
        Ok(checkpoint)
    }

    /// A checkpoint from in-memory safetensors files (the browser fetches them).
    pub fn from_files(files: Vec<(String, Vec<u8>)>) -> Result<Self, WeightsError> {
        let mut keys = BTreeMap::new();
        let mut shards = Vec::with_capacity(files.len());
        for (i, (file, bytes)) in files.into_iter().enumerate() {
            let shard = Shard::parse(file, bytes)?;
            for name in shard.tensors.keys() {
                keys.insert(name.clone(), i);
            }
            shards.push(shard);
        }
        Ok(Self { shards, keys })
    }

    /// Every tensor, copied out, in key order.
    pub fn raw_tensors(&self) -> impl Iterator<Item = RawTensor> + '_ {
        self.shards.iter().flat_map(|shard| {
            shard.tensors.iter().map(|(key, entry)| {
                let [start, end] = entry.data_offsets.map(|o| shard.data_start + o as usize);
                RawTensor {
                    key: key.clone(),
                    dtype: entry.dtype,
                    shape: entry.shape.clone(),
                    bytes: shard.bytes[start..end].to_vec(),
                }
            })
        })
    }

    /// Tensor names; an int8 tensor's `_scale` companion is part of it, not a key of its own.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str).filter(|k| {
            k.strip_suffix(SCALE_SUFFIX)
                .is_none_or(|base| !self.keys.contains_key(base))
        })
    }

    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// The tensor `key` as f32 values (packed ones times their scales), checked against `expected` shape.
    pub fn f32(&self, key: &str, expected: &[usize]) -> Result<Vec<f32>, WeightsError> {
        let (file, view) = self.view(key, expected)?;
        let values = RawTensor {
            key: key.into(),
            dtype: view.dtype,
            shape: expected.to_vec(),
            bytes: view.data.to_vec(),
        };
        let scale = self.raw(&format!("{key}{SCALE_SUFFIX}"));
        super::load::decode(key, &values, scale.as_ref(), expected).map_err(|e| match e {
            WeightsError::Dtype { key, dtype, .. } => WeightsError::Dtype {
                file: file.into(),
                key,
                dtype,
            },
            other => other,
        })
    }

    /// The tensor `key` as stored, if there is one.
    pub fn raw(&self, key: &str) -> Option<RawTensor> {
        let shard = &self.shards[*self.keys.get(key)?];
        let entry = shard.tensors.get(key)?;
        let [start, end] = entry.data_offsets.map(|o| shard.data_start + o as usize);
        Some(RawTensor {
            key: key.into(),
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            bytes: shard.bytes[start..end].to_vec(),
        })
    }

    /// The file holding `key` and the tensor, checked against `expected` shape.
    fn view(&self, key: &str, expected: &[usize]) -> Result<(&str, View<'_>), WeightsError> {
        let Some(&i) = self.keys.get(key) else {
            return Err(WeightsError::Missing {
                key: key.into(),
                expected: expected.to_vec(),
            });
        };
        let shard = &self.shards[i];
        let Some(entry) = shard.tensors.get(key) else {
            return Err(WeightsError::Missing {
                key: key.into(),
                expected: expected.to_vec(),
            });
        };
        // q4 words hold eight values each: `[rows, cols]` is stored as `[rows, cols / 8]`.
        let stored: Vec<usize> = match (entry.dtype, expected) {
            (Dtype::U32, &[rows, cols]) if cols.is_multiple_of(8) => vec![rows, cols / 8],
            _ => expected.to_vec(),
        };
        if entry.shape != stored {
            return Err(WeightsError::Shape {
                key: key.into(),
                expected: expected.to_vec(),
                actual: entry.shape.clone(),
            });
        }
        // In range: checked when the header was parsed.
        let [start, end] = entry.data_offsets.map(|o| shard.data_start + o as usize);
        Ok((
            &shard.file,
            View {
                dtype: entry.dtype,
                data: &shard.bytes[start..end],
            },
        ))
    }
}

#[cfg(all(test, feature = "native"))]
mod tests {
    use super::*;
    use crate::export::{WeightFormat, serialize};

    /// A safetensors file from a header (JSON) and a data section.
    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn open(bytes: Vec<u8>) -> Result<Checkpoint, WeightsError> {
        Checkpoint::from_files(vec![("m.safetensors".into(), bytes)])
    }

    #[test]
    fn the_header_reader_checks_sizes_and_ranges() {
        let ok = file(
            r#"{"__metadata__":{"format":"pt"},"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            &[0, 0, 128, 63, 0, 0, 0, 64],
        );
        assert_eq!(open(ok).unwrap().f32("t", &[2]).unwrap(), [1.0, 2.0]);
        let err = |bytes| open(bytes).err().expect("must fail").to_string();
        // 8 bytes cannot hold 3 f32 values.
        let e = err(file(
            r#"{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ));
        assert!(
            e.contains("m.safetensors") && e.contains("\"t\"") && e.contains("shape [3]"),
            "{e}"
        );
        // A 600M-value int8 tensor (gemma-2-2b's embedding is 590M): sized in u64, so the error is the missing
        // data, not an overflow.
        let e = err(file(
            r#"{"t":{"dtype":"I8","shape":[600000000],"data_offsets":[0,600000000]}}"#,
            &[0; 8],
        ));
        assert!(e.contains("outside the 8-byte data section"), "{e}");
        let e = err(vec![1, 0, 0]);
        assert!(e.contains("shorter than its 8-byte header length"), "{e}");
        let e = err(file("{not json", &[]));
        assert!(e.contains("not valid JSON"), "{e}");
        let mut past = file("{}", &[]);
        past[0] = 200;
        assert!(err(past).contains("runs past the file's end"));
    }

    #[test]
    fn a_file_read_in_chunks_gives_every_tensor_whole_and_a_cut_file_is_named() {
        let tensors = vec![
            (
                "a".to_string(),
                vec![4, 64],
                (0..256).map(|i| i as f32 * 0.01).collect(),
            ),
            ("b".to_string(), vec![3], vec![1.0, 2.0, 3.0]),
            (
                "c".to_string(),
                vec![2, 32],
                (0..64).map(|i| -(i as f32)).collect(),
            ),
        ];
        for format in [WeightFormat::F16, WeightFormat::Int8, WeightFormat::Q4] {
            let bytes = serialize(&tensors, format).unwrap();
            let whole: Vec<RawTensor> = open(bytes.clone()).unwrap().raw_tensors().collect();
            // Chunks of 1, 7 and 1000 bytes: a chunk may end inside the length, the header or a tensor.
            for size in [1, 7, 1000] {
                let mut reader = StreamReader::new("m.safetensors");
                let mut got = Vec::new();
                for chunk in bytes.chunks(size) {
                    got.extend(reader.push(chunk).unwrap());
                }
                reader.finish().unwrap();
                got.sort_by(|a, b| a.key.cmp(&b.key));
                assert_eq!(got.len(), whole.len(), "{format:?}");
                for (g, w) in got.iter().zip(&whole) {
                    assert_eq!(
                        (&g.key, g.dtype, &g.shape, &g.bytes),
                        (&w.key, w.dtype, &w.shape, &w.bytes)
                    );
                }
            }
            let mut cut = StreamReader::new("m.safetensors");
            cut.push(&bytes[..bytes.len() - 3]).unwrap();
            let e = cut.finish().unwrap_err().to_string();
            assert!(
                e.contains("m.safetensors") && e.contains("inside tensor"),
                "{e}"
            );
        }
        let mut empty = StreamReader::new("m.safetensors");
        empty.push(&[1, 0]).unwrap();
        assert!(
            empty
                .finish()
                .unwrap_err()
                .to_string()
                .contains("8-byte header length")
        );
    }
}
