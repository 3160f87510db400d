//! The evaluation report of a classifier on labelled comparisons: loss, accuracy and log loss, accuracy per
//! language, the confusion matrix, position bias, and what swap test-time augmentation gains.

use std::collections::BTreeMap;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::data::{Label, Record};
use crate::model::Gemma2ForSequenceClassification;
use crate::predict::{
    PredictError, PredictOptions, longer_answer_accuracy, predict_both, swap_average,
};
use crate::prepare::Progress;
use crate::preprocess::PreprocessConfig;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub rows: usize,
    pub accuracy: f64,
    /// Plain cross-entropy of the probabilities (Kaggle's metric).
    pub log_loss: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PositionBias {
    /// Share of rows where the model picks response A.
    pub predicted_a_share: f64,
    /// Share of rows where people picked response A.
    pub true_a_share: f64,
    /// Share of rows whose chosen *answer* changes when the two responses trade places: a model without
    /// position bias keeps its choice.
    pub answer_flip_rate: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwapTta {
    pub accuracy: f64,
    pub log_loss: f64,
    /// TTA accuracy minus plain accuracy (positive: TTA helps).
    pub accuracy_gain: f64,
    /// Plain log loss minus TTA log loss (positive: TTA helps).
    pub log_loss_gain: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub source: String,
    pub rows: usize,
    pub ties_skipped: usize,
    /// The training objective (cross-entropy with `label_smoothing`), as the recipe's "test loss".
    pub loss: f64,
    pub label_smoothing: f64,
    pub accuracy: f64,
    pub log_loss: f64,
    /// The length baseline's accuracy on the same rows ([`crate::predict::longer_answer`]): what a model must
    /// beat to have learnt more than the answers' lengths.
    pub longer_answer_accuracy: f64,
    /// Rows `[true][predicted]`, classes model_a, model_b.
    pub confusion: [[usize; 2]; 2],
    pub per_language: BTreeMap<String, Metrics>,
    pub position_bias: PositionBias,
    pub swap_tta: SwapTta,
}

/// Scores `records` straight and swapped and builds the report. Ties are skipped (a two-class model cannot
/// score them).
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &Gemma2ForSequenceClassification,
    tokenizer: &Tokenizer,
    preprocess: &PreprocessConfig,
    records: &[Record],
    source: &str,
    label_smoothing: f64,
    batch_size: usize,
    device: &Device,
    progress: &dyn Progress,
) -> Result<EvalReport, PredictError> {
    if let Some((i, r)) = records.iter().enumerate().find(|(_, r)| r.label.is_none()) {
        return Err(PredictError::Invalid(format!(
            "{source}: row {} (id {}) has no label: evaluation needs labelled rows",
            i + 1,
            r.id
        )));
    }
    let (labelled, ties): (Vec<&Record>, Vec<&Record>) =
        records.iter().partition(|r| r.label != Some(Label::Tie));
    let labelled: Vec<Record> = labelled.into_iter().cloned().collect();
    if labelled.is_empty() {
        return Err(PredictError::Invalid(format!(
            "{source}: no rows labelled model_a or model_b to evaluate ({} ties, {} rows in all)",
            ties.len(),
            records.len()
        )));
    }
    let options = PredictOptions {
        batch_size,
        swap_tta: true,
    };
    let scored = predict_both(
        model, tokenizer, preprocess, &labelled, options, device, progress,
    )?;
    let straight = scored.straight;
    let swapped = scored.swapped.unwrap_or_else(|| straight.clone());
    let tta = swap_average(&straight, &swapped);
    Ok(build_report(
        &labelled,
        &scored.field_tokens,
        &straight,
        &swapped,
        &tta,
        source,
        label_smoothing,
        ties.len(),
    ))
}

fn ln(p: f32) -> f64 {
    f64::from(p).clamp(1e-15, 1.0).ln()
}

