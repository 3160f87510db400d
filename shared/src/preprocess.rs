//! From a comparison to model input ids, exactly as the reference recipe builds them.

use serde::{Deserialize, Serialize};

use crate::data::Record;
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::truncate::{MIN_BUDGET, smart_truncate};

/// Token budgets of the preprocessing. Defaults are the recipe's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreprocessConfig {
    /// Budget of the prompt before smart truncation.
    pub prompt_tokens: usize,
    /// Budget of each response before smart truncation.
    pub response_tokens: usize,
    /// Length of the model input, BOS and EOS included; longer inputs keep their first `max_length - 2` tokens.
    pub max_length: usize,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self {
            prompt_tokens: 150,
            response_tokens: 350,
            max_length: 512,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid preprocessing setting {field} = {value}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub value: usize,
    pub reason: &'static str,
}

impl PreprocessConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("prompt_tokens", self.prompt_tokens),
            ("response_tokens", self.response_tokens),
        ] {
            if value < MIN_BUDGET {
                return Err(ConfigError {
                    field,
                    value,
                    reason: "a truncation budget must be at least 4 tokens",
                });
            }
        }
        if self.max_length < 3 {
            return Err(ConfigError {
                field: "max_length",
                value: self.max_length,
                reason: "must leave room for BOS, EOS and one token",
            });
        }
        Ok(())
    }
}

/// The recipe's input template.
pub fn input_text(prompt: &str, response_a: &str, response_b: &str) -> String {
    let mut s = String::with_capacity(prompt.len() + response_a.len() + response_b.len() + 48);
    s.push_str("<prompt>: ");
    s.push_str(prompt);
    s.push_str("\n\n<response_a>: ");
    s.push_str(response_a);
    s.push_str("\n\n<response_b>: ");
    s.push_str(response_b);
    s
}

/// One model input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// `BOS`, at most `max_length - 2` text tokens, `EOS`.
    pub input_ids: Vec<u32>,
    /// Tokens of prompt, response A and response B before truncation.
    pub field_tokens: [usize; 3],
    /// Which of prompt, response A and response B were snipped.
    pub snipped: [bool; 3],
    /// Whether the templated text was longer than `max_length - 2` tokens and lost its end.
    pub cut: bool,
}

/// The three fields after smart truncation, in the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Templated {
    pub text: String,
    /// Tokens of prompt, response A and response B before truncation.
    pub field_tokens: [usize; 3],
    /// Which of prompt, response A and response B were snipped.
    pub snipped: [bool; 3],
}

/// Smart-truncates the three fields and fills the template.
pub fn template(
    tokenizer: &Tokenizer,
    config: &PreprocessConfig,
    prompt: &str,
    response_a: &str,
    response_b: &str,
) -> Result<Templated, TokenizerError> {
    let p = smart_truncate(tokenizer, prompt, config.prompt_tokens)?;
    let a = smart_truncate(tokenizer, response_a, config.response_tokens)?;
    let b = smart_truncate(tokenizer, response_b, config.response_tokens)?;
    Ok(Templated {
        text: input_text(&p.text, &a.text, &b.text),
        field_tokens: [p.tokens, a.tokens, b.tokens],
        snipped: [p.snipped, a.snipped, b.snipped],
    })
}

/// [`template`], then BOS + text + EOS, with EOS kept when the text is cut (as a fast tokenizer with
/// `add_eos_token` and `truncation=True, max_length` does).
pub fn preprocess(
    tokenizer: &Tokenizer,
    config: &PreprocessConfig,
    prompt: &str,
    response_a: &str,
    response_b: &str,
) -> Result<Example, TokenizerError> {
    let t = template(tokenizer, config, prompt, response_a, response_b)?;
    let body = tokenizer.encode(&t.text)?;
    let keep = body.len().min(config.max_length - 2);
    let mut input_ids = Vec::with_capacity(keep + 2);
    input_ids.push(tokenizer.bos_id);
    input_ids.extend_from_slice(&body[..keep]);
    input_ids.push(tokenizer.eos_id);
    Ok(Example {
        input_ids,
        field_tokens: t.field_tokens,
        snipped: t.snipped,
        cut: keep < body.len(),
    })
}

/// [`preprocess`] of a record; `swap` exchanges the two responses (for swap test-time augmentation).
pub fn preprocess_record(
    tokenizer: &Tokenizer,
    config: &PreprocessConfig,
    record: &Record,
    swap: bool,
) -> Result<Example, TokenizerError> {
    let (a, b) = if swap {
        (&record.response_b, &record.response_a)
    } else {
        (&record.response_a, &record.response_b)
    };
    preprocess(tokenizer, config, &record.prompt, a, b)
}
