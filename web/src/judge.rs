//! The classifier in the browser: a `trainer export` web bundle loaded into the same `shared` model code, on
//! WebGPU (burn's wgpu backend) or, without it, on burn's CPU backend compiled to wasm.
//!
//! Reading tensors back is asynchronous here (a browser cannot block on the GPU), so every prediction is an
//! `async` call; JavaScript awaits it and the page stays responsive.

use std::rc::Rc;

use burn::tensor::activation::softmax;
use burn::tensor::{Device, FloatDType};
use serde::Serialize;
use shared::batch::collate;
use shared::data::{Format, Record, load_bytes};
use shared::model::load::from_checkpoint;
use shared::model::weights::Checkpoint;
use shared::model::{Gemma2Config, Gemma2ForSequenceClassification, Placement};
use shared::preprocess::{Example, PreprocessConfig, preprocess_record};
use shared::tokenizer::{EnginePreference, Tokenizer};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;

pub(crate) struct Inner {
    model: Gemma2ForSequenceClassification,
    tokenizer: Tokenizer,
    preprocess: PreprocessConfig,
    device: Device,
    backend: String,
    /// The largest GPU binding (bytes) when on WebGPU.
    max_binding: Option<u64>,
    /// Turns given back to the browser during CPU computation, in all.
    yields: std::cell::Cell<usize>,
    labels: Vec<String>,
}

/// A loaded model bundle, ready to score comparisons.
#[wasm_bindgen]
pub struct Judge(Rc<Inner>);

/// One comparison's prediction.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct Prediction {
    pub(crate) prob_model_a: f32,
    pub(crate) prob_model_b: f32,
    /// Model input length (BOS and EOS included).
    pub(crate) tokens: usize,
    /// Tokens of prompt, response A and response B before truncation.
    pub(crate) field_tokens: [usize; 3],
    /// Which of prompt, A and B were snipped by smart truncation.
    pub(crate) snipped: [bool; 3],
    /// The templated text was cut at the model's input length.
    pub(crate) cut: bool,
    /// Times the computation gave the browser a turn (CPU backend: once per layer and pass).
    pub(crate) yields: usize,
}