/// The report from probabilities already computed (`swapped[i][0]` is P(original B wins)); `field_tokens` are
/// each record's token counts before truncation (prompt, A, B).
#[allow(clippy::too_many_arguments)]
pub fn build_report(
    records: &[Record],
    field_tokens: &[[usize; 3]],
    straight: &[Vec<f32>],
    swapped: &[Vec<f32>],
    tta: &[Vec<f32>],
    source: &str,
    label_smoothing: f64,
    ties_skipped: usize,
) -> EvalReport {
    let n = records.len().max(1) as f64;
    let pick = |p: &[f32]| usize::from(p[1] > p[0]);
    let (mut loss, mut log_loss, mut correct) = (0.0, 0.0, 0usize);
    let (mut tta_log_loss, mut tta_correct) = (0.0, 0usize);
    let (mut pred_a, mut true_a, mut flips) = (0usize, 0usize, 0usize);
    let mut confusion = [[0usize; 2]; 2];
    let mut langs: BTreeMap<String, (usize, usize, f64)> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        // `evaluate` passes only rows labelled model_a or model_b.
        let y = r.label.map_or(0, |l| l.index().min(1));
        let p = &straight[i];
        let pred = pick(p);
        loss -= (1.0 - label_smoothing) * ln(p[y]) + label_smoothing * (ln(p[0]) + ln(p[1])) / 2.0;
        log_loss -= ln(p[y]);
        correct += usize::from(pred == y);
        confusion[y][pred] += 1;
        pred_a += usize::from(pred == 0);
        true_a += usize::from(y == 0);
        // The swapped run's choice, in terms of the original answers: class 0 there is original B.
        let swapped_pick = 1 - pick(&swapped[i]);
        flips += usize::from(swapped_pick != pred);
        tta_log_loss -= ln(tta[i][y]);
        tta_correct += usize::from(pick(&tta[i]) == y);
        let lang = r.language.clone().unwrap_or_else(|| "unknown".into());
        let e = langs.entry(lang).or_default();
        e.0 += 1;
        e.1 += usize::from(pred == y);
        e.2 -= ln(p[y]);
    }
    let accuracy = correct as f64 / n;
    let log_loss = log_loss / n;
    let tta_accuracy = tta_correct as f64 / n;
    let tta_log_loss = tta_log_loss / n;
    let lengths = field_tokens.iter().zip(records).map(|(&t, r)| (t, r.label));
    EvalReport {
        source: source.into(),
        rows: records.len(),
        ties_skipped,
        loss: loss / n,
        label_smoothing,
        accuracy,
        log_loss,
        longer_answer_accuracy: longer_answer_accuracy(lengths).unwrap_or(f64::NAN),
        confusion,
        per_language: langs
            .into_iter()
            .map(|(k, (rows, c, l))| {
                (
                    k,
                    Metrics {
                        rows,
                        accuracy: c as f64 / rows as f64,
                        log_loss: l / rows as f64,
                    },
                )
            })
            .collect(),
        position_bias: PositionBias {
            predicted_a_share: pred_a as f64 / n,
            true_a_share: true_a as f64 / n,
            answer_flip_rate: flips as f64 / n,
        },
        swap_tta: SwapTta {
            accuracy: tta_accuracy,
            log_loss: tta_log_loss,
            accuracy_gain: tta_accuracy - accuracy,
            log_loss_gain: log_loss - tta_log_loss,
        },
    }
}

