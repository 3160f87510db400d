//! The worker that owns the model: the page sends it [`Request`]s and gets [`Response`]s back, and never computes
//! itself, so it keeps painting and answering input whatever the model does (on WebGPU or the CPU fallback).
//!
//! The worker runs this same wasm module: the page starts it from a small module script that imports the
//! wasm-bindgen glue the page itself was loaded with, initialises it and calls [`worker_main`].

use std::cell::RefCell;
use std::rc::Rc;

use js_sys::{Object, Reflect, Uint8Array};
use shared::data::{Format, Label, load_bytes};
use shared::predict::longer_answer_accuracy;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::spawn_local;
use web_sys::{DedicatedWorkerGlobalScope, MessageEvent};

use crate::error::WebError;
use crate::judge::{Inner, LoadEvents};
use crate::protocol::{BundleInfo, DeviceInfo, FileResult, Request, Response};

fn scope() -> DedicatedWorkerGlobalScope {
    js_sys::global().unchecked_into()
}

/// Posts `response` to the page.
fn post(response: &Response) {
    let msg = Object::new();
    let json = serde_json::to_string(response).unwrap_or_default();
    let _ = Reflect::set(&msg, &"msg".into(), &json.into());
    let _ = scope().post_message(&msg);
}

struct Events;

impl LoadEvents for Events {
    fn bundle(&self, info: BundleInfo) {
        post(&Response::Bundle(info));
    }
    fn device(&self, info: DeviceInfo) {
        post(&Response::Device(info));
    }
    fn progress(&self, text: String, bytes: (u64, u64), tensors: (usize, usize)) {
        post(&Response::Progress {
            text,
            bytes: bytes.0,
            total_bytes: bytes.1,
            tensors: tensors.0,
            total_tensors: tensors.1,
        });
    }
}

type Model = Rc<RefCell<Option<Rc<Inner>>>>;

/// Entry point of the worker: listens for the page's requests.
#[wasm_bindgen(js_name = workerMain)]
pub fn worker_main() {
    let model: Model = Rc::new(RefCell::new(None));
    let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |ev: MessageEvent| {
        let data = ev.data();
        let json = Reflect::get(&data, &"msg".into())
            .ok()
            .and_then(|m| m.as_string())
            .unwrap_or_default();
        let bytes = Reflect::get(&data, &"bytes".into())
            .ok()
            .and_then(|b| b.dyn_into::<Uint8Array>().ok())
            .map(|b| b.to_vec());
        match serde_json::from_str::<Request>(&json) {
            Ok(request) => spawn_local(handle(model.clone(), request, bytes)),
            Err(e) => post(&Response::LoadFailed {
                error: format!("the worker got a message it does not know: {e}"),
            }),
        }
    });
    scope().set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    // The worker lives as long as the page.
    on_message.forget();
    post(&Response::Started);
}

async fn handle(model: Model, request: Request, bytes: Option<Vec<u8>>) {
    match request {
        Request::Load {
            base,
            weights,
            backend,
        } => match Inner::from_bundle(&base, weights.as_deref(), &backend, &Events).await {
            Ok((inner, info)) => {
                *model.borrow_mut() = Some(Rc::new(inner));
                post(&Response::Loaded(info));
            }
            Err(e) => post(&Response::LoadFailed {
                error: e.to_string(),
            }),
        },
        Request::Predict {
            id,
            prompt,
            response_a,
            response_b,
            swap_tta,
        } => {
            let Some(m) = model.borrow().clone() else {
                return post(&not_loaded(id));
            };
            post(
                &match m.predict(prompt, response_a, response_b, swap_tta).await {
                    Ok(prediction) => Response::Prediction { id, prediction },
                    Err(e) => Response::Failed {
                        id,
                        error: e.to_string(),
                    },
                },
            );
        }
        Request::PredictFile {
            id,
            name,
            swap_tta,
            limit,
        } => {
            let Some(m) = model.borrow().clone() else {
                return post(&not_loaded(id));
            };
            let result =
                predict_file(&m, id, &name, bytes.unwrap_or_default(), swap_tta, limit).await;
            post(&match result {
                Ok(result) => Response::FileResult { id, result },
                Err(e) => Response::Failed {
                    id,
                    error: e.to_string(),
                },
            });
        }
    }
}

fn not_loaded(id: u32) -> Response {
    Response::Failed {
        id,
        error: "the model is not loaded".into(),
    }
}

/// Rows scored per progress message.
const FILE_SLICE: usize = 8;

async fn predict_file(
    m: &Inner,
    id: u32,
    name: &str,
    bytes: Vec<u8>,
    swap_tta: bool,
    limit: Option<usize>,
) -> Result<FileResult, WebError> {
    let started = js_sys::Date::now();
    let records: Vec<_> = load_bytes(name, bytes::Bytes::from(bytes), Format::Auto)?
        .records
        .into_iter()
        .take(limit.unwrap_or(usize::MAX))
        .collect();
    let total = records.len();
    let mut probs = Vec::with_capacity(total);
    let mut field_tokens = Vec::with_capacity(total);
    for chunk in records.chunks(FILE_SLICE) {
        let (p, t) = m.predict_records(chunk, swap_tta, FILE_SLICE).await?;
        probs.extend(p);
        field_tokens.extend(t);
        post(&Response::FileProgress {
            id,
            done: probs.len(),
            total,
        });
    }
    let csv = m.csv(&records, &probs)?;
    let (mut n, mut correct) = (0usize, 0usize);
    for (r, p) in records.iter().zip(&probs) {
        if let Some(label @ (Label::ModelA | Label::ModelB)) = r.label {
            n += 1;
            correct += usize::from(usize::from(p[1] > p[0]) == label.index());
        }
    }
    Ok(FileResult {
        rows: records
            .iter()
            .zip(&probs)
            .map(|(r, p)| {
                let w = if p[1] > p[0] { "model_b" } else { "model_a" };
                (r.id.clone(), w.to_string(), p[0], p[1])
            })
            .collect(),
        accuracy: (n > 0).then(|| (correct as f64 / n as f64, n)),
        longer_answer_accuracy: longer_answer_accuracy(
            field_tokens
                .into_iter()
                .zip(records.iter().map(|r| r.label)),
        ),
        csv,
        seconds: (js_sys::Date::now() - started) / 1000.0,
    })
}