fn js(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// The device for `backend`: `webgpu` (an error without it), `cpu`, or `auto` (WebGPU when the browser has it,
/// else the CPU). Returns the device and its name.
async fn pick_device(backend: &str) -> Result<(Placement, String), String> {
    if backend != "cpu" {
        // The adapter's own limits, not WebGPU's defaults: they decide whether the token embedding fits on the GPU.
        match shared::model::placement::wgpu_async().await {
            Ok(placement) => return Ok((placement, "webgpu".into())),
            Err(e) if backend == "webgpu" => {
                return Err(format!("WebGPU is not available here: {e}"));
            }
            Err(_) => {}
        }
    }
    Ok((Placement::from(&Device::flex()), "cpu".into()))
}

#[wasm_bindgen]
impl Judge {
    /// Builds the model from a bundle's files: `config.json`, `tokenizer.json` and one weights file
    /// (safetensors: f32, f16, or int8 with per-row scales). `backend` is `auto`, `webgpu` or `cpu`.
    pub async fn load(
        config_json: Vec<u8>,
        tokenizer_json: Vec<u8>,
        weights_name: String,
        weights: Vec<u8>,
        backend: String,
    ) -> Result<Judge, JsError> {
        Inner::load(
            &config_json,
            &tokenizer_json,
            weights_name,
            weights,
            &backend,
        )
        .await
        .map(|inner| Judge(Rc::new(inner)))
        .map_err(js)
    }

    /// `webgpu` or `cpu`.
    #[wasm_bindgen(getter)]
    pub fn backend(&self) -> String {
        self.0.backend.clone()
    }

    /// P(A) and P(B) of one comparison as JSON (`prob_model_a`, `prob_model_b`, token counts, snipped parts);
    /// with `swap_tta`, averaged with the swapped pair's.
    pub async fn predict(
        &self,
        prompt: String,
        response_a: String,
        response_b: String,
        swap_tta: bool,
    ) -> Result<String, JsError> {
        let inner = self.0.clone();
        let out = inner
            .predict(prompt, response_a, response_b, swap_tta)
            .await
            .map_err(js)?;
        serde_json::to_string(&out).map_err(js)
    }

    /// Scores the first `limit` rows of a parquet or CSV file (either schema) and returns the Kaggle CSV
    /// (`id,winner,prob_model_a,prob_model_b`).
    #[wasm_bindgen(js_name = predictFile)]
    pub async fn predict_file(
        &self,
        name: String,
        bytes: Vec<u8>,
        swap_tta: bool,
        limit: usize,
        batch_size: usize,
    ) -> Result<String, JsError> {
        let inner = self.0.clone();
        let dataset = load_bytes(&name, bytes::Bytes::from(bytes), Format::Auto).map_err(js)?;
        let records: Vec<Record> = dataset.records.into_iter().take(limit).collect();
        let probs = inner
            .predict_records(&name, &records, swap_tta, batch_size, |_| {})
            .await
            .map_err(js)?;
        Ok(inner.csv(&records, &probs))
    }
}

impl Inner {
    pub(crate) async fn load(
        config_json: &[u8],
        tokenizer_json: &[u8],
        weights_name: String,
        weights: Vec<u8>,
        backend: &str,
    ) -> Result<Inner, String> {
        let config =
            Gemma2Config::from_hf_json("config.json", config_json).map_err(|e| e.to_string())?;
        let tokenizer =
            Tokenizer::from_json_bytes("tokenizer.json", tokenizer_json, EnginePreference::Fastest)
                .map_err(|e| e.to_string())?;
        let checkpoint =
            Checkpoint::from_files(vec![(weights_name, weights)]).map_err(|e| e.to_string())?;
        let (placement, backend) = pick_device(backend).await?;
        let device = placement.compute.clone();
        let max_binding = placement.max_binding_bytes;
        let loaded = from_checkpoint(config, &checkpoint, placement).map_err(|e| e.to_string())?;
        // f32 compute (weights as stored, f16 or int8, widened): the same numbers as `trainer predict`.
        let model = loaded.model;
        Ok(Inner {
            model,
            tokenizer,
            preprocess: PreprocessConfig::default(),
            device,
            backend,
            max_binding,
            yields: std::cell::Cell::new(0),
            labels: loaded.config.labels,
        })
    }

    pub(crate) fn backend(&self) -> &str {
        &self.backend
    }

    /// Where the weights went: the GPU's binding limit and whether the embedding table stayed in host memory.
    pub(crate) fn placement_note(&self) -> String {
        let Some(max) = self.max_binding else {
            return String::new();
        };
        let table = if self.model.embedding_device() == self.device {
            "on the GPU"
        } else {
            "in CPU memory (over one GPU binding)"
        };
        format!(
            " · largest GPU binding {} MiB; token embedding {table}",
            max >> 20
        )
    }

    pub(crate) async fn predict(
        &self,
        prompt: String,
        response_a: String,
        response_b: String,
        swap_tta: bool,
    ) -> Result<Prediction, String> {
        let record = Record {
            id: "input".into(),
            prompt,
            response_a,
            response_b,
            label: None,
            model_a: None,
            model_b: None,
            language: None,
        };
        let yields_before = self.yields.get();
        let straight = preprocess_record(&self.tokenizer, &self.preprocess, &record, false)
            .map_err(|e| e.to_string())?;
        let mut p = score(self, &[&straight]).await?[0];
        if swap_tta {
            let swapped = preprocess_record(&self.tokenizer, &self.preprocess, &record, true)
                .map_err(|e| e.to_string())?;
            let s = score(self, &[&swapped]).await?[0];
            p = [(p[0] + s[1]) / 2.0, (p[1] + s[0]) / 2.0];
        }
        Ok(Prediction {
            prob_model_a: p[0],
            prob_model_b: p[1],
            tokens: straight.input_ids.len(),
            field_tokens: straight.field_tokens,
            snipped: straight.snipped,
            cut: straight.cut,
            yields: self.yields.get() - yields_before,
        })
    }

    /// `[P(A), P(B)]` of every record, in batches; `progress(rows done)` after each.
    pub(crate) async fn predict_records(
        &self,
        name: &str,
        records: &[Record],
        swap_tta: bool,
        batch_size: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<[f32; 2]>, String> {
        let mut probs = Vec::with_capacity(records.len());
        for chunk in records.chunks(batch_size.max(1)) {
            let encode = |swap: bool| -> Result<Vec<Example>, String> {
                chunk
                    .iter()
                    .map(|r| {
                        preprocess_record(&self.tokenizer, &self.preprocess, r, swap)
                            .map_err(|e| format!("{name}: row id {}: {e}", r.id))
                    })
                    .collect()
            };
            let straight = encode(false)?;
            let mut p = score(self, &straight.iter().collect::<Vec<_>>()).await?;
            if swap_tta {
                let swapped = encode(true)?;
                let s = score(self, &swapped.iter().collect::<Vec<_>>()).await?;
                for (a, b) in p.iter_mut().zip(s) {
                    *a = [(a[0] + b[1]) / 2.0, (a[1] + b[0]) / 2.0];
                }
            }
            probs.extend(p);
            progress(probs.len());
        }
        Ok(probs)
    }

    /// The Kaggle CSV (`id,winner,prob_model_a,prob_model_b`).
    pub(crate) fn csv(&self, records: &[Record], probs: &[[f32; 2]]) -> String {
        let mut csv = String::from("id,winner");
        for l in &self.labels {
            csv.push_str(&format!(",prob_{l}"));
        }
        csv.push('\n');
        for (r, p) in records.iter().zip(probs) {
            let winner = if p[1] > p[0] {
                &self.labels[1]
            } else {
                &self.labels[0]
            };
            let id = if r.id.contains([',', '"', '\n']) {
                format!("\"{}\"", r.id.replace('"', "\"\""))
            } else {
                r.id.clone()
            };
            csv.push_str(&format!("{id},{winner},{:.6},{:.6}\n", p[0], p[1]));
        }
        csv
    }
}

#[wasm_bindgen]
extern "C" {
    /// The global `setTimeout`: a page's, a worker's or Node's.
    #[wasm_bindgen(js_name = setTimeout)]
    fn set_timeout(callback: &js_sys::Function, ms: i32);
}

/// Gives the browser a turn (a macrotask): it can paint and handle input before the next step. Through
/// `scheduler.postTask` where the browser has it, since `setTimeout(0)` is clamped to 4 ms once timers nest;
/// `setTimeout` elsewhere (Node).
pub(crate) async fn yield_now() {
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        let scheduler = js_sys::Reflect::get(&js_sys::global(), &"scheduler".into())
            .ok()
            .filter(|s| s.is_object());
        let posted = scheduler.is_some_and(|s| {
            js_sys::Reflect::get(&s, &"postTask".into())
                .ok()
                .and_then(|f| f.dyn_into::<js_sys::Function>().ok())
                .is_some_and(|post| post.call1(&s, &resolve).is_ok())
        });
        if !posted {
            set_timeout(&resolve, 0);
        }
    });
    let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
}