impl EvalReport {
    /// A summary for people.
    pub fn summary(&self) -> String {
        let c = &self.confusion;
        let mut s = format!(
            "evaluation of {} ({} rows{})\n\n\
             loss (label smoothing {})  {:.4}\n\
             accuracy                    {:.4}\n\
             log loss                    {:.4}\n\
             pick the longer answer      {:.4}  (the model {:+.4})\n\n\
             confusion (rows: truth, columns: prediction)\n\
             {:>12} {:>9} {:>9}\n\
             {:>12} {:>9} {:>9}\n\
             {:>12} {:>9} {:>9}\n\n\
             position bias\n\
             predicts A                  {:.1}%  (people chose A {:.1}%)\n\
             answer flips when swapped   {:.1}%\n\n\
             swap test-time augmentation\n\
             accuracy                    {:.4}  ({:+.4})\n\
             log loss                    {:.4}  ({:+.4})\n",
            self.source,
            self.rows,
            if self.ties_skipped > 0 {
                format!(", {} ties skipped", self.ties_skipped)
            } else {
                String::new()
            },
            self.label_smoothing,
            self.loss,
            self.accuracy,
            self.log_loss,
            self.longer_answer_accuracy,
            self.accuracy - self.longer_answer_accuracy,
            "",
            "pred A",
            "pred B",
            "true A",
            c[0][0],
            c[0][1],
            "true B",
            c[1][0],
            c[1][1],
            100.0 * self.position_bias.predicted_a_share,
            100.0 * self.position_bias.true_a_share,
            100.0 * self.position_bias.answer_flip_rate,
            self.swap_tta.accuracy,
            self.swap_tta.accuracy_gain,
            self.swap_tta.log_loss,
            -self.swap_tta.log_loss_gain,
        );
        s.push_str("\naccuracy per language\n");
        let mut langs: Vec<(&String, &Metrics)> = self.per_language.iter().collect();
        langs.sort_by_key(|(_, m)| std::cmp::Reverse(m.rows));
        for (lang, m) in langs {
            s.push_str(&format!(
                "{:<24} {:>6} rows  accuracy {:.4}  log loss {:.4}\n",
                lang, m.rows, m.accuracy, m.log_loss
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(label: Label, lang: &str) -> Record {
        Record {
            id: "x".into(),
            prompt: String::new(),
            response_a: String::new(),
            response_b: String::new(),
            label: Some(label),
            model_a: None,
            model_b: None,
            language: Some(lang.into()),
        }
    }

    #[test]
    fn report_counts_confusion_bias_flips_and_tta() {
        let records = vec![
            record(Label::ModelA, "en"),
            record(Label::ModelB, "en"),
            record(Label::ModelA, "de"),
            record(Label::ModelB, "de"),
        ];
        // Straight: always A. Swapped: row 0 keeps its answer (picks B' = original A), others pick A' = orig B.
        let straight = vec![
            vec![0.9, 0.1],
            vec![0.6, 0.4],
            vec![0.7, 0.3],
            vec![0.55, 0.45],
        ];
        let swapped = vec![
            vec![0.2, 0.8],
            vec![0.8, 0.2],
            vec![0.6, 0.4],
            vec![0.9, 0.1],
        ];
        let tta = swap_average(&straight, &swapped);
        // Lengths: A longer (right), B longer (right), as long (A: right), A longer (wrong).
        let lengths = [[1, 10, 5], [1, 3, 9], [1, 4, 4], [1, 8, 2]];
        let r = build_report(&records, &lengths, &straight, &swapped, &tta, "t", 0.0, 1);
        assert_eq!(r.confusion, [[2, 0], [2, 0]]);
        assert_eq!(r.accuracy, 0.5);
        assert_eq!(r.position_bias.predicted_a_share, 1.0);
        assert_eq!(r.position_bias.true_a_share, 0.5);
        assert_eq!(r.position_bias.answer_flip_rate, 0.75);
        // TTA P(A): row0 (0.9+0.8)/2, row1 (0.6+0.2)/2 → B (right), row2 (0.7+0.4)/2 → A (right),
        // row3 (0.55+0.1)/2 → B (right).
        assert_eq!(r.swap_tta.accuracy, 1.0);
        assert_eq!(r.swap_tta.accuracy_gain, 0.5);
        assert_eq!(r.per_language["en"].rows, 2);
        assert_eq!(r.per_language["de"].accuracy, 0.5);
        assert!(
            (r.loss - r.log_loss).abs() < 1e-12,
            "no smoothing: loss is the log loss"
        );
        assert_eq!(r.longer_answer_accuracy, 0.75);
        let summary = r.summary();
        assert!(summary.contains("answer flips when swapped   75.0%"));
        assert!(
            summary.contains("pick the longer answer      0.7500  (the model -0.2500)"),
            "{summary}"
        );
    }
}
