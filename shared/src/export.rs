//! Writing a trained classifier out: a Hugging Face model directory that transformers and `trainer predict` load,
//! and the web bundle the browser app fetches (f16 weights, optionally int8, with a manifest of sizes and hashes).

use std::path::Path;

use burn::tensor::{FloatDType, Tensor};
use safetensors::{Dtype, tensor::TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::Gemma2ForSequenceClassification;
use crate::model::config::{Gemma2Config, LayerType};
use crate::model::weights::SCALE_SUFFIX;
use crate::preprocess::PreprocessConfig;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("the model still has LoRA adapters: merge them first")]
    Unmerged,
    #[error("reading a tensor from the device: {0}")]
    Read(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |e| ExportError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// A tensor by Hugging Face key: `(name, shape, f32 values)`.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Serializes f32 tensors as a safetensors file.
pub fn safetensors_f32(tensors: &[NamedTensor]) -> Result<Vec<u8>, String> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            TensorView::new(Dtype::F32, shape.clone(), b)
                .map(|v| (name.clone(), v))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize(views, None).map_err(|e| e.to_string())
}

/// How the exported weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    F32,
    F16,
    /// Symmetric int8 per row, with an f16 scale per row (`key_scale`). Norms stay f16.
    Int8,
}

/// A tensor's shape and its values as f32.
fn read<const D: usize>(t: Tensor<D>) -> Result<(Vec<usize>, Vec<f32>), ExportError> {
    let dims = t.dims().to_vec();
    let v = t
        .cast(FloatDType::F32)
        .try_to_vec_as::<f32>()
        .map_err(|e| ExportError::Read(format!("{e:?}")))?;
    Ok((dims, v))
}

/// Every tensor of a merged classifier by Hugging Face key, in PyTorch's layout, as f32 values.
pub fn hf_tensors(
    model: &Gemma2ForSequenceClassification,
) -> Result<Vec<NamedTensor>, ExportError> {
    let mut out = Vec::new();
    let mut push = |name: String, (shape, values): (Vec<usize>, Vec<f32>)| {
        out.push((name, shape, values));
    };
    push(
        "model.embed_tokens.weight".into(),
        read(model.model.embed_tokens.val())?,
    );
    for (i, layer) in model.model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        for (name, proj) in model.projections(i) {
            if proj.lora.is_some() {
                return Err(ExportError::Unmerged);
            }
            // **[out, in] Linear**: back to PyTorch's layout.
            push(
                format!("{p}.{name}.weight"),
                read(proj.weight().transpose())?,
            );
        }
        for (name, norm) in [
            ("input_layernorm", &layer.input_layernorm),
            ("post_attention_layernorm", &layer.post_attention_layernorm),
            (
                "pre_feedforward_layernorm",
                &layer.pre_feedforward_layernorm,
            ),
            (
                "post_feedforward_layernorm",
                &layer.post_feedforward_layernorm,
            ),
        ] {
            push(format!("{p}.{name}.weight"), read(norm.weight.val())?);
        }
    }
    push(
        "model.norm.weight".into(),
        read(model.model.norm.weight.val())?,
    );
    push(
        "score.weight".into(),
        read(model.score.weight.val().transpose())?,
    );
    Ok(out)
}

/// Serializes tensors in `format`. Int8 quantizes 2-D tensors per row; 1-D ones (norms) stay f16.
pub fn serialize(tensors: &[NamedTensor], format: WeightFormat) -> Result<Vec<u8>, String> {
    let mut stored: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, shape, values) in tensors {
        match format {
            WeightFormat::F32 => stored.push((
                name.clone(),
                Dtype::F32,
                shape.clone(),
                values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )),
            WeightFormat::Int8 if shape.len() == 2 => {
                let cols = shape[1].max(1);
                let mut q = Vec::with_capacity(values.len());
                let mut scales = Vec::with_capacity(shape[0]);
                for row in values.chunks(cols) {
                    let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
                    // Round the scale to f16 first, so the stored scale is the one the values were divided by.
                    let scale = half::f16::from_f32(scale).to_f32().max(f32::MIN_POSITIVE);
                    scales.push(half::f16::from_f32(scale));
                    q.extend(
                        row.iter()
                            .map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8 as u8),
                    );
                }
                stored.push((name.clone(), Dtype::I8, shape.clone(), q));
                stored.push((
                    format!("{name}{SCALE_SUFFIX}"),
                    Dtype::F16,
                    vec![shape[0]],
                    scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
                ));
            }
            WeightFormat::F16 | WeightFormat::Int8 => stored.push((
                name.clone(),
                Dtype::F16,
                shape.clone(),
                values
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
            )),
        }
    }
    let views: Vec<(String, TensorView<'_>)> = stored
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize(views, None).map_err(|e| e.to_string())
}

