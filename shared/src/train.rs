//! LoRA fine-tuning with the reference recipe: AdamW, warmup then cosine (or linear) decay, gradient
//! accumulation, label smoothing, global gradient-norm clipping, length-grouped batches, evaluation and
//! checkpoints every N steps, the best checkpoint by validation accuracy reloaded at the end, early stopping.
//!
//! A step is one optimizer update (`grad_accum` micro-batches), as in Hugging Face's Trainer. Everything random
//! is a function of the seed and the step (the batch order, dropout), so a run resumed from a checkpoint takes
//! the same path as one never stopped.

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::{Module, ParamId};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::batch::{collate, length_grouped_batches, pack_by_tokens};
use crate::cache::{PreparedSplit, write_atomic};
use crate::model::Gemma2ForSequenceClassification;
use crate::model::lora::LoraConfig;
use crate::run_dir::RunDir;
use crate::split::SplitMix64;

/// Every training setting. Defaults are the reference recipe's; a run saves the resolved config as
/// `train_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub lora: LoraConfig,
    /// Store the frozen projections in int8 (QLoRA-style); adapters and head stay in full precision.
    pub quantize_base: bool,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Padded tokens per micro-batch as a step is computed: the step's `batch_size × grad_accum` rows are regrouped
    /// longest first into as few micro-batches as fit ([`crate::batch::pack_by_tokens`]). The loss and gradient
    /// are the same (the mean over the step's rows); the step runs as fewer, larger batches, which is what a GPU
    /// needs to be busy. The default, 8 × 512, turns the recipe's batch 1 × accumulation 8 into one batch of 8
    /// when its rows fit. Activation memory grows with it; 0 keeps the sampler's micro-batches as they are.
    pub micro_batch_tokens: usize,
    pub epochs: f64,
    /// Stop after this many optimizer steps (overrides `epochs`).
    pub max_steps: Option<usize>,
    /// Share of the steps spent warming the learning rate up from zero.
    pub warmup_ratio: f64,
    pub schedule: Schedule,
    pub label_smoothing: f64,
    /// Clip the global L2 norm of the gradients (Hugging Face's `max_grad_norm`); `None` disables.
    pub max_grad_norm: Option<f64>,
    /// Batches of rows of similar length (less padding), in a seeded random order.
    pub group_by_length: bool,
    pub seed: u64,
    pub logging_steps: usize,
    pub eval_steps: usize,
    pub save_steps: usize,
    /// Checkpoints kept; older ones are deleted.
    pub save_total_limit: usize,
    /// Stop after this many evaluations without a better validation accuracy.
    pub early_stopping_patience: Option<usize>,
    pub eval_batch_size: usize,
    pub precision: Precision,
    /// Dynamic loss scaling when the base is f16 ([`LossScaler`], PyTorch's `GradScaler`); bf16 and f32 have
    /// f32's exponent range and need none.
    pub loss_scaling: bool,
    /// The loss scale an f16 run starts from (PyTorch's `init_scale`).
    pub initial_loss_scale: f64,
    /// The device's dense peak in the training precision, TFLOP/s, for the model FLOPs utilisation (MFU) in the
    /// log; `None` looks the adapter up by name ([`crate::model::flops::known_peak_tflops`]).
    pub peak_tflops: Option<f64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lora: LoraConfig::default(),
            quantize_base: false,
            learning_rate: 2e-5,
            weight_decay: 0.01,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            batch_size: 1,
            grad_accum: 8,
            micro_batch_tokens: 8 * 512,
            epochs: 1.0,
            max_steps: None,
            warmup_ratio: 0.1,
            schedule: Schedule::Cosine,
            label_smoothing: 0.1,
            max_grad_norm: Some(1.0),
            group_by_length: true,
            seed: 42,
            logging_steps: 10,
            eval_steps: 500,
            save_steps: 500,
            save_total_limit: 3,
            early_stopping_patience: Some(3),
            eval_batch_size: 8,
            precision: Precision::Auto,
            loss_scaling: true,
            initial_loss_scale: 65536.0,
            peak_tflops: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

/// Precision of the frozen base; adapters, head and optimizer state stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f16 where the device supports it on a GPU backend, else f32.
    Auto,
    F32,
    /// f16 base, with dynamic loss scaling (f16's smallest normal value is 6e-5, and gradients through the
    /// base are often smaller).
    F16,
    /// bfloat16 base: f32's range with 8 bits of mantissa, so no loss scaling; where the device computes it
    /// (the CPU backend; not lavapipe, and not WGSL, so not the browser).
    Bf16,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{file}: {message}")]
    Config { file: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Lora(#[from] crate::model::lora::LoraError),
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
    #[error("reading a tensor from the device: {0}")]
    Read(String),
    #[error("training diverged at step {step}: the loss is {loss}")]
    Diverged { step: usize, loss: f64 },
    /// An f16 forward pass gave a loss that is not finite: an activation went past f16's largest value. Loss
    /// scaling acts on the backward pass only, so no scale helps; a wider format does.
    #[error(
        "step {step}: the loss is not finite in f16 (rows {rows}): the model's activations exceed f16's range \
         (65504), which no loss scale changes; train in bf16 where the device has it, or f32"
    )]
    ForwardOverflow { step: usize, rows: String },
    /// A row scored by [`evaluate_split`] got probabilities that are not finite.
    #[error(
        "row {row} (id {id}): the model's probabilities are not finite ({probs:?}): its weights or activations \
         overflowed (in f16, whose range ends at 65504, evaluate in bf16 or f32)"
    )]
    NonFinite {
        row: usize,
        id: String,
        probs: [f32; 2],
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

impl TrainConfig {
    /// Reads a TOML (`.toml`) or JSON config; missing fields keep their defaults, unknown ones are errors.
    pub fn from_file(path: &Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let err = |message: String| TrainError::Config {
            file: path.display().to_string(),
            message,
        };
        let config: Self = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text).map_err(|e| err(e.to_string()))?
        } else {
            serde_json::from_str(&text).map_err(|e| err(e.to_string()))?
        };
        config.validate().map_err(err)?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("logging_steps", self.logging_steps),
            ("eval_steps", self.eval_steps),
            ("save_steps", self.save_steps),
            ("save_total_limit", self.save_total_limit),
            ("eval_batch_size", self.eval_batch_size),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be at least 1"));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(format!(
                "learning_rate must be positive, not {}",
                self.learning_rate
            ));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(format!(
                "warmup_ratio {} is outside [0, 1)",
                self.warmup_ratio
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(format!(
                "label_smoothing {} is outside [0, 1)",
                self.label_smoothing
            ));
        }
        if self.max_steps == Some(0) {
            return Err("max_steps must be at least 1".into());
        }
        if self.max_steps.is_none() && !(self.epochs > 0.0 && self.epochs.is_finite()) {
            return Err("epochs must be positive".into());
        }
        // Below 1 a scale would shrink the gradients it is there to keep.
        if !(self.initial_loss_scale >= 1.0 && self.initial_loss_scale.is_finite()) {
            return Err(format!(
                "initial_loss_scale must be at least 1, not {}",
                self.initial_loss_scale
            ));
        }
        Ok(())
    }

    /// Optimizer steps of a run over `rows` training rows.
    pub fn total_steps(&self, rows: usize) -> usize {
        let micro = rows.div_ceil(self.batch_size);
        let per_epoch = micro.div_ceil(self.grad_accum).max(1);
        self.max_steps
            .unwrap_or_else(|| (self.epochs * per_epoch as f64).ceil() as usize)
            .max(1)
    }

    /// Warmup steps: `ceil(warmup_ratio * total)`, as Hugging Face computes them.
    pub fn warmup_steps(&self, total: usize) -> usize {
        (self.warmup_ratio * total as f64).ceil() as usize
    }

    /// Learning rate of optimizer step `step` (0-based) of `total`: linear warmup from zero, then the schedule
    /// (transformers' `get_cosine_schedule_with_warmup` and `get_linear_schedule_with_warmup`).
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warmup = self.warmup_steps(total);
        if step < warmup {
            return self.learning_rate * step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
        let factor = match self.schedule {
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Schedule::Linear => (1.0 - progress).max(0.0),
            Schedule::Constant => 1.0,
        };
        self.learning_rate * factor
    }

    /// Whether the frozen base trains in a 16-bit float (f16 or bf16) on `device`.
    pub fn half(&self, device: &Device) -> bool {
        self.resolve_precision(device).0 != FloatDType::F32
    }

    /// The float type of the frozen base on `device`, and why, in words a run prints.
    pub fn resolve_precision(&self, device: &Device) -> (FloatDType, &'static str) {
        let gpu = crate::model::placement::is_gpu(device);
        let f16 = device.supports_dtype(FloatDType::F16);
        match self.precision {
            Precision::F32 => (FloatDType::F32, "f32 (as asked)"),
            Precision::F16 if self.loss_scaling => (
                FloatDType::F16,
                "f16 base with dynamic loss scaling, f32 adapters, head and optimizer state (as asked)",
            ),
            Precision::F16 => (
                FloatDType::F16,
                "f16 base without loss scaling, f32 adapters, head and optimizer state (as asked)",
            ),
            Precision::Bf16 => (
                FloatDType::BF16,
                "bf16 base, f32 adapters, head and optimizer state (as asked)",
            ),
            Precision::Auto if gpu && f16 && self.loss_scaling => (
                FloatDType::F16,
                "f16 base with dynamic loss scaling, f32 adapters, head and optimizer state (auto: the GPU \
                 supports f16)",
            ),
            Precision::Auto if gpu && f16 => (
                FloatDType::F16,
                "f16 base without loss scaling, f32 adapters, head and optimizer state (auto: the GPU \
                 supports f16)",
            ),
            Precision::Auto if gpu => {
                (FloatDType::F32, "f32 (auto: this GPU does not support f16)")
            }
            // The CPU backend computes f16 by converting each value: slower than f32, and no memory to save.
            Precision::Auto => (FloatDType::F32, "f32 (auto: f16 pays only on a GPU)"),
        }
    }

    /// The loss scaler a run in this precision starts with: one for an f16 base, unless switched off.
    pub fn loss_scaler(&self, device: &Device) -> Option<LossScaler> {
        (self.loss_scaling && self.resolve_precision(device).0 == FloatDType::F16)
            .then(|| LossScaler::new(self.initial_loss_scale))
    }
}

