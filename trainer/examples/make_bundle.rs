//! A web bundle of a randomly initialised Gemma-2 classifier of a chosen size, with the real 256k vocabulary:
//! the input of bench/browser_max_bundle.sh, which finds how large a bundle the browser loads and runs.
//!
//!     cargo run --release -p trainer --example make_bundle -- OUT HIDDEN LAYERS [INTERMEDIATE]
//!
//! Writes OUT/web (f16 and int8 weights, manifest); the f32 Hugging Face copy `export` also writes is removed.

use anyhow::{Context, Result};
use burn::tensor::Device;
use shared::model::{Gemma2Config, LayerType};
use shared::preprocess::PreprocessConfig;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: make_bundle OUT HIDDEN LAYERS [INTERMEDIATE]";
    let out = std::path::PathBuf::from(args.get(1).context(usage)?);
    let num = |i: usize| -> Result<usize> {
        args.get(i)
            .context(usage)?
            .parse()
            .with_context(|| format!("argument {i} must be a number"))
    };
    let (hidden, layers) = (num(2)?, num(3)?);
    let intermediate = num(4).unwrap_or(hidden * 4);
    // gemma-2-2b's proportions: 8 query heads of 256 over 4 KV heads where the width allows, fewer heads below.
    let head_dim = 256.min(hidden / 2);
    let heads = (hidden / head_dim).clamp(2, 8);
    let config = Gemma2Config {
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: heads / 2,
        head_dim,
        query_pre_attn_scalar: head_dim as f64,
        // Even layers slide, as in gemma-2.
        layer_types: (0..layers)
            .map(|i| match i % 2 {
                0 => LayerType::SlidingAttention,
                _ => LayerType::FullAttention,
            })
            .collect(),
        ..Gemma2Config::gemma2_2b()
    };
    let tokenizer = shared::tokenizer::default_tokenizer_path()
        .context("run scripts/setup.sh first: it fetches the Gemma tokenizer")?;
    let device = Device::flex();
    device.seed(0);
    let model = config.init(&device);
    shared::export::export(
        &model,
        &config,
        &tokenizer,
        &PreprocessConfig::default(),
        &out,
        true,
    )?;
    std::fs::remove_dir_all(out.join("hf"))?;
    let (q, kv) = (heads * head_dim, heads / 2 * head_dim);
    let per_layer = 2 * hidden * q + 2 * hidden * kv + 3 * hidden * intermediate + 4 * hidden;
    let params = config.vocab_size * hidden + layers * per_layer + hidden + 2 * hidden;
    println!(
        "{}",
        serde_json::json!({"hidden": hidden, "layers": layers, "intermediate": intermediate, "params": params})
    );
    Ok(())
}
