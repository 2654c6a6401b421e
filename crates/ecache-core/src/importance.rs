//! Importance scores from attention probabilities: head-mean column sums, fed blockwise.

use burn::tensor::{Tensor, backend::Backend};

use crate::error::{Error, Result};

/// Column sums of the head-mean attention probabilities.
///
/// # Shapes
/// - `probs`: `[batch, heads, queries, keys]`, rows after softmax (masked entries 0)
/// - returns `[batch, keys]`: `sum_i mean_h probs[b, h, i, j]`
pub fn column_sums<B: Backend>(probs: Tensor<B, 4>) -> Tensor<B, 2> {
    let [batch, _, _, keys] = probs.dims();
    probs.mean_dim(1).sum_dim(2).reshape([batch, keys])
}

/// Accumulates column sums over query blocks, so that a layer's prefill never needs the
/// whole `T x T` probability matrix at once: feed each block of query rows as it is
/// computed, then read one score row per sequence.
#[derive(Debug, Clone)]
pub struct ImportanceAccumulator<B: Backend> {
    sums: Option<Tensor<B, 2>>,
}

impl<B: Backend> Default for ImportanceAccumulator<B> {
    fn default() -> Self {
        Self { sums: None }
    }
}

impl<B: Backend> ImportanceAccumulator<B> {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one block of query rows.
    ///
    /// # Shapes
    /// - `probs`: `[batch, heads, block_queries, keys]`; every block has the same `keys`
    pub fn add_block(&mut self, probs: Tensor<B, 4>) -> Result<()> {
        self.add_sums(column_sums(probs))
    }

    /// Adds one block's column sums, `[batch, keys]`.
    /// A block of the wrong shape is refused and leaves the sums as they were.
    fn add_sums(&mut self, block: Tensor<B, 2>) -> Result<()> {
        if let Some(sums) = &self.sums
            && sums.dims() != block.dims()
        {
            return Err(Error::shape(
                "importance block [batch, keys]",
                format!("{:?}", sums.dims()),
                format!("{:?}", block.dims()),
            ));
        }
        self.sums = Some(match self.sums.take() {
            None => block,
            Some(sums) => sums + block,
        });
        Ok(())
    }

    /// Adds one block of query rows that saw only the first `seen` keys of `keys` (a
    /// causal block): its column sums, zeros for the keys it did not see.
    ///
    /// # Shapes
    /// - `probs`: `[batch, heads, block_queries, seen]`, `seen <= keys`
    pub fn add_leading_block(&mut self, probs: Tensor<B, 4>, keys: usize) -> Result<()> {
        let [batch, _, _, seen] = probs.dims();
        if seen > keys {
            return Err(Error::shape(
                "importance block keys",
                format!("at most {keys}"),
                seen.to_string(),
            ));
        }
        if seen == keys {
            return self.add_block(probs);
        }
        let device = probs.device();
        let block = column_sums(probs);
        let unseen = Tensor::<B, 2>::zeros([batch, keys - seen], (&device, block.dtype()));
        self.add_sums(Tensor::cat(vec![block, unseen], 1))
    }

    /// The accumulated sums, `[batch, keys]`, if any block was added.
    pub fn sums(&self) -> Option<&Tensor<B, 2>> {
        self.sums.as_ref()
    }

    /// The accumulated sums on the device (zeros when no block was added).
    ///
    /// # Shapes
    /// - returns `[batch, keys]`
    pub fn into_sums(self, batch: usize, keys: usize, device: &B::Device) -> Tensor<B, 2> {
        self.sums
            .unwrap_or_else(|| Tensor::zeros([batch, keys], device))
    }

    /// One host row per sequence, cut to that sequence's length `lens[b]`.
    pub fn into_rows(self, lens: &[usize]) -> Result<Vec<Vec<f32>>> {
        let Some(sums) = self.sums else {
            return Ok(lens.iter().map(|&l| vec![0.0; l]).collect());
        };
        rows_to_host(sums, lens)
    }
}

