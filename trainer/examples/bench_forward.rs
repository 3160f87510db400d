//! Forward throughput of the classifier: rows per second at a fixed length, and peak resident memory.
//! Run by bench/forward_vs_pytorch.sh beside the same measurement in PyTorch.
//!
//!     cargo run --release -p trainer --example bench_forward -- MODEL_DIR [cpu|wgpu] [BATCH] [SEQ] [ITERS] [f32|f16]
//!
//! With `f16` the model is cast to half precision, as `trainer predict --dtype f16` does.

use std::time::Instant;

mod common;

use anyhow::{Context, Result};
use burn::tensor::Device;
use shared::batch::collate;
use shared::split::SplitMix64;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .context("usage: bench_forward MODEL_DIR [cpu|wgpu] [BATCH] [SEQ] [ITERS] [f32|f16]")?;
    let device = match args.get(2).map(String::as_str) {
        Some("cpu") => Device::flex(),
        // The adapter's own limits decide where the token embedding goes.
        _ => {
            shared::model::placement::wgpu()
                .map_err(|e| anyhow::anyhow!(e))?
                .compute
        }
    };
    let num =
        |i: usize, default: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let (batch, seq, iters) = (num(3, 8), num(4, 512), num(5, 5));
    let mut loaded = shared::model::load::load_hf_dir(std::path::Path::new(dir), &device)?;
    let half = args.get(6).is_some_and(|p| p == "f16");
    if half {
        loaded.model = loaded.model.cast(burn::tensor::FloatDType::F16);
    }
    let vocab = loaded.config.vocab_size as u64;
    let mut rng = SplitMix64::new(0);
    let rows: Vec<Vec<u32>> = (0..batch)
        .map(|_| (0..seq).map(|_| 3 + rng.below(vocab - 3) as u32).collect())
        .collect();
    let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let batch_data = collate(&refs, 0);
    let run = || -> Result<()> {
        let logits = loaded.model.forward_batch(&batch_data, &device);
        logits
            .try_to_vec_as::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(())
    };
    run()?; // warm-up: shader compilation, autotune, allocations
    let start = Instant::now();
    for _ in 0..iters {
        run()?;
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "rows_per_s": (batch * iters) as f64 / seconds,
            "seconds_per_batch": seconds / iters as f64,
            "batch": batch, "seq": seq, "iters": iters, "precision": if half { "f16" } else { "f32" },
            "flops_per_token": shared::model::flops::forward_flops_per_token(&loaded.model, seq),
            "peak_rss_mib": common::peak_rss_mib(),
            "autotune": shared::model::placement::AUTOTUNE,
        })
    );
    Ok(())
}
