//! `train`, `eval`, `export` and `demo`: flags to library calls, and the run directory's layout.
//!
//! A run directory holds `run.json` (where the base model and data come from), `train_config.json` (every
//! setting, resolved), `log.jsonl`, `checkpoint-N/`, `best/`, the pictures (`curves.svg`,
//! `confusion_val.svg`), and later `eval/` and `export/`. A run on a random model keeps that model in `base/`
//! so it can be resumed, evaluated and exported.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use shared::cache::{Manifest, PrepareSettings, write_atomic};
use shared::export::{BundleAbout, WeightFormat};
use shared::model::Gemma2Config;
use shared::model::Gemma2ForSequenceClassification;
use shared::model::lora::parameter_counts;
use shared::plot::{Panel, Series, confusion_matrix, line_chart};
use shared::prepare::{PrepareRequest, prepare};
use shared::run_dir::RunDir;
use shared::train::{
    ADAPTER_FILE, BEST_DIR, CONFIG_FILE, EvalLog, LOG_FILE, StepLog, TrainConfig, TrainData,
    TrainEvents, read_log, train,
};

use crate::Bar;

pub const RUN_FILE: &str = "run.json";

/// `run.json`: what a run was made from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    /// Hugging Face directory of the base model (for a random model: the run's `base/`).
    pub base_model: PathBuf,
    /// The base was randomly initialised by this run (no pretrained weights).
    pub random_base: bool,
    /// The prepared-data cache.
    pub prepared: PathBuf,
    pub tokenizer: PathBuf,
}

/// The demo's model: Gemma-2's real vocabulary and every Gemma-2 detail, at a size two CPU cores train in
/// seconds.
pub fn demo_config() -> Gemma2Config {
    Gemma2Config {
        vocab_size: 256_000,
        sliding_window: 64,
        ..Gemma2Config::tiny()
    }
}

/// The demo's training settings: the recipe's, scaled to ~480 training rows and a random model.
pub fn demo_train_config() -> TrainConfig {
    let mut c = TrainConfig {
        learning_rate: 2e-3,
        batch_size: 4,
        grad_accum: 2,
        epochs: 2.0,
        logging_steps: 5,
        eval_steps: 20,
        save_steps: 20,
        early_stopping_patience: Some(3),
        eval_batch_size: 16,
        ..TrainConfig::default()
    };
    c.lora.r = 8;
    c.lora.alpha = 16.0;
    c.lora.first_layer = 0;
    c
}

