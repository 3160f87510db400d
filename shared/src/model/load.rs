//! Building the classifier from a Hugging Face checkpoint: every tensor the model needs must be there with its
//! shape, and every tensor there must be used.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::Dtype;

use super::config::{ConfigError, Gemma2Config};
use super::gemma2::{Gemma2ForSequenceClassification, ParamSource, RandomInit};
use super::placement::Placement;
use super::quant::{self, Packed, PackedEmbedding};
use super::weights::{Checkpoint, RawTensor, SCALE_SUFFIX, WeightsError, check_finite};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{file}: cannot read: {message}")]
    Io { file: String, message: String },
}

/// A loaded classifier and what loading found.
pub struct Loaded {
    pub model: Gemma2ForSequenceClassification,
    pub config: Gemma2Config,
    /// The checkpoint had no `score.weight` (a base LM): the head is freshly initialised.
    pub fresh_head: bool,
    pub stats: LoadStats,
}

/// Where the weights went, in bytes as held there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LoadStats {
    /// On the GPU.
    pub device_bytes: u64,
    /// In host memory (everything on the CPU backend; a table over one binding otherwise).
    pub host_bytes: u64,
    /// Of those, packed (int8 or q4) bytes.
    pub packed_bytes: u64,
}

/// Loads `dir/config.json` and its safetensors weights.
#[cfg(feature = "native")]
///
/// `placement`: a device (`&device`), or a device with its binding limit ([`Placement`]), which decides where
/// the token embedding goes.
pub fn load_hf_dir(
    dir: &std::path::Path,
    placement: impl Into<Placement>,
) -> Result<Loaded, LoadError> {
    load_dir(dir, placement, None)
}

/// [`load_hf_dir`], or for a web bundle its weights in `format` (`f16`, `int8`, `q4`).
#[cfg(feature = "native")]
pub fn load_dir(
    dir: &std::path::Path,
    placement: impl Into<Placement>,
    format: Option<&str>,
) -> Result<Loaded, LoadError> {
    let path = dir.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| LoadError::Io {
        file: path.display().to_string(),
        message: e.to_string(),
    })?;
    let config = Gemma2Config::from_hf_json(&path.display().to_string(), &bytes)?;
    let checkpoint = Checkpoint::open_dir(dir, format)?;
    from_checkpoint(config, &checkpoint, placement)
}

/// Tensors a checkpoint may hold that the classifier does not use: a causal LM's head (tied to the embedding).
const IGNORED: &[&str] = &["lm_head.weight"];

/// Builds the classifier from `checkpoint`. Keys may carry the `model.` prefix (causal LM and classifier
/// checkpoints) or not (a bare `Gemma2Model`).
pub fn from_checkpoint(
    config: Gemma2Config,
    checkpoint: &Checkpoint,
    placement: impl Into<Placement>,
) -> Result<Loaded, LoadError> {
    let mut loader = Loader::new(config, placement);
    for tensor in checkpoint.raw_tensors() {
        loader.add(tensor)?;
    }
    loader.finish()
}

/// Builds the classifier one stored tensor at a time, in any order: each tensor goes to its device (and form) as
/// it arrives, so a caller streaming a download never holds more than one tensor's bytes (see
/// [`super::weights::StreamReader`]). Every tensor the model needs must arrive with its shape, and every tensor
/// that arrives must be one the model uses.
pub struct Loader {
    config: Gemma2Config,
    placement: Placement,
    /// Where a dense (f32 or f16) table goes.
    embedding_device: Device,
    /// Keep int8 and q4 weights packed (see [`super::quant`]) rather than widening them to f32: on a GPU, and in
    /// wasm32's 4 GiB. A native CPU run widens them once here rather than on every product.
    keep_packed: bool,
    /// Every key the model needs, with its `[out, in]` shape.
    expected: BTreeMap<String, Vec<usize>>,
    ready: BTreeMap<String, Ready>,
    /// Packed values whose `_scale` has not arrived yet, and scales whose values have not.
    waiting: BTreeMap<String, RawTensor>,
    unexpected: Vec<String>,
    stats: LoadStats,
}

