//! The page: paste a prompt and two answers (or pick an example from the bundled sample), see which answer
//! people will likely prefer; or drop a whole parquet/CSV file for a predictions table and CSV.
//!
//! The model is loaded from a `trainer export` web bundle: `./bundle/` by default, `?bundle=URL` for another,
//! `?weights=int8|f16` to choose the weights, `?backend=cpu|webgpu|auto`.

use std::rc::Rc;

use leptos::prelude::*;
use leptos::task::spawn_local;
use shared::data::{Format, Label, Record, load_bytes};
use wasm_bindgen::JsCast;

use crate::bundle;
use crate::judge::{Inner, Prediction, yield_now};

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

fn now_ms() -> f64 {
    web_sys::window()
        .and_then(|w| w.performance())
        .map(|p| p.now())
        .unwrap_or(0.0)
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
struct Shown {
    prediction: Prediction,
    latency_ms: f64,
}

#[derive(Clone)]
struct BatchResult {
    rows: Vec<(String, String, f32, f32)>,
    accuracy: Option<(f64, usize)>,
    csv_url: String,
    seconds: f64,
}

#[component]
pub fn App() -> impl IntoView {
    let (status, set_status) = signal(Status::Loading("starting".into()));
    let model: RwSignal<Option<Rc<Inner>>, LocalStorage> = RwSignal::new_local(None);
    let (prompt, set_prompt) = signal(String::new());
    let (answer_a, set_answer_a) = signal(String::new());
    let (answer_b, set_answer_b) = signal(String::new());
    let (swap, set_swap) = signal(false);
    let (busy, set_busy) = signal(false);
    let (shown, set_shown) = signal(None::<Shown>);
    let (error, set_error) = signal(None::<String>);
    let (batch, set_batch) = signal(None::<BatchResult>);
    let (batch_progress, set_batch_progress) = signal(String::new());
    // Score only the first N rows of a dropped file (a whole competition file takes long on a CPU).
    let (batch_limit, set_batch_limit) = signal(None::<usize>);
    let (source, set_source) = signal(String::new());
    let samples = StoredValue::new(examples());

    let base = bundle::normalize_base(&query("bundle").unwrap_or_else(|| "bundle/".into()));
    let weights = query("weights");
    let backend = query("backend").unwrap_or_else(|| "auto".into());
    spawn_local(async move {
        let started = now_ms();
        let mut last = (String::new(), 0.0f64);
        let loaded = bundle::load(&base, weights.as_deref(), |file, done, total, cached| {
            let secs = (now_ms() - started) / 1000.0;
            let text = if cached {
                format!("{file}: from the browser cache")
            } else {
                format!(
                    "downloading {file}: {:.1} / {:.1} MB ({:.1} MB/s)",
                    done as f64 / 1e6,
                    total as f64 / 1e6,
                    done as f64 / 1e6 / secs.max(1e-3)
                )
            };
            if text != last.0 && (now_ms() - last.1 > 100.0 || done == total) {
                last = (text.clone(), now_ms());
                set_status.set(Status::Loading(text));
            }
        })
        .await;
        let b = match loaded {
            Ok(b) => b,
            Err(e) => {
                set_status.set(Status::Failed(e));
                return;
            }
        };
        set_source.set(if b.from_cache {
            format!(
                "{:.1} MB from the browser cache",
                b.total_bytes as f64 / 1e6
            )
        } else {
            format!("{:.1} MB downloaded", b.total_bytes as f64 / 1e6)
        });
        set_status.set(Status::Loading(format!(
            "building the model ({:.1} MB{})",
            b.total_bytes as f64 / 1e6,
            if b.from_cache { ", cached" } else { "" }
        )));
        yield_now().await;
        match Inner::load(&b.config, &b.tokenizer, b.weights_name, b.weights, &backend).await {
            Ok(m) => {
                model.set(Some(Rc::new(m)));
                set_status.set(Status::Ready);
            }
            Err(e) => set_status.set(Status::Failed(format!("{base}: {e}"))),
        }
    });

    let run = move || {
        let Some(m) = model.get_untracked() else {
            return;
        };
        set_busy.set(true);
        set_error.set(None);
        let (p, a, b, s) = (
            prompt.get_untracked(),
            answer_a.get_untracked(),
            answer_b.get_untracked(),
            swap.get_untracked(),
        );
        spawn_local(async move {
            yield_now().await;
            let t0 = now_ms();
            match m.predict(p, a, b, s).await {
                Ok(prediction) => set_shown.set(Some(Shown {
                    prediction,
                    latency_ms: now_ms() - t0,
                })),
                Err(e) => set_error.set(Some(e)),
            }
            set_busy.set(false);
        });
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
        let Some(m) = model.get_untracked() else {
            return;
        };
        let s = swap.get_untracked();
        let limit = batch_limit.get_untracked();
        set_batch.set(None);
        set_error.set(None);
        spawn_local(async move {
            let name = file.name();
            let buf = match wasm_bindgen_futures::JsFuture::from(file.array_buffer()).await {
                Ok(b) => js_sys::Uint8Array::new(&b).to_vec(),
                Err(_) => {
                    set_error.set(Some(format!("{name}: cannot read the file")));
                    return;
                }
            };
            let records = match load_bytes(&name, bytes::Bytes::from(buf), Format::Auto) {
                Ok(d) => d
                    .records
                    .into_iter()
                    .take(limit.unwrap_or(usize::MAX))
                    .collect::<Vec<_>>(),
                Err(e) => {
                    set_error.set(Some(e.to_string()));
                    return;
                }
            };
            let t0 = now_ms();
            let total = records.len();
            let mut probs = Vec::with_capacity(total);
            // Score in small slices, yielding between them, so the page stays responsive.
            for chunk in records.chunks(8) {
                match m.predict_records(&name, chunk, s, 8, |_| {}).await {
                    Ok(p) => probs.extend(p),
                    Err(e) => {
                        set_error.set(Some(e));
                        return;
                    }
                }
                set_batch_progress.set(format!("scored {} / {total} rows", probs.len()));
                yield_now().await;
            }
            let csv = m.csv(&records, &probs);
            let (mut n, mut correct) = (0usize, 0usize);
            for (r, p) in records.iter().zip(&probs) {
                if let Some(label @ (Label::ModelA | Label::ModelB)) = r.label {
                    n += 1;
                    correct += usize::from(usize::from(p[1] > p[0]) == label.index());
                }
            }
            let parts = js_sys::Array::of1(&csv.into());
            let opts = web_sys::BlobPropertyBag::new();
            opts.set_type("text/csv");
            let url = web_sys::Blob::new_with_str_sequence_and_options(&parts, &opts)
                .ok()
                .and_then(|b| web_sys::Url::create_object_url_with_blob(&b).ok())
                .unwrap_or_default();
            set_batch.set(Some(BatchResult {
                rows: records
                    .iter()
                    .zip(&probs)
                    .map(|(r, p)| {
                        let w = if p[1] > p[0] { "model_b" } else { "model_a" };
                        (r.id.clone(), w.to_string(), p[0], p[1])
                    })
                    .collect(),
                accuracy: (n > 0).then(|| (correct as f64 / n as f64, n)),
                csv_url: url,
                seconds: (now_ms() - t0) / 1000.0,
            }));
        });
    };

    let ready = move || matches!(status.get(), Status::Ready);
    view! {
        <main>
            <h1>"arena-judge"</h1>
            <p class="lead">
                "Which of two chatbot answers will people prefer? A Gemma-2 classifier fine-tuned on Chatbot Arena "
                "votes, running in your browser."
            </p>
            <div id="status" data-status=move || match status.get() {
                Status::Loading(_) => "loading",
                Status::Ready => "ready",
                Status::Failed(_) => "error",
            }>
                {move || match status.get() {
                    Status::Loading(t) => view! { <p class="loading">{t}</p> }.into_any(),
                    Status::Ready => view! {
                        <p class="ready">
                            "Model ready on "
                            <strong id="backend">{move || model.get().map(|m| m.backend().to_string()).unwrap_or_default()}</strong>
                            <span class="meta" id="source">" (" {source} ")"</span>
                            <span class="meta" id="placement">{move || model.get().map(|m| m.placement_note()).unwrap_or_default()}</span>
                        </p>
                    }.into_any(),
                    Status::Failed(e) => view! { <p class="error" id="load-error">"Could not load the model: " {e}</p> }.into_any(),
                }}
            </div>
            <Show when=move || model.get().is_some_and(|m| m.backend() == "cpu")>
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
            {move || shown.get().map(|s| {
                let p = s.prediction;
                let pa = p.prob_model_a;
                let parts = ["prompt", "answer A", "answer B"];
                let snipped: Vec<&str> = parts.iter().zip(p.snipped).filter(|(_, s)| *s).map(|(n, _)| *n).collect();
                view! {
                    <section id="result" data-pa=format!("{:.6}", pa) data-pb=format!("{:.6}", p.prob_model_b) data-yields=p.yields>
                        <div class="bar">
                            <div class="a" style=format!("width:{:.1}%", pa * 100.0)>{format!("A {:.1}%", pa * 100.0)}</div>
                            <div class="b" style=format!("width:{:.1}%", (1.0 - pa) * 100.0)>{format!("B {:.1}%", p.prob_model_b * 100.0)}</div>
                        </div>
                        <p>
                            {if pa >= 0.5 { "People will likely prefer answer A." } else { "People will likely prefer answer B." }}
                        </p>
                        <p class="meta">
                            {format!("{} tokens in (prompt {}, A {}, B {} before truncation) · {:.0} ms",
                                p.tokens, p.field_tokens[0], p.field_tokens[1], p.field_tokens[2], s.latency_ms)}
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
                {move || batch.get().map(|b| view! {
                    <div id="batch-result">
                        <p>
                            {format!("{} rows in {:.1} s", b.rows.len(), b.seconds)}
                            {b.accuracy.map(|(a, n)| format!(" · accuracy {:.4} on {n} labelled rows", a))}
                            " · "<a href=b.csv_url.clone() download="predictions.csv">"download predictions.csv"</a>
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
                "The model, tokenizer and preprocessing are the trainer's own Rust code compiled to WebAssembly; "
                "nothing leaves your browser."
            </footer>
        </main>
    }
}
