//! Reading Hugging Face safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`; f32, bf16 or f16 (converted to f32 on the way in), or int8 with a per-row
//! scale (the web bundle's compact form: `key` holds i8 values and `key_scale` one f16 or f32 scale per row).

use std::collections::BTreeMap;

use safetensors::{Dtype, SafeTensors};

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
        "{file}: tensor {key:?} has dtype {dtype}, expected F32, BF16, F16 or I8 with a _scale"
    )]
    Dtype {
        file: String,
        key: String,
        dtype: String,
    },
}

/// Suffix of the per-row scale of an int8 tensor.
pub const SCALE_SUFFIX: &str = "_scale";

/// The tensors of a checkpoint, by Hugging Face key.
pub struct Checkpoint {
    /// `(file name, bytes)` of each shard.
    shards: Vec<(String, Vec<u8>)>,
    /// Key → shard index.
    keys: BTreeMap<String, usize>,
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
    pub fn from_files(shards: Vec<(String, Vec<u8>)>) -> Result<Self, WeightsError> {
        let mut keys = BTreeMap::new();
        for (i, (file, bytes)) in shards.iter().enumerate() {
            let st = SafeTensors::deserialize(bytes).map_err(|e| WeightsError::Safetensors {
                file: file.clone(),
                message: e.to_string(),
            })?;
            for name in st.names() {
                keys.insert(name.to_string(), i);
            }
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
        let data = view.data();
        Ok(match view.dtype() {
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
        match view.dtype() {
            Dtype::F16 => Ok(Some(
                view.data()
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            )),
            Dtype::I8 if !expected.is_empty() => {
                let rows = expected[0];
                let scale = self.f32(&format!("{key}{SCALE_SUFFIX}"), &[rows])?;
                let per_row = view.data().len() / rows.max(1);
                Ok(Some(
                    view.data()
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
    fn view(
        &self,
        key: &str,
        expected: &[usize],
    ) -> Result<(&str, safetensors::tensor::TensorView<'_>), WeightsError> {
        let Some(&shard) = self.keys.get(key) else {
            return Err(WeightsError::Missing {
                key: key.into(),
                expected: expected.to_vec(),
            });
        };
        let (file, bytes) = &self.shards[shard];
        let st = SafeTensors::deserialize(bytes).map_err(|e| WeightsError::Safetensors {
            file: file.clone(),
            message: e.to_string(),
        })?;
        let view = st.tensor(key).map_err(|e| WeightsError::Safetensors {
            file: file.clone(),
            message: e.to_string(),
        })?;
        if view.shape() != expected {
            return Err(WeightsError::Shape {
                key: key.into(),
                expected: expected.to_vec(),
                actual: view.shape().to_vec(),
            });
        }
        Ok((file, view))
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