/// A tensor in its final form, waiting for the model to be assembled.
enum Ready {
    /// A norm weight.
    Vector(Tensor<1>),
    /// A matrix, `[out, in]` as stored (f32; an f16 host table stays f16).
    Matrix(Tensor<2>),
    /// A packed projection, `[out, in]`.
    Packed(Tensor<2>),
    /// A packed token embedding.
    Table(PackedEmbedding),
}

impl Loader {
    pub fn new(config: Gemma2Config, placement: impl Into<Placement>) -> Self {
        let placement = placement.into();
        let embedding_device = placement.embedding_device(config.vocab_size, config.hidden_size, 4);
        let expected = config.hf_shapes().into_iter().collect();
        Self {
            keep_packed: super::placement::is_gpu(&placement.compute)
                || cfg!(target_family = "wasm"),
            config,
            placement,
            embedding_device,
            expected,
            ready: BTreeMap::new(),
            waiting: BTreeMap::new(),
            unexpected: Vec::new(),
            stats: LoadStats::default(),
        }
    }

    /// Tensors in their final form so far, and how many the model has.
    pub fn progress(&self) -> (usize, usize) {
        (self.ready.len(), self.expected.len())
    }

    /// Where the tensors so far went.
    pub fn stats(&self) -> LoadStats {
        self.stats
    }

    fn count(&mut self, device: &Device, bytes: u64, packed: bool) {
        if super::placement::is_gpu(device) {
            self.stats.device_bytes += bytes;
        } else {
            self.stats.host_bytes += bytes;
        }
        if packed {
            self.stats.packed_bytes += bytes;
        }
    }

    /// The model's key for a stored one: a bare `Gemma2Model` checkpoint has no `model.` prefix.
    fn model_key(&self, key: &str) -> Option<String> {
        if self.expected.contains_key(key) {
            return Some(key.to_string());
        }
        let prefixed = format!("model.{key}");
        self.expected.contains_key(&prefixed).then_some(prefixed)
    }

    /// Takes one stored tensor.
    pub fn add(&mut self, tensor: RawTensor) -> Result<(), WeightsError> {
        if IGNORED.contains(&tensor.key.as_str()) {
            return Ok(());
        }
        // A packed tensor's scale.
        if let Some(base) = tensor.key.strip_suffix(SCALE_SUFFIX)
            && let Some(key) = self.model_key(base)
        {
            return match self.waiting.remove(&key) {
                Some(values) => self.convert(key, values, Some(tensor)),
                None => {
                    self.waiting.insert(format!("{key}{SCALE_SUFFIX}"), tensor);
                    Ok(())
                }
            };
        }
        let Some(key) = self.model_key(&tensor.key) else {
            self.unexpected.push(tensor.key);
            return Ok(());
        };
        let expected = &self.expected[&key];
        // q4 words hold eight values each: `[rows, cols]` is stored as `[rows, cols / 8]`.
        let logical = match (tensor.dtype, tensor.shape.as_slice()) {
            (Dtype::U32, &[rows, words]) => vec![rows, words * 8],
            _ => tensor.shape.clone(),
        };
        if &logical != expected {
            return Err(WeightsError::Shape {
                key,
                expected: expected.clone(),
                actual: logical,
            });
        }
        match tensor.dtype {
            Dtype::I8 | Dtype::U32 => match self.waiting.remove(&format!("{key}{SCALE_SUFFIX}")) {
                Some(scale) => self.convert(key, tensor, Some(scale)),
                None => {
                    self.waiting.insert(key, tensor);
                    Ok(())
                }
            },
            _ => self.convert(key, tensor, None),
        }
    }

