//! LoRA training throughput: tokens per second of `shared::train::train_step` (forward, backward, clipping,
//! AdamW: the code `trainer train` runs) with the recipe's adapters (r 32, alpha 64, q/k/v from layer 6), one
//! micro-batch of BATCH rows at a fixed length per step, and peak resident memory. Run by bench/train_vs_peft.sh
//! and bench/gpu.sh beside the same loop in PyTorch + PEFT.
//!
//!     cargo run --release -p trainer --example bench_train -- MODEL_DIR [cpu|wgpu] [SEQ] [STEPS] [f32|f16|bf16] [BATCH]
//!
//! With `f16` (or `bf16`) the frozen base is in half precision and adapters, head and optimizer state in f32, as
//! `trainer train` does on a GPU; f16 scales the loss as `trainer train` does (one read-back per step), and the
//! warm-up lasts until a step no longer overflows (`warmup_steps`, `warmup_overflows` and `timed_overflows` in the
//! JSON). The JSON line also gives the model FLOPs per token (`shared::model::flops::training_flops_per_token`),
//! from which the scripts compute MFU for both sides.

use std::time::Instant;

mod common;

use anyhow::{Context, Result};
use burn::optim::AdamWConfig;
use burn::tensor::Device;
use shared::cache::{PreparedSplit, RowMeta};
use shared::data::Label;
use shared::model::lora::LoraConfig;
use shared::split::SplitMix64;
use shared::train::{Precision, TrainConfig, for_training, train_step, trainable_ids};

/// Warm-up steps at most: 16 halvings take the loss scale from 65,536 to 1.
const MAX_WARMUP_STEPS: usize = 17;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .context("usage: bench_train MODEL_DIR [cpu|wgpu] [SEQ] [STEPS] [f32|f16|bf16] [BATCH]")?;
    let device = match args.get(2).map(String::as_str) {
        Some("cpu") => Device::flex(),
        // The adapter's own limits decide where the token embedding goes.
        _ => {
            shared::model::placement::wgpu()
                .map_err(|e| anyhow::anyhow!(e))?
                .compute
        }
    }
    .autodiff();
    let num =
        |i: usize, default: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let (seq, steps, batch) = (num(3, 512), num(4, 5), num(6, 1));
    let precision = match args.get(5).map(String::as_str) {
        Some("f16") => Precision::F16,
        Some("bf16") => Precision::Bf16,
        _ => Precision::F32,
    };
    let loaded = shared::model::load::load_hf_dir(std::path::Path::new(dir), &device)?;
    let layers = loaded.config.num_hidden_layers;
    let config = TrainConfig {
        lora: LoraConfig {
            first_layer: 6.min(layers - 1),
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

    // Random rows of SEQ tokens with random labels, a fresh micro-batch each step.
    let vocab = loaded.config.vocab_size as u64;
    let mut rng = SplitMix64::new(0);
    let mut split = PreparedSplit::with_capacity(batch * (MAX_WARMUP_STEPS + steps));
    for i in 0..batch * (MAX_WARMUP_STEPS + steps) {
        let ids: Vec<u32> = (0..seq).map(|_| 3 + rng.below(vocab - 3) as u32).collect();
        let meta = RowMeta {
            id: i.to_string(),
            label: if rng.below(2) == 0 {
                Label::ModelA
            } else {
                Label::ModelB
            },
            language: None,
            model_a: None,
            model_b: None,
            field_tokens: [0; 3],
            snipped: [false; 3],
            cut: false,
        };
        split.push(meta, &ids);
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
    // Warm-up: shader compilation, autotune, allocations. In f16 also until a step no longer overflows: the loss
    // scale starts at 65,536 and halves at each overflow, computing that step again, which happens in a run's
    // first steps only (a long run settles); timing those would charge a run's every step for them. Every step
    // takes rows of its own, the warm-up's too, so that a clean warm-up step is not just rows seen before.
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
    let start = Instant::now();
    for s in warmup_steps..warmup_steps + steps {
        (model, overflows) = step(model, s)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let flops =
        shared::model::flops::training_flops_per_token(&model, seq, model.first_adapted_layer());
    println!(
        "{}",
        serde_json::json!({
            "tokens_per_s": (batch * seq * steps) as f64 / seconds,
            "seconds_per_step": seconds / steps as f64,
            "batch": batch, "seq": seq, "steps": steps, "precision": format!("{:?}", config.precision).to_lowercase(),
            "flops_per_token": flops,
            "peak_rss_mib": common::peak_rss_mib(),
            "autotune": shared::model::placement::AUTOTUNE,
            "warmup_steps": warmup_steps,
            "warmup_overflows": warmup_overflows,
            "timed_overflows": overflows - warmup_overflows,
        })
    );
    Ok(())
}
