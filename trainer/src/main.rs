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
use shared::run_dir::{OpenMode, RunDir};
use shared::split::SplitRatios;

/// Prints a line to stdout, ignoring a failed write: when stdout is a closed pipe (`trainer train | head -1`),
/// `println!` would panic and abort the training; the output is lost, the work is not.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// [`out!`] without the newline.
macro_rules! out_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

mod bench;
mod run;

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

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Load, split, truncate and tokenize a data file into a reusable cache.
    Prepare(PrepareArgs),
    /// Score comparisons with a Gemma-2 classifier and write a Kaggle-style predictions CSV.
    Predict(PredictArgs),
    /// Fine-tune a Gemma-2 classifier with LoRA (the reference recipe by default), or resume a run.
    Train(TrainArgs),
    /// Evaluate a run (or a model directory): accuracy, log loss, per language, confusion, position bias, TTA.
    Eval(EvalArgs),
    /// Merge a run's LoRA adapters and write a Hugging Face directory and the web bundle.
    Export(ExportArgs),
    /// The whole pipeline on the bundled sample in minutes: prepare, train a small random model, eval, export.
    Demo(DemoArgs),
    /// Throughput on random rows at a fixed length, as one JSON line: the forward pass or a LoRA training step.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// `trainer bench`: what the benchmark scripts run beside PyTorch (bench/). Positional, in the order the scripts