/// Copies a `[batch, keys]` tensor to one host row per sequence, cut to `lens[b]`.
pub fn rows_to_host<B: Backend>(rows: Tensor<B, 2>, lens: &[usize]) -> Result<Vec<Vec<f32>>> {
    let [batch, keys] = rows.dims();
    if batch != lens.len() || lens.iter().any(|&l| l > keys) {
        return Err(Error::shape(
            "score rows",
            format!("{} rows of at least {:?} keys", lens.len(), lens),
            format!("[{batch}, {keys}]"),
        ));
    }
    let flat: Vec<f32> = rows
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| Error::shape("score rows", "f32 data", format!("{e:?}")))?;
    Ok(lens
        .iter()
        .enumerate()
        .map(|(b, &l)| flat[b * keys..b * keys + l].to_vec())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    type B = Flex;

    #[test]
    fn column_sums_match_a_hand_computed_case() {
        // 1 sequence, 2 heads, 2 queries, 2 keys; causal rows.
        let probs = Tensor::<B, 4>::from_data(
            TensorData::new(
                vec![1.0f32, 0.0, 0.25, 0.75, 1.0, 0.0, 0.75, 0.25],
                [1, 2, 2, 2],
            ),
            &Default::default(),
        );
        let rows = rows_to_host(column_sums(probs), &[2]).unwrap();
        // head mean: [[1, 0], [0.5, 0.5]] -> column sums [1.5, 0.5]
        assert_eq!(rows, vec![vec![1.5, 0.5]]);
    }

    #[test]
    fn blockwise_accumulation_equals_one_pass() {
        let device = Default::default();
        let probs = Tensor::<B, 4>::random([2, 3, 8, 8], Distribution::Uniform(0.0, 1.0), &device);
        let whole = rows_to_host(column_sums(probs.clone()), &[8, 5]).unwrap();
        let mut acc = ImportanceAccumulator::new();
        for start in [0, 3, 6] {
            let end = (start + 3).min(8);
            acc.add_block(probs.clone().slice([0..2, 0..3, start..end, 0..8]))
                .unwrap();
        }
        let blocked = acc.into_rows(&[8, 5]).unwrap();
        for (w, b) in whole.iter().flatten().zip(blocked.iter().flatten()) {
            assert!((w - b).abs() < 1e-5, "{w} vs {b}");
        }
        assert_eq!(blocked[1].len(), 5);
    }

    /// Causal blocks that read only the keys they can see sum to the same importance as
    /// whole blocks whose unseen keys carry zero probability; a wrong block is refused
    /// without losing what was accumulated.
    #[test]
    fn leading_blocks_equal_zero_padded_blocks() {
        let device = Default::default();
        let probs = Tensor::<B, 4>::random([2, 3, 8, 8], Distribution::Uniform(0.0, 1.0), &device);
        let causal: Vec<bool> = (0..8).flat_map(|i| (0..8).map(move |j| j > i)).collect();
        let hidden = Tensor::<B, 4, burn::tensor::Bool>::from_data(
            TensorData::new(causal, [1, 1, 8, 8]),
            &device,
        );
        let probs = probs.mask_fill(hidden, 0.0);
        let whole = rows_to_host(column_sums(probs.clone()), &[8, 8]).unwrap();
        let mut acc = ImportanceAccumulator::new();
        for start in [0, 3, 6] {
            let end = (start + 3).min(8);
            acc.add_leading_block(probs.clone().slice([0..2, 0..3, start..end, 0..end]), 8)
                .unwrap();
        }
        let wrong = probs.clone().slice([0..2, 0..3, 0..1, 0..8]);
        assert!(acc.add_leading_block(wrong.clone(), 7).is_err());
        assert!(
            acc.add_block(wrong.slice([0..2, 0..3, 0..1, 0..7]))
                .is_err()
        );
        let blocked = acc.into_rows(&[8, 8]).unwrap();
        for (w, b) in whole.iter().flatten().zip(blocked.iter().flatten()) {
            assert!((w - b).abs() < 1e-5, "{w} vs {b}");
        }
    }
}
