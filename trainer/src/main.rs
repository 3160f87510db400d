//! `trainer`: the arena-judge command line. Each command parses its flags and calls into `shared`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use shared::cache::{Manifest, PrepareSettings};
use shared::data::Format;
use shared::prepare::{PrepareRequest, Progress, prepare};
use shared::preprocess::PreprocessConfig;
use shared::split::SplitRatios;

#[derive(Parser)]
#[command(
    name = "trainer",
    version,
    about = "Predict which of two chatbot answers people prefer: prepare data, train, evaluate, predict."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load, split, truncate and tokenize a data file into a reusable cache.
    Prepare(PrepareArgs),
    /// Score comparisons with a Gemma-2 classifier and write a Kaggle-style predictions CSV.
    Predict(PredictArgs),
}

#[derive(clap::Args)]
struct PredictArgs {
    /// A Hugging Face model directory (config.json, safetensors, tokenizer.json), or a trainer export.
    #[arg(long)]
    model: PathBuf,
    /// Arena data: parquet or CSV, WSDM or LMSYS schema; labels, when present, are scored.
    #[arg(long)]
    data: PathBuf,
    /// Where to write `id,winner,prob_model_a,prob_model_b`.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "auto", value_parser = parse_format)]
    format: Format,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Also score each pair with the responses swapped and average the two.
    #[arg(long)]
    swap_tta: bool,
    /// wgpu (any GPU; Mesa's lavapipe without one) or cpu.
    #[arg(long, default_value = "wgpu")]
    device: DeviceArg,
    /// A tokenizer.json to use instead of the model directory's.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Precision of weights and activations: auto is f16 on a wgpu adapter that supports it, else f32.
    #[arg(long, default_value = "auto")]
    dtype: DtypeArg,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum DtypeArg {
    Auto,
    F32,
    F16,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum DeviceArg {
    Wgpu,
    Cpu,
}

impl DeviceArg {
    fn device(self) -> burn::tensor::Device {
        match self {
            DeviceArg::Wgpu => burn::tensor::Device::wgpu(Default::default()),
            DeviceArg::Cpu => burn::tensor::Device::flex(),
        }
    }
}

#[derive(clap::Args)]
struct PrepareArgs {
    /// Arena data: parquet or CSV, WSDM or LMSYS schema.
    #[arg(long)]
    data: PathBuf,
    /// Schema of the data file.
    #[arg(long, default_value = "auto", value_parser = parse_format)]
    format: Format,
    /// Output directory of the cache.
    #[arg(long)]
    out: PathBuf,
    /// Keep this percent of each class before splitting.
    #[arg(long, default_value_t = 100.0)]
    sample_percent: f64,
    /// Seed of the subsample and the split.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Validation share of the split.
    #[arg(long, default_value_t = 0.1)]
    val_ratio: f64,
    /// Test share of the split; train gets the rest.
    #[arg(long, default_value_t = 0.2)]
    test_ratio: f64,
    /// Token budget of the prompt before smart truncation.
    #[arg(long, default_value_t = 150)]
    prompt_tokens: usize,
    /// Token budget of each response before smart truncation.
    #[arg(long, default_value_t = 350)]
    response_tokens: usize,
    /// Model input length, BOS and EOS included.
    #[arg(long, default_value_t = 512)]
    max_length: usize,
    /// Keep ties as a third class (binary training drops them).
    #[arg(long)]
    keep_ties: bool,
    /// A tokenizer.json; default: the Gemma tokenizer fetched by scripts/setup.sh.
    #[arg(long, conflicts_with = "model")]
    tokenizer: Option<PathBuf>,
    /// A Hugging Face model directory whose tokenizer.json to use.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Rebuild the cache even when it is up to date.
    #[arg(long)]
    force: bool,
    /// Word-like chunks whose tokens each thread remembers (0: no cache). Changes speed, never ids.
    #[arg(long, default_value_t = shared::tokenizer::DEFAULT_CACHE_CAPACITY)]
    token_cache_chunks: usize,
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse()
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,wgpu_hal=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Prepare(args) => run_prepare(args),
        Command::Predict(args) => run_predict(args),
    }
}

fn tokenizer_path(tokenizer: Option<PathBuf>, model: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(t) = tokenizer {
        return Ok(t);
    }
    if let Some(m) = model {
        return Ok(m.join("tokenizer.json"));
    }
    shared::tokenizer::default_tokenizer_path().with_context(|| {
        format!(
            "no tokenizer given and {} not found: run scripts/setup.sh, or pass --tokenizer FILE or --model DIR",
            shared::tokenizer::DEFAULT_TOKENIZER
        )
    })
}

fn run_prepare(args: PrepareArgs) -> Result<()> {
    let train = 1.0 - args.val_ratio - args.test_ratio;
    if train <= 0.0 {
        bail!(
            "--val-ratio {} and --test-ratio {} leave no training rows",
            args.val_ratio,
            args.test_ratio
        );
    }
    let req = PrepareRequest {
        data: args.data,
        tokenizer: tokenizer_path(args.tokenizer, args.model)?,
        out: args.out,
        settings: PrepareSettings {
            format: args.format,
            sample_percent: args.sample_percent,
            seed: args.seed,
            ratios: SplitRatios {
                train,
                val: args.val_ratio,
                test: args.test_ratio,
            },
            preprocess: PreprocessConfig {
                prompt_tokens: args.prompt_tokens,
                response_tokens: args.response_tokens,
                max_length: args.max_length,
            },
            keep_ties: args.keep_ties,
        },
        force: args.force,
        token_cache_chunks: args.token_cache_chunks,
    };
    let started = Instant::now();
    let bar = Bar::default();
    let prepared = prepare(&req, &bar)?;
    let m = &prepared.manifest;
    if prepared.reused {
        println!(
            "cache {} is up to date with {} (sha256 {}); nothing to do",
            req.out.display(),
            m.source.path,
            &m.source.sha256[..12]
        );
    } else {
        println!(
            "prepared {} in {:.1}s with the {} tokenizer",
            m.source.path,
            started.elapsed().as_secs_f64(),
            m.tokenizer.engine
        );
    }
    print_summary(m);
    println!("cache: {}", req.out.join(shared::cache::MANIFEST).display());
    Ok(())
}

fn run_predict(args: PredictArgs) -> Result<()> {
    let device = args.device.device();
    let started = Instant::now();
    let loaded = shared::model::load::load_hf_dir(&args.model, &device)
        .with_context(|| format!("loading the model from {}", args.model.display()))?;
    if loaded.fresh_head {
        eprintln!(
            "warning: {} has no classification head (score.weight); its predictions are random",
            args.model.display()
        );
    }
    let f16 = burn::tensor::FloatDType::F16;
    let half = match args.dtype {
        DtypeArg::F32 => false,
        DtypeArg::F16 => true,
        DtypeArg::Auto => args.device == DeviceArg::Wgpu && device.supports_dtype(f16),
    };
    if half && !device.supports_dtype(f16) {
        bail!("this device does not support f16; use --dtype f32");
    }
    let model = if half {
        loaded.model.cast(f16)
    } else {
        loaded.model
    };
    let tokenizer_path = args
        .tokenizer
        .unwrap_or_else(|| args.model.join("tokenizer.json"));
    let tokenizer = shared::tokenizer::Tokenizer::from_file(&tokenizer_path)
        .with_context(|| "the model directory needs a tokenizer.json (or pass --tokenizer FILE)")?;
    let dataset = shared::data::load_file(&args.data, args.format)?;
    let records = dataset.records;
    let options = shared::predict::PredictOptions {
        batch_size: args.batch_size,
        swap_tta: args.swap_tta,
    };
    let bar = Bar::default();
    let probs = shared::predict::predict(
        &model,
        &tokenizer,
        &PreprocessConfig::default(),
        &records,
        options,
        &device,
        &bar,
    )?;
    shared::predict::write_predictions_csv(&args.out, &records, &probs, &loaded.config.labels)?;
    println!(
        "scored {} rows in {:.1}s ({}){}; predictions: {}",
        records.len(),
        started.elapsed().as_secs_f64(),
        if half { "f16" } else { "f32" },
        if args.swap_tta { " with swap-TTA" } else { "" },
        args.out.display()
    );
    let labels: Vec<shared::data::Label> = records.iter().map(|r| r.label).collect();
    if let Some(m) = shared::predict::binary_metrics(&probs, &labels) {
        println!(
            "accuracy {:.4}   log loss {:.4}   on {} labelled rows{}",
            m.accuracy,
            m.log_loss,
            m.rows,
            if m.ties_skipped > 0 {
                format!(" ({} ties not scored)", m.ties_skipped)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

fn print_summary(m: &Manifest) {
    let c = &m.counts;
    println!(
        "rows read: {}  ({:?} schema)   ties dropped: {}   rows kept after {}% sample: {}",
        c.rows_read,
        m.source.format,
        c.ties_dropped,
        m.settings.sample_percent,
        c.rows_after_sample
    );
    println!(
        "{:<6} {:>7} {:>16} {:>16} {:>12} {:>9} {:>9}",
        "split", "rows", "model_a", "model_b", "tie", "snipped", "cut@max"
    );
    for (name, s) in &c.splits {
        let pct = |n: usize| {
            if s.rows == 0 {
                0.0
            } else {
                100.0 * n as f64 / s.rows as f64
            }
        };
        println!(
            "{:<6} {:>7} {:>8} ({:>5.1}%) {:>8} ({:>5.1}%) {:>4} ({:>4.1}%) {:>9} {:>9}",
            name,
            s.rows,
            s.model_a,
            pct(s.model_a),
            s.model_b,
            pct(s.model_b),
            s.tie,
            pct(s.tie),
            s.snipped,
            s.cut_at_max_length
        );
    }
}

/// An indicatif bar behind the library's progress trait.
#[derive(Default)]
struct Bar(std::sync::Mutex<Option<ProgressBar>>);

impl Progress for Bar {
    fn start(&self, stage: &str, total: u64) {
        let bar = if total == 0 {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("static template"),
            );
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b
        } else {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg:>10} [{bar:36}] {pos}/{len} rows  {per_sec}  ETA {eta}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            b
        };
        bar.set_message(stage.to_string());
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(bar);
        }
    }
    fn inc(&self, n: u64) {
        if let Ok(slot) = self.0.lock()
            && let Some(b) = slot.as_ref()
        {
            b.inc(n);
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