/// A `config.json` for `Gemma2ForSequenceClassification` that transformers 4.42+ and 5.x read, and
/// [`Gemma2Config::from_hf_json`] reads back to `config`.
pub fn hf_config_json(config: &Gemma2Config, dtype: &str) -> serde_json::Value {
    let id2label: serde_json::Map<String, serde_json::Value> = config
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), l.clone().into()))
        .collect();
    let label2id: serde_json::Map<String, serde_json::Value> = config
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), i.into()))
        .collect();
    let layer_types: Vec<&str> = config
        .layer_types
        .iter()
        .map(|t| match t {
            LayerType::SlidingAttention => "sliding_attention",
            LayerType::FullAttention => "full_attention",
        })
        .collect();
    serde_json::json!({
        "architectures": ["Gemma2ForSequenceClassification"],
        "model_type": "gemma2",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        // transformers 5 validates this field as an integer.
        "query_pre_attn_scalar": number(config.query_pre_attn_scalar),
        "sliding_window": config.sliding_window,
        "attn_logit_softcapping": config.attn_logit_softcapping,
        "final_logit_softcapping": config.final_logit_softcapping,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_position_embeddings,
        "layer_types": layer_types,
        "hidden_activation": "gelu_pytorch_tanh",
        "pad_token_id": config.pad_token_id,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": false,
        "num_labels": config.labels.len(),
        "id2label": id2label,
        "label2id": label2id,
        "torch_dtype": dtype,
        "dtype": dtype,
    })
}

/// An integral value as a JSON integer, else as a float.
fn number(v: f64) -> serde_json::Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        (v as i64).into()
    } else {
        v.into()
    }
}

