//! arena-judge's shared crate: everything the trainer (native) and the web app (wasm32) must do identically.
//!
//! - [`data`]: loading Arena rows from parquet or CSV, in the WSDM or LMSYS schema;
//! - [`split`]: seeded stratified subsampling and train/val/test splits;
//! - [`tokenizer`], [`truncate`], [`preprocess`]: the reference recipe's text preprocessing, token for token;
//! - [`batch`]: dynamic padding and length-grouped batches;
//! - with the `native` feature, [`cache`] and [`prepare`]: the on-disk prepared-data cache and its multi-core
//!   builder;
//! - [`model`]: the Gemma-2 classifier and its LoRA adapters; [`plot`]: SVG pictures of a run;
//! - with `native`, [`train`], [`report`], [`export`]: fine-tuning, the evaluation report, merged export;
//!   [`run_dir`]: a training run's directory, locked by the process that uses it; [`host_memory`]: the allocator's
//!   settings for activations on the CPU.

pub mod batch;
pub mod bundle;
pub mod data;
pub mod model;
pub mod plot;
pub mod predict;
pub mod preprocess;
pub mod progress;
pub mod split;
pub mod tokenizer;
pub mod truncate;

#[cfg(feature = "native")]
pub mod cache;
#[cfg(feature = "native")]
pub mod export;
#[cfg(feature = "native")]
pub mod host_memory;
#[cfg(feature = "native")]
pub mod prepare;
#[cfg(feature = "native")]
pub mod report;
#[cfg(feature = "native")]
pub mod run_dir;
#[cfg(feature = "native")]
pub mod train;
