//! Scoring comparisons with a classifier: preprocessing exactly as `prepare` does, length-sorted batches,
//! optional swap test-time augmentation, and the metrics of labelled data.

use rayon::prelude::*;

use burn::tensor::Device;
use burn::tensor::activation::softmax;

use crate::batch::collate;
use crate::data::{Label, Record};
use crate::model::Gemma2ForSequenceClassification;
use crate::prepare::Progress;
use crate::preprocess::{Example, PreprocessConfig, preprocess_record};
use crate::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("row {row} (id {id}): {source}")]
    Tokenize {
        row: usize,
        id: String,
        #[source]
        source: TokenizerError,
    },
    #[error(
        "row {row} (id {id}): token id {token} is outside the model's vocabulary of {vocab}: the tokenizer and the model do not belong together"
    )]
    OutOfVocabulary {
        row: usize,
        id: String,
        token: u32,
        vocab: usize,
    },
    #[error(
        "row {row} (id {id}): the model's probabilities are not finite ({probs:?}): its weights or activations overflowed"
    )]
    NonFinite {
        row: usize,
        id: String,
        probs: Vec<f32>,
    },
    #[error("reading model output: {0}")]
    Read(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: cannot write predictions: {message}")]
    Write { path: String, message: String },
}

#[derive(Debug, Clone, Copy)]
pub struct PredictOptions {
    pub batch_size: usize,
    /// Also score each pair with the responses swapped and average P(A) with the swapped run's P(B).
    pub swap_tta: bool,
}

/// Class probabilities of every record, in record order (`[P(model_a), P(model_b)]` for the recipe's classes).
pub fn predict(
    model: &Gemma2ForSequenceClassification,
    tokenizer: &Tokenizer,
    config: &PreprocessConfig,
    records: &[Record],
    options: PredictOptions,
    device: &Device,
    progress: &dyn Progress,
) -> Result<Vec<Vec<f32>>, PredictError> {
    let (straight, swapped) =
        predict_both(model, tokenizer, config, records, options, device, progress)?;
    Ok(match swapped {
        Some(swapped) => swap_average(&straight, &swapped),
        None => straight,
    })
}

/// Per-row class probabilities.
pub type Probs = Vec<Vec<f32>>;

/// The straight probabilities and, with `swap_tta`, those of the swapped pairs (whose classes are the swapped
/// answers: `swapped[i][0]` is P(original B wins)).
pub fn predict_both(
    model: &Gemma2ForSequenceClassification,
    tokenizer: &Tokenizer,
    config: &PreprocessConfig,
    records: &[Record],
    options: PredictOptions,
    device: &Device,
    progress: &dyn Progress,
) -> Result<(Probs, Option<Probs>), PredictError> {
    let encode = |swap: bool| -> Result<Vec<Example>, PredictError> {
        records
            .par_iter()
            .enumerate()
            .map(|(i, r)| {
                preprocess_record(tokenizer, config, r, swap).map_err(|source| {
                    PredictError::Tokenize {
                        row: i + 1,
                        id: r.id.clone(),
                        source,
                    }
                })
            })
            .collect()
    };
    let vocab = model.vocab_size();
    // A token id past the table would index out of bounds inside the backend: name the row instead.
    let checked = |examples: Vec<Example>| -> Result<Vec<Example>, PredictError> {
        for (i, e) in examples.iter().enumerate() {
            if let Some(&token) = e.input_ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(PredictError::OutOfVocabulary {
                    row: i + 1,
                    id: records[i].id.clone(),
                    token,
                    vocab,
                });
            }
        }
        Ok(examples)
    };
    let scored = |probs: Result<Probs, (usize, Vec<f32>)>| -> Result<Probs, PredictError> {
        probs.map_err(|(i, probs)| PredictError::NonFinite {
            row: i + 1,
            id: records[i].id.clone(),
            probs,
        })
    };
    let passes = if options.swap_tta { 2 } else { 1 };
    progress.start("scoring", (records.len() * passes) as u64);
    let straight = checked(encode(false)?)?;
    let straight = scored(score(
        model,
        &straight,
        options.batch_size,
        device,
        progress,
    )?)?;
    let swapped = if options.swap_tta {
        let examples = checked(encode(true)?)?;
        Some(scored(score(
            model,
            &examples,
            options.batch_size,
            device,
            progress,
        )?)?)
    } else {
        None
    };
    progress.finish();
    Ok((straight, swapped))
}

/// Swap test-time augmentation: each class's probability averaged with the swapped run's probability of the
/// same answer.
pub fn swap_average(straight: &[Vec<f32>], swapped: &[Vec<f32>]) -> Vec<Vec<f32>> {
    straight
        .iter()
        .zip(swapped)
        .map(|(p, s)| {
            // Swapping the responses exchanges classes 0 and 1; any further class (tie) keeps its place.
            (0..p.len())
                .map(|i| {
                    let j = if i < 2 { 1 - i } else { i };
                    (p[i] + s.get(j).copied().unwrap_or(p[i])) / 2.0
                })
                .collect()
        })
        .collect()
}