/// Dynamic loss scaling, as PyTorch's `GradScaler`. In an f16 base, gradients below f16's smallest normal
/// value (6e-5) lose digits and those below 6e-8 become zero; the loss is multiplied by `scale` before the
/// backward pass so they stay in range, and the gradients are divided by it again before clipping. When the
/// gradients overflow (infinite or NaN) the scale halves and [`train_step`] computes the step again; after
/// [`LossScaler::GROWTH_INTERVAL`] steps in a row without overflow it doubles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Steps in a row without overflow.
    pub good_steps: usize,
    /// Overflows over the run (each cost one step's computation).
    pub overflows: usize,
}

impl LossScaler {
    /// PyTorch's `growth_interval`.
    pub const GROWTH_INTERVAL: usize = 2000;

    pub fn new(scale: f64) -> Self {
        Self {
            scale,
            good_steps: 0,
            overflows: 0,
        }
    }

    /// Records whether a step's gradients were finite.
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale /= 2.0;
            self.good_steps = 0;
            self.overflows += 1;
        }
    }
}

/// Cross-entropy with label smoothing, as PyTorch's `CrossEntropyLoss(label_smoothing=eps)`:
/// `(1 - eps) * nll + eps * mean_c(-log p_c)`, averaged over rows. Computed in f32.
///
/// # Shapes
/// `logits`: `[batch, classes]`, `labels`: `[batch]` → `[1]`
pub fn smoothed_cross_entropy(logits: Tensor<2>, labels: Tensor<1, Int>, eps: f64) -> Tensor<1> {
    let [batch, _] = logits.dims();
    let logp = log_softmax(logits.cast(FloatDType::F32), 1);
    let nll = logp.clone().gather(1, labels.reshape([batch, 1])).neg(); // [batch, 1]
    let uniform = logp.mean_dim(1).neg(); // [batch, 1]
    (nll.mul_scalar(1.0 - eps) + uniform.mul_scalar(eps))
        .mean()
        .reshape([1])
}

/// One logged stretch of training steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub kind: String,
    pub step: usize,
    pub epoch: f64,
    /// Mean training loss over the steps since the last log line.
    pub loss: f64,
    pub learning_rate: f64,
    /// Global gradient norm of the last step, before clipping.
    pub grad_norm: f64,
    pub rows_per_second: f64,
    /// Input tokens (padding not counted) per second since the last log line.
    #[serde(default)]
    pub tokens_per_second: f64,
    /// Model FLOPs utilisation since the last log line: the FLOPs a frozen-base LoRA step needs
    /// ([`crate::model::flops`]) per second, over the device's peak; `None` where the peak is unknown.
    #[serde(default)]
    pub mfu: Option<f64>,
    /// The f16 loss scale after the last step ([`LossScaler`]); `None` in f32 and bf16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    pub elapsed_seconds: f64,
}

/// One evaluation on the validation split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalLog {
    pub kind: String,
    pub step: usize,
    pub epoch: f64,
    /// The training loss (label-smoothed), as the recipe reports it.
    pub loss: f64,
    pub accuracy: f64,
    /// Plain cross-entropy of the probabilities.
    pub log_loss: f64,
    pub rows: usize,
    /// Rows `[true][predicted]`, classes model_a, model_b.
    pub confusion: [[usize; 2]; 2],
    pub best: bool,
    /// The length baseline's accuracy on the same rows ([`crate::predict::longer_answer`]); absent from the logs
    /// of runs that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longer_answer_accuracy: Option<f64>,
}

/// What training tells the caller as it goes (the command line draws a bar from it).
pub trait TrainEvents {
    fn start(&self, _total_steps: usize, _done: usize) {}
    /// An optimizer step ended. Its loss is not known yet: it stays on the device until the next log line.
    fn step(&self, _step: usize) {}
    fn log(&self, _log: &StepLog) {}
    fn eval(&self, _log: &EvalLog) {}
    fn message(&self, _text: &str) {}
    fn finish(&self) {}
}

pub struct Quiet;
impl TrainEvents for Quiet {}

/// The rows to train and validate on.
pub struct TrainData<'a> {
    pub train: &'a PreparedSplit,
    pub val: &'a PreparedSplit,
}

/// The state a checkpoint restores besides weights and optimizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    pub total_steps: usize,
    pub best_accuracy: Option<f64>,
    pub best_step: Option<usize>,
    pub evals_without_gain: usize,
    /// The training loss sum and step count since the last log line.
    pub pending_loss: f64,
    pub pending_steps: usize,
    pub stopped_early: bool,
    /// The f16 loss scale; `None` in f32 and bf16 (and in checkpoints from before loss scaling).
    #[serde(default)]
    pub loss_scaler: Option<LossScaler>,
}

