//! `trainer bench`: throughput on random rows at a fixed length, printed as one JSON line, for the benchmark
//! scripts that run the same measurement in PyTorch beside it (bench/forward_vs_pytorch.sh, bench/train_vs_peft.sh,
//! bench/gpu.sh).
//!
//! Part of the `trainer` binary rather than examples of their own: a GPU machine without a Rust toolchain gets
//! prebuilt binaries, and one binary compresses to about half of what three did (bench/gpu_pack.sh), which is
//! what keeps what travels there under its size limit.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use burn::optim::AdamWConfig;
use burn::tensor::Device;
use shared::batch::collate;
use shared::cache::{PreparedSplit, RowMeta};
use shared::data::Label;
use shared::model::lora::LoraConfig;
use shared::split::SplitMix64;
use shared::train::{Precision, TrainConfig, for_training, train_step, trainable_ids};

/// Warm-up steps of a training benchmark at most: 16 halvings take the f16 loss scale from 65,536 to 1.
const MAX_WARMUP_STEPS: usize = 17;

/// High-water mark of resident memory (Linux), MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// CPU time each of this process's threads has run (Linux: `/proc/self/task/*/schedstat`, nanoseconds), summed by
/// thread name with trailing digits dropped ("llvmpipe-3" counts as "llvmpipe-"), so that thread pools add up; the
/// main thread as "main".
/// An empty map where the kernel does not report it.
fn thread_cpu_seconds() -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("schedstat")),
        ) else {
            continue;
        };
        let Some(ns) = stat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()) else {
            continue;
        };
        // Threads that never named themselves carry the process's name, as the main thread does.
        let name = if task.file_name().to_str() == Some(std::process::id().to_string().as_str()) {
            "main".to_string()
        } else {
            name.trim().trim_end_matches(|c: char| c.is_ascii_digit()).to_string()
        };
        *out.entry(name).or_insert(0.0) += ns as f64 * 1e-9;
    }
    out
}

/// What each group of threads ran on the CPU between two `thread_cpu_seconds` readings, per timed iteration, as
/// JSON, largest first. Set against the wall time of an iteration, the threads that queue the work (`main`, and
/// cubecl's device threads `DSU-`/`DSD-`) says how much of a step is host work: where it
/// nears the step's time, the GPU waits for the host. A thread that ended in between is not counted.
fn cpu_per_iteration(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    iters: usize,
) -> serde_json::Value {
    let mut spent: Vec<(String, f64)> = after
        .iter()
        .map(|(name, &t)| (name.clone(), t - before.get(name).copied().unwrap_or(0.0)))
        .filter(|(_, t)| *t > 0.0)
        .collect();
    spent.sort_by(|a, b| b.1.total_cmp(&a.1));
    serde_json::Value::Object(
        spent
            .into_iter()
            .map(|(name, t)| (name, serde_json::json!(t / iters as f64)))
            .collect(),
    )
}

/// Tells a `perf record --control fifo:CTL,ACK -D -1` that wraps this benchmark to sample only the timed
/// iterations: `BENCH_PERF_CONTROL` names the control fifo, and `BENCH_PERF_ACK` its acknowledgement fifo, read
/// before going on so that no timed work escapes the samples (bench/host_work.sh). Nothing without the variable.
fn perf_control(command: &str) -> Result<()> {
    use std::io::{Read, Write};
    let Some(ctl) = std::env::var_os("BENCH_PERF_CONTROL") else {
        return Ok(());
    };
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ctl)
        .and_then(|mut f| f.write_all(format!("{command}\n").as_bytes()))
        .map_err(|e| anyhow::anyhow!("BENCH_PERF_CONTROL {}: {e}", ctl.to_string_lossy()))?;
    if let Some(ack) = std::env::var_os("BENCH_PERF_ACK") {
        let mut reply = [0u8; 4];
        std::fs::File::open(&ack)
            .and_then(|mut f| f.read_exact(&mut reply))
            .map_err(|e| anyhow::anyhow!("BENCH_PERF_ACK {}: {e}", ack.to_string_lossy()))?;
    }
    Ok(())
}

/// `batch` rows of `seq` random token ids (never the special ids 0-2).
fn random_rows(vocab: usize, batch: usize, seq: usize, rng: &mut SplitMix64) -> Vec<Vec<u32>> {
    let vocab = vocab as u64;
    (0..batch)
        .map(|_| (0..seq).map(|_| 3 + rng.below(vocab - 3) as u32).collect())
        .collect()
}

/// Forward throughput of the classifier: rows per second of `forward_batch` (what `trainer predict` runs) on one
/// batch, timed over `iters` passes after a warm-up pass (shader compilation, autotuning, allocations), with
/// the model FLOPs per token and peak resident memory. `half` casts the model to f16, as `trainer predict --dtype
/// f16` does.
pub fn forward(
    dir: &Path,
    device: &Device,
    batch: usize,
    seq: usize,
    iters: usize,
    half: bool,
) -> Result<serde_json::Value> {
    let mut loaded = shared::model::load::load_hf_dir(dir, device)?;
    if half {
        loaded.model = loaded.model.cast(burn::tensor::FloatDType::F16);
    }
    let rows = random_rows(
        loaded.config.vocab_size,
        batch,
        seq,
        &mut SplitMix64::new(0),
    );
    let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let batch_data = collate(&refs, 0);
    let run = || -> Result<()> {
        let logits = loaded.model.forward_batch(&batch_data, device);
        // Wait for the device: read the logits back.
        logits
            .try_to_vec_as::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(())
    };
    run()?;
    perf_control("enable")?;
    let cpu_before = thread_cpu_seconds();
    let start = Instant::now();
    for _ in 0..iters {
        run()?;
    }
    let seconds = start.elapsed().as_secs_f64();
    perf_control("disable")?;
    let cpu = cpu_per_iteration(&cpu_before, &thread_cpu_seconds(), iters);
    Ok(serde_json::json!({
        "rows_per_s": (batch * iters) as f64 / seconds,
        "seconds_per_batch": seconds / iters as f64,
        "batch": batch, "seq": seq, "iters": iters, "precision": if half { "f16" } else { "f32" },
        "flops_per_token": shared::model::flops::forward_flops_per_token(&loaded.model, seq),
        "peak_rss_mib": peak_rss_mib(),
        "autotune": shared::model::placement::AUTOTUNE,
        "cpu_seconds_per_batch_by_thread": cpu,
    }))
}

