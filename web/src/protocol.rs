//! The messages between the page and the worker that owns the model. Each travels as `{msg: JSON, bytes?}`: the
//! JSON of one of these types, and for a dropped file its bytes as a transferred `Uint8Array`.

use serde::{Deserialize, Serialize};
use shared::bundle::BundleAbout;

/// From the page to the worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Load the bundle at `base` (an absolute URL ending in `/`), its weights in `weights` when listed.
    Load {
        base: String,
        weights: Option<String>,
        backend: String,
    },
    Predict {
        id: u32,
        prompt: String,
        response_a: String,
        response_b: String,
        swap_tta: bool,
    },
    /// Score the first `limit` rows of a parquet or CSV file (its bytes ride along).
    PredictFile {
        id: u32,
        name: String,
        swap_tta: bool,
        limit: Option<usize>,
    },
}

/// From the worker to the page.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// The worker is listening.
    Started,
    /// The manifest is read: what the model is and what loading it will take, before anything large downloads.
    Bundle(BundleInfo),
    /// The device is open: what it can hold.
    Device(DeviceInfo),
    /// Loading goes on: a line for the page, and bytes and tensors done so far.
    Progress {
        text: String,
        bytes: u64,
        total_bytes: u64,
        tensors: usize,
        total_tensors: usize,
    },
    Loaded(LoadInfo),
    LoadFailed {
        error: String,
    },
    Prediction {
        id: u32,
        prediction: Prediction,
    },
    FileProgress {
        id: u32,
        done: usize,
        total: usize,
    },
    FileResult {
        id: u32,
        result: FileResult,
    },
    Failed {
        id: u32,
        error: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleInfo {
    pub about: Option<BundleAbout>,
    /// The weights format chosen, and every format the bundle lists with its size in bytes.
    pub format: String,
    pub formats: Vec<(String, u64)>,
    /// What will be fetched: config, tokenizer and the chosen weights.
    pub download_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// `webgpu` or `cpu`.
    pub backend: String,
    /// The largest buffer one kernel may bind on the GPU.
    pub max_binding_bytes: Option<u64>,
    /// Estimated bytes the model takes on the GPU and in wasm memory in the chosen format.
    pub gpu_bytes: u64,
    pub host_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadInfo {
    pub backend: String,
    pub from_cache: bool,
    pub download_bytes: u64,
    pub seconds: f64,
    /// Bytes as held after loading: on the GPU, and in host (wasm) memory.
    pub gpu_bytes: u64,
    pub host_bytes: u64,
    /// The wasm memory's size after loading: it only grows, so this is its peak.
    pub wasm_memory_bytes: u64,
    /// The token embedding stayed in wasm memory (over one GPU binding).
    pub table_on_host: bool,
    /// On WebGPU, whether this build fuses its kernels (see `shared::model::placement::fused_kernels`).
    pub fused_kernels: bool,
}

/// One comparison's prediction.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Prediction {
    pub prob_model_a: f32,
    pub prob_model_b: f32,
    /// Model input length (BOS and EOS included).
    pub tokens: usize,
    /// Tokens of prompt, response A and response B before truncation.
    pub field_tokens: [usize; 3],
    /// Which of prompt, A and B were snipped by smart truncation.
    pub snipped: [bool; 3],
    /// The templated text was cut at the model's input length.
    pub cut: bool,
    pub latency_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileResult {
    /// `(id, winner, P(A), P(B))` of every scored row.
    pub rows: Vec<(String, String, f32, f32)>,
    /// Accuracy and the number of labelled rows it is over.
    pub accuracy: Option<(f64, usize)>,
    /// The length baseline's accuracy on the same rows (`shared::predict::longer_answer`).
    pub longer_answer_accuracy: Option<f64>,
    pub csv: String,
    pub seconds: f64,
}