/// The outcome of [`train`].
pub struct Trained {
    /// The model with the best validation accuracy's adapters (or the last, without evaluations).
    pub model: Gemma2ForSequenceClassification,
    pub state: TrainerState,
    pub evals: Vec<EvalLog>,
    pub logs: Vec<StepLog>,
    /// Steps this call ran (fewer than the total when resumed).
    pub steps_run: usize,
    pub seconds: f64,
}

pub const LOG_FILE: &str = "log.jsonl";
pub const CONFIG_FILE: &str = "train_config.json";
pub const BEST_DIR: &str = "best";
pub const ADAPTER_FILE: &str = "adapter.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.bpk";
const STATE_FILE: &str = "trainer_state.json";
const CHECKPOINT_PREFIX: &str = "checkpoint-";

/// Fine-tunes `model` (a classifier without adapters, on `device`, which must be an autodiff device) and
/// returns it with the best adapters. Writes the run's `log.jsonl`, checkpoints and `best/`; continues from the
/// newest checkpoint when `run` was opened to resume.
pub fn train(
    model: Gemma2ForSequenceClassification,
    config: &TrainConfig,
    data: TrainData<'_>,
    run: &RunDir,
    device: &Device,
    events: &dyn TrainEvents,
) -> Result<Trained, TrainError> {
    config.validate().map_err(TrainError::Invalid)?;
    if data.train.is_empty() {
        return Err(TrainError::Invalid("the training split has no rows".into()));
    }
    check_rows(data.train, "training", model.vocab_size(), true)?;
    check_rows(data.val, "validation", model.vocab_size(), false)?;
    if !device.is_autodiff() {
        return Err(TrainError::Invalid(
            "training needs an autodiff device".into(),
        ));
    }
    let mut model = for_training(model, config, device)?;
    let peak_flops = config
        .peak_tflops
        .or_else(|| crate::model::flops::known_peak_tflops(device, config.half(device)))
        .map(|t| t * 1e12);
    let mut optim = AdamWConfig::new()
        .with_beta_1(config.adam_beta1 as f32)
        .with_beta_2(config.adam_beta2 as f32)
        .with_epsilon(config.adam_epsilon as f32)
        .with_weight_decay(config.weight_decay as f32)
        .init();

    let total = config.total_steps(data.train.len());
    let mut state = TrainerState {
        step: 0,
        total_steps: total,
        best_accuracy: None,
        best_step: None,
        evals_without_gain: 0,
        pending_loss: 0.0,
        pending_steps: 0,
        stopped_early: false,
        loss_scaler: config.loss_scaler(device),
    };
    let mut logs: Vec<StepLog> = Vec::new();
    let mut evals: Vec<EvalLog> = Vec::new();
    if run.resumes() {
        let Some(ckpt) = latest_checkpoint(run.path()) else {
            return Err(TrainError::Checkpoint {
                path: run.path().display().to_string(),
                message: "--resume: no checkpoint to resume from".into(),
            });
        };
        let (m, o, s) = load_checkpoint(&ckpt, model, optim, device)?;
        (model, optim, state) = (m, o, s);
        // The scaler follows this run's precision, which may differ from the checkpoint's: a run stopped by an
        // f16 overflow resumes in f32 or bf16, and needs none.
        state.loss_scaler = match config.loss_scaler(device) {
            Some(fresh) => state.loss_scaler.or(Some(fresh)),
            None => None,
        };
        if state.total_steps != total {
            return Err(TrainError::Checkpoint {
                path: ckpt.display().to_string(),
                message: format!(
                    "was made for {} steps, this run has {total}: the data or config changed",
                    state.total_steps
                ),
            });
        }
        (logs, evals) = truncate_log(&run.join(LOG_FILE), state.step)?;
        events.message(&format!(
            "resumed from {} at step {}/{total}",
            ckpt.display(),
            state.step
        ));
    } else {
        write_atomic(&run.join(LOG_FILE), b"").map_err(|e| TrainError::Io {
            path: run.join(LOG_FILE).display().to_string(),
            message: e.to_string(),
        })?;
    }

    let micro = micro_batches(data.train, config, total);
    let trainable = trainable_ids(&model);
    let clock = std::time::Instant::now();
    let first_step = state.step;
    // What the steps since the last log line did. Their loss sum and the last gradient norm stay on the device
    // and are read back together at the next log line or checkpoint, so the host never waits for the device
    // inside the loop (evaluations aside).
    let mut window = Window::default();
    let mut log_clock = std::time::Instant::now();
    events.start(total, state.step);

    while state.step < total && !state.stopped_early {
        let step = state.step;
        let chunk = &micro[(step * config.grad_accum).min(micro.len())
            ..((step + 1) * config.grad_accum).min(micro.len())];
        let lr = config.lr_at(step, total);
        let out;
        (model, out) = train_step(
            model,
            &mut optim,
            chunk,
            data.train,
            config,
            step,
            lr,
            &trainable,
            state.loss_scaler.as_mut(),
            device,
        )?;
        window.add(out, &model);
        state.step += 1;
        events.step(state.step);

        let epoch = epoch_of(state.step, data.train.len(), config);
        if state.step.is_multiple_of(config.logging_steps) || state.step == total {
            let grad_norm = window.read_into(&mut state)?;
            let elapsed = log_clock.elapsed().as_secs_f64().max(1e-9);
            let log = StepLog {
                kind: "train".into(),
                step: state.step,
                epoch,
                loss: state.pending_loss / state.pending_steps.max(1) as f64,
                learning_rate: lr,
                grad_norm,
                rows_per_second: window.rows as f64 / elapsed,
                tokens_per_second: window.tokens as f64 / elapsed,
                mfu: peak_flops.map(|peak| window.flops / elapsed / peak),
                loss_scale: state.loss_scaler.as_ref().map(|s| s.scale),
                elapsed_seconds: clock.elapsed().as_secs_f64(),
            };
            append_log(run.path(), &log)?;
            events.log(&log);
            logs.push(log);
            state.pending_loss = 0.0;
            state.pending_steps = 0;
            window = Window::default();
            log_clock = std::time::Instant::now();
        }
        let last = state.step == total;
        if state.step.is_multiple_of(config.eval_steps) || last {
            let m = evaluate_split(&model.valid(), data.val, config, &device.clone().inner())?;
            let gain = state.best_accuracy.is_none_or(|b| m.accuracy > b);
            if gain {
                state.best_accuracy = Some(m.accuracy);
                state.best_step = Some(state.step);
                state.evals_without_gain = 0;
                save_adapter(&run.join(BEST_DIR), &model)?;
            } else {
                state.evals_without_gain += 1;
                if config
                    .early_stopping_patience
                    .is_some_and(|p| state.evals_without_gain >= p)
                {
                    state.stopped_early = true;
                    events.message(&format!(
                        "early stop at step {}: {} evaluations without a better validation accuracy",
                        state.step, state.evals_without_gain
                    ));
                }
            }
            let log = EvalLog {
                kind: "eval".into(),
                step: state.step,
                epoch,
                loss: m.loss,
                accuracy: m.accuracy,
                log_loss: m.log_loss,
                rows: m.rows,
                confusion: m.confusion,
                best: gain,
                longer_answer_accuracy: Some(m.longer_answer_accuracy),
            };
            append_log(run.path(), &log)?;
            events.eval(&log);
            evals.push(log);
        }
        if state.step.is_multiple_of(config.save_steps) || last || state.stopped_early {
            // The checkpoint carries the loss of the steps not logged yet, so a resumed run logs the same mean.
            window.read_into(&mut state)?;
            save_checkpoint(run.path(), &model, &optim, &state, config.save_total_limit)?;
        }
    }
    events.finish();

    let best = run.join(BEST_DIR).join(ADAPTER_FILE);
    if best.is_file() {
        model = load_adapter(&best, model, device)?;
    }
    Ok(Trained {
        model,
        steps_run: state.step - first_step,
        state,
        evals,
        logs,
        seconds: clock.elapsed().as_secs_f64(),
    })
}

