//! Host loops for [`Kernel::Fused`](super::gemma2::Kernel) on the CPU backend: element-wise work that burn's CPU
//! backend does one value at a time, here written as straight-line arithmetic the compiler vectorises, split across
//! threads where the `native` feature brings rayon.

/// `tanh` in f32, in straight-line arithmetic that the compiler vectorises. glibc's `tanhf` (which `f32::tanh`
/// calls) is a scalar call per value, and Gemma-2's soft-capping calls it for every attention score: with GELU's,
/// those calls were a fifth of a forward pass on the CPU. Within 1.5 ulp of the exact value over the f32 range
/// (tested against f64; glibc's is within 1.4), odd, ±1 from |x| ≈ 9, NaN for NaN.
///
/// Both of two formulas are computed and one is chosen per value, so that a loop over values has no branch:
/// - below |x| = 0.55, tanh's Taylor series to x¹⁷: the terms fall by about (2 · 0.55 / π)² ≈ 0.12 each, so the
///   next one is 0.1 ulp;
/// - above, `1 - 2 / (e^{2|x|} + 1)`, which cancels little there (the result is above 0.5) and less beyond. `e^y`
///   is `2^k · e^r`, with `k` the integer nearest `y / ln 2`, `r = y - k ln 2` (ln 2 in two parts, so that `r` is
///   exact to f32) within ±ln 2 / 2, `e^r` by its Taylor series to r⁷ (error below 6e-9 relative) and `2^k` made
///   from its exponent bits. `y` stops at 88, where `e^y` is still finite and `tanh` long since 1.
#[inline]
pub fn tanh(x: f32) -> f32 {
    // The series' coefficients after x: -1/3, 2/15, -17/315, 62/2835, -1382/155925, 21844/6081075,
    // -929569/638512875, 6404582/10854718875 (from the Bernoulli numbers).
    const SERIES: [f32; 8] = [
        -0.333_333_34,
        0.133_333_34,
        -0.053_968_254,
        0.021_869_488,
        -0.008_863_236,
        0.003_592_128,
        -0.001_455_834_4,
        0.000_590_027_4,
    ];
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let a = x.abs();
    let z = a * a;
    let mut p = SERIES[7];
    for c in SERIES[..7].iter().rev() {
        p = p * z + c;
    }
    let small = a + a * z * p;
    let y = a + a;
    // Written so that NaN stays NaN (`min` would turn it into 88).
    let y = if y > 88.0 { 88.0 } else { y };
    // y >= 0, so truncation after adding one half rounds to nearest; NaN becomes 0 and `r` stays NaN.
    let k = (y * std::f32::consts::LOG2_E + 0.5) as i32;
    let r = (y - k as f32 * LN2_HI) - k as f32 * LN2_LO;
    let mut e = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        e = e * r + c;
    }
    // 0 <= k <= 127: a normal power of two.
    let exp_y = e * f32::from_bits(((k + 127) as u32) << 23);
    let large = 1.0 - 2.0 / (exp_y + 1.0);
    let t = if a < 0.55 { small } else { large };
    t.copysign(x)
}