/// pass them.
#[derive(Subcommand)]
enum BenchCommand {
    /// Rows per second of the classifier's forward pass (what `trainer predict` runs) on one batch.
    Forward {
        /// A Hugging Face Gemma-2 directory (config.json, model.safetensors).
        model: PathBuf,
        #[arg(value_enum, default_value = "wgpu")]
        device: DeviceArg,
        #[arg(default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
        batch: u32,
        #[arg(default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
        seq: u32,
        /// Timed passes, after one warm-up pass.
        #[arg(default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
        iters: u32,
        /// Precision of weights and activations.
        #[arg(value_enum, default_value = "f32")]
        dtype: BenchDtype,
    },
    /// Tokens per second of a LoRA training step (forward, backward, clipping, AdamW) with the recipe's adapters.
    Train {
        /// A Hugging Face Gemma-2 directory (config.json, model.safetensors).
        model: PathBuf,
        #[arg(value_enum, default_value = "wgpu")]
        device: DeviceArg,
        #[arg(default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
        seq: u32,
        /// Timed steps, after the warm-up (in f16, until a step no longer overflows).
        #[arg(default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
        steps: u32,
        /// Precision of the frozen base (adapters, head and optimizer state stay f32), as `trainer train
        /// --precision` takes it.
        #[arg(value_enum, default_value = "f32")]
        dtype: PrecisionArg,
        /// Rows per step, computed as one micro-batch.
        #[arg(default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        batch: u32,
    },
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum BenchDtype {
    F32,
    F16,
    Bf16,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Run directory (checkpoints, logs, pictures).
    #[arg(long)]
    out: PathBuf,
    /// Arena data to prepare into OUT/prepared (or give --prepared).
    #[arg(long, required_unless_present_any = ["prepared", "resume"])]
    data: Option<PathBuf>,
    /// A cache written by `trainer prepare`.
    #[arg(long, conflicts_with = "data")]
    prepared: Option<PathBuf>,
    /// Base model: a Hugging Face Gemma-2 directory (google/gemma-2-2b, or a classifier).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A randomly initialised model instead of --model (for tests and demos; it learns little).
    #[arg(long, value_enum, conflicts_with = "model")]
    preset: Option<PresetArg>,
    /// Training settings, TOML or JSON (any subset of the fields; the rest are the recipe's).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the run in OUT from its newest checkpoint, with its saved settings, data and tokenizer.
    #[arg(long, conflicts_with_all = ["overwrite", "data", "prepared", "model", "preset", "tokenizer"])]
    resume: bool,
    /// Delete what OUT holds and start a new run there (without it, a used OUT is refused).
    #[arg(long)]
    overwrite: bool,
    /// wgpu (any GPU; Mesa's lavapipe without one) or cpu.
    #[arg(long, default_value = "wgpu")]
    device: DeviceArg,
    /// A tokenizer.json (default: the model directory's, else the bundled Gemma tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
}

/// Flags that override single training settings (after --config).
#[derive(clap::Args, Default)]
struct Overrides {
    #[arg(long)]
    learning_rate: Option<f64>,
    #[arg(long)]
    epochs: Option<f64>,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Padded tokens per micro-batch: a step's rows are regrouped, longest first, into as few batches as fit
    /// (same loss and gradient, fewer kernel launches). Default 4096 (the recipe's 8 rows of 512 as one batch);
    /// 0 keeps batch_size rows per micro-batch. Lower it if a step runs out of device memory.
    #[arg(long)]
    micro_batch_tokens: Option<usize>,
    #[arg(long)]
    eval_steps: Option<usize>,
    #[arg(long)]
    save_steps: Option<usize>,
    #[arg(long)]
    logging_steps: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    lora_r: Option<usize>,
    #[arg(long)]
    lora_alpha: Option<f64>,
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// Comma-separated projection names, e.g. q_proj,k_proj,v_proj,o_proj.
    #[arg(long)]
    lora_targets: Option<String>,
    #[arg(long)]
    lora_first_layer: Option<usize>,
    /// The frozen base's number format. The only setting --resume takes: it changes no step's definition, and
    /// a run stopped by an f16 overflow continues from its last checkpoint in f32 or bf16.
    #[arg(long, value_enum)]
    precision: Option<PrecisionArg>,
    /// Keep the frozen projections in int8 (QLoRA-style).
    #[arg(long)]
    quantize_base: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PrecisionArg {
    /// f16 on a GPU that supports it (with dynamic loss scaling), else f32.
    Auto,
    F32,
    /// f16 base with dynamic loss scaling.
    F16,
    /// bfloat16 base, where the device computes it (the CPU backend; not lavapipe or WGSL).
    Bf16,
}

impl From<PrecisionArg> for shared::train::Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Auto => Self::Auto,
            PrecisionArg::F32 => Self::F32,
            PrecisionArg::F16 => Self::F16,
            PrecisionArg::Bf16 => Self::Bf16,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PresetArg {
    /// The demo's small model with Gemma's 256k vocabulary.
    Demo,
    /// The unit-test model (32 wide, 4 layers).
    Tiny,
}

impl Overrides {
    /// Whether a flag other than `--precision` is given.
    fn any_but_precision(&self) -> bool {
        self.learning_rate.is_some()
            || self.epochs.is_some()
            || self.max_steps.is_some()
            || self.batch_size.is_some()
            || self.grad_accum.is_some()
            || self.micro_batch_tokens.is_some()
            || self.eval_steps.is_some()
            || self.save_steps.is_some()
            || self.logging_steps.is_some()
            || self.seed.is_some()
            || self.lora_r.is_some()
            || self.lora_alpha.is_some()
            || self.lora_dropout.is_some()
            || self.lora_targets.is_some()
            || self.lora_first_layer.is_some()
            || self.quantize_base
    }