/// A split is fit to train or validate on: every token id is inside the model's vocabulary (a mismatched
/// tokenizer would index past the embedding), and, for training, no row is a tie (the classifier has two
/// classes); a validation split needs at least one row labelled model_a or model_b.
fn check_rows(
    split: &PreparedSplit,
    name: &str,
    vocab: usize,
    training: bool,
) -> Result<(), TrainError> {
    for (i, row) in split.rows.iter().enumerate() {
        if let Some(&t) = split.input_ids(i).iter().find(|&&t| t as usize >= vocab) {
            return Err(TrainError::Invalid(format!(
                "{name} row {} (id {}): token id {t} is outside the model's vocabulary of {vocab}: the data was \
                 prepared with a tokenizer that does not belong to this model",
                i + 1,
                row.id
            )));
        }
        if training && row.label == crate::data::Label::Tie {
            return Err(TrainError::Invalid(format!(
                "{name} row {} (id {}) is a tie: the data was prepared with --keep-ties, and the classifier \
                 has two classes (model_a, model_b); prepare it without --keep-ties",
                i + 1,
                row.id
            )));
        }
    }
    if !training && !split.rows.iter().any(|r| r.label.index() < 2) {
        return Err(TrainError::Invalid(format!(
            "the {name} split has no rows labelled model_a or model_b: nothing to evaluate on (give the \
             split more rows)"
        )));
    }
    Ok(())
}

/// The model as [`train`] trains it: the base in the run's precision (f16 on a GPU by default), LoRA adapters
/// where the config says, optionally an int8 base; adapters and head stay in f32, so their gradients and AdamW
/// state do too.
pub fn for_training(
    model: Gemma2ForSequenceClassification,
    config: &TrainConfig,
    device: &Device,
) -> Result<Gemma2ForSequenceClassification, TrainError> {
    let dtype = config.resolve_precision(device).0;
    let half = dtype != FloatDType::F32;
    if half && !device.supports_dtype(dtype) {
        let name = if dtype == FloatDType::BF16 {
            "bf16"
        } else {
            "f16"
        };
        return Err(TrainError::Invalid(format!(
            "this device does not support {name}: train with --precision f32{}",
            if dtype == FloatDType::BF16 && device.supports_dtype(FloatDType::F16) {
                " or f16"
            } else {
                ""
            }
        )));
    }
    let model = if half { model.cast(dtype) } else { model };
    let mut model = model.with_lora(&config.lora, device)?;
    if config.quantize_base {
        model = model.quantize_base(device);
    }
    if half {
        // The head trains: keep it (and its optimizer state) in f32.
        let w = model.score.weight.val().cast(FloatDType::F32);
        model.score.weight = crate::model::lora::trainable("score.weight", w);
    }
    Ok(model)
}

/// What one optimizer step leaves behind, still on the device.
pub struct StepOutput {
    /// The step's mean loss, `[1]`.
    pub loss: Tensor<1>,
    /// The global gradient norm before clipping, `[1]`; `None` when nothing received a gradient.
    pub grad_norm: Option<Tensor<1>>,
    pub rows: usize,
    /// Input tokens, padding not counted.
    pub tokens: usize,
    /// `(rows, padded length)` of each micro-batch, for the FLOPs count.
    pub shapes: Vec<(usize, usize)>,
    /// Times the step's scaled f16 gradients overflowed and it was computed again at half the scale.
    pub overflows: usize,
}

/// One optimizer step (step `step`, 0-based, at learning rate `lr`): forward and backward over the step's
/// micro-batches with their gradients accumulated, the global norm clipped, then AdamW. Without a loss scaler
/// nothing is read back from the device: on a GPU the host queues the next step while this one runs. With one,
/// the gradient norm is read once per step to see whether the scaled gradients overflowed f16. An overflowed
/// step is computed again at half the scale (same rows, same dropout), so no rows are dropped; PyTorch's
/// `GradScaler` skips such a step instead, and with it the step's rows.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: Gemma2ForSequenceClassification,
    optim: &mut ModuleOptimizer,
    micro: &[Vec<usize>],
    split: &PreparedSplit,
    config: &TrainConfig,
    step: usize,
    lr: f64,
    trainable: &[ParamId],
    mut scaler: Option<&mut LossScaler>,
    device: &Device,
) -> Result<(Gemma2ForSequenceClassification, StepOutput), TrainError> {
    let mut overflows = 0;
    loop {
        let scale = scaler.as_ref().map_or(1.0, |s| s.scale);
        let (mut grads, mut out) =
            step_gradients(&model, micro, split, config, step, scale, device);
        out.grad_norm = clip_global_norm(&mut grads, trainable, config.max_grad_norm, scale);
        if let (Some(scaler), Some(norm)) = (scaler.as_deref_mut(), &out.grad_norm) {
            // Loss and norm in one read: the loss tells a forward pass that overflowed, which no scale mends,
            // from scaled gradients that did, which a smaller scale does.
            let values = Tensor::cat(
                vec![
                    out.loss.clone().cast(FloatDType::F32),
                    norm.clone().cast(FloatDType::F32),
                ],
                0,
            )
            .try_to_vec_as::<f32>()
            .map_err(|e| TrainError::Read(format!("{e:?}")))?;
            let (loss, norm) = (values[0], values[1]);
            if !loss.is_finite() {
                return Err(TrainError::ForwardOverflow {
                    step: step + 1,
                    rows: row_ids(micro, split),
                });
            }
            scaler.update(norm.is_finite());
            if !norm.is_finite() {
                if scaler.scale < 1.0 {
                    // Even an unscaled backward pass overflows f16: no scale can help.
                    return Err(TrainError::Invalid(format!(
                        "step {}: the gradients overflow f16 even without loss scaling (rows {}): train with \
                         --precision f32 or bf16",
                        step + 1,
                        row_ids(micro, split)
                    )));
                }
                overflows += 1;
                continue;
            }
        }
        out.overflows = overflows;
        return Ok((step_by_shape(optim, lr, model, grads, trainable), out));
    }
}

/// AdamW on the gradients one shape at a time. burn's optimizer updates the parameters in the module's order,
/// and the adapters alternate shapes there (`A` is `[d_in, r]`, `B` `[r, d_out]`): fusion ran each parameter's
/// update as kernels of its own, two per parameter and step. Updates of one shape queued one after another run
/// together. The same update of each parameter: only the order in which they are queued differs.
fn step_by_shape(
    optim: &mut ModuleOptimizer,
    lr: f64,
    mut model: Gemma2ForSequenceClassification,
    mut grads: GradientsParams,
    ids: &[ParamId],
) -> Gemma2ForSequenceClassification {
    for group in ids_by_shape(&grads, ids) {
        let mut part = GradientsParams::new();
        for id in group {
            if let Some(g) = grads.remove::<2>(id) {
                part.register(id, g);
            }
        }
        model = optim.step(lr, model, part);
    }
    // Whatever is not a matrix, in the module's order.
    if !grads.is_empty() {
        model = optim.step(lr, model, grads);
    }
    model
}

