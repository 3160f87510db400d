//! Building the classifier from a Hugging Face checkpoint: every tensor the model needs must be there with its
//! shape, and every tensor there must be used.

use std::collections::BTreeSet;

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor, TensorData};

use super::config::{ConfigError, Gemma2Config};
use super::gemma2::{Gemma2ForSequenceClassification, ParamSource, RandomInit};
use super::placement::Placement;
use super::weights::{Checkpoint, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{file}: cannot read: {message}")]
    Io { file: String, message: String },
}

/// A loaded classifier and what loading found.
pub struct Loaded {
    pub model: Gemma2ForSequenceClassification,
    pub config: Gemma2Config,
    /// The checkpoint had no `score.weight` (a base LM): the head is freshly initialised.
    pub fresh_head: bool,
}

/// Loads `dir/config.json` and its safetensors weights.
#[cfg(feature = "native")]
///
/// `placement`: a device (`&device`), or a device with its binding limit ([`Placement`]), which decides where
/// the token embedding goes.
pub fn load_hf_dir(
    dir: &std::path::Path,
    placement: impl Into<Placement>,
) -> Result<Loaded, LoadError> {
    let path = dir.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| LoadError::Io {
        file: path.display().to_string(),
        message: e.to_string(),
    })?;
    let config = Gemma2Config::from_hf_json(&path.display().to_string(), &bytes)?;
    let checkpoint = Checkpoint::open_dir(dir)?;
    from_checkpoint(config, &checkpoint, placement)
}

/// Tensors a checkpoint may hold that the classifier does not use: a causal LM's head (tied to the embedding).
const IGNORED: &[&str] = &["lm_head.weight"];

/// Builds the classifier from `checkpoint`. Keys may carry the `model.` prefix (causal LM and classifier
/// checkpoints) or not (a bare `Gemma2Model`).
pub fn from_checkpoint(
    config: Gemma2Config,
    checkpoint: &Checkpoint,
    placement: impl Into<Placement>,
) -> Result<Loaded, LoadError> {
    let placement = placement.into();
    let bare = !checkpoint.contains("model.embed_tokens.weight")
        && checkpoint.contains("embed_tokens.weight");
    let embedding_device = placement.embedding_device(config.vocab_size, config.hidden_size, 4);
    let mut source = CheckpointSource {
        checkpoint,
        device: &placement.compute,
        embedding_device: &embedding_device,
        bare,
        used: BTreeSet::new(),
        fresh_head: false,
    };
    let model = config.build(&mut source)?;
    let unexpected: Vec<&str> = checkpoint
        .keys()
        .filter(|k| !source.used.contains(*k) && !IGNORED.contains(k))
        .collect();
    if !unexpected.is_empty() {
        let shown: Vec<&str> = unexpected.iter().take(10).copied().collect();
        let more = if unexpected.len() > 10 {
            format!(" and {} more", unexpected.len() - 10)
        } else {
            String::new()
        };
        return Err(WeightsError::Unexpected {
            keys: format!("{}{more}", shown.join(", ")),
        }
        .into());
    }
    if source.fresh_head {
        tracing::warn!(
            "checkpoint has no score.weight (a base language model): the classification head starts fresh"
        );
    }
    let fresh_head = source.fresh_head;
    Ok(Loaded {
        model,
        config,
        fresh_head,
    })
}

struct CheckpointSource<'a> {
    checkpoint: &'a Checkpoint,
    device: &'a Device,
    embedding_device: &'a Device,
    /// Keys without the `model.` prefix.
    bare: bool,
    used: BTreeSet<String>,
    fresh_head: bool,
}

impl CheckpointSource<'_> {
    fn key(&self, key: &str) -> String {
        match key.strip_prefix("model.") {
            Some(rest) if self.bare => rest.to_string(),
            _ => key.to_string(),
        }
    }

    fn read<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
    ) -> Result<Tensor<D>, WeightsError> {
        let device = self.device;
        self.read_on(key, shape, device)
    }

    fn read_on<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, WeightsError> {
        let key = self.key(key);
        let values = self.checkpoint.f32(&key, &shape)?;
        super::weights::check_finite(&key, values.iter().copied())?;
        self.used.insert(key);
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }
}

impl ParamSource for CheckpointSource<'_> {
    type Error = WeightsError;

    fn norm(&mut self, key: &str, n: usize) -> Result<Tensor<1>, WeightsError> {
        self.read(key, [n])
    }

    fn linear(&mut self, key: &str, d_in: usize, d_out: usize) -> Result<Linear, WeightsError> {
        // **[out, in] Linear**: PyTorch stores `[d_out, d_in]`; burn's Linear computes `x @ W` with `[d_in, d_out]`.
        let weight = self
            .read(&format!("{key}.weight"), [d_out, d_in])?
            .transpose();
        Ok(Linear {
            weight: Param::from_tensor(weight),
            bias: None,
        })
    }

    fn embedding(
        &mut self,
        key: &str,
        vocab: usize,
        hidden: usize,
    ) -> Result<Tensor<2>, WeightsError> {
        let device = self.embedding_device;
        if device != self.device {
            // A host-side table (too large for one GPU binding) stored in f16 or int8 is kept in f16: half the
            // memory of f32, which matters most in the browser's 4 GiB address space.
            let k = self.key(key);
            if let Some(values) = self.checkpoint.compact_f16(&k, &[vocab, hidden])? {
                super::weights::check_finite(&k, values.iter().map(|v| v.to_f32()))?;
                self.used.insert(k);
                // The dtype must be named: from_data alone converts to the device's default (f32).
                return Ok(Tensor::from_data(
                    TensorData::new(values, [vocab, hidden]),
                    (device, burn::tensor::DType::F16),
                ));
            }
        }
        self.read_on(key, [vocab, hidden], device)
    }

    fn head(&mut self, key: &str, d_in: usize, d_out: usize) -> Result<Linear, WeightsError> {
        if self.checkpoint.contains(&format!("{key}.weight")) {
            return self.linear(key, d_in, d_out);
        }
        self.fresh_head = true;
        let Ok(head) = RandomInit {
            device: self.device,
            embedding_device: self.embedding_device,
        }
        .linear(key, d_in, d_out);
        Ok(head)
    }
}