    fn apply(&self, c: &mut shared::train::TrainConfig) {
        macro_rules! set {
            ($($field:ident => $target:expr),*) => {$(if let Some(v) = self.$field.clone() { $target = v; })*};
        }
        set!(learning_rate => c.learning_rate, epochs => c.epochs, batch_size => c.batch_size,
             grad_accum => c.grad_accum, micro_batch_tokens => c.micro_batch_tokens, eval_steps => c.eval_steps, save_steps => c.save_steps,
             logging_steps => c.logging_steps, seed => c.seed, lora_r => c.lora.r, lora_alpha => c.lora.alpha,
             lora_dropout => c.lora.dropout, lora_first_layer => c.lora.first_layer);
        if self.max_steps.is_some() {
            c.max_steps = self.max_steps;
        }
        if self.quantize_base {
            c.quantize_base = true;
        }
        if let Some(t) = &self.lora_targets {
            c.lora.targets = t
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(p) = self.precision {
            c.precision = p.into();
        }
    }
}

#[derive(clap::Args)]
struct EvalArgs {
    /// A training run (its base model with the best adapters).
    #[arg(long, required_unless_present = "model")]
    run: Option<PathBuf>,
    /// A Hugging Face model directory instead (e.g. a run's export/hf).
    #[arg(long, conflicts_with = "run")]
    model: Option<PathBuf>,
    /// Labelled data to evaluate on (default for --run: its test split).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Which split of the run's data, without --data.
    #[arg(long, default_value = "test")]
    split: String,
    /// Report directory (default: RUN/eval or MODEL/eval).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value = "wgpu")]
    device: DeviceArg,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// A training run.
    #[arg(long)]
    run: PathBuf,
    /// Output directory (default: RUN/export), with hf/ and web/ inside.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write int8 weights (per-row scales) for the browser: a quarter of f32's download.
    #[arg(long)]
    int8: bool,
    /// Also write 4-bit weights (blocks of 32, f16 scales): an eighth of f32's download, and what the browser
    /// keeps on the GPU for gemma-2-2b in about 1.5 GB.
    #[arg(long)]
    q4: bool,
    /// Compare each compact format with f32 on this many test rows (0: skip); the result goes in the manifest.
    #[arg(long, default_value_t = run::QUALITY_ROWS)]
    quality_rows: usize,
}

#[derive(clap::Args)]
struct DemoArgs {
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// The bundled sample by default.
    #[arg(long, default_value = "data/arena-sample.parquet")]
    data: PathBuf,
    /// cpu is fastest for the demo's small model on a machine without GPU.
    #[arg(long, default_value = "cpu")]
    device: DeviceArg,
    /// Stop after this many steps (default: two epochs of the sample).
    #[arg(long)]
    max_steps: Option<usize>,
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
    /// Score only the first N rows.
    #[arg(long)]
    limit: Option<usize>,
    /// For a web bundle (`trainer export`'s web/): its weights in this format (f16, int8, q4). On a GPU int8 and
    /// q4 stay packed and are dequantized inside the matmul; on the CPU they are widened once.
    #[arg(long)]
    weights: Option<String>,
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
    /// The device. wgpu opens the adapter with its own limits, which decide whether a large token embedding
    /// stays in host memory (`shared::model::placement`).
    fn device(self) -> Result<burn::tensor::Device> {
        match self {
            DeviceArg::Wgpu => Ok(shared::model::placement::wgpu()?.compute),
            DeviceArg::Cpu => Ok(burn::tensor::Device::flex()),
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
    // Before any model is loaded: activations on the CPU are then reused instead of new pages each time.
    shared::host_memory::keep_freed_memory();
    match Cli::parse().command {
        Command::Prepare(args) => run_prepare(args),
        Command::Predict(args) => run_predict(args),
        Command::Train(args) => cmd_train(args),
        Command::Eval(args) => cmd_eval(args),
        Command::Export(args) => cmd_export(args),
        Command::Demo(args) => cmd_demo(args),
        Command::Bench(what) => cmd_bench(what),
    }
}

fn cmd_bench(what: BenchCommand) -> Result<()> {
    let result = match what {
        BenchCommand::Forward {
            model,
            device,
            batch,
            seq,
            iters,
            dtype,
        } => {
            if dtype == BenchDtype::Bf16 {
                bail!("bench forward runs in f32 or f16 (as trainer predict does), not bf16");
            }
            bench::forward(
                &model,
                &device.device()?,
                batch as usize,
                seq as usize,
                iters as usize,
                dtype == BenchDtype::F16,
            )
        }
        BenchCommand::Train {
            model,
            device,
            seq,
            steps,
            dtype,
            batch,
        } => bench::train(
            &model,
            &device.device()?,
            seq as usize,
            steps as usize,
            dtype.into(),
            batch as usize,
        ),
    }?;
    out!("{result}");
    Ok(())
}

fn cmd_train(args: TrainArgs) -> Result<()> {
    if args.resume && (args.overrides.any_but_precision() || args.config.is_some()) {
        bail!(
            "--resume continues with the run's saved settings; drop --config and the setting flags \
             (--precision excepted)"
        );
    }
    let mut config = match &args.config {
        Some(p) => shared::train::TrainConfig::from_file(p)?,
        None => shared::train::TrainConfig::default(),
    };
    args.overrides.apply(&mut config);
    let random = args.preset.map(|p| match p {
        PresetArg::Demo => run::demo_config(),
        PresetArg::Tiny => shared::model::Gemma2Config::tiny(),
    });
    if let Some(c) = &random
        && args.overrides.lora_first_layer.is_none()
        && config.lora.first_layer >= c.num_hidden_layers
    {
        // The recipe adapts gemma-2-2b's layers 6 to 25; a preset's small model has fewer layers than that, so it
        // gets adapters on every layer.
        config.lora.first_layer = 0;
    }
    config.validate().map_err(anyhow::Error::msg)?;
    // Locked before anything is written into it: a second run on the same directory stops here.
    let mode = match (args.resume, args.overwrite) {
        (true, _) => OpenMode::Resume,
        (false, true) => OpenMode::Overwrite,
        (false, false) => OpenMode::New,
    };
    let run_dir = RunDir::open(&args.out, mode)?;
    let tokenizer = match args.resume {
        // The run's own tokenizer, as run.json records it.
        true => run::recorded_tokenizer(run_dir.path())?,
        false => tokenizer_path(args.tokenizer.clone(), args.model.clone())?,
    };
    let prepared = match (&args.prepared, &args.data) {
        (Some(p), _) => p.clone(),
        (None, Some(d)) => {
            run::prepare_into(d, &tokenizer, run_dir.path(), PrepareSettings::default())?
        }
        (None, None) => run_dir.join("prepared"),
    };
    let run_path = run_dir.path().to_path_buf();
    let out = run::run_train(run::TrainJob {
        run: run_dir,
        prepared,
        model: args.model,
        random,
        tokenizer,
        resume_precision: args
            .overrides
            .precision
            .filter(|_| args.resume)
            .map(Into::into),
        config,
        device: args.device.device()?.autodiff(),
    })
    .map_err(|e| with_precision_hint(e, &run_path))?;
    out!("run: {}", out.display());
    out!("curves: {}", out.join("curves.svg").display());
    Ok(())
}

/// An f16 overflow ends a run; the error then says how to go on in a wider format without losing the steps
/// already checkpointed.
fn with_precision_hint(e: anyhow::Error, run: &std::path::Path) -> anyhow::Error {
    use shared::train::TrainError;
    // Only an f16 step raises this one (an evaluation's non-finite probabilities may come from any precision).
    if !matches!(
        e.downcast_ref::<TrainError>(),
        Some(TrainError::ForwardOverflow { .. })
    ) {
        return e;
    }
    let how = match shared::train::latest_checkpoint(run) {
        Some(c) => format!(
            "training stopped on an overflow: continue from {} in f32 with `trainer train --out {} --resume \
             --precision f32`",
            c.display(),
            run.display()
        ),
        None => "training stopped on an overflow before its first checkpoint: run the same command again with \
                 --overwrite --precision f32"
            .to_string(),
    };
    e.context(how)
}

fn cmd_eval(args: EvalArgs) -> Result<()> {
    let (out, report) = run::run_eval(run::EvalJob {
        run: args.run,
        model: args.model,
        data: args.data,
        split: args.split,
        out: args.out,
        batch_size: args.batch_size,
        tokenizer: args.tokenizer,
        device: args.device.device()?,
    })?;
    out_raw!("{}", report.summary());
    out!("report: {}", out.join("report.json").display());
    Ok(())
}

fn cmd_export(args: ExportArgs) -> Result<()> {
    let mut compact = Vec::new();
    if args.int8 {
        compact.push(shared::export::WeightFormat::Int8);
    }
    if args.q4 {
        compact.push(shared::export::WeightFormat::Q4);
    }
    let (out, exported) = run::run_export(&args.run, args.out, &compact, args.quality_rows)?;
    print_export(&out, &exported);
    Ok(())
}

fn print_export(out: &std::path::Path, exported: &shared::export::Exported) {
    out!("Hugging Face directory: {}", out.join("hf").display());
    out!("web bundle: {}", out.join("web").display());
    for f in &exported.bundle.files {
        out!(
            "  {:<24} {:>12} bytes  sha256 {}",
            f.file,
            f.bytes,
            &f.sha256[..16]
        );
    }
    let Some(about) = &exported.bundle.about else {
        return;
    };
    for q in &about.quality {
        out!(
            "  {:<5} vs f32 on {} test rows: |ΔP(A)| mean {:.2e}, max {:.2e}; accuracy {:.4} (f32 {:.4})",
            q.format.name(),
            q.rows,
            q.mean_abs_delta_p,
            q.max_abs_delta_p,
            q.accuracy,
            q.f32_accuracy
        );
    }
}

fn cmd_demo(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let tokenizer = tokenizer_path(None, None)?;
    out!(
        "arena-judge demo: the whole pipeline on {}",
        args.data.display()
    );
    out!(
        "note: the model is a small randomly initialised Gemma-2 (no pretrained weights), so it learns little;\n      real accuracy needs a pretrained checkpoint: trainer train --model DIR (e.g. google/gemma-2-2b)\n"
    );
    // A demo replaces an earlier demo in the same place; any other non-empty directory is refused.
    let earlier_demo = run::recorded_random_base(&args.out);
    let mode = if earlier_demo {
        OpenMode::Overwrite
    } else {
        OpenMode::New
    };
    let run_dir = RunDir::open(&args.out, mode)?;
    let prepared = run::prepare_into(
        &args.data,
        &tokenizer,
        run_dir.path(),
        PrepareSettings::default(),
    )?;
    let mut config = run::demo_train_config();
    config.max_steps = args.max_steps;
    let run_dir = run::run_train(run::TrainJob {
        run: run_dir,
        prepared,
        model: None,
        random: Some(run::demo_config()),
        tokenizer,
        resume_precision: None,
        config,
        device: args.device.device()?.autodiff(),
    })?;
    out!("\n== evaluation on the test split (straight and swapped)");
    let (eval_dir, report) = run::run_eval(run::EvalJob {
        run: Some(run_dir.clone()),
        model: None,
        data: None,
        split: "test".into(),
        out: None,
        batch_size: 16,
        tokenizer: None,
        device: args.device.device()?,
    })?;
    out_raw!("{}", report.summary());
    out!("\n== export");
    let (export_dir, exported) = run::run_export(
        &run_dir,
        None,
        &[
            shared::export::WeightFormat::Int8,
            shared::export::WeightFormat::Q4,
        ],
        run::QUALITY_ROWS,
    )?;
    print_export(&export_dir, &exported);
    out!("\ndone in {:.0}s", started.elapsed().as_secs_f64());
    out!("report:     {}", eval_dir.join("report.txt").display());
    out!("curves:     {}", run_dir.join("curves.svg").display());
    out!("confusion:  {}", eval_dir.join("confusion.svg").display());
    out!("web bundle: {}", export_dir.join("web").display());
    out!(
        "reminder: a random small model learns little; for real accuracy train from a pretrained gemma-2 (--model DIR)"
    );
    Ok(())
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
        out!(
            "cache {} is up to date with {} (sha256 {}); nothing to do",
            req.out.display(),
            m.source.path,
            &m.source.sha256[..12]
        );
    } else {
        out!(
            "prepared {} in {:.1}s with the {} tokenizer",
            m.source.path,
            started.elapsed().as_secs_f64(),
            m.tokenizer.engine
        );
    }
    print_summary(m);
    out!("cache: {}", req.out.join(shared::cache::MANIFEST).display());
    Ok(())
}

fn run_predict(args: PredictArgs) -> Result<()> {
    let tokenizer_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| args.model.join("tokenizer.json"));
    // Before any work: the predictions must not replace an input.
    shared::predict::check_output_path(&args.out, &[&args.data, &tokenizer_path, &args.model])?;
    let device = args.device.device()?;
    let started = Instant::now();
    let loaded = shared::model::load::load_dir(&args.model, &device, args.weights.as_deref())
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
    let tokenizer = shared::tokenizer::Tokenizer::from_file(&tokenizer_path)
        .with_context(|| "the model directory needs a tokenizer.json (or pass --tokenizer FILE)")?;
    warn_vocab_mismatch(&tokenizer, &tokenizer_path, &model, &args.model);
    let dataset = shared::data::load_file(&args.data, args.format)?;
    warn_duplicate_ids(&dataset, &args.data);
    let mut records = dataset.records;
    if let Some(n) = args.limit {
        records.truncate(n);
    }
    let options = shared::predict::PredictOptions {
        batch_size: args.batch_size,
        swap_tta: args.swap_tta,
    };
    let bar = Bar::default();
    let scored = shared::predict::predict_both(
        &model,
        &tokenizer,
        &PreprocessConfig::default(),
        &records,
        options,
        &device,
        &bar,
    )?;
    let probs = scored.probs();
    shared::predict::write_predictions_csv(&args.out, &records, &probs, &loaded.config.labels)?;
    out!(
        "scored {} rows in {:.1}s ({}){}; predictions: {}",
        records.len(),
        started.elapsed().as_secs_f64(),
        if half { "f16" } else { "f32" },
        if args.swap_tta { " with swap-TTA" } else { "" },
        args.out.display()
    );
    let labels: Vec<Option<shared::data::Label>> = records.iter().map(|r| r.label).collect();
    if let Some(m) = shared::predict::binary_metrics(&probs, &labels) {
        let lengths = scored
            .field_tokens
            .iter()
            .copied()
            .zip(labels.iter().copied());
        out!(
            "accuracy {:.4}   log loss {:.4}   on {} labelled rows{}; picking the longer answer scores {:.4}",
            m.accuracy,
            m.log_loss,
            m.rows,
            if m.ties_skipped > 0 {
                format!(" ({} ties not scored)", m.ties_skipped)
            } else {
                String::new()
            },
            shared::predict::longer_answer_accuracy(lengths).unwrap_or(f64::NAN),
        );
    }
    Ok(())
}

/// A tokenizer whose ids the model's table does not cover is caught row by row before the forward pass; a
/// different size either way usually means the two do not belong together, so say so up front.
fn warn_vocab_mismatch(
    tokenizer: &shared::tokenizer::Tokenizer,
    tokenizer_path: &std::path::Path,
    model: &shared::model::Gemma2ForSequenceClassification,
    model_path: &std::path::Path,
) {
    if tokenizer.vocab_size != model.vocab_size() {
        eprintln!(
            "warning: the tokenizer {} has {} tokens and the model {} a vocabulary of {}: are they a pair?",
            tokenizer_path.display(),
            tokenizer.vocab_size,
            model_path.display(),
            model.vocab_size()
        );
    }
}

fn warn_duplicate_ids(dataset: &shared::data::Dataset, path: &std::path::Path) {
    let dups = dataset.duplicate_ids();
    if !dups.is_empty() {
        eprintln!(
            "warning: {}: {} id(s) occur more than once (first: {}); every row is scored, in file order",
            path.display(),
            dups.len(),
            dups[0]
        );
    }
}

fn print_summary(m: &Manifest) {
    let c = &m.counts;
    out!(
        "rows read: {}  ({:?} schema)   ties dropped: {}   rows kept after {}% sample: {}",
        c.rows_read,
        m.source.format,
        c.ties_dropped,
        m.settings.sample_percent,
        c.rows_after_sample
    );
    out!(
        "{:<6} {:>7} {:>16} {:>16} {:>12} {:>9} {:>9}",
        "split",
        "rows",
        "model_a",
        "model_b",
        "tie",
        "snipped",
        "cut@max"
    );
    for (name, s) in &c.splits {
        let pct = |n: usize| {
            if s.rows == 0 {
                0.0
            } else {
                100.0 * n as f64 / s.rows as f64
            }
        };
        out!(
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
pub(crate) struct Bar(std::sync::Mutex<Option<ProgressBar>>);

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
