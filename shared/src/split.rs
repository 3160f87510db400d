//! Seeded, stratified subsampling and train/val/test splitting.
//!
//! The generator is SplitMix64 with rejection sampling, written out here so that a seed gives the same rows on
//! every platform and every dependency version (a library RNG may change its stream between releases).

use serde::{Deserialize, Serialize};

use crate::data::Label;

/// SplitMix64 (Steele, Lea and Flood, 2014): tiny, fast, and fully specified by its constants.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// Fractions of rows for train, validation and test.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitRatios {
    pub train: f64,
    pub val: f64,
    pub test: f64,
}

impl Default for SplitRatios {
    /// The recipe's 70/10/20.
    fn default() -> Self {
        Self {
            train: 0.7,
            val: 0.1,
            test: 0.2,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SplitError {
    #[error(
        "split ratios must be non-negative and sum to 1 (got train {train}, val {val}, test {test})"
    )]
    BadRatios { train: f64, val: f64, test: f64 },
    #[error("sample percent must be in (0, 100] (got {0})")]
    BadPercent(f64),
}

impl SplitRatios {
    pub fn validate(&self) -> Result<(), SplitError> {
        let Self { train, val, test } = *self;
        let ok = [train, val, test]
            .iter()
            .all(|r| r.is_finite() && *r >= 0.0)
            && (train + val + test - 1.0).abs() < 1e-6;
        if ok {
            Ok(())
        } else {
            Err(SplitError::BadRatios { train, val, test })
        }
    }
}

/// Row indices of each split, each in ascending (file) order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Splits {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
}

impl Splits {
    pub fn named(&self) -> [(&'static str, &[usize]); 3] {
        [
            ("train", &self.train),
            ("val", &self.val),
            ("test", &self.test),
        ]
    }
}

/// Indices of each class, shuffled by `rng`, classes in [`Label::ALL`] order.
fn shuffled_by_class(labels: &[Label], rng: &mut SplitMix64) -> Vec<Vec<usize>> {
    Label::ALL
        .iter()
        .map(|class| {
            let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == *class).collect();
            rng.shuffle(&mut idx);
            idx
        })
        .collect()
}

/// Splits `total` slots among classes in proportion to `counts` (largest remainder, earlier class first on
/// ties), never giving a class more than `caps[c]`.
fn apportion(counts: &[usize], caps: &[usize], total: usize) -> Vec<usize> {
    let n: usize = counts.iter().sum();
    if n == 0 {
        return vec![0; counts.len()];
    }
    let quotas: Vec<f64> = counts
        .iter()
        .map(|&c| c as f64 * total as f64 / n as f64)
        .collect();
    let mut out: Vec<usize> = quotas
        .iter()
        .zip(caps)
        .map(|(q, &cap)| (q.floor() as usize).min(cap))
        .collect();
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by(|&x, &y| {
        (quotas[y] - quotas[y].floor())
            .total_cmp(&(quotas[x] - quotas[x].floor()))
            .then(x.cmp(&y))
    });
    let mut left = total.saturating_sub(out.iter().sum());
    while left > 0 {
        let before = left;
        for &c in &order {
            if left > 0 && out[c] < caps[c] {
                out[c] += 1;
                left -= 1;
            }
        }
        if left == before {
            break;
        }
    }
    out
}

/// Keeps `percent`% of the rows (rounded to nearest), each class in proportion, seeded.
/// Returns ascending indices into `labels`.
pub fn stratified_sample(
    labels: &[Label],
    percent: f64,
    seed: u64,
) -> Result<Vec<usize>, SplitError> {
    if !(percent > 0.0 && percent <= 100.0) {
        return Err(SplitError::BadPercent(percent));
    }
    let mut rng = SplitMix64::new(seed);
    let by_class = shuffled_by_class(labels, &mut rng);
    let counts: Vec<usize> = by_class.iter().map(Vec::len).collect();
    let total =
        ((labels.len() as f64 * percent / 100.0).round() as usize).clamp(1, labels.len().max(1));
    let take = apportion(&counts, &counts, total);
    let mut kept: Vec<usize> = by_class
        .iter()
        .zip(&take)
        .flat_map(|(idx, &k)| idx[..k].iter().copied())
        .collect();
    kept.sort_unstable();
    Ok(kept)
}