fn abs(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// Writes a randomly initialised classifier as a Hugging Face directory (the run's `base/`).
fn write_random_base(dir: &Path, config: &Gemma2Config, seed: u64) -> Result<()> {
    let device = Device::flex();
    device.seed(seed);
    let model = config.init(&device);
    let tensors = shared::export::hf_tensors(&model)?;
    let bytes = shared::export::serialize(&tensors, shared::export::WeightFormat::F32)
        .map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(dir)?;
    write_json(
        &dir.join("config.json"),
        &shared::export::hf_config_json(config, "float32"),
    )?;
    write_atomic(&dir.join("model.safetensors"), &bytes)?;
    Ok(())
}

pub struct TrainJob {
    /// The run directory, opened and locked (new, resumed or overwritten).
    pub run: RunDir,
    pub prepared: PathBuf,
    pub model: Option<PathBuf>,
    /// A random model of this config when there is no `model`.
    pub random: Option<Gemma2Config>,
    pub tokenizer: PathBuf,
    /// Ignored when resuming: the run's saved settings apply, but for `resume_precision`.
    pub config: TrainConfig,
    /// On resume, the base's precision from here on (saved into the run's settings).
    pub resume_precision: Option<shared::train::Precision>,
    pub device: Device,
}

/// The tokenizer a run was made with (`run.json`).
pub fn recorded_tokenizer(run: &Path) -> Result<PathBuf> {
    let info: RunInfo = read_json(&run.join(RUN_FILE))
        .context("--resume needs a run directory made by `trainer train`")?;
    Ok(info.tokenizer)
}

/// Whether `dir` holds a run on a randomly initialised model (a demo's, or a `--preset` run's).
pub fn recorded_random_base(dir: &Path) -> bool {
    read_json::<RunInfo>(&dir.join(RUN_FILE)).is_ok_and(|info| info.random_base)
}

/// Loads a run's base model with its LoRA layout and the adapters of `adapter` (when given).
pub fn load_run_model(
    run: &Path,
    adapter: Option<&Path>,
    device: &Device,
) -> Result<(
    Gemma2ForSequenceClassification,
    Gemma2Config,
    RunInfo,
    TrainConfig,
)> {
    let info: RunInfo = read_json(&run.join(RUN_FILE))?;
    let config = TrainConfig::from_file(&run.join(CONFIG_FILE))?;
    let loaded = shared::model::load::load_hf_dir(&info.base_model, device)
        .with_context(|| format!("loading the base model {}", info.base_model.display()))?;
    let mut model = loaded.model.with_lora(&config.lora, device)?;
    if config.quantize_base {
        // The adapters learned on the quantized base: evaluate and merge on the same one.
        model = model.quantize_base(device);
    }
    if let Some(a) = adapter {
        model = shared::train::load_adapter(a, model, device)?;
    }
    Ok((model, loaded.config, info, config))
}

/// Trains, then scores the test split and draws the pictures. Returns the run directory.
pub fn run_train(job: TrainJob) -> Result<PathBuf> {
    let out = job.run.path().to_path_buf();
    let (info, config) = if job.run.resumes() {
        let info: RunInfo = read_json(&out.join(RUN_FILE))
            .context("--resume needs a run directory made by `trainer train`")?;
        let mut config = TrainConfig::from_file(&out.join(CONFIG_FILE))?;
        if let Some(p) = job.resume_precision.filter(|&p| p != config.precision) {
            let name = |p: shared::train::Precision| format!("{p:?}").to_lowercase();
            out!(
                "precision: {} from here on (the run had {})",
                name(p),
                name(config.precision)
            );
            config.precision = p;
            write_json(&out.join(CONFIG_FILE), &config)?;
        }
        (info, config)
    } else {
        let (base_model, random_base) = match (&job.model, &job.random) {
            (Some(m), _) => (abs(m), false),
            (None, Some(c)) => {
                let base = out.join("base");
                write_random_base(&base, c, job.config.seed)?;
                (base, true)
            }
            (None, None) => {
                bail!("give --model DIR (a Hugging Face Gemma-2 directory) or --preset")
            }
        };
        let info = RunInfo {
            base_model,
            random_base,
            prepared: abs(&job.prepared),
            tokenizer: abs(&job.tokenizer),
        };
        write_json(&out.join(RUN_FILE), &info)?;
        write_json(&out.join(CONFIG_FILE), &job.config)?;
        (info, job.config)
    };

    let manifest = Manifest::read(&info.prepared)
        .with_context(|| format!("reading the prepared data in {}", info.prepared.display()))?;
    let train_split = manifest.load_split(&info.prepared, "train")?;
    let val_split = manifest.load_split(&info.prepared, "val")?;
    let test_split = manifest.load_split(&info.prepared, "test")?;

    let device = job.device;
    let loaded = shared::model::load::load_hf_dir(&info.base_model, &device)
        .with_context(|| format!("loading the base model {}", info.base_model.display()))?;
    let (trainable, total) = parameter_counts(&loaded.config, &config.lora);
    out!(
        "trainable params: {trainable} || all params: {total} || trainable%: {:.4}",
        100.0 * trainable as f64 / total as f64
    );
    let steps = config.total_steps(train_split.len());
    out!(
        "training on {} rows ({} val, {} test): {} steps of {} x {} rows{}, lr {} ({:?}, {} warmup steps); precision: {}",
        train_split.len(),
        val_split.len(),
        test_split.len(),
        steps,
        config.grad_accum,
        config.batch_size,
        match config.micro_batch_tokens {
            0 => String::new(),
            t => format!(" (computed in micro-batches of up to {t} padded tokens)"),
        },
        config.learning_rate,
        config.schedule,
        config.warmup_steps(steps),
        config.resolve_precision(&device).1,
    );
    out!("device: {}", describe_device(&device));
    let events = TrainBar::default();
    let trained = train(
        loaded.model,
        &config,
        TrainData {
            train: &train_split,
            val: &val_split,
        },
        &job.run,
        &device,
        &events,
    )?;
    let s = &trained.state;
    out!(
        "trained {} steps in {:.1}s{}; best validation accuracy {} at step {}",
        trained.steps_run,
        trained.seconds,
        if s.stopped_early {
            " (stopped early)"
        } else {
            ""
        },
        s.best_accuracy.map_or("-".into(), |a| format!("{a:.4}")),
        s.best_step.map_or("-".into(), |v| v.to_string()),
    );
    let plain = device.clone().inner();
    let test = shared::train::evaluate_split(&trained.model.valid(), &test_split, &config, &plain)?;
    out!(
        "test (best checkpoint): loss {:.4}  accuracy {:.4}  log loss {:.4}  on {} rows; \
         picking the longer answer scores {:.4}",
        test.loss,
        test.accuracy,
        test.log_loss,
        test.rows,
        test.longer_answer_accuracy,
    );
    write_json(
        &out.join("test_metrics.json"),
        &serde_json::json!({
            "loss": test.loss, "accuracy": test.accuracy, "log_loss": test.log_loss, "rows": test.rows,
            "longer_answer_accuracy": test.longer_answer_accuracy,
            "confusion": test.confusion, "best_step": s.best_step, "best_val_accuracy": s.best_accuracy,
        }),
    )?;
    draw_run(&out)?;
    Ok(out)
}

/// The device in a line: the adapter's name, its graphics API and the shader language its kernels compile to
/// (SPIR-V on Vulkan, MSL on Metal, WGSL elsewhere) and whether this build autotunes them, or the CPU backend.
pub fn describe_device(device: &Device) -> String {
    let tuned = if shared::model::placement::AUTOTUNE {
        ", autotuned kernels"
    } else {
        ""
    };
    match device.identity() {
        Some(id) => match shared::model::placement::opened_adapter() {
            Some(api) => format!("{} ({api}{tuned})", id.name),
            None => format!("{}{tuned}", id.name),
        },
        None if shared::model::placement::is_gpu(device) => "wgpu".into(),
        None => "CPU (burn flex)".into(),
    }
}

/// `curves.svg` and `confusion_val.svg` from the run's log.
pub fn draw_run(run: &Path) -> Result<()> {
    let (logs, evals): (Vec<StepLog>, Vec<EvalLog>) = read_log(&run.join(LOG_FILE))?;
    let svg = line_chart(
        &[
            Panel {
                title: "loss",
                y_label: "cross-entropy (label-smoothed)",
                series: vec![
                    Series {
                        name: "train",
                        color: "#1f77b4",
                        points: logs.iter().map(|l| (l.step as f64, l.loss)).collect(),
                    },
                    Series {
                        name: "validation",
                        color: "#d62728",
                        points: evals.iter().map(|e| (e.step as f64, e.loss)).collect(),
                    },
                ],
            },
            Panel {
                title: "validation accuracy",
                y_label: "accuracy",
                series: vec![
                    Series {
                        name: "validation",
                        color: "#2ca02c",
                        points: evals.iter().map(|e| (e.step as f64, e.accuracy)).collect(),
                    },
                    // The bar to clear: the same rows scored by their answers' lengths alone.
                    Series {
                        name: "pick the longer answer",
                        color: "#7f7f7f",
                        points: evals
                            .iter()
                            .filter_map(|e| Some((e.step as f64, e.longer_answer_accuracy?)))
                            .collect(),
                    },
                ],
            },
        ],
        "optimizer step",
    );
    write_atomic(&run.join("curves.svg"), svg.as_bytes())?;
    if let Some(best) = evals.iter().rev().find(|e| e.best).or(evals.last()) {
        let c = best.confusion;
        let svg = confusion_matrix(
            &format!("validation, step {}", best.step),
            &["model_a", "model_b"],
            &[c[0].to_vec(), c[1].to_vec()],
        );
        write_atomic(&run.join("confusion_val.svg"), svg.as_bytes())?;
    }
    Ok(())
}

pub struct EvalJob {
    pub run: Option<PathBuf>,
    pub model: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub split: String,
    pub out: Option<PathBuf>,
    pub batch_size: usize,
    pub tokenizer: Option<PathBuf>,
    pub device: Device,
}

/// Writes `report.json`, `report.txt` and `confusion.svg`; returns the report directory.
pub fn run_eval(job: EvalJob) -> Result<(PathBuf, shared::report::EvalReport)> {
    let device = job.device;
    let (model, tokenizer_path, records, source, smoothing, preprocess, out) =
        match (&job.run, &job.model) {
            (Some(run), _) => {
                let best = run.join(BEST_DIR).join(ADAPTER_FILE);
                let (model, _, info, config) = load_run_model(run, Some(&best), &device)
                    .with_context(|| format!("loading run {}", run.display()))?;
                let manifest = Manifest::read(&info.prepared)?;
                let (records, source) = match &job.data {
                    Some(d) => (
                        shared::data::load_file(d, manifest.settings.format)?.records,
                        d.display().to_string(),
                    ),
                    None => {
                        let data = PathBuf::from(&manifest.source.path);
                        let (sha, _) = shared::cache::sha256_file(&data).with_context(|| {
                            format!(
                                "the run's data file {} is gone; pass --data FILE",
                                data.display()
                            )
                        })?;
                        if sha != manifest.source.sha256 {
                            bail!(
                                "{} changed since it was prepared; pass --data FILE",
                                data.display()
                            );
                        }
                        let records =
                            shared::prepare::split_records(&data, &manifest.settings, &job.split)?;
                        (records, format!("{} ({} split)", data.display(), job.split))
                    }
                };
                let out = job.out.clone().unwrap_or_else(|| run.join("eval"));
                (
                    model.valid(),
                    job.tokenizer.clone().unwrap_or(info.tokenizer),
                    records,
                    source,
                    config.label_smoothing,
                    manifest.settings.preprocess,
                    out,
                )
            }
            (None, Some(dir)) => {
                let Some(data) = &job.data else {
                    bail!("--model needs --data FILE (labelled rows to evaluate on)");
                };
                let loaded = shared::model::load::load_hf_dir(dir, &device)
                    .with_context(|| format!("loading the model from {}", dir.display()))?;
                let records = shared::data::load_file(data, shared::data::Format::Auto)?.records;
                let out = job.out.clone().unwrap_or_else(|| dir.join("eval"));
                let tok = job
                    .tokenizer
                    .clone()
                    .unwrap_or_else(|| dir.join("tokenizer.json"));
                (
                    loaded.model,
                    tok,
                    records,
                    data.display().to_string(),
                    TrainConfig::default().label_smoothing,
                    shared::preprocess::PreprocessConfig::default(),
                    out,
                )
            }
            (None, None) => {
                bail!("give --run DIR (a training run) or --model DIR (a Hugging Face directory)")
            }
        };
    let tokenizer = shared::tokenizer::Tokenizer::from_file(&tokenizer_path)?;
    let bar = Bar::default();
    let report = shared::report::evaluate(
        &model,
        &tokenizer,
        &preprocess,
        &records,
        &source,
        smoothing,
        job.batch_size,
        &device,
        &bar,
    )?;
    std::fs::create_dir_all(&out)?;
    write_json(&out.join("report.json"), &report)?;
    write_atomic(&out.join("report.txt"), report.summary().as_bytes())?;
    let c = report.confusion;
    let svg = confusion_matrix(
        &format!("{} rows", report.rows),
        &["model_a", "model_b"],
        &[c[0].to_vec(), c[1].to_vec()],
    );
    write_atomic(&out.join("confusion.svg"), svg.as_bytes())?;
    Ok((out, report))
}

/// Rows of the test split on which `trainer export` compares each compact format with f32.
pub const QUALITY_ROWS: usize = 64;

/// Merges the run's best adapters and writes `hf/` and `web/` under `out`, with `compact` weight formats
/// beside f16. The bundle's manifest says what the model is (base, size, test accuracy) and, for each compact
/// format, how far it moves P(A) from f32 on the first `quality_rows` rows of the test split.
pub fn run_export(
    run: &Path,
    out: Option<PathBuf>,
    compact: &[WeightFormat],
    quality_rows: usize,
) -> Result<(PathBuf, shared::export::Exported)> {
    let device = Device::flex();
    let best = run.join(BEST_DIR).join(ADAPTER_FILE);
    let (model, base_config, info, _) = load_run_model(run, Some(&best), &device)
        .with_context(|| format!("loading run {}", run.display()))?;
    let manifest = Manifest::read(&info.prepared)?;
    let merged = model.merge_lora();
    let out = out.unwrap_or_else(|| run.join("export"));
    let test: Option<serde_json::Value> = read_json(&run.join("test_metrics.json")).ok();
    // The model's tensors are read, and each compact format serialized, once: the bytes compared with f32 below
    // are the bytes written.
    let tensors = shared::export::hf_tensors(&merged)?;
    let compact = shared::export::serialize_all(&tensors, compact)?;
    let quality = if quality_rows > 0 && !compact.is_empty() {
        // The test rows come back from the prepared data's source; without it there is no comparison to make.
        let data = PathBuf::from(&manifest.source.path);
        match shared::prepare::split_records(&data, &manifest.settings, "test") {
            Ok(mut records) => {
                records.retain(|r| r.label.is_some());
                records.truncate(quality_rows);
                let tokenizer = shared::tokenizer::Tokenizer::from_file(&info.tokenizer)?;
                shared::export::format_quality(
                    &merged,
                    &base_config,
                    &compact,
                    &tokenizer,
                    &manifest.settings.preprocess,
                    &records,
                    &device,
                )?
            }
            Err(e) => {
                out!("no format comparison: the test rows cannot be read back ({e})");
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    let c = &base_config;
    let about = BundleAbout {
        base: if info.random_base {
            "random".into()
        } else {
            info.base_model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| info.base_model.display().to_string())
        },
        random_base: info.random_base,
        shape: format!(
            "hidden {} × {} layers, vocabulary {}",
            c.hidden_size, c.num_hidden_layers, c.vocab_size
        ),
        parameters: merged.num_params() as u64,
        test_accuracy: test.as_ref().and_then(|t| t["accuracy"].as_f64()),
        test_rows: test
            .as_ref()
            .and_then(|t| t["rows"].as_u64())
            .map(|r| r as usize),
        quality,
    };
    let exported = shared::export::export(
        &tensors,
        &base_config,
        &info.tokenizer,
        &manifest.settings.preprocess,
        &out,
        compact,
        Some(about),
    )?;
    Ok((out, exported))
}

/// Prepares `data` into `out/prepared` (or reuses it).
pub fn prepare_into(
    data: &Path,
    tokenizer: &Path,
    out: &Path,
    settings: PrepareSettings,
) -> Result<PathBuf> {
    let dir = out.join("prepared");
    let req = PrepareRequest {
        data: data.to_path_buf(),
        tokenizer: tokenizer.to_path_buf(),
        out: dir.clone(),
        settings,
        force: false,
        token_cache_chunks: shared::tokenizer::DEFAULT_CACHE_CAPACITY,
    };
    let started = Instant::now();
    let prepared = prepare(&req, &Bar::default())?;
    let c = &prepared.manifest.counts;
    out!(
        "prepared {} rows ({} ties dropped) in {:.1}s: {}",
        c.rows_after_sample,
        c.ties_dropped,
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(dir)
}

/// An indicatif bar over optimizer steps, with the loss in its message, and one printed line per evaluation.
#[derive(Default)]
pub struct TrainBar(std::sync::Mutex<Option<ProgressBar>>);

impl TrainBar {
    fn with(&self, f: impl FnOnce(&ProgressBar)) {
        if let Ok(slot) = self.0.lock()
            && let Some(b) = slot.as_ref()
        {
            f(b);
        }
    }
}

impl TrainEvents for TrainBar {
    fn start(&self, total: usize, done: usize) {
        let b = ProgressBar::new(total as u64);
        b.set_style(
            ProgressStyle::with_template(
                "train [{bar:32}] {pos}/{len} steps  {per_sec}  ETA {eta}  {msg}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        b.set_position(done as u64);
        b.reset_eta();
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(b);
        }
    }
    fn step(&self, step: usize) {
        self.with(|b| b.set_position(step as u64));
    }
    fn log(&self, l: &StepLog) {
        let mfu = l
            .mfu
            .map_or(String::new(), |m| format!("  MFU {:.1}%", 100.0 * m));
        self.with(|b| {
            b.set_message(format!(
                "loss {:.4}  {:.0} tok/s{mfu}",
                l.loss, l.tokens_per_second
            ))
        });
    }
    fn eval(&self, e: &EvalLog) {
        let line = format!(
            "step {:>5}  val loss {:.4}  accuracy {:.4}  log loss {:.4}{}{}",
            e.step,
            e.loss,
            e.accuracy,
            e.log_loss,
            e.longer_answer_accuracy
                .map_or(String::new(), |b| format!("  (longer answer {b:.4})")),
            if e.best { "  (best)" } else { "" }
        );
        self.message(&line);
    }
    fn message(&self, text: &str) {
        // `suspend` prints whether or not the bar is drawn (`println` on a hidden bar prints nothing).
        let mut printed = false;
        self.with(|b| {
            b.suspend(|| out!("{text}"));
            printed = true;
        });
        if !printed {
            out!("{text}");
        }
    }
    fn finish(&self) {
        if let Ok(mut slot) = self.0.lock()
            && let Some(b) = slot.take()
        {
            b.finish_and_clear();
        }
    }
}