/// Softmax probabilities of each example, in input order; batches hold rows of similar length. The inner
/// error is the first example (its index in input order, and its probabilities) whose probabilities are not
/// finite.
fn score(
    model: &Gemma2ForSequenceClassification,
    examples: &[Example],
    batch_size: usize,
    device: &Device,
    progress: &dyn Progress,
) -> Result<Result<Probs, (usize, Vec<f32>)>, PredictError> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].input_ids.len()));
    let mut out = vec![Vec::new(); examples.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let rows: Vec<&[u32]> = chunk
            .iter()
            .map(|&i| examples[i].input_ids.as_slice())
            .collect();
        let logits = model.forward_batch(&collate(&rows, 0), device);
        let probs = softmax(logits, 1)
            .try_to_vec_as::<f32>()
            .map_err(|e| PredictError::Read(format!("{e:?}")))?;
        let classes = probs.len() / chunk.len();
        for (k, &i) in chunk.iter().enumerate() {
            out[i] = probs[k * classes..(k + 1) * classes].to_vec();
        }
        progress.inc(chunk.len() as u64);
    }
    Ok(
        match out.iter().position(|p| p.iter().any(|v| !v.is_finite())) {
            Some(i) => Err((i, out[i].clone())),
            None => Ok(out),
        },
    )
}

/// Accuracy and log loss on the rows labelled model_a or model_b (ties cannot be scored by a two-class model).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BinaryMetrics {
    pub rows: usize,
    pub ties_skipped: usize,
    pub accuracy: f64,
    pub log_loss: f64,
}

/// `None` when no row is labelled model_a or model_b (an unlabelled test file).
pub fn binary_metrics(probs: &[Vec<f32>], labels: &[Option<Label>]) -> Option<BinaryMetrics> {
    let (mut n, mut ties, mut correct, mut loss) = (0usize, 0usize, 0usize, 0f64);
    for (p, label) in probs.iter().zip(labels) {
        let y = match label {
            None => continue,
            Some(Label::Tie) => {
                ties += 1;
                continue;
            }
            Some(l) => l.index(),
        };
        n += 1;
        let predicted = if p[1] > p[0] { 1 } else { 0 };
        correct += usize::from(predicted == y);
        loss -= f64::from(p[y]).clamp(1e-15, 1.0).ln();
    }
    (n > 0).then(|| BinaryMetrics {
        rows: n,
        ties_skipped: ties,
        accuracy: correct as f64 / n as f64,
        log_loss: loss / n as f64,
    })
}

/// Refuses an output path that is one of the `inputs` (files, or model directories, whose `.json` and
/// `.safetensors` files count), so that
/// predictions never replace the data, tokenizer or model they come from. Paths are compared after resolving
/// links; an output that does not exist yet is no input.
pub fn check_output_path(
    out: &std::path::Path,
    inputs: &[&std::path::Path],
) -> Result<(), PredictError> {
    let Ok(target) = std::fs::canonicalize(out) else {
        return Ok(());
    };
    for input in inputs {
        let Ok(input) = std::fs::canonicalize(input) else {
            continue;
        };
        let clash = if input.is_dir() {
            // A model directory: its config, weights and tokenizer files.
            target.parent() == Some(input.as_path())
                && target
                    .extension()
                    .is_some_and(|e| e == "json" || e == "safetensors")
        } else {
            target == input
        };
        if clash {
            return Err(PredictError::Write {
                path: out.display().to_string(),
                message: format!(
                    "this is (inside) the input {}: refusing to overwrite it; choose another --out",
                    input.display()
                ),
            });
        }
    }
    Ok(())
}

/// Writes the Kaggle-style `id,winner,prob_model_a,prob_model_b` file.
pub fn write_predictions_csv(
    path: &std::path::Path,
    records: &[Record],
    probs: &[Vec<f32>],
    labels: &[String],
) -> Result<(), PredictError> {
    let err = |message: String| PredictError::Write {
        path: path.display().to_string(),
        message,
    };
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header = vec!["id".to_string(), "winner".to_string()];
    header.extend(labels.iter().map(|l| format!("prob_{l}")));
    w.write_record(&header).map_err(|e| err(e.to_string()))?;
    for (r, p) in records.iter().zip(probs) {
        let best = p
            .iter()
            .enumerate()
            .fold(0, |b, (i, v)| if *v > p[b] { i } else { b });
        let mut row = vec![r.id.clone(), labels.get(best).cloned().unwrap_or_default()];
        row.extend(p.iter().map(|v| format!("{v:.6}")));
        w.write_record(&row).map_err(|e| err(e.to_string()))?;
    }
    let bytes = w.into_inner().map_err(|e| err(e.to_string()))?;
    crate::cache::write_atomic(path, &bytes).map_err(|e| err(e.to_string()))
}
