//! What can go wrong in the browser, each case with what a reader needs to act on it.

use shared::model::load::LoadError;
use shared::model::weights::WeightsError;

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("{url}: cannot fetch: {message}")]
    Fetch { url: String, message: String },
    #[error("{url}: HTTP {status} {text}")]
    Http {
        url: String,
        status: u16,
        text: String,
    },
    #[error("{url}: not a bundle manifest: {message}")]
    Manifest { url: String, message: String },
    #[error(
        "{url} does not match the bundle's manifest ({bytes} bytes, expected {expected}): the bundle is corrupt or mixed up"
    )]
    Corrupt {
        url: String,
        bytes: u64,
        expected: u64,
    },
    #[error("WebGPU is not available here: {0}")]
    NoWebGpu(String),
    /// The device cannot hold the model; the message names what it lacks.
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Config(#[from] shared::model::config::ConfigError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Predict(#[from] shared::predict::PredictError),
    #[error(transparent)]
    Data(#[from] shared::data::DataError),
    #[error(transparent)]
    Tokenizer(#[from] shared::tokenizer::TokenizerError),
    #[error("{0}")]
    Js(String),
}

impl WebError {
    /// A JavaScript exception, with its message.
    pub fn js(e: wasm_bindgen::JsValue) -> Self {
        use wasm_bindgen::JsCast;
        Self::Js(
            e.as_string()
                .or_else(|| {
                    e.dyn_ref::<js_sys::Error>()
                        .map(|e| String::from(e.message()))
                })
                .unwrap_or_else(|| format!("{e:?}")),
        )
    }
}
