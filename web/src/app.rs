//! The page: paste a prompt and two answers (or pick an example from the bundled sample), see which answer
//! people will likely prefer; or drop a whole parquet/CSV file for a predictions table and CSV.
//!
//! The model is loaded from a `trainer export` web bundle: `./bundle/` by default, `?bundle=URL` for another,
//! `?weights=f16|int8|q4` to choose the weights, `?backend=cpu|webgpu|auto`. A worker owns the model
//! ([`crate::worker`]); the page only sends requests and shows what comes back.

use std::rc::Rc;

use leptos::prelude::*;
use leptos::task::spawn_local;
use shared::bundle::BundleAbout;
use shared::data::{Format, Record, load_bytes};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::Closure;

use crate::bundle;
use crate::error::WebError;
use crate::protocol::{
    BundleInfo, DeviceInfo, FileResult, LoadInfo, Prediction, Request, Response,
};

/// The bundled real sample's first comparisons, for one-click examples.
const SAMPLE: &[u8] = include_bytes!("../../data/arena-sample.parquet");
const EXAMPLES: usize = 6;

fn examples() -> Vec<Record> {
    load_bytes(
        "arena-sample.parquet",
        bytes::Bytes::from_static(SAMPLE),
        Format::Auto,
    )
    .map(|d| d.records.into_iter().take(EXAMPLES).collect())
    .unwrap_or_default()
}

fn query(name: &str) -> Option<String> {
    let search = web_sys::window()?.location().search().ok()?;
    web_sys::UrlSearchParams::new_with_str(&search)
        .ok()?
        .get(name)
        .filter(|v| !v.is_empty())
}