    /// Puts `values` (with its `scale` when packed) in its final form.
    fn convert(
        &mut self,
        key: String,
        values: RawTensor,
        scale: Option<RawTensor>,
    ) -> Result<(), WeightsError> {
        let shape = self.expected[&key].clone();
        let embedding = key == "model.embed_tokens.weight";
        let head = key == "score.weight";
        let compute = self.placement.compute.clone();
        let ready = if let [rows, cols] = shape[..] {
            // The head has two rows: nothing to save by keeping it packed, and the pooled activations meet it in f32.
            let form = match &scale {
                Some(scale) if !head && self.keep_packed => {
                    Packed::stored_form(values.dtype, scale, rows, cols)
                }
                _ => None,
            };
            match (form, &scale) {
                (Some(bits), Some(scale)) => {
                    let p = Packed::from_stored(bits, values.bytes, scale, rows, cols);
                    check_finite(
                        &format!("{key}{SCALE_SUFFIX}"),
                        p.scales.iter().map(|s| s.to_f32()),
                    )?;
                    if embedding {
                        // The words are the larger of its two tensors: on the GPU when they fit one binding.
                        let words = rows as u64 * cols as u64 * p.bits.bits() as u64 / 8;
                        let device = if self.placement.fits(words) {
                            compute
                        } else {
                            Device::flex()
                        };
                        self.count(&device, PackedEmbedding::bytes(rows, cols, p.bits), true);
                        Ready::Table(PackedEmbedding::new(p, &device))
                    } else {
                        let f16 = compute.supports_dtype(burn::tensor::FloatDType::F16);
                        self.count(
                            &compute,
                            Packed::device_bytes(rows, cols, p.bits, &compute),
                            true,
                        );
                        Ready::Packed(Tensor::from_data(p.tensor_data(f16), &compute))
                    }
                }
                _ if embedding
                    && self.embedding_device != compute
                    && values.dtype != Dtype::F32 =>
                {
                    // A host-side table (too large for one GPU binding) stored in f16 or int8 is kept in f16: half
                    // the memory of f32, which matters most in the browser's 4 GiB address space. (int8 rounded to
                    // f16: a 2^-11 relative step under int8's 2^-8.)
                    let wide = decode(&key, &values, scale.as_ref(), &shape)?;
                    let half: Vec<half::f16> = wide.into_iter().map(half::f16::from_f32).collect();
                    let device = self.embedding_device.clone();
                    self.count(&device, half.len() as u64 * 2, false);
                    // The dtype must be named: from_data alone converts to the device's default (f32).
                    Ready::Matrix(Tensor::from_data(
                        TensorData::new(half, [rows, cols]),
                        (&self.embedding_device, burn::tensor::DType::F16),
                    ))
                }
                _ => {
                    let device = if embedding {
                        self.embedding_device.clone()
                    } else {
                        compute
                    };
                    let wide = decode(&key, &values, scale.as_ref(), &shape)?;
                    self.count(&device, wide.len() as u64 * 4, false);
                    Ready::Matrix(Tensor::from_data(
                        TensorData::new(wide, [rows, cols]),
                        &device,
                    ))
                }
            }
        } else {
            let wide = decode(&key, &values, scale.as_ref(), &shape)?;
            self.count(&compute, wide.len() as u64 * 4, false);
            Ready::Vector(Tensor::from_data(
                TensorData::new(wide, [shape[0]]),
                &compute,
            ))
        };
        self.ready.insert(key, ready);
        Ok(())
    }

    /// Assembles the classifier once every tensor is in.
    pub fn finish(mut self) -> Result<Loaded, LoadError> {
        if let Some((key, _)) = self.waiting.iter().next() {
            return Err(match key.strip_suffix(SCALE_SUFFIX) {
                // A scale without its values.
                Some(base) => WeightsError::Missing {
                    key: base.into(),
                    expected: self.expected[base].clone(),
                },
                None => WeightsError::Missing {
                    key: format!("{key}{SCALE_SUFFIX}"),
                    expected: vec![self.expected[key][0]],
                },
            }
            .into());
        }
        if !self.unexpected.is_empty() {
            let shown: Vec<&str> = self
                .unexpected
                .iter()
                .take(10)
                .map(String::as_str)
                .collect();
            let more = match self.unexpected.len() {
                n if n > 10 => format!(" and {} more", n - 10),
                _ => String::new(),
            };
            return Err(WeightsError::Unexpected {
                keys: format!("{}{more}", shown.join(", ")),
            }
            .into());
        }
        let in_kernel = self.placement.packed_matmul_in_kernel();
        let config = self.config.clone();
        let mut source = ReadySource {
            loader: &mut self,
            fresh_head: false,
        };
        let mut model = config.build(&mut source)?;
        let fresh_head = source.fresh_head;
        model.set_in_kernel_dequantization(in_kernel);
        if fresh_head {
            tracing::warn!(
                "checkpoint has no score.weight (a base language model): the classification head starts fresh"
            );
        }
        Ok(Loaded {
            model,
            config,
            fresh_head,
            stats: self.stats,
        })
    }
}

