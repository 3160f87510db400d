//! The `trainer` command line, run as a subprocess; one binary (see trainer/Cargo.toml).

mod bench_cli;
mod hostile_cli;
mod predict_cli;
mod prepare_cli;
mod train_cli;