/// Stratified split: split sizes are the ratios of the whole (rounded), shared among classes in proportion, so
/// every split keeps the class balance. Test takes the remainder, so no row is lost to rounding.
pub fn stratified_split(
    labels: &[Label],
    ratios: SplitRatios,
    seed: u64,
) -> Result<Splits, SplitError> {
    ratios.validate()?;
    // A different stream from the subsample's, so sampling then splitting with one seed is not correlated.
    let mut rng = SplitMix64::new(seed ^ 0xA5A5_5A5A_C3C3_3C3C);
    let by_class = shuffled_by_class(labels, &mut rng);
    let counts: Vec<usize> = by_class.iter().map(Vec::len).collect();
    let n = labels.len() as f64;
    let n_train = ((n * ratios.train).round() as usize).min(labels.len());
    let n_val = ((n * ratios.val).round() as usize).min(labels.len() - n_train);
    let train = apportion(&counts, &counts, n_train);
    let rest: Vec<usize> = counts.iter().zip(&train).map(|(c, t)| c - t).collect();
    let val = apportion(&counts, &rest, n_val);
    let mut splits = Splits::default();
    for (c, idx) in by_class.iter().enumerate() {
        let (t, v) = (train[c], val[c]);
        splits.train.extend_from_slice(&idx[..t]);
        splits.val.extend_from_slice(&idx[t..t + v]);
        splits.test.extend_from_slice(&idx[t + v..]);
    }
    for s in [&mut splits.train, &mut splits.val, &mut splits.test] {
        s.sort_unstable();
    }
    Ok(splits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_stream_is_pinned() {
        // Reference values of SplitMix64 from seed 0 (as in the xoshiro authors' reference implementation).
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    fn labels(a: usize, b: usize, t: usize) -> Vec<Label> {
        let mut v = vec![Label::ModelA; a];
        v.extend(vec![Label::ModelB; b]);
        v.extend(vec![Label::Tie; t]);
        v
    }

    #[test]
    fn split_is_stratified_complete_and_seeded() {
        let l = labels(505, 495, 0);
        let s = stratified_split(&l, SplitRatios::default(), 42).unwrap();
        assert_eq!((s.train.len(), s.val.len(), s.test.len()), (700, 100, 200));
        let mut all: Vec<usize> = s
            .train
            .iter()
            .chain(&s.val)
            .chain(&s.test)
            .copied()
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        let a_in_train = s.train.iter().filter(|&&i| l[i] == Label::ModelA).count();
        assert!(
            (a_in_train as f64 - 505.0 * 0.7).abs() <= 1.0,
            "{a_in_train}"
        );
        let a_in_val = s.val.iter().filter(|&&i| l[i] == Label::ModelA).count();
        assert!((a_in_val as f64 - 505.0 * 0.1).abs() <= 1.0, "{a_in_val}");
        assert_eq!(s, stratified_split(&l, SplitRatios::default(), 42).unwrap());
        assert_ne!(s, stratified_split(&l, SplitRatios::default(), 43).unwrap());
    }

    #[test]
    fn sample_keeps_class_shares() {
        let l = labels(600, 400, 10);
        let kept = stratified_sample(&l, 10.0, 7).unwrap();
        let counts = crate::data::label_counts(kept.iter().map(|&i| &l[i]));
        assert_eq!(counts, [60, 40, 1]);
        assert!(stratified_sample(&l, 0.0, 7).is_err());
        assert_eq!(stratified_sample(&l, 50.0, 7).unwrap().len(), 505);
        assert_eq!(stratified_sample(&l, 100.0, 7).unwrap().len(), l.len());
    }

    #[test]
    fn apportion_is_exact_and_capped() {
        assert_eq!(apportion(&[505, 495], &[505, 495], 700), vec![354, 346]);
        assert_eq!(apportion(&[1, 1, 1], &[1, 1, 1], 2), vec![1, 1, 0]);
        assert_eq!(apportion(&[10, 0], &[3, 0], 5), vec![3, 0]);
    }

    #[test]
    fn bad_ratios_are_rejected() {
        let r = SplitRatios {
            train: 0.8,
            val: 0.1,
            test: 0.2,
        };
        assert!(matches!(
            stratified_split(&labels(3, 3, 0), r, 1),
            Err(SplitError::BadRatios { .. })
        ));
    }
}

#[cfg(test)]
mod golden {
    use super::*;

    /// The same seed must give the same rows on every platform and release: a change here changes every user's
    /// splits, and must be deliberate.
    #[test]
    fn split_of_seed_42_is_pinned() {
        let labels: Vec<Label> = (0..20)
            .map(|i| {
                if i % 3 == 0 {
                    Label::ModelB
                } else {
                    Label::ModelA
                }
            })
            .collect();
        let s = stratified_split(&labels, SplitRatios::default(), 42).unwrap();
        assert_eq!(s.val, [3, 10]);
        assert_eq!(s.test, [1, 4, 9, 11]);
        assert_eq!(
            stratified_sample(&labels, 50.0, 42).unwrap(),
            [0, 1, 2, 5, 8, 9, 12, 13, 16, 19]
        );
    }
}