/// `tokenizer_config.json` for transformers: BOS and EOS added, right padding, the recipe's 512 tokens.
fn tokenizer_config_json() -> serde_json::Value {
    serde_json::json!({
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": true,
        "add_eos_token": true,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "padding_side": "right",
        "model_max_length": 512
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    crate::cache::write_atomic(path, bytes).map_err(|e| ExportError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn json_bytes(v: &serde_json::Value) -> Vec<u8> {
    let mut b = serde_json::to_vec_pretty(v).unwrap_or_default();
    b.push(b'\n');
    b
}

/// One file of the web bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleFile {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

/// `manifest.json` of the web bundle: what the browser fetches and how to check it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleManifest {
    pub format_version: u32,
    pub config: String,
    pub tokenizer: String,
    /// Weight files by format (`f16`, `int8`).
    pub weights: Vec<BundleWeights>,
    pub labels: Vec<String>,
    pub preprocess: PreprocessConfig,
    pub files: Vec<BundleFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleWeights {
    pub format: WeightFormat,
    pub file: String,
}

pub const BUNDLE_MANIFEST: &str = "manifest.json";

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub hf_files: Vec<BundleFile>,
    pub bundle: BundleManifest,
}

/// Writes `out/hf/` (config.json, model.safetensors in f32, tokenizer.json, tokenizer_config.json) and
/// `out/web/` (config.json, tokenizer.json, model.f16.safetensors, optionally model.int8.safetensors,
/// manifest.json). `model` must be merged.
pub fn export(
    model: &Gemma2ForSequenceClassification,
    config: &Gemma2Config,
    tokenizer_json: &Path,
    preprocess: &PreprocessConfig,
    out: &Path,
    int8: bool,
) -> Result<Exported, ExportError> {
    let tensors = hf_tensors(model)?;
    let tokenizer = std::fs::read(tokenizer_json).map_err(io(tokenizer_json))?;
    let err = |path: &Path| {
        let path = path.display().to_string();
        move |message: String| ExportError::Io { path, message }
    };

    let hf = out.join("hf");
    std::fs::create_dir_all(&hf).map_err(io(&hf))?;
    let weights = serialize(&tensors, WeightFormat::F32).map_err(err(&hf))?;
    let mut hf_files = Vec::new();
    for (name, bytes) in [
        (
            "config.json",
            json_bytes(&hf_config_json(config, "float32")),
        ),
        (
            "tokenizer_config.json",
            json_bytes(&tokenizer_config_json()),
        ),
        ("tokenizer.json", tokenizer.clone()),
        ("model.safetensors", weights),
    ] {
        write(&hf.join(name), &bytes)?;
        hf_files.push(entry(name, &bytes));
    }

    let web = out.join("web");
    std::fs::create_dir_all(&web).map_err(io(&web))?;
    let mut files = Vec::new();
    let mut weight_files = Vec::new();
    let mut formats = vec![WeightFormat::F16];
    if int8 {
        formats.push(WeightFormat::Int8);
    }
    for format in formats {
        let name = match format {
            WeightFormat::F32 => "model.f32.safetensors",
            WeightFormat::F16 => "model.f16.safetensors",
            WeightFormat::Int8 => "model.int8.safetensors",
        };
        let bytes = serialize(&tensors, format).map_err(err(&web))?;
        write(&web.join(name), &bytes)?;
        files.push(entry(name, &bytes));
        weight_files.push(BundleWeights {
            format,
            file: name.into(),
        });
    }
    for (name, bytes) in [
        (
            "config.json",
            json_bytes(&hf_config_json(config, "float16")),
        ),
        ("tokenizer.json", tokenizer),
    ] {
        write(&web.join(name), &bytes)?;
        files.push(entry(name, &bytes));
    }
    let bundle = BundleManifest {
        format_version: 1,
        config: "config.json".into(),
        tokenizer: "tokenizer.json".into(),
        weights: weight_files,
        labels: config.labels.clone(),
        preprocess: *preprocess,
        files,
    };
    let manifest = serde_json::to_value(&bundle).unwrap_or_default();
    write(&web.join(BUNDLE_MANIFEST), &json_bytes(&manifest))?;
    Ok(Exported { hf_files, bundle })
}

fn entry(name: &str, bytes: &[u8]) -> BundleFile {
    BundleFile {
        file: name.into(),
        bytes: bytes.len() as u64,
        sha256: Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    }
}

/// Checks every file the bundle manifest lists against its size and sha256.
pub fn verify_bundle(dir: &Path) -> Result<BundleManifest, ExportError> {
    let path = dir.join(BUNDLE_MANIFEST);
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let manifest: BundleManifest = serde_json::from_slice(&bytes).map_err(|e| ExportError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    for f in &manifest.files {
        let p = dir.join(&f.file);
        let data = std::fs::read(&p).map_err(io(&p))?;
        let actual = entry(&f.file, &data);
        if actual != *f {
            return Err(ExportError::Io {
                path: p.display().to_string(),
                message: format!(
                    "does not match the manifest ({} bytes, sha256 {}; expected {} bytes, {})",
                    actual.bytes, actual.sha256, f.bytes, f.sha256
                ),
            });
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::Checkpoint;

    #[test]
    fn int8_rows_round_trip_within_half_a_step() {
        let values: Vec<f32> = (0..24).map(|i| (i as f32 - 11.0) * 0.37).collect();
        let t = vec![("w.weight".to_string(), vec![4, 6], values.clone())];
        let bytes = serialize(&t, WeightFormat::Int8).unwrap();
        let ckpt = Checkpoint::from_files(vec![("m".into(), bytes)]).unwrap();
        assert_eq!(ckpt.keys().collect::<Vec<_>>(), vec!["w.weight"]);
        let back = ckpt.f32("w.weight", &[4, 6]).unwrap();
        for (row, (a, b)) in values.chunks(6).zip(back.chunks(6)).enumerate() {
            let step = a.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= step * 0.51 + 1e-3 * step,
                    "row {row}: {x} vs {y}"
                );
            }
        }
    }

    #[test]
    fn exported_config_reads_back_to_the_same_config() {
        let c = Gemma2Config::tiny();
        let json = serde_json::to_vec(&hf_config_json(&c, "float32")).unwrap();
        let back = Gemma2Config::from_hf_json("config.json", &json).unwrap();
        assert_eq!(
            Gemma2Config {
                dtype: None,
                ..back
            },
            Gemma2Config { dtype: None, ..c }
        );
    }
}