/// The ids of `ids`' matrix gradients grouped by shape, groups in the order their first member comes: work queued
/// one group after another puts tensors of one shape side by side, which fusion runs as one kernel.
fn ids_by_shape(grads: &GradientsParams, ids: &[ParamId]) -> Vec<Vec<ParamId>> {
    let mut groups: Vec<([usize; 2], Vec<ParamId>)> = Vec::new();
    for id in ids {
        let Some(dims) = grads.get::<2>(*id).map(|g| g.dims()) else {
            continue;
        };
        match groups.iter_mut().find(|(d, _)| *d == dims) {
            Some((_, group)) => group.push(*id),
            None => groups.push((dims, vec![*id])),
        }
    }
    groups.into_iter().map(|(_, group)| group).collect()
}

/// The ids of a step's rows, for an error that names them.
fn row_ids(micro: &[Vec<usize>], split: &PreparedSplit) -> String {
    micro
        .iter()
        .flatten()
        .map(|&i| split.rows[i].id.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The gradients of one step's micro-batches (regrouped by `micro_batch_tokens`), accumulated, of the loss times
/// `scale`; and the step's output (its unscaled loss, rows and shapes), still without its gradient norm.
fn step_gradients(
    model: &Gemma2ForSequenceClassification,
    micro: &[Vec<usize>],
    split: &PreparedSplit,
    config: &TrainConfig,
    step: usize,
    scale: f64,
    device: &Device,
) -> (GradientsParams, StepOutput) {
    let micro = pack_by_tokens(
        micro,
        |i| split.input_ids(i).len(),
        config.micro_batch_tokens,
    );
    let step_rows = micro.iter().map(Vec::len).sum::<usize>().max(1);
    let mut accumulator = GradientsAccumulator::<Gemma2ForSequenceClassification>::new();
    let mut loss_sum: Option<Tensor<1>> = None;
    let (mut rows, mut tokens, mut shapes) = (0, 0, Vec::with_capacity(micro.len()));
    for (k, batch_rows) in micro.iter().enumerate() {
        // Dropout draws from the device RNG: seed it from the position, so a resumed run (or a step computed
        // again at another loss scale) draws the same.
        device.seed(
            config
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add((step * config.grad_accum + k) as u64),
        );
        let ids: Vec<&[u32]> = batch_rows.iter().map(|&i| split.input_ids(i)).collect();
        let batch = collate(&ids, 0);
        let labels: Vec<i32> = batch_rows
            .iter()
            .map(|&i| split.rows[i].label.index() as i32)
            .collect();
        let labels =
            Tensor::<1, Int>::from_data(TensorData::new(labels, [batch_rows.len()]), device);
        let logits = model.forward_batch(&batch, device);
        // Each micro-batch's mean loss weighted by its share of the step's rows, so the step's loss is the mean
        // over its rows however they were grouped (with equal micro-batches, Hugging Face's mean of means).
        let loss = smoothed_cross_entropy(logits, labels, config.label_smoothing)
            .mul_scalar(batch_rows.len() as f64 / step_rows as f64);
        let value = loss.clone().detach();
        loss_sum = Some(match loss_sum {
            Some(sum) => sum + value,
            None => value,
        });
        let scaled = if scale == 1.0 {
            loss
        } else {
            loss.mul_scalar(scale)
        };
        let grads = GradientsParams::from_grads(scaled.backward(), model);
        accumulator.accumulate(model, grads);
        rows += batch_rows.len();
        tokens += batch.lengths.iter().sum::<usize>();
        shapes.push((batch.batch_size, batch.seq_len));
    }
    let loss = loss_sum.unwrap_or_else(|| Tensor::zeros([1], &device.clone().inner()));
    let out = StepOutput {
        loss,
        grad_norm: None,
        rows,
        tokens,
        shapes,
        overflows: 0,
    };
    (accumulator.grads(), out)
}

/// The steps since the last log line: their losses summed on the device, the last gradient norm, and what they
/// processed.
#[derive(Default)]
struct Window {
    loss: Option<Tensor<1>>,
    steps: usize,
    grad_norm: Option<Tensor<1>>,
    rows: usize,
    tokens: usize,
    flops: f64,
}

impl Window {
    fn add(&mut self, out: StepOutput, model: &Gemma2ForSequenceClassification) {
        let first_trained = model.first_adapted_layer();
        self.flops += out
            .shapes
            .iter()
            .map(|&(rows, seq)| {
                (rows * seq) as f64
                    * crate::model::flops::training_flops_per_token(model, seq, first_trained)
            })
            .sum::<f64>();
        self.loss = Some(match self.loss.take() {
            Some(sum) => sum + out.loss,
            None => out.loss,
        });
        self.steps += 1;
        if out.grad_norm.is_some() {
            self.grad_norm = out.grad_norm;
        }
        self.rows += out.rows;
        self.tokens += out.tokens;
    }

    /// Reads the pending loss (one read for loss and norm) into `state` and returns the last gradient norm; a
    /// non-finite loss stops the run before anything is written.
    fn read_into(&mut self, state: &mut TrainerState) -> Result<f64, TrainError> {
        let Some(loss) = self.loss.take() else {
            return Ok(0.0);
        };
        let norm = self
            .grad_norm
            .clone()
            .unwrap_or_else(|| Tensor::zeros([1], &loss.device()));
        let values = Tensor::cat(vec![loss, norm.cast(FloatDType::F32)], 0)
            .try_to_vec_as::<f32>()
            .map_err(|e| TrainError::Read(format!("{e:?}")))?;
        let (loss, norm) = (f64::from(values[0]), f64::from(values[1]));
        if !loss.is_finite() {
            return Err(TrainError::Diverged {
                step: state.step,
                loss,
            });
        }
        state.pending_loss += loss;
        state.pending_steps += std::mem::take(&mut self.steps);
        Ok(norm)
    }
}

fn epoch_of(step: usize, rows: usize, config: &TrainConfig) -> f64 {
    let per_epoch = rows
        .div_ceil(config.batch_size)
        .div_ceil(config.grad_accum)
        .max(1);
    step as f64 / per_epoch as f64
}

/// The micro-batches of the whole run, in order: each epoch a fresh seeded order, length-grouped or shuffled.
fn micro_batches(train: &PreparedSplit, config: &TrainConfig, total: usize) -> Vec<Vec<usize>> {
    let lengths: Vec<usize> = (0..train.len()).map(|i| train.input_ids(i).len()).collect();
    let needed = total * config.grad_accum;
    let mut out = Vec::with_capacity(needed);
    let mut epoch = 0u64;
    while out.len() < needed {
        let seed = config.seed.wrapping_add(epoch);
        if config.group_by_length {
            out.extend(length_grouped_batches(
                &lengths,
                config.batch_size,
                50,
                seed,
            ));
        } else {
            let mut order: Vec<usize> = (0..lengths.len()).collect();
            SplitMix64::new(seed).shuffle(&mut order);
            out.extend(order.chunks(config.batch_size).map(<[usize]>::to_vec));
        }
        epoch += 1;
    }
    // An epoch's last step may take fewer micro-batches: keep the whole of each epoch's stream, cut at the end.
    out
}

/// The ids of the adapters and the head.
pub fn trainable_ids(model: &Gemma2ForSequenceClassification) -> Vec<ParamId> {
    struct Ids(Vec<ParamId>);
    impl burn::module::ModuleVisitor for Ids {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            if param.is_require_grad() {
                self.0.push(param.id);
            }
        }
    }
    let mut ids = Ids(Vec::new());
    model.visit(&mut ids);
    ids.0
}

/// Scales the gradients so their global L2 norm is at most `max`, as PyTorch's `clip_grad_norm_` does (every
/// gradient times `min(1, max / (norm + 1e-6))`), and returns the norm before clipping. Gradients of a loss
/// multiplied by `loss_scale` are divided by it first (one multiplication with the clipping factor). All on the
/// device: the factor is a tensor, so clipping never waits for a read-back.
fn clip_global_norm(
    grads: &mut GradientsParams,
    ids: &[ParamId],
    max: Option<f64>,
    loss_scale: f64,
) -> Option<Tensor<1>> {
    // Each gradient's squares summed down its columns, a reduction that reads the gradient in place whatever its
    // layout: the adapters' gradients on wgpu are transposed views (attention's head-major layout), which a
    // reshape to one row copied first, a kernel more per tensor. The column sums of one shape are then added
    // element-wise and reduced once per shape. All reductions are queued first, then the additions, grouped by
    // shape: queued next to each other, fusion runs the additions of a shape as one kernel, where an addition
    // right after its reduction was a launch of its own. burn's full `sum()` would instead zero its output and
    // add partial sums into it atomically, two launches in no fixed order.
    // Each column sum is unscaled (by the loss scale squared, a power of two, so exactly) right after its reduction:
    // with work on its output, burn's fusion runs the square and the sum as one kernel; a reduction with nothing
    // after it ran the square as a kernel of its own, one launch more per trainable tensor (121 per step).
    let groups = ids_by_shape(grads, ids);
    let unscale = loss_scale.powi(-2);
    let columns: Vec<Vec<Tensor<2>>> = groups
        .iter()
        .map(|group| {
            let sums = group.iter().filter_map(|id| grads.get::<2>(*id));
            sums.map(|g| g.cast(FloatDType::F32).square().sum_dim(0).mul_scalar(unscale)).collect()
        })
        .collect();
    let per_shape: Vec<Tensor<2>> = columns
        .into_iter()
        .filter_map(|group| group.into_iter().reduce(|t, sums| t + sums))
        .collect();
    // Collected first, so the reductions are queued before the additions again.
    let totals: Vec<Tensor<1>> = per_shape.into_iter().map(|t| t.sum_dim(1).reshape([1])).collect();
    let total = totals.into_iter().reduce(|t, sq| t + sq)?;
    let norm = total.sqrt();
    let factor = match max {
        Some(max) => Some(
            norm.clone()
                .add_scalar(1e-6)
                .recip()
                .mul_scalar(max)
                .clamp_max(1.0)
                .div_scalar(loss_scale),
        ),
        None if loss_scale != 1.0 => Some(Tensor::ones([1], &norm.device()).div_scalar(loss_scale)),
        None => None,
    };
    if let Some(factor) = factor {
        let factor = factor.reshape([1, 1]);
        // Gradients of one shape scaled one after the other: fusion then runs their multiplications as one
        // kernel, where in the module's order (each adapter's `A`, then its `B`) every one was a launch of its own.
        for id in groups.iter().flatten() {
            if let Some(g) = grads.remove::<2>(*id) {
                let f = factor.clone().cast(g.dtype());
                grads.register(*id, g * f);
            }
        }
    }
    Some(norm)
}

/// Loss, accuracy and confusion of a split.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitMetrics {
    pub rows: usize,
    pub loss: f64,
    pub log_loss: f64,
    pub accuracy: f64,
    /// The length baseline's accuracy on the same rows ([`crate::predict::longer_answer`]).
    pub longer_answer_accuracy: f64,
    pub confusion: [[usize; 2]; 2],
    /// `[P(model_a), P(model_b)]` per row.
    pub probs: Vec<[f32; 2]>,
}

