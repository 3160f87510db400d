//! Cross-crate integration tests, one binary (see tests/Cargo.toml).

mod bad_input;
mod model_parity;
mod recipe_parity;
mod tokenizer_props;
mod training;
