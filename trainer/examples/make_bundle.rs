//! A web bundle of a randomly initialised Gemma-2 classifier of a chosen size, with the real 256k vocabulary:
//! the input of bench/browser_max_bundle.sh, which finds how large a bundle the browser loads and runs.
//!
//!     FORMATS=q4,int8 cargo run --release -p trainer --example make_bundle -- OUT HIDDEN LAYERS [INTERMEDIATE]
//!
//! Writes OUT/web: the weights in each of FORMATS (`f16`, `int8`, `q4`; default `int8`), config, tokenizer and
//! manifest, generated one tensor at a time (no f32 copy of the whole model ever exists).

use anyhow::{Context, Result};
use shared::bundle::{BUNDLE_MANIFEST, BundleAbout, BundleManifest, BundleWeights, WeightFormat};
use shared::export::{StoredTensor, bundle_file, hf_config_json, store, to_safetensors};
use shared::model::{Gemma2Config, LayerType};
use shared::preprocess::PreprocessConfig;
use shared::split::SplitMix64;

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
    let formats: Vec<WeightFormat> = std::env::var("FORMATS")
        .unwrap_or_else(|_| "int8".into())
        .split(',')
        .map(|f| match f {
            "f16" => Ok(WeightFormat::F16),
            "int8" => Ok(WeightFormat::Int8),
            "q4" => Ok(WeightFormat::Q4),
            other => anyhow::bail!("FORMATS: unknown format {other:?} (f16, int8, q4)"),
        })
        .collect::<Result<_>>()?;
    // One tensor at a time: gemma-2-2b in f32 would be 10 GB, its q4 file is 1.4 GB. Normal(0, 0.02) values, as
    // transformers initialises; norms near one so activations keep their scale.
    let mut rng = SplitMix64::new(0);
    let mut stored: Vec<Vec<StoredTensor>> = vec![Vec::new(); formats.len()];
    let mut params = 0usize;
    for (name, shape) in config.hf_shapes() {
        let n: usize = shape.iter().product();
        params += n;
        let values: Vec<f32> = if shape.len() == 1 {
            (0..n).map(|_| 0.1 * normal(&mut rng)).collect()
        } else {
            (0..n).map(|_| 0.02 * normal(&mut rng)).collect()
        };
        for (k, &format) in formats.iter().enumerate() {
            stored[k].extend(store(&name, &shape, &values, format).map_err(anyhow::Error::msg)?);
        }
    }
    let web = out.join("web");
    std::fs::create_dir_all(&web)?;
    let mut files = Vec::new();
    let mut weights = Vec::new();
    for (format, tensors) in formats.iter().zip(stored) {
        let bytes = to_safetensors(&tensors).map_err(anyhow::Error::msg)?;
        drop(tensors);
        std::fs::write(web.join(format.file_name()), &bytes)?;
        files.push(bundle_file(format.file_name(), &bytes));
        weights.push(BundleWeights {
            format: *format,
            file: format.file_name().into(),
        });
    }
    let config_json = serde_json::to_vec_pretty(&hf_config_json(&config, "float16"))?;
    let tokenizer_json = std::fs::read(&tokenizer)?;
    for (name, bytes) in [
        ("config.json", &config_json),
        ("tokenizer.json", &tokenizer_json),
    ] {
        std::fs::write(web.join(name), bytes)?;
        files.push(bundle_file(name, bytes));
    }
    let manifest = BundleManifest {
        format_version: 1,
        config: "config.json".into(),
        tokenizer: "tokenizer.json".into(),
        weights,
        labels: config.labels.clone(),
        preprocess: PreprocessConfig::default(),
        files,
        about: Some(BundleAbout {
            base: "random".into(),
            random_base: true,
            shape: format!(
                "hidden {hidden} × {layers} layers, vocabulary {}",
                config.vocab_size
            ),
            parameters: params as u64,
            test_accuracy: None,
            test_rows: None,
            quality: Vec::new(),
        }),
    };
    std::fs::write(
        web.join(BUNDLE_MANIFEST),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    println!(
        "{}",
        serde_json::json!({"hidden": hidden, "layers": layers, "intermediate": intermediate, "params": params})
    );
    Ok(())
}

/// A standard normal value (Box-Muller).
fn normal(rng: &mut SplitMix64) -> f32 {
    let u = |r: &mut SplitMix64| ((r.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let (a, b) = (u(rng), u(rng));
    ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
}
