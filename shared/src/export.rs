//! Writing a trained classifier out: a Hugging Face model directory that transformers and `trainer predict` load,
//! and the web bundle the browser app fetches (f16 weights, optionally int8, with a manifest of sizes and hashes).

use std::path::Path;

use burn::tensor::{FloatDType, Tensor};
use safetensors::Dtype;
use sha2::{Digest, Sha256};

pub use crate::bundle::{
    BUNDLE_MANIFEST, BundleAbout, BundleFile, BundleManifest, BundleWeights, FormatQuality,
    WeightFormat,
};
use crate::model::Gemma2ForSequenceClassification;
use crate::model::config::{Gemma2Config, LayerType};
use crate::model::quant;
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
    serialize(tensors, WeightFormat::F32)
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

/// A tensor as stored: name, dtype, shape and little-endian bytes.
pub type StoredTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Serializes tensors in `format`. Int8 quantizes 2-D tensors per row, q4 in blocks; 1-D ones (norms) stay f16.
pub fn serialize(tensors: &[NamedTensor], format: WeightFormat) -> Result<Vec<u8>, String> {
    let mut stored = Vec::new();
    for (name, shape, values) in tensors {
        stored.extend(store(name, shape, values, format)?);
    }
    to_safetensors(&stored)
}

/// Weights serialized in one format, as a bundle file holds them.
pub type Serialized = (WeightFormat, Vec<u8>);

/// `tensors` in each of `formats`. `trainer export` serializes each compact format once: the same bytes are
/// compared with f32 ([`format_quality`]) and then written ([`export`]).
pub fn serialize_all(
    tensors: &[NamedTensor],
    formats: &[WeightFormat],
) -> Result<Vec<Serialized>, ExportError> {
    formats
        .iter()
        .map(|&f| Ok((f, serialize(tensors, f).map_err(ExportError::Read)?)))
        .collect()
}

/// One tensor in `format`: itself, and for int8 and q4 its `_scale` companion (first).
pub fn store(
    name: &str,
    shape: &[usize],
    values: &[f32],
    format: WeightFormat,
) -> Result<Vec<StoredTensor>, String> {
    let (name, shape) = (name.to_string(), shape.to_vec());
    let mut stored: Vec<StoredTensor> = Vec::new();
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
            stored.push((
                format!("{name}{SCALE_SUFFIX}"),
                Dtype::F16,
                vec![shape[0]],
                scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
            ));
            stored.push((name.clone(), Dtype::I8, shape.clone(), q));
        }
        WeightFormat::Q4 if shape.len() == 2 && quant::packable(shape[1]) => {
            let packed = quant::Packed::quantize_q4(values, shape[0], shape[1])
                .ok_or_else(|| format!("{name}: cannot pack {shape:?} in q4"))?;
            stored.push((
                format!("{name}{SCALE_SUFFIX}"),
                Dtype::F16,
                vec![shape[0], shape[1] / quant::BLOCK],
                packed.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
            ));
            stored.push((
                name.clone(),
                Dtype::U32,
                vec![shape[0], shape[1] / 8],
                packed.words,
            ));
        }
        WeightFormat::F16 | WeightFormat::Int8 | WeightFormat::Q4 => stored.push((
            name.clone(),
            Dtype::F16,
            shape.clone(),
            values
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
        )),
    }
    Ok(stored)
}

/// A safetensors file of `stored` tensors, their data in the given order (the `safetensors` crate would sort
/// them by alignment, which puts every q4 word before every scale): a packed tensor's scale comes right before
/// its values, so a reader of a download can convert each tensor as it completes.
pub fn to_safetensors(stored: &[StoredTensor]) -> Result<Vec<u8>, String> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in stored {
        let dtype = serde_json::to_value(dtype).map_err(|e| e.to_string())?;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    // The data section starts 8-byte aligned, as the reference writer pads it.
    json.resize((json.len() + 8).next_multiple_of(8) - 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, _, _, bytes) in stored {
        out.extend_from_slice(bytes);
    }
    Ok(out)
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

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub hf_files: Vec<BundleFile>,
    pub bundle: BundleManifest,
}