/// A stored tensor's values as f32: f32, bf16 and f16 as they are, int8 and q4 times their scales; `shape` is
/// the model's (`[rows, cols]` for q4, whose words are stored `[rows, cols / 8]`).
pub(crate) fn decode(
    key: &str,
    values: &RawTensor,
    scale: Option<&RawTensor>,
    shape: &[usize],
) -> Result<Vec<f32>, WeightsError> {
    let data = &values.bytes;
    let wide: Vec<f32> = match (values.dtype, scale) {
        (Dtype::F32, _) => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        (Dtype::BF16, _) => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        (Dtype::F16, _) => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        (Dtype::I8, Some(scale)) => {
            let rows = shape[0].max(1);
            let scales = decode(&scale.key, scale, None, &[rows])?;
            if scales.len() != rows {
                return Err(WeightsError::Shape {
                    key: scale.key.clone(),
                    expected: vec![rows],
                    actual: scale.shape.clone(),
                });
            }
            let per_row = data.len() / rows;
            data.iter()
                .enumerate()
                .map(|(i, &b)| f32::from(b as i8) * scales[i / per_row.max(1)])
                .collect()
        }
        (Dtype::U32, Some(scale)) => {
            let &[rows, cols] = shape else {
                return Err(dtype_error(key, values.dtype));
            };
            match Packed::stored_form(Dtype::U32, scale, rows, cols) {
                Some(bits) => {
                    Packed::from_stored(bits, data.clone(), scale, rows, cols).dequantize()
                }
                None => {
                    return Err(WeightsError::Shape {
                        key: scale.key.clone(),
                        expected: vec![rows, cols / quant::BLOCK],
                        actual: scale.shape.clone(),
                    });
                }
            }
        }
        (other, _) => return Err(dtype_error(key, other)),
    };
    check_finite(key, wide.iter().copied())?;
    Ok(wide)
}

fn dtype_error(key: &str, dtype: Dtype) -> WeightsError {
    WeightsError::Dtype {
        file: "checkpoint".into(),
        key: key.into(),
        dtype: format!("{dtype:?}"),
    }
}

/// The model's parameters from a [`Loader`]'s finished tensors.
struct ReadySource<'a> {
    loader: &'a mut Loader,
    fresh_head: bool,
}

impl ReadySource<'_> {
    fn take(&mut self, key: &str) -> Result<Ready, WeightsError> {
        self.loader
            .ready
            .remove(key)
            .ok_or_else(|| WeightsError::Missing {
                key: key.into(),
                expected: self.loader.expected.get(key).cloned().unwrap_or_default(),
            })
    }

    fn matrix(&mut self, key: &str) -> Result<Tensor<2>, WeightsError> {
        match self.take(key)? {
            Ready::Matrix(t) | Ready::Packed(t) => Ok(t),
            _ => Err(dtype_error(key, Dtype::U32)),
        }
    }
}