/// Scores every binary-labelled row of `split` (ties are skipped) in length-sorted batches.
pub fn evaluate_split(
    model: &Gemma2ForSequenceClassification,
    split: &PreparedSplit,
    config: &TrainConfig,
    device: &Device,
) -> Result<SplitMetrics, TrainError> {
    let rows: Vec<usize> = (0..split.len())
        .filter(|&i| split.rows[i].label.index() < 2)
        .collect();
    let mut order = rows.clone();
    order.sort_by_key(|&i| std::cmp::Reverse(split.input_ids(i).len()));
    // The probabilities stay on the device until every batch is queued, then come back in one read: a read per
    // batch would make a GPU wait for the host to collate and upload the next batch, every batch.
    let mut batches = Vec::with_capacity(order.len().div_ceil(config.eval_batch_size));
    for chunk in order.chunks(config.eval_batch_size) {
        let ids: Vec<&[u32]> = chunk.iter().map(|&i| split.input_ids(i)).collect();
        let logits = model.forward_batch(&collate(&ids, 0), device);
        batches.push(burn::tensor::activation::softmax(
            logits.cast(FloatDType::F32),
            1,
        ));
    }
    let p = if batches.is_empty() {
        Vec::new()
    } else {
        Tensor::cat(batches, 0)
            .try_to_vec_as::<f32>()
            .map_err(|e| TrainError::Read(format!("{e:?}")))?
    };
    let mut probs = vec![[0f32; 2]; split.len()];
    for (k, &i) in order.iter().enumerate() {
        probs[i] = [p[2 * k], p[2 * k + 1]];
    }
    // A NaN would pass the loss's clamp as 1e-15 and count as a prediction of model_a: an overflowed model
    // would score like a constant one instead of failing.
    if let Some(&i) = rows
        .iter()
        .find(|&&i| probs[i].iter().any(|v| !v.is_finite()))
    {
        return Err(TrainError::NonFinite {
            row: i + 1,
            id: split.rows[i].id.clone(),
            probs: probs[i],
        });
    }
    let (mut loss, mut log_loss, mut correct) = (0.0, 0.0, 0usize);
    let mut confusion = [[0usize; 2]; 2];
    let eps = config.label_smoothing;
    for &i in &rows {
        let y = split.rows[i].label.index();
        let p = probs[i];
        let lp = [
            f64::from(p[0]).max(1e-15).ln(),
            f64::from(p[1]).max(1e-15).ln(),
        ];
        log_loss -= lp[y];
        loss -= (1.0 - eps) * lp[y] + eps * (lp[0] + lp[1]) / 2.0;
        let pred = usize::from(p[1] > p[0]);
        correct += usize::from(pred == y);
        confusion[y][pred] += 1;
    }
    if rows.is_empty() {
        return Err(TrainError::Invalid(
            "no rows labelled model_a or model_b to evaluate".into(),
        ));
    }
    let n = rows.len() as f64;
    let lengths = rows
        .iter()
        .map(|&i| (split.rows[i].field_tokens, Some(split.rows[i].label)));
    Ok(SplitMetrics {
        rows: rows.len(),
        loss: loss / n,
        log_loss: log_loss / n,
        accuracy: correct as f64 / n,
        longer_answer_accuracy: crate::predict::longer_answer_accuracy(lengths).unwrap_or(f64::NAN),
        confusion,
        probs: rows.iter().map(|&i| probs[i]).collect(),
    })
}

fn append_log<T: Serialize>(dir: &Path, entry: &T) -> Result<(), TrainError> {
    let path = dir.join(LOG_FILE);
    let mut line = serde_json::to_string(entry).map_err(|e| TrainError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io_err(&path))?;
    f.write_all(line.as_bytes()).map_err(io_err(&path))
}

