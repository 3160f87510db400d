//! The classifier in the browser: a `trainer export` web bundle streamed into the same `shared` model code, on
//! WebGPU (burn's wgpu backend) or, without it, on burn's CPU backend compiled to wasm.
//!
//! In the page the model lives in a worker ([`crate::worker`]); [`Judge`] is the same model for JavaScript that
//! holds one itself (the Node tests). Reading tensors back is asynchronous here (a browser cannot block on the
//! GPU), so scoring is `async`; batching, swap-TTA, the checks and the CSV are `shared::predict`'s, as natively.

use std::rc::Rc;

use burn::tensor::activation::softmax;
use burn::tensor::{Device, FloatDType};
use shared::batch::collate;
use shared::bundle::WeightFormat;
use shared::data::{Format, Record, load_bytes};
use shared::model::load::{Loaded, Loader, footprint};
use shared::model::weights::StreamReader;
use shared::model::{Gemma2Config, Gemma2ForSequenceClassification, Placement};
use shared::predict::{batches, check_finite, encode, predictions_csv, swap_average};
use shared::preprocess::{Example, PreprocessConfig};
use shared::tokenizer::{EnginePreference, Tokenizer};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;

use crate::bundle::Bundle;
use crate::error::WebError;
use crate::protocol::{BundleInfo, DeviceInfo, LoadInfo, Prediction};

/// The weights a page may hold in wasm memory. wasm32's address space is 4 GiB, and loading needs far more than
/// the weights: on the CPU fallback, a 2304 × 4 q4 bundle (719 MB of weights, as burn's CPU backend holds them)
/// peaked at 1,381 MB, and gemma-2-2b's 26 layers (2,647 MB) ran out of memory at the end of loading, so the
/// headroom grows with the weights. Under this budget the CPU fallback refuses gemma-2-2b before downloading it.
const HOST_BUDGET_BYTES: u64 = 2 << 30;

pub(crate) struct Inner {
    model: Gemma2ForSequenceClassification,
    tokenizer: Tokenizer,
    preprocess: PreprocessConfig,
    device: Device,
    backend: String,
    labels: Vec<String>,
    /// Give the browser a turn between decoder layers on the CPU backend: on for a model on the page's own
    /// thread, off in a worker (nothing waits on its thread).
    yield_between_layers: bool,
}

/// A loaded model bundle, ready to score comparisons.
#[wasm_bindgen]
pub struct Judge(Rc<Inner>);

fn js(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// The device for `backend`: `webgpu` (an error without it), `cpu`, or `auto` (WebGPU when the browser has it,
/// else the CPU). Returns the device and its name.
async fn pick_device(backend: &str) -> Result<(Placement, String), WebError> {
    if backend != "cpu" {
        // The adapter's own limits, not WebGPU's defaults: they decide whether the token embedding fits on the GPU.
        match shared::model::placement::wgpu_async().await {
            Ok(placement) => return Ok((placement, "webgpu".into())),
            Err(e) if backend == "webgpu" => return Err(WebError::NoWebGpu(e.to_string())),
            Err(_) => {}
        }
    }
    Ok((Placement::from(&Device::flex()), "cpu".into()))
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64)
}

/// The wasm memory's size now.
pub(crate) fn wasm_memory_bytes() -> u64 {
    wasm_bindgen::memory()
        .dyn_into::<js_sys::WebAssembly::Memory>()
        .ok()
        .and_then(|m| m.buffer().dyn_into::<js_sys::ArrayBuffer>().ok())
        .map_or(0, |b| b.byte_length() as u64)
}

/// What loading tells its caller as it goes.
pub(crate) trait LoadEvents {
    fn bundle(&self, _info: BundleInfo) {}
    fn device(&self, _info: DeviceInfo) {}
    /// `text`, bytes of the weights so far and in all, tensors so far and in all.
    fn progress(&self, _text: String, _bytes: (u64, u64), _tensors: (usize, usize)) {}
}