/// Gemma-2's attention probabilities, in place, from the raw scores `q · k` in rows of `seq` keys, the row `r` the
/// query at position `r % seq` (the layout of queries stacked by GQA group): each score times `scale`,
/// **soft-capped** (`cap * tanh(s / cap)`, with [`tanh`]), then masked where `hidden` (`[seq, seq]`, query by key)
/// is true, and a softmax over the row, all in f32.
///
/// Each row is computed only between its first and its last visible key, and is 0 outside them: under the causal
/// mask that skips the half of the scores, and of their `tanh`s, that are hidden, which burn's attention loop and
/// the eager ops both compute. A row with no visible key (no Gemma-2 mask makes one) is all 0, as in burn's loop;
/// the eager softmax makes it NaN.
///
/// The operations on each score are the eager path's, in its order (the scale, the division by the cap, `tanh`,
/// the cap; the maximum, `exp` of the difference, the sum, the division), so that the two differ only in `tanh`
/// and in the order the sum is taken.
///
/// With `slopes` (as long as `scores`), the same pass also writes there each probability times the derivative of
/// its soft-capped score by the raw one, `p · scale · (1 - tanh²)` (`p · scale` without a cap; 0 where `p` is):
/// what the softmax's gradient needs ([`Kernel::Linearised`](super::gemma2::Kernel)).
pub fn softcapped_softmax(
    scores: &mut [f32],
    slopes: Option<&mut [f32]>,
    hidden: &[bool],
    seq: usize,
    scale: f32,
    softcap: Option<f32>,
) {
    assert_eq!(hidden.len(), seq * seq, "the mask is [seq, seq]");
    assert_eq!(scores.len() % seq.max(1), 0, "scores come in rows of seq keys");
    if seq == 0 {
        return;
    }
    let row = |r: usize, row: &mut [f32], mut slope: Option<&mut [f32]>| {
        let hidden = &hidden[(r % seq) * seq..][..seq];
        let (Some(first), Some(last)) = (hidden.iter().position(|h| !h), hidden.iter().rposition(|h| !h)) else {
            row.fill(0.0);
            slope.iter_mut().for_each(|s| s.fill(0.0));
            return;
        };
        let (span, hidden) = (&mut row[first..=last], &hidden[first..=last]);
        match (softcap, slope.as_deref_mut()) {
            (Some(cap), None) => span.iter_mut().for_each(|s| *s = tanh(*s * scale / cap) * cap),
            (Some(cap), Some(slope)) => span.iter_mut().zip(&mut slope[first..=last]).for_each(|(s, d)| {
                let t = tanh(*s * scale / cap);
                *d = scale * (1.0 - t * t);
                *s = t * cap;
            }),
            (None, slope) => {
                span.iter_mut().for_each(|s| *s *= scale);
                slope.into_iter().for_each(|d| d[first..=last].fill(scale));
            }
        }
        let max = span
            .iter()
            .zip(hidden)
            .filter(|(_, h)| !**h)
            .fold(f32::NEG_INFINITY, |m, (s, _)| m.max(*s));
        let mut sum = 0.0;
        for (s, h) in span.iter_mut().zip(hidden) {
            *s = if *h { 0.0 } else { (*s - max).exp() };
            sum += *s;
        }
        span.iter_mut().for_each(|s| *s /= sum);
        row[..first].fill(0.0);
        row[last + 1..].fill(0.0);
        if let Some(slope) = slope {
            slope.iter_mut().zip(row.iter()).for_each(|(d, p)| *d = if *p == 0.0 { 0.0 } else { *d * p });
        }
    };
    match slopes {
        None => rows(scores, seq, |r, s| row(r, s, None)),
        Some(slopes) => {
            assert_eq!(slopes.len(), scores.len(), "a slope for each score");
            rows2(scores, slopes, seq, |r, s, d| row(r, s, Some(d)));
        }
    }
}

/// `f(r, row)` for each row of `seq` values, in parallel where the `native` feature brings rayon, at least 16 rows
/// per task: a row is a few microseconds of work.
fn rows(values: &mut [f32], seq: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    #[cfg(feature = "native")]
    {
        use rayon::prelude::*;
        values.par_chunks_mut(seq).enumerate().with_min_len(16).for_each(|(r, row)| f(r, row));
    }
    #[cfg(not(feature = "native"))]
    values.chunks_mut(seq).enumerate().for_each(|(r, row)| f(r, row));
}

