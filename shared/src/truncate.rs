//! The recipe's "smart truncation": a field over its token budget keeps its first half and its last half minus one
//! token, joined by [`SNIP`]. A budget of 150 keeps 75 + 74 tokens.
//!
//! The recipe decodes the kept ids back to text. We cut the original text at token offsets instead, and reproduce
//! the two places where Hugging Face's decode differs from the original text (`▁` → space; a character cut in the
//! middle of its byte tokens → `U+FFFD` per byte of that run), so the result is string-for-string the recipe's.

use std::borrow::Cow;

use crate::tokenizer::{Tokenizer, TokenizerError};

/// What joins the head and the tail of a truncated field.
pub const SNIP: &str = "\n(snip)\n";

/// The smallest budget for which the rule makes sense: the tail keeps `budget / 2 - 1` tokens, and Python's
/// `ids[-0:]` would keep everything.
pub const MIN_BUDGET: usize = 4;

/// A field after smart truncation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncated<'a> {
    pub text: Cow<'a, str>,
    /// Tokens in the original field.
    pub tokens: usize,
    /// Whether the field was over budget and cut.
    pub snipped: bool,
}

/// Applies the rule to one field. `budget` must be at least [`MIN_BUDGET`] (checked by
/// [`crate::preprocess::PreprocessConfig::validate`]).
pub fn smart_truncate<'a>(
    tokenizer: &Tokenizer,
    text: &'a str,
    budget: usize,
) -> Result<Truncated<'a>, TokenizerError> {
    debug_assert!(budget >= MIN_BUDGET);
    let half = budget / 2;
    let cut = tokenizer.head_tail(text, budget, half, half - 1)?;
    Ok(match cut.pieces {
        None => Truncated {
            text: Cow::Borrowed(text),
            tokens: cut.tokens,
            snipped: false,
        },
        Some((head, tail)) => {
            let mut s = String::with_capacity(head.len() + SNIP.len() + tail.len());
            s.push_str(&head);
            s.push_str(SNIP);
            s.push_str(&tail);
            Truncated {
                text: Cow::Owned(s),
                tokens: cut.tokens,
                snipped: true,
            }
        }
    })
}