impl Inner {
    /// Streams the bundle at `base` (absolute, ending in `/`) onto the device for `backend`.
    pub(crate) async fn from_bundle(
        base: &str,
        weights: Option<&str>,
        backend: &str,
        events: &dyn LoadEvents,
    ) -> Result<(Inner, LoadInfo), WebError> {
        let started = js_sys::Date::now();
        let bundle = Bundle::open(base, weights).await?;
        let m = &bundle.manifest;
        events.bundle(BundleInfo {
            about: m.about.clone(),
            format: bundle.weights.format.name().into(),
            formats: m
                .weights
                .iter()
                .map(|w| (w.format.name().into(), m.file_bytes(&w.file).unwrap_or(0)))
                .collect(),
            download_bytes: bundle.download_bytes(),
        });
        let (config_json, c1) = bundle.file(&m.config).await?;
        let config = Gemma2Config::from_hf_json(&format!("{base}{}", m.config), &config_json)?;
        let (placement, backend) = pick_device(backend).await?;
        let fp = footprint(&config, bundle.weights.format, &placement);
        events.device(DeviceInfo {
            backend: backend.clone(),
            max_binding_bytes: placement.max_binding_bytes,
            gpu_bytes: fp.device_bytes,
            host_bytes: fp.host_bytes,
        });
        check_fits(&placement, &fp, bundle.weights.format)?;
        let (tokenizer_json, c2) = bundle.file(&m.tokenizer).await?;
        let tokenizer = Tokenizer::from_json_bytes(
            &format!("{base}{}", m.tokenizer),
            &tokenizer_json,
            EnginePreference::Fastest,
        )?;
        drop(tokenizer_json);
        let file = bundle.weights.file.clone();
        let total = m.file_bytes(&file).unwrap_or(0);
        // A damaged cached copy is dropped by the failed check: the second try downloads.
        let mut attempt = 0;
        let (loaded, c3) = loop {
            attempt += 1;
            match stream_weights(
                &bundle,
                &file,
                total,
                config.clone(),
                placement.clone(),
                events,
            )
            .await
            {
                Err(WebError::Corrupt { .. }) if attempt == 1 => continue,
                other => break other?,
            }
        };
        let stats = loaded.stats;
        let table_on_host = loaded.model.embedding_device() != placement.compute;
        let fused_kernels = backend == "webgpu" && shared::model::placement::fused_kernels();
        let inner = Inner {
            labels: loaded.config.labels.clone(),
            model: loaded.model,
            tokenizer,
            preprocess: m.preprocess,
            device: placement.compute,
            backend: backend.clone(),
            yield_between_layers: false,
        };
        let info = LoadInfo {
            backend,
            from_cache: c1 && c2 && c3,
            download_bytes: bundle.download_bytes(),
            seconds: (js_sys::Date::now() - started) / 1000.0,
            gpu_bytes: stats.device_bytes,
            host_bytes: stats.host_bytes,
            wasm_memory_bytes: wasm_memory_bytes(),
            table_on_host,
            fused_kernels,
        };
        Ok((inner, info))
    }

    /// From a bundle's files in memory: `config.json`, `tokenizer.json` and one weights file.
    pub(crate) async fn from_bytes(
        config_json: &[u8],
        tokenizer_json: &[u8],
        weights_name: &str,
        weights: &[u8],
        backend: &str,
    ) -> Result<Inner, WebError> {
        let config = Gemma2Config::from_hf_json("config.json", config_json)?;
        let tokenizer = Tokenizer::from_json_bytes(
            "tokenizer.json",
            tokenizer_json,
            EnginePreference::Fastest,
        )?;
        let (placement, backend) = pick_device(backend).await?;
        let mut loader = Loader::new(config, placement.clone());
        let mut reader = StreamReader::new(weights_name);
        for t in reader.push(weights)? {
            loader.add(t)?;
        }
        reader.finish()?;
        let loaded = loader.finish()?;
        Ok(Inner {
            labels: loaded.config.labels.clone(),
            model: loaded.model,
            tokenizer,
            preprocess: PreprocessConfig::default(),
            device: placement.compute,
            backend,
            yield_between_layers: true,
        })
    }