fn short(s: &str, n: usize) -> String {
    let mut out: String = s.chars().take(n).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

#[derive(Clone)]
enum Status {
    Loading(String),
    Ready,
    Failed(String),
}

#[derive(Clone)]
struct BatchResult {
    result: FileResult,
    csv_url: String,
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// What the page says about the model before a reader trusts its numbers.
fn describe(about: &Option<BundleAbout>) -> String {
    let Some(a) = about else {
        return "A Gemma-2 classifier (this bundle does not say which: it predates that record)."
            .into();
    };
    let accuracy = match (a.test_accuracy, a.test_rows) {
        (Some(acc), Some(n)) => {
            format!(" Test accuracy {:.1}% on {n} held-out votes.", acc * 100.0)
        }
        _ => String::new(),
    };
    let params = format!("{:.1}M parameters", a.parameters as f64 / 1e6);
    if a.random_base {
        // A run of `trainer demo` records its test accuracy; a benchmark bundle (make_bundle) was never trained.
        let trained = if accuracy.is_empty() {
            " and was never trained (a size benchmark): its percentages mean nothing".to_string()
        } else {
            format!(
                " and was trained for minutes by `trainer demo`.{accuracy} It has learnt little: its percentages \
                 are close to a coin flip and are not a verdict"
            )
        };
        format!(
            "This model is a Gemma-2 ({}, {params}) that started from random weights{trained}. A model \
             fine-tuned from pretrained gemma-2-2b is what the page is for.",
            a.shape
        )
    } else {
        format!(
            "Gemma-2 fine-tuned from {} ({}, {params}) on Chatbot Arena votes.{accuracy}",
            a.base, a.shape
        )
    }
}

/// The page's side of the worker: requests go out (queued until the worker listens), responses come back to
/// `on_response`.
struct Client {
    worker: web_sys::Worker,
    started: std::cell::Cell<bool>,
    queue: std::cell::RefCell<Vec<js_sys::Object>>,
    next_id: std::cell::Cell<u32>,
}

impl Client {
    fn send(&self, request: &Request, bytes: Option<js_sys::Uint8Array>) -> u32 {
        let msg = js_sys::Object::new();
        let json = serde_json::to_string(request).unwrap_or_default();
        let _ = js_sys::Reflect::set(&msg, &"msg".into(), &json.into());
        if let Some(b) = bytes {
            let _ = js_sys::Reflect::set(&msg, &"bytes".into(), &b);
        }
        if self.started.get() {
            let _ = self.worker.post_message(&msg);
        } else {
            self.queue.borrow_mut().push(msg);
        }
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    fn started(&self) {
        self.started.set(true);
        for msg in self.queue.borrow_mut().drain(..) {
            let _ = self.worker.post_message(&msg);
        }
    }

    fn next_id(&self) -> u32 {
        self.next_id.get()
    }
}

/// Starts the worker from this page's own wasm-bindgen glue and module (the URLs trunk preloads).
fn start_worker(on_response: impl Fn(Response) + 'static) -> Result<web_sys::Worker, WebError> {
    let document = web_sys::window()
        .and_then(|w| w.document())
        .ok_or_else(|| WebError::Js("no document".into()))?;
    let href = |selector: &str| -> Option<String> {
        let links = document.query_selector_all(selector).ok()?;
        (0..links.length())
            .filter_map(|i| links.item(i)?.dyn_into::<web_sys::HtmlLinkElement>().ok())
            .map(|l| l.href())
            .next()
    };
    let glue = href("link[rel=modulepreload][href$='.js']")
        .ok_or_else(|| WebError::Js("the page does not name its wasm-bindgen module".into()))?;
    let wasm = href("link[rel=preload][href$='.wasm']")
        .ok_or_else(|| WebError::Js("the page does not name its wasm file".into()))?;
    let source = format!(
        "import init, {{ workerMain }} from {glue:?};\nawait init({{ module_or_path: {wasm:?} }});\nworkerMain();\n"
    );
    let parts = js_sys::Array::of1(&source.into());
    let opts = web_sys::BlobPropertyBag::new();
    opts.set_type("text/javascript");
    let blob =
        web_sys::Blob::new_with_str_sequence_and_options(&parts, &opts).map_err(WebError::js)?;
    let url = web_sys::Url::create_object_url_with_blob(&blob).map_err(WebError::js)?;
    let options = web_sys::WorkerOptions::new();
    options.set_type(web_sys::WorkerType::Module);
    let worker = web_sys::Worker::new_with_options(&url, &options).map_err(WebError::js)?;
    let on_response = std::rc::Rc::new(on_response);
    let handler = on_response.clone();
    let on_message =
        Closure::<dyn FnMut(web_sys::MessageEvent)>::new(move |ev: web_sys::MessageEvent| {
            let json = js_sys::Reflect::get(&ev.data(), &"msg".into())
                .ok()
                .and_then(|m| m.as_string())
                .unwrap_or_default();
            match serde_json::from_str::<Response>(&json) {
                Ok(r) => handler(r),
                Err(e) => handler(Response::LoadFailed {
                    error: format!("the page got a message it does not know: {e}"),
                }),
            }
        });
    worker.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    on_message.forget();
    let on_error =
        Closure::<dyn FnMut(web_sys::ErrorEvent)>::new(move |ev: web_sys::ErrorEvent| {
            on_response(Response::LoadFailed {
                error: format!("the model's worker failed: {}", ev.message()),
            });
        });
    worker.set_onerror(Some(on_error.as_ref().unchecked_ref()));
    on_error.forget();
    Ok(worker)
}

#[component]
pub fn App() -> impl IntoView {
    let (status, set_status) = signal(Status::Loading("starting".into()));
    let (bundle_info, set_bundle_info) = signal(None::<BundleInfo>);
    let (device_info, set_device_info) = signal(None::<DeviceInfo>);
    let (load_info, set_load_info) = signal(None::<LoadInfo>);
    let (load_fraction, set_load_fraction) = signal(0.0f64);
    let (prompt, set_prompt) = signal(String::new());
    let (answer_a, set_answer_a) = signal(String::new());
    let (answer_b, set_answer_b) = signal(String::new());
    let (swap, set_swap) = signal(false);
    let (busy, set_busy) = signal(false);
    let (shown, set_shown) = signal(None::<Prediction>);
    let (error, set_error) = signal(None::<String>);
    let (batch, set_batch) = signal(None::<BatchResult>);
    let (batch_progress, set_batch_progress) = signal(String::new());
    // Score only the first N rows of a dropped file (a whole competition file takes long on a CPU).
    let (batch_limit, set_batch_limit) = signal(None::<usize>);
    let samples = StoredValue::new(examples());

    let base = bundle::absolute(&bundle::normalize_base(
        &query("bundle").unwrap_or_else(|| "bundle/".into()),
    ));
    let weights = query("weights");
    let backend = query("backend").unwrap_or_else(|| "auto".into());
    let client: StoredValue<Option<Rc<Client>>, LocalStorage> = StoredValue::new_local(None);
    let shown_base = base.clone();
    let on_response = move |r: Response| match r {
        Response::Started => {
            if let Some(c) = client.get_value() {
                c.started();
            }
        }
        Response::Bundle(info) => set_bundle_info.set(Some(info)),
        Response::Device(info) => set_device_info.set(Some(info)),
        Response::Progress {
            text,
            bytes,
            total_bytes,
            ..
        } => {
            set_load_fraction.set(bytes as f64 / total_bytes.max(1) as f64);
            set_status.set(Status::Loading(text));
        }
        Response::Loaded(info) => {
            set_load_info.set(Some(info));
            set_status.set(Status::Ready);
        }
        Response::LoadFailed { error } => {
            set_status.set(Status::Failed(format!("{shown_base}: {error}")))
        }
        Response::Prediction { prediction, .. } => {
            set_shown.set(Some(prediction));
            set_busy.set(false);
        }
        Response::FileProgress { done, total, .. } => {
            set_batch_progress.set(format!("scored {done} / {total} rows"));
        }
        Response::FileResult { result, .. } => {
            let parts = js_sys::Array::of1(&result.csv.clone().into());
            let opts = web_sys::BlobPropertyBag::new();
            opts.set_type("text/csv");
            let csv_url = web_sys::Blob::new_with_str_sequence_and_options(&parts, &opts)
                .ok()
                .and_then(|b| web_sys::Url::create_object_url_with_blob(&b).ok())
                .unwrap_or_default();
            set_batch.set(Some(BatchResult { result, csv_url }));
        }
        Response::Failed { error, .. } => {
            set_error.set(Some(error));
            set_busy.set(false);
        }
    };
    match start_worker(on_response) {
        Ok(worker) => {
            let c = Rc::new(Client {
                worker,
                started: std::cell::Cell::new(false),
                queue: std::cell::RefCell::new(Vec::new()),
                next_id: std::cell::Cell::new(1),
            });
            c.send(
                &Request::Load {
                    base: base.clone(),
                    weights,
                    backend,
                },
                None,
            );
            client.set_value(Some(c));
        }
        Err(e) => set_status.set(Status::Failed(e.to_string())),
    }

    let run = move || {
        let Some(c) = client.get_value() else {
            return;
        };
        set_busy.set(true);
        set_error.set(None);
        c.send(
            &Request::Predict {
                id: c.next_id(),
                prompt: prompt.get_untracked(),
                response_a: answer_a.get_untracked(),
                response_b: answer_b.get_untracked(),
                swap_tta: swap.get_untracked(),
            },
            None,
        );
    };

    let load_example = move |i: usize| {
        if let Some(r) = samples.with_value(|s| s.get(i).cloned()) {
            set_prompt.set(r.prompt);
            set_answer_a.set(r.response_a);
            set_answer_b.set(r.response_b);
            set_shown.set(None);
            run();
        }
    };

    let on_file = move |ev: leptos::ev::Event| {
        let Some(input) = ev
            .target()
            .and_then(|t| t.dyn_into::<web_sys::HtmlInputElement>().ok())
        else {
            return;
        };
        let Some(file) = input.files().and_then(|f| f.get(0)) else {
            return;
        };
        let Some(c) = client.get_value() else {
            return;
        };
        let (swap_tta, limit) = (swap.get_untracked(), batch_limit.get_untracked());
        set_batch.set(None);
        set_error.set(None);
        set_batch_progress.set(String::new());
        spawn_local(async move {
            let name = file.name();
            let bytes = match wasm_bindgen_futures::JsFuture::from(file.array_buffer()).await {
                Ok(b) => js_sys::Uint8Array::new(&b),
                Err(_) => {
                    set_error.set(Some(format!("{name}: cannot read the file")));
                    return;
                }
            };
            // The page reads nothing of the file: the worker parses it and scores it.
            c.send(
                &Request::PredictFile {
                    id: c.next_id(),
                    name,
                    swap_tta,
                    limit,
                },
                Some(bytes),
            );
        });
    };

    let ready = move || matches!(status.get(), Status::Ready);
    view! {
        <main>
            <h1>"arena-judge"</h1>
            <p class="lead">
                "Which of two chatbot answers will people prefer? A Gemma-2 classifier trained on Chatbot Arena votes "
                "makes its guess, running in your browser."
            </p>
            <section id="about" class="about">
                {move || bundle_info.get().map(|b| {
                    let random = b.about.as_ref().is_some_and(|a| a.random_base);
                    let formats = b.formats.iter().map(|(f, n)| format!("{f} {}", mb(*n))).collect::<Vec<_>>().join(", ");
                    view! {
                        <p id="model-about" class=if random { "banner" } else { "" } data-random=random.to_string()>{describe(&b.about)}</p>
                        <p class="meta" id="bundle-size">
                            {format!("Weights: {} · {} to download (config, tokenizer, weights) · the bundle has {formats}", b.format, mb(b.download_bytes))}
                        </p>
                    }
                })}
                {move || device_info.get().map(|d| view! {
                    <p class="meta" id="device-info" data-gpu-bytes=d.gpu_bytes data-host-bytes=d.host_bytes>
                        {match d.max_binding_bytes {
                            Some(max) => format!("WebGPU: largest buffer binding {:.0} MiB · ", max as f64 / (1u64 << 20) as f64),
                            None => "CPU (WebAssembly) · ".to_string(),
                        }}
                        {format!("the model takes about {} on the GPU and {} of WebAssembly memory", mb(d.gpu_bytes), mb(d.host_bytes))}
                    </p>
                })}
            </section>
            <div id="status" data-status=move || match status.get() {
                Status::Loading(_) => "loading",
                Status::Ready => "ready",
                Status::Failed(_) => "error",
            }>
                {move || match status.get() {
                    Status::Loading(t) => view! {
                        <p class="loading">
                            <progress max="1" value=move || load_fraction.get()></progress>" "{t}
                        </p>
                    }.into_any(),
                    Status::Ready => view! {
                        <p class="ready">
                            "Model ready on "
                            <strong id="backend">{move || load_info.get().map(|l| l.backend).unwrap_or_default()}</strong>
                            {move || load_info.get().map(|l| view! {
                                <span class="meta" id="source" data-wasm-memory=l.wasm_memory_bytes data-gpu-bytes=l.gpu_bytes data-host-bytes=l.host_bytes>
                                    {format!(" ({} {} in {:.1} s)", mb(l.download_bytes), if l.from_cache { "from the browser cache" } else { "downloaded" }, l.seconds)}
                                </span>
                                <span class="meta" id="placement">
                                    {format!(" · on the GPU {}, in WebAssembly memory {} (peak wasm memory {}){}",
                                        mb(l.gpu_bytes), mb(l.host_bytes), mb(l.wasm_memory_bytes),
                                        if l.table_on_host { "; token embedding in wasm memory (over one GPU binding)" } else { "" })}
                                </span>
                            })}
                            {move || load_info.get().filter(|l| l.backend == "webgpu").map(|l| view! {
                                <span class="meta" id="kernels" data-fused=l.fused_kernels.to_string()>
                                    {if l.fused_kernels { " · WGSL kernels, fused" } else { " · WGSL kernels, not fused" }}
                                </span>
                            })}
                        </p>
                    }.into_any(),
                    Status::Failed(e) => view! { <p class="error" id="load-error">"Could not load the model: " {e}</p> }.into_any(),
                }}
            </div>
            <Show when=move || load_info.get().is_some_and(|l| l.backend == "cpu")>
                <p class="banner" id="cpu-banner">
                    "WebGPU is not available in this browser: the model runs on the CPU (slower)."
                </p>
            </Show>
            <section class="examples">
                <span>"Examples from real Arena votes: "</span>
                {(0..EXAMPLES).map(|i| view! {
                    <button class="example" data-example=i disabled=move || !ready() || busy.get()
                        on:click=move |_| load_example(i)>
                        {move || samples.with_value(|s| s.get(i).map(|r| short(&r.prompt, 28)).unwrap_or_default())}
                    </button>
                }).collect_view()}
            </section>
            <label>"Prompt"<textarea id="prompt" rows="3" prop:value=prompt on:input=move |e| set_prompt.set(event_target_value(&e))></textarea></label>
            <div class="pair">
                <label>"Answer A"<textarea id="answer-a" rows="8" prop:value=answer_a on:input=move |e| set_answer_a.set(event_target_value(&e))></textarea></label>
                <label>"Answer B"<textarea id="answer-b" rows="8" prop:value=answer_b on:input=move |e| set_answer_b.set(event_target_value(&e))></textarea></label>
            </div>
            <div class="controls">
                <label class="inline"><input type="checkbox" id="swap" prop:checked=swap on:change=move |e| {
                    let checked = e.target().and_then(|t| t.dyn_into::<web_sys::HtmlInputElement>().ok()).is_some_and(|i| i.checked());
                    set_swap.set(checked);
                }/>" swap-TTA (also score with the answers swapped)"</label>
                <button id="predict" disabled=move || !ready() || busy.get() on:click=move |_| run()>
                    {move || if busy.get() { "Predicting…" } else { "Predict" }}
                </button>
            </div>
            {move || error.get().map(|e| view! { <p class="error" id="predict-error">{e}</p> })}
            {move || shown.get().map(|p| {
                let pa = p.prob_model_a;
                let parts = ["prompt", "answer A", "answer B"];
                let snipped: Vec<&str> = parts.iter().zip(p.snipped).filter(|(_, s)| *s).map(|(n, _)| *n).collect();
                view! {
                    <section id="result" data-pa=format!("{:.6}", pa) data-pb=format!("{:.6}", p.prob_model_b)>
                        <div class="bar">
                            <div class="a" style=format!("width:{:.1}%", pa * 100.0)>{format!("A {:.1}%", pa * 100.0)}</div>
                            <div class="b" style=format!("width:{:.1}%", (1.0 - pa) * 100.0)>{format!("B {:.1}%", p.prob_model_b * 100.0)}</div>
                        </div>
                        <p>
                            {if pa >= 0.5 { "The model expects people to prefer answer A." } else { "The model expects people to prefer answer B." }}
                        </p>
                        <p class="meta">
                            {format!("{} tokens in (prompt {}, A {}, B {} before truncation) · {:.0} ms",
                                p.tokens, p.field_tokens[0], p.field_tokens[1], p.field_tokens[2], p.latency_ms)}
                            <br/>
                            {if snipped.is_empty() { "Nothing was snipped.".to_string() } else { format!("Snipped to fit: {}.", snipped.join(", ")) }}
                            {if p.cut { " The input was cut at 512 tokens." } else { "" }}
                        </p>
                    </section>
                }
            })}
            <section class="batch">
                <h2>"Batch"</h2>
                <p>"Drop a parquet or CSV file (WSDM or LMSYS format) to score every row; labels, if present, give the accuracy."</p>
                <label class="inline">"First rows only: "<input type="number" id="batch-limit" min="1" placeholder="all"
                    on:input=move |e| set_batch_limit.set(event_target_value(&e).trim().parse().ok().filter(|n| *n > 0))/></label>
                <input type="file" id="batch-file" accept=".parquet,.csv" disabled=move || !ready() on:change=on_file/>
                <p class="meta">{batch_progress}</p>
                {move || batch.get().map(|BatchResult { result: b, csv_url }| view! {
                    <div id="batch-result">
                        <p>
                            {format!("{} rows in {:.1} s", b.rows.len(), b.seconds)}
                            {b.accuracy.map(|(a, n)| format!(" · accuracy {:.4} on {n} labelled rows", a))}
                            {b.longer_answer_accuracy.map(|a| format!(" (picking the longer answer: {a:.4})"))}
                            " · "<a href=csv_url.clone() download="predictions.csv">"download predictions.csv"</a>
                        </p>
                        <table>
                            <thead><tr><th>"id"</th><th>"winner"</th><th>"P(A)"</th><th>"P(B)"</th></tr></thead>
                            <tbody>
                                {b.rows.iter().take(50).map(|(id, w, a, bb)| view! {
                                    <tr><td>{id.clone()}</td><td>{w.clone()}</td><td>{format!("{a:.4}")}</td><td>{format!("{bb:.4}")}</td></tr>
                                }).collect_view()}
                            </tbody>
                        </table>
                    </div>
                })}
            </section>
            <footer>
                "The model, tokenizer and preprocessing are the trainer's own Rust code compiled to WebAssembly, "
                "running in a worker beside this page; nothing leaves your browser."
            </footer>
        </main>
    }
}