impl ParamSource for ReadySource<'_> {
    type Error = WeightsError;

    fn norm(&mut self, key: &str, _n: usize) -> Result<Tensor<1>, WeightsError> {
        match self.take(key)? {
            Ready::Vector(t) => Ok(t),
            _ => Err(dtype_error(key, Dtype::U32)),
        }
    }

    fn linear(&mut self, key: &str, _d_in: usize, _d_out: usize) -> Result<Linear, WeightsError> {
        // **[out, in] Linear**: PyTorch stores `[d_out, d_in]`; burn's Linear computes `x @ W` with `[d_in, d_out]`.
        let weight = self.matrix(&format!("{key}.weight"))?.transpose();
        Ok(Linear {
            weight: Param::from_tensor(weight),
            bias: None,
        })
    }

    fn packed_embedding(
        &mut self,
        key: &str,
        _vocab: usize,
        _hidden: usize,
    ) -> Result<Option<PackedEmbedding>, WeightsError> {
        match self.loader.ready.remove(key) {
            Some(Ready::Table(table)) => Ok(Some(table)),
            Some(other) => {
                self.loader.ready.insert(key.into(), other);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    fn embedding(
        &mut self,
        key: &str,
        _vocab: usize,
        _hidden: usize,
    ) -> Result<Tensor<2>, WeightsError> {
        self.matrix(key)
    }

    fn head(&mut self, key: &str, d_in: usize, d_out: usize) -> Result<Linear, WeightsError> {
        if self.loader.ready.contains_key(&format!("{key}.weight")) {
            return self.linear(key, d_in, d_out);
        }
        self.fresh_head = true;
        let Ok(head) = RandomInit {
            device: &self.loader.placement.compute,
            embedding_device: &self.loader.embedding_device,
        }
        .linear(key, d_in, d_out);
        Ok(head)
    }
}

/// What a model takes where, before loading it: the figures a page shows (and checks) before it downloads.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Footprint {
    pub device_bytes: u64,
    pub host_bytes: u64,
    /// The largest tensor bound on the GPU (the table aside, which goes to the host when it does not fit).
    pub largest: (String, u64),
    pub table_on_host: bool,
}

/// The [`Footprint`] of `config` stored in `format`, loaded as [`Loader`] loads it onto `placement`.
pub fn footprint(
    config: &Gemma2Config,
    format: crate::bundle::WeightFormat,
    placement: &Placement,
) -> Footprint {
    use crate::bundle::WeightFormat;
    let gpu = super::placement::is_gpu(&placement.compute);
    let keep_packed = gpu || cfg!(target_family = "wasm");
    let mut f = Footprint {
        device_bytes: 0,
        host_bytes: 0,
        largest: (String::new(), 0),
        table_on_host: false,
    };
    let bits = match format {
        WeightFormat::Int8 => Some(quant::Bits::Q8),
        WeightFormat::Q4 => Some(quant::Bits::Q4),
        WeightFormat::F32 | WeightFormat::F16 => None,
    };
    for (key, shape) in config.hf_shapes() {
        let n: u64 = shape.iter().map(|&d| d as u64).product();
        let packed = match (bits, shape.as_slice()) {
            (Some(b), &[_, cols])
                if keep_packed && key != "score.weight" && quant::packable(cols) =>
            {
                Some(b)
            }
            _ => None,
        };
        let (bytes, on_gpu) = if key == "model.embed_tokens.weight" {
            let (rows, cols) = (shape[0], shape[1]);
            match packed {
                Some(b) => (
                    PackedEmbedding::bytes(rows, cols, b),
                    placement.fits(n * b.bits() as u64 / 8),
                ),
                None if placement.fits(n * 4) => (n * 4, true),
                // A host table from f16 or int8 stays f16.
                None if format != WeightFormat::F32 => (n * 2, false),
                None => (n * 4, false),
            }
        } else {
            let bytes = match packed {
                Some(b) => Packed::device_bytes(shape[0], shape[1], b, &placement.compute),
                None => n * 4,
            };
            if bytes > f.largest.1 {
                f.largest = (key.clone(), bytes);
            }
            (bytes, true)
        };
        if on_gpu && gpu {
            f.device_bytes += bytes;
        } else {
            f.host_bytes += bytes;
        }
        if key == "model.embed_tokens.weight" {
            f.table_on_host = gpu && !on_gpu;
        }
    }
    f
}