    pub(crate) fn backend(&self) -> &str {
        &self.backend
    }

    pub(crate) async fn predict(
        &self,
        prompt: String,
        response_a: String,
        response_b: String,
        swap_tta: bool,
    ) -> Result<Prediction, WebError> {
        let started = js_sys::Date::now();
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
        let records = std::slice::from_ref(&record);
        let vocab = self.model.vocab_size();
        let straight = encode(&self.tokenizer, &self.preprocess, records, false, vocab)?;
        let probs = self.score_examples(records, &straight, swap_tta, 1).await?;
        let e = &straight[0];
        Ok(Prediction {
            prob_model_a: probs[0][0],
            prob_model_b: probs[0][1],
            tokens: e.input_ids.len(),
            field_tokens: e.field_tokens,
            snipped: e.snipped,
            cut: e.cut,
            latency_ms: js_sys::Date::now() - started,
        })
    }

    /// `[P(A), P(B)]` of every record, as `trainer predict` computes them.
    pub(crate) async fn predict_records(
        &self,
        records: &[Record],
        swap_tta: bool,
        batch_size: usize,
    ) -> Result<(Vec<Vec<f32>>, Vec<[usize; 3]>), WebError> {
        let vocab = self.model.vocab_size();
        let straight = encode(&self.tokenizer, &self.preprocess, records, false, vocab)?;
        let probs = self
            .score_examples(records, &straight, swap_tta, batch_size)
            .await?;
        Ok((probs, straight.iter().map(|e| e.field_tokens).collect()))
    }

