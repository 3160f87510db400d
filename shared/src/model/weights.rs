//! Reading Hugging Face safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`; f32, bf16 or f16 (converted to f32 on the way in), or int8 with a per-row
//! scale (the web bundle's compact form: `key` holds i8 values and `key_scale` one f16 or f32 scale per row).

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
        "{file}: tensor {key:?} has dtype {dtype}, expected F32, BF16, F16 or I8 with a _scale"
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
        let mut header: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..data_start])
                .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        header.remove("__metadata__");
        let data_len = (bytes.len() - data_start) as u64;
        let mut tensors = BTreeMap::new();
        for (name, value) in header {
            let entry: Entry =
                serde_json::from_value(value).map_err(|e| bad(format!("tensor {name:?}: {e}")))?;
            let [start, end] = entry.data_offsets;
            if start > end || end > data_len {
                return Err(bad(format!(
                    "tensor {name:?}: data {start}..{end} is outside the {data_len}-byte data section"
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
        Ok(Self {
            file,
            bytes,
            tensors,
            data_start,
        })
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
    /// Reads `dir/model.safetensors`, or every shard named by `dir/model.safetensors.index.json`, or the weights
    /// a web bundle's `manifest.json` names first.
    #[cfg(feature = "native")]
    pub fn open_dir(dir: &std::path::Path) -> Result<Self, WeightsError> {
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
        // A web bundle (`trainer export`'s web/): the first weight file its manifest lists.
        let manifest = dir.join("manifest.json");
        if !index_path.is_file() && manifest.is_file() {
            #[derive(serde::Deserialize)]
            struct Weights {
                file: String,
            }
            #[derive(serde::Deserialize)]
            struct Bundle {
                weights: Vec<Weights>,
            }
            let bundle: Bundle =
                serde_json::from_slice(&read(&manifest)?).map_err(|e| WeightsError::Index {
                    file: manifest.display().to_string(),
                    message: e.to_string(),
                })?;
            if let Some(w) = bundle.weights.first() {
                let p = dir.join(&w.file);
                return Self::from_files(vec![(p.display().to_string(), read(&p)?)]);
            }
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

    /// The tensor `key` as f32 values, checked against `expected` shape.
    pub fn f32(&self, key: &str, expected: &[usize]) -> Result<Vec<f32>, WeightsError> {
        let (file, view) = self.view(key, expected)?;
        let data = view.data;
        Ok(match view.dtype {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::I8 if !expected.is_empty() => {
                let rows = expected[0];
                let scale = self.f32(&format!("{key}{SCALE_SUFFIX}"), &[rows])?;
                let per_row = data.len() / rows.max(1);
                data.iter()
                    .enumerate()
                    .map(|(i, &b)| f32::from(b as i8) * scale[i / per_row.max(1)])
                    .collect()
            }
            other => {
                return Err(WeightsError::Dtype {
                    file: file.into(),
                    key: key.into(),
                    dtype: format!("{other:?}"),
                });
            }
        })
    }

    /// The tensor `key` as f16 values when it is stored in f16 (exact) or int8 (dequantized, then rounded to f16:
    /// a 2^-11 relative step under int8's 2^-8), checked against `expected` shape; `None` for f32 or bf16. Half
    /// the memory of [`f32`](Self::f32), for tables kept in host memory.
    pub fn compact_f16(
        &self,
        key: &str,
        expected: &[usize],
    ) -> Result<Option<Vec<half::f16>>, WeightsError> {
        let (_, view) = self.view(key, expected)?;
        match view.dtype {
            Dtype::F16 => Ok(Some(
                view.data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            )),
            Dtype::I8 if !expected.is_empty() => {
                let rows = expected[0];
                let scale = self.f32(&format!("{key}{SCALE_SUFFIX}"), &[rows])?;
                let per_row = view.data.len() / rows.max(1);
                Ok(Some(
                    view.data
                        .iter()
                        .enumerate()
                        .map(|(i, &b)| {
                            half::f16::from_f32(f32::from(b as i8) * scale[i / per_row.max(1)])
                        })
                        .collect(),
                ))
            }
            _ => Ok(None),
        }
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
        if entry.shape != expected {
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

    fn table() -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let values: Vec<f32> = (0..24).map(|i| (i as f32 - 11.5) * 0.037).collect();
        vec![("t".into(), vec![4, 6], values)]
    }

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
    fn compact_f16_is_exact_for_f16_and_close_for_int8_and_absent_for_f32() {
        let tensors = table();
        let read = |format| {
            let bytes = serialize(&tensors, format).unwrap();
            let ck = Checkpoint::from_files(vec![("m.safetensors".into(), bytes)]).unwrap();
            (
                ck.f32("t", &[4, 6]).unwrap(),
                ck.compact_f16("t", &[4, 6]).unwrap(),
            )
        };
        let (_, none) = read(WeightFormat::F32);
        assert!(none.is_none(), "f32 stays f32");
        let (wide, half) = read(WeightFormat::F16);
        let half = half.expect("f16 is kept");
        assert!(wide.iter().zip(&half).all(|(w, h)| *w == h.to_f32()));
        let (wide, half) = read(WeightFormat::Int8);
        let half = half.expect("int8 becomes f16");
        for (w, h) in wide.iter().zip(&half) {
            assert!(
                (w - h.to_f32()).abs() <= w.abs() * 1e-3 + 1e-6,
                "{w} vs {h}"
            );
        }
        // The shape is still checked.
        let bytes = serialize(&tensors, WeightFormat::F16).unwrap();
        let ck = Checkpoint::from_files(vec![("m.safetensors".into(), bytes)]).unwrap();
        assert!(matches!(
            ck.compact_f16("t", &[6, 4]),
            Err(WeightsError::Shape { .. })
        ));
    }
}
