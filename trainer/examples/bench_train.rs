//! LoRA training throughput: tokens per second of forward + backward + AdamW step with the recipe's adapters
//! (r 32, alpha 64, q/k/v from layer 6), batch 1 at a fixed length, and peak resident memory.
//! Run by bench/train_vs_peft.sh beside the same loop in PyTorch + PEFT.
//!
//!     cargo run --release -p trainer --example bench_train -- MODEL_DIR [cpu|wgpu] [SEQ] [STEPS] [f32|f16]
//!
//! With `f16` the frozen base is cast to half precision (adapters and head stay f32), as `trainer train` does
//! on a GPU.

use std::time::Instant;

mod common;

use anyhow::{Context, Result};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use shared::batch::collate;
use shared::model::Gemma2ForSequenceClassification as Model;
use shared::model::lora::LoraConfig;
use shared::split::SplitMix64;
use shared::train::smoothed_cross_entropy;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .context("usage: bench_train MODEL_DIR [cpu|wgpu] [SEQ] [STEPS]")?;
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
    let (seq, steps) = (num(3, 512), num(4, 5));
    let loaded = shared::model::load::load_hf_dir(std::path::Path::new(dir), &device)?;
    let layers = loaded.config.num_hidden_layers;
    let lora = LoraConfig {
        first_layer: 6.min(layers - 1),
        ..LoraConfig::default()
    };
    let half = args.get(5).is_some_and(|p| p == "f16");
    let base = if half {
        loaded.model.cast(burn::tensor::FloatDType::F16)
    } else {
        loaded.model
    };
    let mut model = base.with_lora(&lora, &device)?;
    if half {
        let w = model.score.weight.val().cast(burn::tensor::FloatDType::F32);
        model.score.weight = shared::model::lora::trainable("score.weight", w);
    }
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.01)
        .with_epsilon(1e-8)
        .init();
    let vocab = loaded.config.vocab_size as u64;
    let mut rng = SplitMix64::new(0);
    let mut step = |model: Model| -> Result<Model> {
        let row: Vec<u32> = (0..seq).map(|_| 3 + rng.below(vocab - 3) as u32).collect();
        let batch = collate(&[row.as_slice()], 0);
        let label =
            Tensor::<1, Int>::from_data(TensorData::new(vec![(rng.below(2)) as i32], [1]), &device);
        let loss = smoothed_cross_entropy(model.forward_batch(&batch, &device), label, 0.1);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let model = optim.step(2e-5, model, grads);
        // Wait for the device: read one trained value back.
        model
            .score
            .weight
            .val()
            .inner()
            .slice([0..1, 0..1])
            .try_to_vec_as::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(model)
    };
    model = step(model)?; // warm-up: shader compilation, autotune, allocations
    let start = Instant::now();
    for _ in 0..steps {
        model = step(model)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "tokens_per_s": (seq * steps) as f64 / seconds,
            "seconds_per_step": seconds / steps as f64,
            "seq": seq, "steps": steps, "precision": if half { "f16" } else { "f32" },
            "peak_rss_mib": common::peak_rss_mib(),
        })
    );
    Ok(())
}