/// Softmax probabilities `[P(A), P(B)]` of each example, read back asynchronously.
async fn score(inner: &Inner, examples: &[&Example]) -> Result<Vec<[f32; 2]>, String> {
    let rows: Vec<&[u32]> = examples.iter().map(|e| e.input_ids.as_slice()).collect();
    let batch = collate(&rows, 0);
    let (ids, last) = inner.model.batch_inputs(&batch, &inner.device);
    let body = &inner.model.model;
    let mut pass = body.begin(ids);
    while body.step(&mut pass) {
        // On the CPU backend each layer computes right here, on the page's thread: give the browser a turn
        // between layers so the page keeps painting and answering input. (WebGPU work runs in the GPU process;
        // submitting it returns at once.)
        if inner.backend == "cpu" {
            yield_now().await;
            inner.yields.set(inner.yields.get() + 1);
        }
    }
    let logits = inner.model.classify(body.finish(pass), last);
    let data = softmax(logits.cast(FloatDType::F32), 1)
        .into_data_async()
        .await
        .map_err(|e| format!("reading the model output: {e:?}"))?;
    let values: Vec<f32> = data
        .try_to_vec::<f32>()
        .map_err(|e| format!("reading the model output: {e:?}"))?;
    Ok(values.chunks(2).map(|c| [c[0], c[1]]).collect())
}