/// Writes `out/hf/` (config.json, model.safetensors in f32, tokenizer.json, tokenizer_config.json) and the web
/// bundle in `out/web/` (see [`export_web`]: f16 weights and the `compact` ones, already serialized). `tensors`
/// are a merged model's ([`hf_tensors`]).
pub fn export(
    tensors: &[NamedTensor],
    config: &Gemma2Config,
    tokenizer_json: &Path,
    preprocess: &PreprocessConfig,
    out: &Path,
    compact: Vec<Serialized>,
    about: Option<BundleAbout>,
) -> Result<Exported, ExportError> {
    let tokenizer = std::fs::read(tokenizer_json).map_err(io(tokenizer_json))?;
    let err = |path: &Path| {
        let path = path.display().to_string();
        move |message: String| ExportError::Io { path, message }
    };

    let hf = out.join("hf");
    std::fs::create_dir_all(&hf).map_err(io(&hf))?;
    let weights = serialize(tensors, WeightFormat::F32).map_err(err(&hf))?;
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
        hf_files.push(bundle_file(name, &bytes));
    }

    let mut files = vec![(
        WeightFormat::F16,
        serialize(tensors, WeightFormat::F16).map_err(err(&out.join("web")))?,
    )];
    files.extend(compact.into_iter().filter(|(f, _)| *f != WeightFormat::F16));
    let bundle = export_web(
        files,
        config,
        tokenizer,
        preprocess,
        &out.join("web"),
        about,
    )?;
    Ok(Exported { hf_files, bundle })
}

/// Writes the web bundle to `web`: config.json, tokenizer.json, one weights file per serialized format
/// ([`WeightFormat::file_name`]), and manifest.json (last, so a bundle with a manifest is whole).
pub fn export_web(
    weights: Vec<Serialized>,
    config: &Gemma2Config,
    tokenizer: Vec<u8>,
    preprocess: &PreprocessConfig,
    web: &Path,
    about: Option<BundleAbout>,
) -> Result<BundleManifest, ExportError> {
    std::fs::create_dir_all(web).map_err(io(web))?;
    let mut files = Vec::new();
    let mut weight_files = Vec::new();
    for (format, bytes) in weights {
        let name = format.file_name();
        write(&web.join(name), &bytes)?;
        files.push(bundle_file(name, &bytes));
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
        files.push(bundle_file(name, &bytes));
    }
    let bundle = BundleManifest {
        format_version: 1,
        config: "config.json".into(),
        tokenizer: "tokenizer.json".into(),
        weights: weight_files,
        labels: config.labels.clone(),
        preprocess: *preprocess,
        files,
        about,
    };
    let manifest = serde_json::to_value(&bundle).unwrap_or_default();
    write(&web.join(BUNDLE_MANIFEST), &json_bytes(&manifest))?;
    Ok(bundle)
}

/// How far each of the serialized `formats` moves P(A) from the f32 `model` on `records` (all labelled), and the
/// accuracy either way: each is loaded back from the bytes the bundle will hold, as `trainer predict` loads it.
#[allow(clippy::too_many_arguments)]
pub fn format_quality(
    model: &Gemma2ForSequenceClassification,
    config: &Gemma2Config,
    formats: &[Serialized],
    tokenizer: &crate::tokenizer::Tokenizer,
    preprocess: &PreprocessConfig,
    records: &[crate::data::Record],
    device: &burn::tensor::Device,
) -> Result<Vec<FormatQuality>, ExportError> {
    use crate::predict::{PredictOptions, binary_metrics, predict};
    let options = PredictOptions {
        batch_size: 8,
        swap_tta: false,
    };
    let score = |m: &Gemma2ForSequenceClassification| {
        predict(
            m,
            tokenizer,
            preprocess,
            records,
            options,
            device,
            &crate::prepare::Silent,
        )
        .map_err(|e| ExportError::Read(e.to_string()))
    };
    let labels: Vec<_> = records.iter().map(|r| r.label).collect();
    let accuracy = |p: &[Vec<f32>]| binary_metrics(p, &labels).map_or(f64::NAN, |m| m.accuracy);
    let reference = score(model)?;
    let mut out = Vec::new();
    for (format, bytes) in formats {
        let format = *format;
        // A copy of the bytes (the checkpoint owns its file): a memcpy, where serializing again quantized every
        // value.
        let checkpoint = crate::model::weights::Checkpoint::from_files(vec![(
            format.file_name().into(),
            bytes.clone(),
        )])
        .map_err(|e| ExportError::Read(e.to_string()))?;
        let loaded = crate::model::load::from_checkpoint(config.clone(), &checkpoint, device)
            .map_err(|e| ExportError::Read(e.to_string()))?;
        let probs = score(&loaded.model)?;
        let deltas: Vec<f64> = probs
            .iter()
            .zip(&reference)
            .map(|(p, r)| f64::from((p[0] - r[0]).abs()))
            .collect();
        out.push(FormatQuality {
            format,
            rows: records.len(),
            mean_abs_delta_p: deltas.iter().sum::<f64>() / deltas.len().max(1) as f64,
            max_abs_delta_p: deltas.iter().copied().fold(0.0, f64::max),
            accuracy: accuracy(&probs),
            f32_accuracy: accuracy(&reference),
        });
    }
    Ok(out)
}

/// A file's manifest entry: its name, size and sha256.
pub fn bundle_file(name: &str, bytes: &[u8]) -> BundleFile {
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
        let actual = bundle_file(&f.file, &data);
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
