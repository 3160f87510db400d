//! The web bundle's manifest (`manifest.json`), written by `trainer export` and read by the browser and by
//! `trainer predict`: what the bundle holds, how to check each file, and what a reader should know about the model.

use serde::{Deserialize, Serialize};

use crate::preprocess::PreprocessConfig;

/// How the exported weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    F32,
    F16,
    /// Symmetric int8 per row, with an f16 scale per row (`key_scale`). Norms stay f16.
    Int8,
    /// Symmetric 4-bit values in blocks of 32 along each row, with an f16 scale per block (see
    /// [`crate::model::quant`]). Norms, and matrices whose rows are not whole blocks, stay f16.
    Q4,
}

impl WeightFormat {
    /// The bundle's file name for weights in this format.
    pub fn file_name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "model.f32.safetensors",
            WeightFormat::F16 => "model.f16.safetensors",
            WeightFormat::Int8 => "model.int8.safetensors",
            WeightFormat::Q4 => "model.q4.safetensors",
        }
    }
}

/// One file of the web bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleFile {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

/// `manifest.json` of the web bundle: what the browser fetches and how to check it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleManifest {
    pub format_version: u32,
    pub config: String,
    pub tokenizer: String,
    /// Weight files by format (`f16`, `int8`).
    pub weights: Vec<BundleWeights>,
    pub labels: Vec<String>,
    pub preprocess: PreprocessConfig,
    pub files: Vec<BundleFile>,
    /// What the model is. Absent in bundles written before it was recorded.
    #[serde(default)]
    pub about: Option<BundleAbout>,
}

impl BundleManifest {
    /// The weights in `format` (by its name: `f16`, `int8`, `q4`) when listed, else the first listed.
    pub fn pick_weights(&self, format: Option<&str>) -> Option<&BundleWeights> {
        format
            .and_then(|f| self.weights.iter().find(|w| w.format.name() == f))
            .or(self.weights.first())
    }

    /// The size in bytes of `file`, as listed.
    pub fn file_bytes(&self, file: &str) -> Option<u64> {
        self.files.iter().find(|f| f.file == file).map(|f| f.bytes)
    }
}

/// What a reader of the page needs to know about the model before trusting its numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleAbout {
    /// Where the base weights came from: a model directory's name, or `random` for a randomly initialised base.
    pub base: String,
    /// The base was randomly initialised: the model has learnt only what its short training gave it.
    pub random_base: bool,
    /// `hidden × layers, vocabulary`.
    pub shape: String,
    pub parameters: u64,
    /// Test-split accuracy of the exported weights (f32), when the run recorded one.
    pub test_accuracy: Option<f64>,
    pub test_rows: Option<usize>,
    /// How far each stored format moves P(A) from f32, on the test split's first rows.
    #[serde(default)]
    pub quality: Vec<FormatQuality>,
}

/// How a weight format compares with f32 on the same rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FormatQuality {
    pub format: WeightFormat,
    pub rows: usize,
    pub mean_abs_delta_p: f64,
    pub max_abs_delta_p: f64,
    /// Accuracy on those rows, and f32's.
    pub accuracy: f64,
    pub f32_accuracy: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleWeights {
    pub format: WeightFormat,
    pub file: String,
}

pub const BUNDLE_MANIFEST: &str = "manifest.json";

impl WeightFormat {
    /// The name in a manifest and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::Int8 => "int8",
            WeightFormat::Q4 => "q4",
        }
    }
}
