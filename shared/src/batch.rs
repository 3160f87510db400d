//! Batching: right padding to the longest row of each batch (dynamic padding), and batches of similar length.

use crate::split::SplitMix64;

/// A padded batch, row-major `[batch, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u32>,
    /// Unpadded length of each row; the classifier pools the token at `lengths[i] - 1`.
    pub lengths: Vec<usize>,
    pub batch_size: usize,
    pub seq_len: usize,
}

/// Pads `rows` on the right with `pad_id` to the longest row.
pub fn collate(rows: &[&[u32]], pad_id: u32) -> Batch {
    let seq_len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut input_ids = Vec::with_capacity(rows.len() * seq_len);
    let mut attention_mask = Vec::with_capacity(rows.len() * seq_len);
    for row in rows {
        input_ids.extend_from_slice(row);
        input_ids.extend(std::iter::repeat_n(pad_id, seq_len - row.len()));
        attention_mask.extend(std::iter::repeat_n(1, row.len()));
        attention_mask.extend(std::iter::repeat_n(0, seq_len - row.len()));
    }
    Batch {
        input_ids,
        attention_mask,
        lengths: rows.iter().map(|r| r.len()).collect(),
        batch_size: rows.len(),
        seq_len,
    }
}

/// Batches of row indices in order.
pub fn sequential_batches(n: usize, batch_size: usize) -> Vec<Vec<usize>> {
    (0..n)
        .collect::<Vec<_>>()
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

/// Length-grouped batches, as Hugging Face's `group_by_length`: a seeded permutation is cut into mega-batches of
/// `mega * batch_size` rows, each sorted longest first and cut into batches, so a batch holds rows of similar length
/// (little padding) while the order stays random. The batch holding the longest row goes first, so a run that
/// would run out of memory does so at once.
pub fn length_grouped_batches(
    lengths: &[usize],
    batch_size: usize,
    mega: usize,
    seed: u64,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    SplitMix64::new(seed).shuffle(&mut order);
    let mut batches = Vec::with_capacity(lengths.len().div_ceil(batch_size));
    for chunk in order.chunks_mut((mega.max(1)) * batch_size) {
        chunk.sort_by(|&x, &y| lengths[y].cmp(&lengths[x]));
        batches.extend(chunk.chunks(batch_size).map(<[usize]>::to_vec));
    }
    let longest = batches
        .iter()
        .enumerate()
        .max_by_key(|(k, b)| {
            (
                b.iter().map(|&i| lengths[i]).max().unwrap_or(0),
                std::cmp::Reverse(*k),
            )
        })
        .map(|(k, _)| k);
    if let Some(k) = longest {
        batches.swap(0, k);
    }
    batches
}

/// An optimizer step's micro-batches regrouped by a padded-token budget: the step's rows, longest first, cut into
/// as few batches as keep `rows × longest row ≤ budget` (a row longer than the budget goes alone). The step
/// computes the same loss and gradient (the mean over its rows), in fewer and larger kernel launches: the
/// recipe's batch 1 × accumulation 8 becomes one batch of 8 when the 8 rows fit. The rows of a length-grouped
/// step are of similar length, so little padding is added. A budget of 0 keeps `micro` as it is.
pub fn pack_by_tokens(
    micro: &[Vec<usize>],
    lengths: impl Fn(usize) -> usize,
    budget: usize,
) -> Vec<Vec<usize>> {
    if budget == 0 {
        return micro.to_vec();
    }
    let mut rows: Vec<usize> = micro.iter().flatten().copied().collect();
    // Stable: rows of equal length keep the sampler's order.
    rows.sort_by_key(|&i| std::cmp::Reverse(lengths(i)));
    let mut packed: Vec<Vec<usize>> = Vec::new();
    for i in rows {
        match packed.last_mut() {
            // Longest first, so the batch's first row sets its padded length.
            Some(batch) if (batch.len() + 1) * lengths(batch[0]).max(1) <= budget => batch.push(i),
            _ => packed.push(vec![i]),
        }
    }
    packed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_right_to_the_longest_row() {
        let b = collate(&[&[2, 5, 1], &[2, 1]], 0);
        assert_eq!(b.seq_len, 3);
        assert_eq!(b.input_ids, vec![2, 5, 1, 2, 1, 0]);
        assert_eq!(b.attention_mask, vec![1, 1, 1, 1, 1, 0]);
        assert_eq!(b.lengths, vec![3, 2]);
    }

    #[test]
    fn grouped_batches_cover_every_row_once_and_group_lengths() {
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 7919) % 500 + 3).collect();
        let batches = length_grouped_batches(&lengths, 8, 50, 3);
        let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        let max = *lengths.iter().max().unwrap();
        assert!(batches[0].iter().any(|&i| lengths[i] == max));
        // Padding waste against random batches of the same size.
        let waste = |bs: &[Vec<usize>]| -> usize {
            bs.iter()
                .map(|b| {
                    let m = b.iter().map(|&i| lengths[i]).max().unwrap();
                    b.iter().map(|&i| m - lengths[i]).sum::<usize>()
                })
                .sum()
        };
        let random = length_grouped_batches(&lengths, 8, 1, 3);
        assert!(
            waste(&batches) * 5 < waste(&random),
            "{} vs {}",
            waste(&batches),
            waste(&random)
        );
        assert_eq!(batches, length_grouped_batches(&lengths, 8, 50, 3));
    }

    #[test]
    fn packing_fills_the_token_budget_longest_first_and_keeps_every_row_once() {
        let lengths = [100, 512, 30, 400, 512, 90, 10, 200];
        let micro: Vec<Vec<usize>> = (0..8).map(|i| vec![i]).collect();
        let packed = pack_by_tokens(&micro, |i| lengths[i], 1024);
        // 2 × 512 fills a batch; 3 × 400 would not fit, so 400 takes 200 only; 4 × 100 fits.
        assert_eq!(packed, vec![vec![1, 4], vec![3, 7], vec![0, 5, 2, 6]]);
        for batch in &packed {
            let longest = batch.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(batch.len() * longest <= 1024, "{batch:?} is over the budget");
        }
        let mut all: Vec<usize> = packed.concat();
        all.sort_unstable();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn a_row_over_the_budget_goes_alone_and_budget_zero_keeps_the_batches() {
        let lengths = [600, 20, 20];
        let micro = vec![vec![1], vec![0], vec![2]];
        assert_eq!(
            pack_by_tokens(&micro, |i| lengths[i], 512),
            vec![vec![0], vec![1, 2]]
        );
        assert_eq!(pack_by_tokens(&micro, |i| lengths[i], 0), micro);
        assert!(pack_by_tokens(&[], |i| lengths[i], 512).is_empty());
    }
}