/// LoRA training throughput: tokens per second of `shared::train::train_step` (forward, backward, clipping,
/// AdamW: the code `trainer train` runs) with the recipe's adapters (r 32, alpha 64, q/k/v from layer 6), one
/// micro-batch of `batch` random rows of `seq` tokens per step, timed over `steps` steps after the warm-up, with
/// the model FLOPs per token (`shared::model::flops::training_flops_per_token`, for MFU) and peak resident memory.
///
/// In f16 (or bf16) the frozen base is in half precision and adapters, head and optimizer state in f32, as
/// `trainer train` does on a GPU, and f16 scales the loss as it does. The warm-up lasts until a step no longer
/// overflows: the scale starts at 65,536 and halves at each overflow, computing that step again, which happens in
/// a run's first steps (a long run settles); timing those would charge every step for them. The JSON says how
/// many warm-up steps that took and how many timed steps still overflowed.
pub fn train(
    dir: &Path,
    device: &Device,
    seq: usize,
    steps: usize,
    precision: Precision,
    batch: usize,
) -> Result<serde_json::Value> {
    let device = device.clone().autodiff();
    let loaded = shared::model::load::load_hf_dir(dir, &device)?;
    let layers = loaded.config.num_hidden_layers;
    let config = TrainConfig {
        lora: LoraConfig {
            first_layer: 6.min(layers.saturating_sub(1)),
            ..LoraConfig::default()
        },
        precision,
        batch_size: batch,
        grad_accum: 1,
        // The batch as given: the default token budget (4096) would split a 16 x 512 batch into two of 8.
        micro_batch_tokens: 0,
        ..TrainConfig::default()
    };
    let mut model = for_training(loaded.model, &config, &device)?;
    let trainable = trainable_ids(&model);
    let mut scaler = config.loss_scaler(&device);
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.01)
        .with_epsilon(1e-8)
        .init();

    // Random rows with random labels, a fresh micro-batch each step, the warm-up's too, so that a clean warm-up
    // step is not just rows seen before.
    let mut rng = SplitMix64::new(0);
    let total = batch * (MAX_WARMUP_STEPS + steps);
    let mut split = PreparedSplit::with_capacity(total);
    for (i, ids) in random_rows(loaded.config.vocab_size, total, seq, &mut rng)
        .iter()
        .enumerate()
    {
        let label = if rng.below(2) == 0 {
            Label::ModelA
        } else {
            Label::ModelB
        };
        let meta = RowMeta {
            id: i.to_string(),
            label,
            language: None,
            model_a: None,
            model_b: None,
            field_tokens: [0; 3],
            snipped: [false; 3],
            cut: false,
        };
        split.push(meta, ids);
    }
    let mut step = |model, s: usize| -> Result<_> {
        let rows: Vec<usize> = (s * batch..(s + 1) * batch).collect();
        let (model, out) = train_step(
            model,
            &mut optim,
            &[rows],
            &split,
            &config,
            s,
            2e-5,
            &trainable,
            scaler.as_mut(),
            &device,
        )?;
        // Wait for the device: read the step's loss back.
        out.loss
            .try_to_vec_as::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok((model, scaler.as_ref().map_or(0, |s| s.overflows)))
    };
    let mut warmup_steps = 0;
    let mut overflows = 0;
    loop {
        let before = overflows;
        (model, overflows) = step(model, warmup_steps)?;
        warmup_steps += 1;
        if overflows == before || warmup_steps == MAX_WARMUP_STEPS {
            break;
        }
    }
    let warmup_overflows = overflows;
    perf_control("enable")?;
    let cpu_before = thread_cpu_seconds();
    let start = Instant::now();
    for s in warmup_steps..warmup_steps + steps {
        (model, overflows) = step(model, s)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    perf_control("disable")?;
    let cpu = cpu_per_iteration(&cpu_before, &thread_cpu_seconds(), steps);
    let flops =
        shared::model::flops::training_flops_per_token(&model, seq, model.first_adapted_layer());
    Ok(serde_json::json!({
        "tokens_per_s": (batch * seq * steps) as f64 / seconds,
        "seconds_per_step": seconds / steps as f64,
        "batch": batch, "seq": seq, "steps": steps, "precision": format!("{:?}", config.resolve_precision(&device).0).to_lowercase(),
        "flops_per_token": flops,
        "peak_rss_mib": peak_rss_mib(),
        "autotune": shared::model::placement::AUTOTUNE,
        "warmup_steps": warmup_steps,
        "warmup_overflows": warmup_overflows,
        "timed_overflows": overflows - warmup_overflows,
        "cpu_seconds_per_step_by_thread": cpu,
    }))
}