/// [`rows`] over two arrays of the same layout at once.
fn rows2(a: &mut [f32], b: &mut [f32], seq: usize, f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync + Send) {
    #[cfg(feature = "native")]
    {
        use rayon::prelude::*;
        let pairs = a.par_chunks_mut(seq).zip(b.par_chunks_mut(seq)).enumerate().with_min_len(16);
        pairs.for_each(|(r, (a, b))| f(r, a, b));
    }
    #[cfg(not(feature = "native"))]
    a.chunks_mut(seq).zip(b.chunks_mut(seq)).enumerate().for_each(|(r, (a, b))| f(r, a, b));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance from `exact` in units of the f32 spacing at `exact`.
    fn ulps(got: f32, exact: f64) -> f64 {
        let spacing = {
            let e = exact.abs() as f32;
            f64::from(f32::from_bits(e.to_bits() + 1) - e)
        };
        (f64::from(got) - exact).abs() / spacing
    }

    #[test]
    fn tanh_is_within_one_and_a_half_ulp_of_the_exact_value() {
        // Every 331st f32 from 0 to 12 (3.3 million values: every binade, both formulas and the switch between
        // them, the approach to 1), and their negatives.
        let end = 12f32.to_bits();
        let mut worst = (0.0, 0.0f32);
        for bits in (0..end).step_by(331).chain([0.55f32.to_bits() - 1, 0.55f32.to_bits()]) {
            for x in [f32::from_bits(bits), -f32::from_bits(bits)] {
                let err = ulps(tanh(x), f64::from(x).tanh());
                if err > worst.0 {
                    worst = (err, x);
                }
            }
        }
        assert!(worst.0 <= 1.5, "{} ulp at {}", worst.0, worst.1);
    }

    #[test]
    fn tanh_keeps_zero_sign_saturation_and_nan() {
        assert_eq!(tanh(0.0).to_bits(), 0f32.to_bits());
        assert_eq!(tanh(-0.0).to_bits(), (-0f32).to_bits());
        assert_eq!(tanh(1e-30), 1e-30, "tiny values are their own tanh");
        for x in [9.1, 44.0, 45.0, 1e30, f32::INFINITY] {
            assert_eq!((tanh(x), tanh(-x)), (1.0, -1.0), "{x}");
        }
        assert!(tanh(f32::NAN).is_nan());
    }

    #[test]
    fn softcapped_softmax_skips_hidden_keys_and_equals_the_plain_formula() {
        // Two rows per query position (two heads of a group stacked), 5 keys, a causal mask with a window of 3.
        let seq = 5;
        let hidden: Vec<bool> = (0..seq * seq).map(|i| (i % seq) > i / seq || i / seq >= (i % seq) + 3).collect();
        let raw: Vec<f32> = (0..2 * seq * seq).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.9).collect();
        let mut got = raw.clone();
        softcapped_softmax(&mut got, None, &hidden, seq, 0.5, Some(4.0));
        for (r, (row, raw)) in got.chunks(seq).zip(raw.chunks(seq)).enumerate() {
            let hidden = &hidden[(r % seq) * seq..][..seq];
            let capped: Vec<f64> = raw.iter().map(|s| 4.0 * (f64::from(*s) * 0.5 / 4.0).tanh()).collect();
            let max = capped.iter().zip(hidden).filter(|(_, h)| !**h).map(|(c, _)| *c).fold(f64::MIN, f64::max);
            let sum: f64 = capped.iter().zip(hidden).filter(|(_, h)| !**h).map(|(c, _)| (c - max).exp()).sum();
            for ((p, c), h) in row.iter().zip(&capped).zip(hidden) {
                let want = if *h { 0.0 } else { (c - max).exp() / sum };
                assert!((f64::from(*p) - want).abs() < 1e-6, "row {r}: {p} against {want}");
            }
        }
        // A row with nothing visible is 0, not NaN.
        let mut all_hidden = vec![1.0f32; 4];
        softcapped_softmax(&mut all_hidden, None, &[true; 4], 2, 1.0, None);
        assert_eq!(all_hidden, [0.0; 4]);
    }
}