/// Log lines of a run: the training and evaluation entries.
pub fn read_log(path: &Path) -> Result<(Vec<StepLog>, Vec<EvalLog>), TrainError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let (mut logs, mut evals) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |e: serde_json::Error| TrainError::Io {
            path: path.display().to_string(),
            message: format!("line {}: {e}", n + 1),
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(bad)?;
        match v.get("kind").and_then(|k| k.as_str()) {
            Some("eval") => evals.push(serde_json::from_value(v).map_err(bad)?),
            _ => logs.push(serde_json::from_value(v).map_err(bad)?),
        }
    }
    Ok((logs, evals))
}

/// Keeps the log entries up to `step` (a resumed run rewrites what came after its checkpoint).
fn truncate_log(path: &Path, step: usize) -> Result<(Vec<StepLog>, Vec<EvalLog>), TrainError> {
    let (logs, evals) = if path.is_file() {
        read_log(path)?
    } else {
        (Vec::new(), Vec::new())
    };
    let logs: Vec<StepLog> = logs.into_iter().filter(|l| l.step <= step).collect();
    let evals: Vec<EvalLog> = evals.into_iter().filter(|l| l.step <= step).collect();
    let mut lines: Vec<(usize, u8, String)> = Vec::new();
    for l in &logs {
        lines.push((l.step, 0, serde_json::to_string(l).unwrap_or_default()));
    }
    for e in &evals {
        lines.push((e.step, 1, serde_json::to_string(e).unwrap_or_default()));
    }
    lines.sort_by_key(|(s, k, _)| (*s, *k));
    let mut text = String::new();
    for (_, _, l) in lines {
        text.push_str(&l);
        text.push('\n');
    }
    write_atomic(path, text.as_bytes()).map_err(|e| TrainError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    Ok((logs, evals))
}

/// Writes the adapters and head as `dir/adapter.safetensors` (f32, PEFT names and layouts), atomically.
pub fn save_adapter(dir: &Path, model: &Gemma2ForSequenceClassification) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join(ADAPTER_FILE);
    let mut tensors = Vec::new();
    for (name, t) in model.trainable_tensors() {
        let shape = t.dims().to_vec();
        let values = t
            .cast(FloatDType::F32)
            .try_to_vec_as::<f32>()
            .map_err(|e| TrainError::Read(format!("{e:?}")))?;
        tensors.push((name, shape, values));
    }
    let bytes = crate::export::safetensors_f32(&tensors).map_err(|message| TrainError::Io {
        path: path.display().to_string(),
        message,
    })?;
    write_atomic(&path, &bytes).map_err(|e| TrainError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Loads adapters and head saved by [`save_adapter`] into a model with the same LoRA layout.
pub fn load_adapter(
    path: &Path,
    model: Gemma2ForSequenceClassification,
    device: &Device,
) -> Result<Gemma2ForSequenceClassification, TrainError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let err = |message: String| TrainError::Checkpoint {
        path: path.display().to_string(),
        message,
    };
    let ckpt =
        crate::model::weights::Checkpoint::from_files(vec![(path.display().to_string(), bytes)])
            .map_err(|e| err(e.to_string()))?;
    let mut failure = None;
    let model = model
        .load_trainable(|name, shape| match ckpt.f32(name, &shape) {
            Ok(v) => Some(Tensor::from_data(TensorData::new(v, shape), device)),
            Err(e) => {
                failure.get_or_insert(e.to_string());
                None
            }
        })
        .map_err(|missing| err(failure.clone().unwrap_or(format!("missing {missing}"))))?;
    Ok(model)
}

/// `dir/checkpoint-N` with the highest N that holds a complete checkpoint.
pub fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n: usize = name.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()?;
            let p = e.path();
            p.join(STATE_FILE).is_file().then_some((n, p))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

/// Writes `checkpoint-N` whole or not at all: everything goes to a temporary directory that is renamed into
/// place, then checkpoints beyond `keep` are deleted, oldest first.
fn save_checkpoint(
    dir: &Path,
    model: &Gemma2ForSequenceClassification,
    optim: &ModuleOptimizer,
    state: &TrainerState,
    keep: usize,
) -> Result<(), TrainError> {
    let name = format!("{CHECKPOINT_PREFIX}{}", state.step);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    save_adapter(&tmp, model)?;
    let opt_path = tmp.join(OPTIMIZER_FILE);
    let bytes = optim.into_bytes().map_err(|e| TrainError::Checkpoint {
        path: opt_path.display().to_string(),
        message: format!("{e:?}"),
    })?;
    write_atomic(&opt_path, &bytes).map_err(|e| TrainError::Io {
        path: opt_path.display().to_string(),
        message: e.to_string(),
    })?;
    let state_path = tmp.join(STATE_FILE);
    let json = serde_json::to_vec_pretty(state).map_err(|e| TrainError::Io {
        path: state_path.display().to_string(),
        message: e.to_string(),
    })?;
    write_atomic(&state_path, &json).map_err(|e| TrainError::Io {
        path: state_path.display().to_string(),
        message: e.to_string(),
    })?;
    let target = dir.join(&name);
    let _ = std::fs::remove_dir_all(&target);
    std::fs::rename(&tmp, &target).map_err(io_err(&target))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    let mut all: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n: usize = name.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    all.sort();
    let excess = all.len().saturating_sub(keep);
    for (_, p) in all.into_iter().take(excess) {
        let _ = std::fs::remove_dir_all(p);
    }
    Ok(())
}

fn load_checkpoint(
    ckpt: &Path,
    model: Gemma2ForSequenceClassification,
    optim: ModuleOptimizer,
    device: &Device,
) -> Result<
    (
        Gemma2ForSequenceClassification,
        ModuleOptimizer,
        TrainerState,
    ),
    TrainError,
> {
    let err = |message: String| TrainError::Checkpoint {
        path: ckpt.display().to_string(),
        message,
    };
    let state_path = ckpt.join(STATE_FILE);
    let state: TrainerState =
        serde_json::from_slice(&std::fs::read(&state_path).map_err(io_err(&state_path))?)
            .map_err(|e| err(format!("{STATE_FILE}: {e}")))?;
    let model = load_adapter(&ckpt.join(ADAPTER_FILE), model, device)?;
    let opt_path = ckpt.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&opt_path).map_err(io_err(&opt_path))?;
    let optim = optim
        .from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
        .map_err(|e| err(format!("{OPTIMIZER_FILE}: {e:?}")))?;
    Ok((model, optim, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loss_scale_halves_on_overflow_and_doubles_after_a_clean_stretch() {
        let mut s = LossScaler::new(65536.0);
        s.update(false);
        assert_eq!((s.scale, s.overflows), (32768.0, 1));
        for _ in 0..LossScaler::GROWTH_INTERVAL - 1 {
            s.update(true);
        }
        assert_eq!(s.scale, 32768.0, "grew before the interval");
        s.update(true);
        assert_eq!((s.scale, s.good_steps), (65536.0, 0));
        // An overflow restarts the count.
        s.update(true);
        s.update(false);
        assert_eq!((s.scale, s.good_steps, s.overflows), (32768.0, 0, 2));
    }

    #[test]
    fn warmup_then_cosine_matches_transformers() {
        let c = TrainConfig::default();
        // 100 steps, 10 of warmup: 0 at step 0, linear to the peak, half the peak halfway through the decay.
        assert_eq!(c.lr_at(0, 100), 0.0);
        assert!((c.lr_at(5, 100) - 1e-5).abs() < 1e-12);
        assert!((c.lr_at(10, 100) - 2e-5).abs() < 1e-12);
        assert!((c.lr_at(55, 100) - 1e-5).abs() < 1e-12);
        assert!(c.lr_at(99, 100) < 1e-7);
        let linear = TrainConfig {
            schedule: Schedule::Linear,
            ..c
        };
        assert!((linear.lr_at(55, 100) - 1e-5).abs() < 1e-12);
    }

    #[test]
    fn steps_count_optimizer_updates_over_the_epochs() {
        let c = TrainConfig::default();
        // The recipe: 33,907 training rows, batch 1, accumulation 8.
        assert_eq!(c.total_steps(33_907), 4_239);
        assert_eq!(c.warmup_steps(4_239), 424);
        let two = TrainConfig {
            epochs: 2.0,
            ..TrainConfig::default()
        };
        assert_eq!(two.total_steps(16), 4);
    }

    #[test]
    fn clipping_scales_every_gradient_by_the_global_norm_of_the_unscaled_gradients() {
        let device = Device::flex();
        let t = |v: Vec<f32>, shape: [usize; 2]| {
            Tensor::<2>::from_data(TensorData::new(v, shape), &device)
        };
        let (a, b, absent) = (ParamId::new(), ParamId::new(), ParamId::new());
        let mut grads = GradientsParams::new();
        // Gradients of the loss times 2 (the loss scale): unscaled, [3, 0] and [0, 4]ᵀ, a global norm of 5.
        grads.register(a, t(vec![6.0, 0.0], [1, 2]));
        grads.register(b, t(vec![0.0, 8.0], [2, 1]));
        let norm = clip_global_norm(&mut grads, &[a, b, absent], Some(1.0), 2.0).unwrap();
        assert!((norm.try_to_vec_as::<f32>().unwrap()[0] - 5.0).abs() < 1e-5);
        // Unscaled and clipped to norm 1: each divided by 2 and by 5.
        let got = |grads: &GradientsParams, id| {
            grads.get::<2>(id).unwrap().try_to_vec_as::<f32>().unwrap()
        };
        let (ga, gb) = (got(&grads, a), got(&grads, b));
        assert!((ga[0] - 0.6).abs() < 1e-5 && ga[1] == 0.0, "{ga:?}");
        assert!(gb[0] == 0.0 && (gb[1] - 0.8).abs() < 1e-5, "{gb:?}");
        // Below the limit only the loss scale comes off.
        let norm = clip_global_norm(&mut grads, &[a, b], Some(10.0), 1.0).unwrap();
        assert!((norm.try_to_vec_as::<f32>().unwrap()[0] - 1.0).abs() < 1e-5);
        assert!((got(&grads, b)[1] - 0.8).abs() < 1e-5);
        // Two gradients of one shape (their squares are added before they are reduced) and a transposed view,
        // which is summed where it lies: 1 + 4 + (4 + 16) + (9 + 16 + 25 + 36) = 111.
        let (c, d, e) = (ParamId::new(), ParamId::new(), ParamId::new());
        let mut grads = GradientsParams::new();
        grads.register(c, t(vec![1.0, 2.0], [1, 2]));
        grads.register(d, t(vec![2.0, 4.0], [1, 2]));
        grads.register(e, t(vec![3.0, 4.0, 5.0, 6.0], [2, 2]).transpose());
        let norm = clip_global_norm(&mut grads, &[c, d, e], None, 1.0).unwrap();
        assert!((norm.try_to_vec_as::<f32>().unwrap()[0] - 111f32.sqrt()).abs() < 1e-5);
        assert_eq!(got(&grads, e), [3.0, 5.0, 4.0, 6.0], "unchanged without a limit or a loss scale");
    }

    #[test]
    fn adamw_one_shape_at_a_time_equals_adamw_in_the_modules_order() {
        use crate::batch::collate;
        use crate::model::Gemma2Config;
        let device = Device::flex().autodiff();
        let lora = LoraConfig {
            r: 4,
            dropout: 0.0,
            first_layer: 0,
            ..LoraConfig::default()
        };
        let model = Gemma2Config::tiny().init(&device).with_lora(&lora, &device).unwrap();
        let ids = trainable_ids(&model);
        let grads = |model: &Gemma2ForSequenceClassification| {
            let batch = collate(&[&[2u32, 5, 7, 9][..], &[2, 4]], 0);
            let loss = model.forward_batch(&batch, &device).square().sum();
            GradientsParams::from_grads(loss.backward(), model)
        };
        let first = grads(&model);
        let shapes: std::collections::BTreeSet<[usize; 2]> =
            ids.iter().filter_map(|id| first.get::<2>(*id)).map(|g| g.dims()).collect();
        assert!(shapes.len() >= 3, "one group would test no regrouping: {shapes:?}");
        let values = |model: &Gemma2ForSequenceClassification| -> Vec<Vec<f32>> {
            struct Values(Vec<Vec<f32>>);
            impl burn::module::ModuleVisitor for Values {
                fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
                    self.0.push(param.val().try_to_vec_as::<f32>().unwrap());
                }
            }
            let mut v = Values(Vec::new());
            model.visit(&mut v);
            v.0
        };
        // Two steps each way (the second moves `B` off zero and continues the optimizer's state).
        let config = AdamWConfig::new().with_weight_decay(0.01);
        let (mut optim, mut ours) = (config.init(), config.init());
        let (mut reference, mut grouped) = (model.clone(), model);
        for _ in 0..2 {
            let (g_ref, g_ours) = (grads(&reference), grads(&grouped));
            reference = optim.step(1e-2, reference, g_ref);
            grouped = step_by_shape(&mut ours, 1e-2, grouped, g_ours, &ids);
        }
        assert_eq!(values(&grouped), values(&reference));
    }

    #[test]
    fn label_smoothing_mixes_the_nll_with_the_uniform_cross_entropy() {
        let device = Device::flex();
        let logits = Tensor::<2>::from_data(TensorData::new(vec![2.0f32, 0.0], [1, 2]), &device);
        let labels = Tensor::<1, Int>::from_data(TensorData::new(vec![0i32], [1]), &device);
        let got = smoothed_cross_entropy(logits, labels, 0.1)
            .try_to_vec_as::<f32>()
            .unwrap()[0] as f64;
        let lp0 = -(1.0f64 + (-2.0f64).exp()).ln();
        let lp1 = lp0 - 2.0;
        let want = -(0.9 * lp0 + 0.1 * (lp0 + lp1) / 2.0);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn config_files_fill_defaults_and_reject_unknown_fields() {
        let dir = std::env::temp_dir().join(format!("aj-train-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let toml_path = dir.join("c.toml");
        std::fs::write(&toml_path, "learning_rate = 1e-4\n[lora]\nr = 8\n").unwrap();
        let c = TrainConfig::from_file(&toml_path).unwrap();
        assert_eq!(c.learning_rate, 1e-4);
        assert_eq!(c.lora.r, 8);
        assert_eq!(c.grad_accum, 8);
        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"{"learning_rat": 1e-4}"#).unwrap();
        let e = TrainConfig::from_file(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.json") && e.contains("learning_rat"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
        for scale in [0.5, f64::NAN, f64::INFINITY] {
            let c = TrainConfig {
                initial_loss_scale: scale,
                ..TrainConfig::default()
            };
            assert!(c.validate().unwrap_err().contains("initial_loss_scale"));
        }
    }
}
