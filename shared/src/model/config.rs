//! Gemma-2's configuration, read straight from a Hugging Face `config.json` (transformers 4.x or 5.x).

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: not a valid config.json: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: model_type is {found:?}, expected \"gemma2\"")]
    ModelType { file: String, found: String },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

/// Whether a layer attends to every earlier token or only to the last `sliding_window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    SlidingAttention,
    FullAttention,
}

/// Hyper-parameters of a Gemma-2 sequence classifier. Field names are the Hugging Face keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gemma2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the GeGLU feed-forward block.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Fewer than `num_attention_heads` means grouped-query attention: each KV head serves a group of query heads.
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Attention scores are scaled by `query_pre_attn_scalar^-0.5`, which is not always `head_dim^-0.5`.
    pub query_pre_attn_scalar: f64,
    /// Local layers see this many most recent tokens (themselves included).
    pub sliding_window: usize,
    /// `cap * tanh(score / cap)` on attention scores; `None` turns it off.
    pub attn_logit_softcapping: Option<f64>,
    /// The same on LM-head logits. Not used by the sequence classifier (as in transformers).
    pub final_logit_softcapping: Option<f64>,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// Sliding or full attention, per layer (from `layer_types`, else even layers slide, as transformers 4.x did).
    pub layer_types: Vec<LayerType>,
    pub pad_token_id: u32,
    /// Class names in index order (from `id2label`).
    pub labels: Vec<String>,
    /// The checkpoint's stored dtype (`torch_dtype` in 4.x, `dtype` in 5.x), informational.
    pub dtype: Option<String>,
}

/// `config.json` as transformers writes it; only what we read.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    query_pre_attn_scalar: Option<f64>,
    sliding_window: Option<usize>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    max_position_embeddings: Option<usize>,
    layer_types: Option<Vec<LayerType>>,
    pad_token_id: Option<u32>,
    id2label: Option<std::collections::BTreeMap<String, String>>,
    num_labels: Option<usize>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    hidden_activation: Option<String>,
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

impl Gemma2Config {
    /// Parses a `config.json`. `file` only labels errors.
    pub fn from_hf_json(file: &str, bytes: &[u8]) -> Result<Self, ConfigError> {
        let parse = |message: String| ConfigError::Parse {
            file: file.into(),
            message,
        };
        let invalid = |message: String| ConfigError::Invalid {
            file: file.into(),
            message,
        };
        let hf: HfConfig = serde_json::from_slice(bytes).map_err(|e| parse(e.to_string()))?;
        match hf.model_type.as_deref() {
            Some("gemma2") => {}
            other => {
                return Err(ConfigError::ModelType {
                    file: file.into(),
                    found: other.unwrap_or("(none)").into(),
                });
            }
        }
        if let Some(act) = hf.hidden_activation.as_deref()
            && act != "gelu_pytorch_tanh"
        {
            return Err(invalid(format!(
                "hidden_activation {act:?} is not supported (gelu_pytorch_tanh is)"
            )));
        }
        if let Some(rope_type) = hf
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.as_deref())
            && rope_type != "default"
        {
            return Err(invalid(format!(
                "rope_type {rope_type:?} is not supported (default is)"
            )));
        }
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1));
        let layer_types = hf
            .layer_types
            .unwrap_or_else(|| default_layer_types(hf.num_hidden_layers));
        let labels = match (hf.id2label, hf.num_labels) {
            (Some(map), _) => {
                let mut labels = vec![String::new(); map.len()];
                for (k, v) in map {
                    let i: usize = k
                        .parse()
                        .map_err(|_| invalid(format!("id2label key {k:?} is not an index")))?;
                    *labels
                        .get_mut(i)
                        .ok_or_else(|| invalid(format!("id2label index {i} out of range")))? = v;
                }
                labels
            }
            (None, Some(n)) => (0..n).map(|i| format!("LABEL_{i}")).collect(),
            // A base LM checkpoint: the recipe's two classes.
            (None, None) => vec!["model_a".into(), "model_b".into()],
        };
        let config = Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim,
            query_pre_attn_scalar: hf.query_pre_attn_scalar.unwrap_or(head_dim as f64),
            sliding_window: hf.sliding_window.unwrap_or(4096),
            attn_logit_softcapping: hf.attn_logit_softcapping,
            final_logit_softcapping: hf.final_logit_softcapping,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: hf
                .rope_parameters
                .and_then(|r| r.rope_theta)
                .or(hf.rope_theta)
                .unwrap_or(10_000.0),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(8192),
            layer_types,
            pad_token_id: hf.pad_token_id.unwrap_or(0),
            labels,
            dtype: hf.dtype.or(hf.torch_dtype),
        };
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return Err("attention needs at least one head".into());
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            ));
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return Err(format!(
                "{} layer_types for {} layers",
                self.layer_types.len(),
                self.num_hidden_layers
            ));
        }
        if self.labels.is_empty() {
            return Err("no labels".into());
        }
        Ok(())
    }

    pub fn num_labels(&self) -> usize {
        self.labels.len()
    }

    fn base(
        hidden: usize,
        inter: usize,
        layers: usize,
        heads: usize,
        kv: usize,
        head_dim: usize,
        scalar: f64,
    ) -> Self {
        Self {
            vocab_size: 256_000,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            query_pre_attn_scalar: scalar,
            sliding_window: 4096,
            attn_logit_softcapping: Some(50.0),
            final_logit_softcapping: Some(30.0),
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            max_position_embeddings: 8192,
            layer_types: default_layer_types(layers),
            pad_token_id: 0,
            labels: vec!["model_a".into(), "model_b".into()],
            dtype: None,
        }
    }

    /// Every tensor of a `Gemma2ForSequenceClassification` by Hugging Face key, with its shape in PyTorch's
    /// `[out, in]` layout, in build order.
    pub fn hf_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let (q, kv) = (
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        );
        let mut out = Vec::new();
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            for (name, shape) in [
                ("input_layernorm", vec![h]),
                ("post_attention_layernorm", vec![h]),
                ("pre_feedforward_layernorm", vec![h]),
                ("post_feedforward_layernorm", vec![h]),
                ("self_attn.q_proj", vec![q, h]),
                ("self_attn.k_proj", vec![kv, h]),
                ("self_attn.v_proj", vec![kv, h]),
                ("self_attn.o_proj", vec![h, q]),
                ("mlp.gate_proj", vec![self.intermediate_size, h]),
                ("mlp.up_proj", vec![self.intermediate_size, h]),
                ("mlp.down_proj", vec![h, self.intermediate_size]),
            ] {
                out.push((format!("{p}.{name}.weight"), shape));
            }
        }
        out.push(("model.embed_tokens.weight".into(), vec![self.vocab_size, h]));
        out.push(("model.norm.weight".into(), vec![h]));
        out.push(("score.weight".into(), vec![self.num_labels(), h]));
        out
    }

    /// `google/gemma-2-2b`.
    pub fn gemma2_2b() -> Self {
        Self::base(2304, 9216, 26, 8, 4, 256, 256.0)
    }

    /// `google/gemma-2-9b`.
    pub fn gemma2_9b() -> Self {
        Self::base(3584, 14336, 42, 16, 8, 256, 256.0)
    }

    /// A tiny model for tests and the demo: every Gemma-2 detail, a few thousand parameters besides the embedding.
    pub fn tiny() -> Self {
        Self {
            sliding_window: 16,
            attn_logit_softcapping: Some(5.0),
            ..Self::base(32, 64, 4, 4, 2, 16, 24.0)
        }
    }
}

