//! The Gemma-2 sequence classifier: configuration, modules, and Hugging Face checkpoint loading.

pub mod config;
pub mod cpu_kernels;
pub mod flops;
pub mod gemma2;
pub mod load;
pub mod lora;
pub mod placement;
pub mod quant;
pub mod weights;

pub use config::{Gemma2Config, LayerType};
pub use gemma2::Gemma2ForSequenceClassification;
pub use placement::Placement;