    async fn score_examples(
        &self,
        records: &[Record],
        straight: &[Example],
        swap_tta: bool,
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>, WebError> {
        let mut probs = self.score(straight, batch_size).await?;
        if swap_tta {
            let vocab = self.model.vocab_size();
            let swapped = encode(&self.tokenizer, &self.preprocess, records, true, vocab)?;
            probs = swap_average(&probs, &self.score(&swapped, batch_size).await?);
        }
        check_finite(records, &probs)?;
        Ok(probs)
    }

    /// Softmax probabilities of each example, in input order, in `shared::predict`'s length-sorted batches.
    async fn score(
        &self,
        examples: &[Example],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>, WebError> {
        let mut out = vec![Vec::new(); examples.len()];
        for chunk in batches(examples, batch_size) {
            let rows: Vec<&[u32]> = chunk
                .iter()
                .map(|&i| examples[i].input_ids.as_slice())
                .collect();
            let (ids, last) = self.model.batch_inputs(&collate(&rows, 0), &self.device);
            let body = &self.model.model;
            let mut pass = body.begin(ids);
            while body.step(&mut pass) {
                // On the CPU backend each layer computes right here: on the page's thread, give the browser a
                // turn between layers so the page keeps painting and answering input.
                if self.yield_between_layers && self.backend == "cpu" {
                    yield_now().await;
                }
            }
            let logits = self.model.classify(body.finish(pass), last);
            let data = softmax(logits.cast(FloatDType::F32), 1)
                .into_data_async()
                .await
                .map_err(|e| WebError::Js(format!("reading the model output: {e:?}")))?;
            let values: Vec<f32> = data
                .try_to_vec::<f32>()
                .map_err(|e| WebError::Js(format!("reading the model output: {e:?}")))?;
            let classes = values.len() / chunk.len().max(1);
            for (k, &i) in chunk.iter().enumerate() {
                out[i] = values[k * classes..(k + 1) * classes].to_vec();
            }
        }
        Ok(out)
    }

    /// The Kaggle CSV (`id,winner,prob_model_a,prob_model_b`).
    pub(crate) fn csv(&self, records: &[Record], probs: &[Vec<f32>]) -> Result<String, WebError> {
        Ok(predictions_csv(records, probs, &self.labels)?)
    }
}

/// Refuses a model the device cannot hold, naming what it lacks.
fn check_fits(
    placement: &Placement,
    fp: &shared::model::load::Footprint,
    format: WeightFormat,
) -> Result<(), WebError> {
    // q4 is the smallest format: past it, only another device helps.
    let smaller = match format {
        WeightFormat::Q4 => "",
        _ => "choose smaller weights (?weights=q4) or ",
    };
    if let Some(max) = placement.max_binding_bytes
        && fp.largest.1 > max
    {
        return Err(WebError::TooLarge(format!(
            "this GPU binds at most {} per buffer, and the model's {} takes {} in {} weights: {smaller}use a GPU \
             with larger bindings",
            mib(max),
            fp.largest.0,
            mib(fp.largest.1),
            format.name()
        )));
    }
    if fp.host_bytes > HOST_BUDGET_BYTES {
        return Err(WebError::TooLarge(format!(
            "the model needs {} of WebAssembly memory in {} weights (the table over one GPU binding, or every \
             weight on the CPU), over the {} a page can use: {smaller}use a browser and device with WebGPU",
            mib(fp.host_bytes),
            format.name(),
            mib(HOST_BUDGET_BYTES)
        )));
    }
    Ok(())
}

/// Streams the weights file into a fresh loader, tensor by tensor.
async fn stream_weights(
    bundle: &Bundle,
    file: &str,
    total: u64,
    config: Gemma2Config,
    placement: Placement,
    events: &dyn LoadEvents,
) -> Result<(Loaded, bool), WebError> {
    let mut loader = Loader::new(config, placement);
    let mut reader = StreamReader::new(format!("{}{file}", bundle.base));
    let mut bytes = 0u64;
    let mut last_report = 0.0;
    let from_cache = bundle
        .stream(
            file,
            |chunk| {
                bytes += chunk.len() as u64;
                let mut last_key = None;
                for t in reader.push(chunk)? {
                    last_key = Some(t.key.clone());
                    loader.add(t)?;
                }
                let now = js_sys::Date::now();
                if let Some(key) = last_key
                    && (now - last_report > 100.0 || bytes == total)
                {
                    last_report = now;
                    let (done, all) = loader.progress();
                    events.progress(
                        format!(
                            "{file}: {:.1} / {:.1} MB · tensor {done} of {all} on the device ({key})",
                            bytes as f64 / 1e6,
                            total as f64 / 1e6
                        ),
                        (bytes, total),
                        (done, all),
                    );
                }
                Ok(())
            },
            |_| {},
        )
        .await?;
    reader.finish()?;
    Ok((loader.finish()?, from_cache))
}

#[wasm_bindgen]
impl Judge {
    /// Builds the model from a bundle's files: `config.json`, `tokenizer.json` and one weights file
    /// (safetensors: f32, f16, int8 or q4). `backend` is `auto`, `webgpu` or `cpu`.
    pub async fn load(
        config_json: Vec<u8>,
        tokenizer_json: Vec<u8>,
        weights_name: String,
        weights: Vec<u8>,
        backend: String,
    ) -> Result<Judge, JsError> {
        Inner::from_bytes(
            &config_json,
            &tokenizer_json,
            &weights_name,
            &weights,
            &backend,
        )
        .await
        .map(|inner| Judge(Rc::new(inner)))
        .map_err(js)
    }

    /// `webgpu` or `cpu`.
    #[wasm_bindgen(getter)]
    pub fn backend(&self) -> String {
        self.0.backend().into()
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
        let (probs, _) = inner
            .predict_records(&records, swap_tta, batch_size)
            .await
            .map_err(js)?;
        inner.csv(&records, &probs).map_err(js)
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