/// transformers 4.x had no `layer_types`: even layers slide, odd layers see everything.
fn default_layer_types(layers: usize) -> Vec<LayerType> {
    (0..layers)
        .map(|i| {
            if i % 2 == 0 {
                LayerType::SlidingAttention
            } else {
                LayerType::FullAttention
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// google/gemma-2-2b's config.json, as transformers 4.42 wrote it.
    const GEMMA2_2B_V4: &str = r#"{"architectures":["Gemma2ForCausalLM"],"attention_bias":false,"attention_dropout":0.0,
        "attn_logit_softcapping":50.0,"bos_token_id":2,"cache_implementation":"hybrid","eos_token_id":1,
        "final_logit_softcapping":30.0,"head_dim":256,"hidden_act":"gelu_pytorch_tanh",
        "hidden_activation":"gelu_pytorch_tanh","hidden_size":2304,"initializer_range":0.02,"intermediate_size":9216,
        "max_position_embeddings":8192,"model_type":"gemma2","num_attention_heads":8,"num_hidden_layers":26,
        "num_key_value_heads":4,"pad_token_id":0,"query_pre_attn_scalar":256,"rms_norm_eps":1e-06,
        "rope_theta":10000.0,"sliding_window":4096,"torch_dtype":"float32","transformers_version":"4.42.4",
        "use_cache":true,"vocab_size":256000}"#;

    #[test]
    fn transformers_4_config_equals_the_preset() {
        let c = Gemma2Config::from_hf_json("config.json", GEMMA2_2B_V4.as_bytes()).unwrap();
        assert_eq!(
            c,
            Gemma2Config {
                dtype: Some("float32".into()),
                ..Gemma2Config::gemma2_2b()
            }
        );
        assert_eq!(c.layer_types[0], LayerType::SlidingAttention);
        assert_eq!(c.layer_types[1], LayerType::FullAttention);
    }

    #[test]
    fn transformers_5_config_reads_rope_parameters_dtype_and_layer_types() {
        let mut v: serde_json::Value = serde_json::from_str(GEMMA2_2B_V4).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.remove("torch_dtype");
        o.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_theta": 5000.0, "rope_type": "default"}),
        );
        o.insert("dtype".into(), "bfloat16".into());
        let types: Vec<&str> = (0..26)
            .map(|i| {
                if i < 2 {
                    "full_attention"
                } else {
                    "sliding_attention"
                }
            })
            .collect();
        o.insert("layer_types".into(), serde_json::json!(types));
        o.insert(
            "id2label".into(),
            serde_json::json!({"1": "b", "0": "a", "2": "tie"}),
        );
        let c = Gemma2Config::from_hf_json("c.json", &serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(c.rope_theta, 5000.0);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.layer_types[0], LayerType::FullAttention);
        assert_eq!(c.layer_types[2], LayerType::SlidingAttention);
        assert_eq!(c.labels, ["a", "b", "tie"]);
    }

    #[test]
    fn wrong_model_type_is_named() {
        let bad = GEMMA2_2B_V4.replace("\"gemma2\"", "\"llama\"");
        let err = Gemma2Config::from_hf_json("m/config.json", bad.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m/config.json") && err.contains("llama"),
            "{err}"
        );
    }

    #[test]
    fn presets_are_valid() {
        for c in [
            Gemma2Config::gemma2_2b(),
            Gemma2Config::gemma2_9b(),
            Gemma2Config::tiny(),
        ] {
            c.validate().unwrap();
        }
    }
}
