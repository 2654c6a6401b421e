//! The tensor side of one decoder layer's KV cache, for a batch of sequences.
//!
//! Layout: keys and values are `[batch, kv_heads, capacity, head_dim]` buffers; sequence `b`
//! owns rows `0..len(b)` of batch entry `b`, described in slot order (oldest first) by its
//! [`SlotTable`]. Which row holds which slot is its [`RowMap`]: a removal moves the rows
//! past the new length into the holes instead of shifting every later slot (see
//! [`crate::rows`]). Capacity grows by doubling and never shrinks, so steady-state decoding
//! sees fixed buffer shapes.

use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData, backend::Backend};

use crate::decision::Plan;
use crate::error::{Error, Result};
use crate::rows::{RowMap, RowMoves};
use crate::slots::{SlotKind, SlotTable};

/// Above this many runs of rows to copy, a removal gathers the kept rows in one go.
const MAX_COPY_RUNS: usize = 4;

/// The fixed dimensions of one layer's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    /// Sequences in the batch.
    pub batch: usize,
    /// Key/value heads (fewer than query heads under grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// One layer's keys, values and slot tables for a batch.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    shape: CacheShape,
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    tables: Vec<SlotTable>,
    rows: Vec<RowMap>,
}

impl<B: Backend> LayerCache<B> {
    /// An empty cache with room for `capacity` slots per sequence, in `dtype`.
    pub fn new(
        shape: CacheShape,
        capacity: usize,
        tracks_scores: bool,
        dtype: burn::tensor::DType,
        device: &B::Device,
    ) -> Self {
        let dims = [shape.batch, shape.kv_heads, capacity.max(1), shape.head_dim];
        Self {
            shape,
            keys: Tensor::zeros(dims, (device, dtype)),
            values: Tensor::zeros(dims, (device, dtype)),
            tables: vec![SlotTable::new(tracks_scores); shape.batch],
            rows: vec![RowMap::default(); shape.batch],
        }
    }

    /// The cache's fixed dimensions.
    pub fn shape(&self) -> CacheShape {
        self.shape
    }

    /// Slots sequence `seq` holds.
    pub fn len(&self, seq: usize) -> usize {
        self.tables.get(seq).map_or(0, SlotTable::len)
    }

    /// The longest sequence's slot count.
    pub fn max_len(&self) -> usize {
        self.tables.iter().map(SlotTable::len).max().unwrap_or(0)
    }

    /// Slots per sequence the buffers hold before they grow.
    pub fn capacity(&self) -> usize {
        self.keys.dims()[2]
    }

    /// Sequence `seq`'s slot table.
    pub fn table(&self, seq: usize) -> Result<&SlotTable> {
        let batch = self.shape.batch;
        self.tables
            .get(seq)
            .ok_or(Error::Sequence { index: seq, batch })
    }

    /// The buffer row of each of sequence `seq`'s slots, in slot order.
    pub fn rows(&self, seq: usize) -> Result<&[usize]> {
        self.row_map(seq).map(RowMap::rows)
    }

    fn row_map(&self, seq: usize) -> Result<&RowMap> {
        let batch = self.shape.batch;
        self.rows
            .get(seq)
            .ok_or(Error::Sequence { index: seq, batch })
    }

    /// Adds a score row in buffer-row order (an attention row over [`LayerCache::keys`])
    /// to sequence `seq`'s slot scores.
    pub fn accumulate_rows(&mut self, seq: usize, by_row: &[f32]) -> Result<()> {
        let map = self.row_map(seq)?;
        if by_row.len() != map.len() {
            return Err(Error::shape("attention row", map.len(), by_row.len()));
        }
        let by_slot = map.to_slot_order(by_row);
        self.table_mut(seq)?.accumulate(&by_slot)
    }

    /// Sequence `seq`'s slot table, for accumulating scores in slot order (see
    /// [`LayerCache::accumulate_rows`] for rows that come from attention).
    pub fn table_mut(&mut self, seq: usize) -> Result<&mut SlotTable> {
        let batch = self.shape.batch;
        self.tables
            .get_mut(seq)
            .ok_or(Error::Sequence { index: seq, batch })
    }

    /// Keys of the valid prefix shared by the batch (`max_len` rows; shorter sequences
    /// are padded with stale data that attention must mask), in buffer-row order: slot `i`
    /// of sequence `b` is row `rows(b)[i]`, and the newest appended slots are the last
    /// rows.
    ///
    /// # Shapes
    /// - returns `[batch, kv_heads, max_len, head_dim]`
    pub fn keys(&self) -> Tensor<B, 4> {
        let len = self.max_len();
        self.keys.clone().narrow(2, 0, len)
    }

    /// Values of the valid prefix, like [`LayerCache::keys`].
    ///
    /// # Shapes
    /// - returns `[batch, kv_heads, max_len, head_dim]`
    pub fn values(&self) -> Tensor<B, 4> {
        let len = self.max_len();
        self.values.clone().narrow(2, 0, len)
    }

    /// Appends `t` slots to every sequence of the batch.
    ///
    /// # Shapes
    /// - `keys`, `values`: `[batch, kv_heads, t, head_dim]` (keys after RoPE)
    /// - `positions[b]`: `t` absolute positions of sequence `b`; `kinds`: `t` kinds
    pub fn append(
        &mut self,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
        positions: &[&[usize]],
        kinds: &[SlotKind],
    ) -> Result<()> {
        let [batch, heads, t, dim] = keys.dims();
        let expected = [
            self.shape.batch,
            self.shape.kv_heads,
            t,
            self.shape.head_dim,
        ];
        for (what, dims) in [
            ("appended keys", keys.dims()),
            ("appended values", values.dims()),
        ] {
            if dims != expected {
                return Err(Error::shape(
                    what,
                    format!("{expected:?}"),
                    format!("{dims:?}"),
                ));
            }
        }
        if positions.len() != batch || positions.iter().any(|p| p.len() != t) || kinds.len() != t {
            return Err(Error::shape(
                "appended positions and kinds",
                format!("{batch} rows of {t}"),
                format!("{} rows, {} kinds", positions.len(), kinds.len()),
            ));
        }
        // Validate every table before touching any buffer, so a bad call changes nothing.
        for (table, pos) in self.tables.iter().zip(positions) {
            table.check_push(pos, kinds)?;
        }
        let lens: Vec<usize> = self.tables.iter().map(SlotTable::len).collect();
        if self.max_len() == 0 && t >= self.capacity() && keys.dtype() == self.keys.dtype() {
            // An empty cache given at least its capacity (a prefill) takes the new keys and
            // values as its buffers: growing a buffer and copying them in would cost two
            // copies of each for the same contents.
            self.keys = keys;
            self.values = values;
        } else if lens.iter().all(|&l| l == lens[0]) {
            self.reserve(self.max_len() + t);
            let at = lens[0]..lens[0] + t;
            self.keys =
                take(&mut self.keys).slice_assign([0..batch, 0..heads, at.clone(), 0..dim], keys);
            self.values =
                take(&mut self.values).slice_assign([0..batch, 0..heads, at, 0..dim], values);
        } else {
            self.reserve(self.max_len() + t);
            for (b, &len) in lens.iter().enumerate() {
                let region = [b..b + 1, 0..heads, len..len + t, 0..dim];
                let k = keys.clone().narrow(0, b, 1);
                let v = values.clone().narrow(0, b, 1);
                self.keys = take(&mut self.keys).slice_assign(region.clone(), k);
                self.values = take(&mut self.values).slice_assign(region, v);
            }
        }
        for (table, pos) in self.tables.iter_mut().zip(positions) {
            table.push(pos, kinds)?;
        }
        for rows in &mut self.rows {
            rows.push(t);
        }
        Ok(())
    }

    /// Applies a validated plan to sequence `seq`: keys, values and slot table together.
    pub fn apply(&mut self, seq: usize, plan: &Plan) -> Result<()> {
        let len = self.table(seq)?.len();
        if plan.old_len() != len {
            return Err(Error::shape("plan length", len, plan.old_len()));
        }
        if plan.is_identity() {
            return Ok(());
        }
        if plan.has_merges() {
            let rows = self.rows[seq].rows();
            let groups: Vec<Vec<(usize, f32)>> = plan
                .weighted_groups(self.tables[seq].scores())
                .into_iter()
                .map(|g| g.into_iter().map(|(slot, w)| (rows[slot], w)).collect())
                .collect();
            self.keys = merge_rows(take(&mut self.keys), seq, len, &groups);
            self.values = merge_rows(take(&mut self.values), seq, len, &groups);
            self.rows[seq].reset(groups.len());
        } else {
            let moves = self.rows[seq].keep(plan.kept(), MAX_COPY_RUNS);
            self.keys = move_rows(take(&mut self.keys), seq, len, &moves);
            self.values = move_rows(take(&mut self.values), seq, len, &moves);
        }
        self.tables[seq].apply(plan)
    }

    /// Bytes the valid slots of every sequence occupy (keys and values).
    pub fn bytes_used(&self) -> usize {
        let per_slot = 2 * self.shape.kv_heads * self.shape.head_dim * self.keys.dtype().size();
        self.tables.iter().map(SlotTable::len).sum::<usize>() * per_slot
    }

    /// Bytes the buffers reserve, capacity included.
    pub fn bytes_reserved(&self) -> usize {
        2 * self.keys.shape().num_elements() * self.keys.dtype().size()
    }

    /// Sets the buffers' capacity to exactly `slots` per sequence, copying the rows in use
    /// (`0..max_len`, see [`crate::rows`]) into new buffers, so that the old ones go back
    /// to the allocator. After a prefill that compressed the cache this returns the
    /// prompt's transient rows; sized to what a sequence can grow to, the buffers never
    /// grow again. Fails, changing nothing, when `slots` is below the longest sequence.
    pub fn set_capacity(&mut self, slots: usize) -> Result<()> {
        let len = self.max_len();
        if slots < len {
            return Err(Error::shape(
                "cache capacity",
                format!("at least {len} slots"),
                slots,
            ));
        }
        if slots == self.capacity() {
            return Ok(());
        }
        self.keys = resized(take(&mut self.keys), len, slots.max(1));
        self.values = resized(take(&mut self.values), len, slots.max(1));
        Ok(())
    }

    /// Grows the buffers (by doubling) so that every sequence can hold `slots` slots.
    pub fn reserve(&mut self, slots: usize) {
        let capacity = self.capacity();
        if slots <= capacity {
            return;
        }
        let new_capacity = slots.max(capacity * 2);
        self.keys = grow(take(&mut self.keys), new_capacity);
        self.values = grow(take(&mut self.values), new_capacity);
    }
}

/// Moves a tensor out of a field, leaving an empty placeholder, so that the buffer stays
/// uniquely owned and backends can update it in place.
fn take<B: Backend>(t: &mut Tensor<B, 4>) -> Tensor<B, 4> {
    let placeholder = Tensor::empty([0, 0, 0, 0], (&t.device(), t.dtype()));
    std::mem::replace(t, placeholder)
}

fn grow<B: Backend>(buffer: Tensor<B, 4>, capacity: usize) -> Tensor<B, 4> {
    let [batch, heads, old, dim] = buffer.dims();
    let extra = Tensor::zeros(
        [batch, heads, capacity - old, dim],
        (&buffer.device(), buffer.dtype()),
    );
    Tensor::cat(vec![buffer, extra], 2)
}

/// A new buffer of `capacity` rows holding the first `len` rows of `buffer`.
fn resized<B: Backend>(buffer: Tensor<B, 4>, len: usize, capacity: usize) -> Tensor<B, 4> {
    let [batch, heads, _, dim] = buffer.dims();
    let fresh = Tensor::zeros(
        [batch, heads, capacity, dim],
        (&buffer.device(), buffer.dtype()),
    );
    if len == 0 {
        return fresh;
    }
    fresh.slice_assign(
        [0..batch, 0..heads, 0..len, 0..dim],
        buffer.narrow(2, 0, len),
    )
}

fn index_tensor<B: Backend>(
    indices: impl IntoIterator<Item = usize>,
    device: &B::Device,
) -> Tensor<B, 1, Int> {
    let data: Vec<i64> = indices.into_iter().map(|i| i as i64).collect();
    let n = data.len();
    Tensor::from_data(TensorData::new(data, [n]), device)
}

/// Carries out a removal's row moves in sequence `seq`'s first `len` rows: each run is one
/// slice and one slice assignment (sources and targets never overlap); a gather is one
/// select of the kept rows into rows `0..kept`.
fn move_rows<B: Backend>(
    buffer: Tensor<B, 4>,
    seq: usize,
    len: usize,
    moves: &RowMoves,
) -> Tensor<B, 4> {
    let [_, heads, _, dim] = buffer.dims();
    let row = seq..seq + 1;
    match moves {
        RowMoves::None => buffer,
        RowMoves::Runs(runs) => runs.iter().fold(buffer, |buffer, &(from, to, n)| {
            let source = buffer
                .clone()
                .slice([row.clone(), 0..heads, from..from + n, 0..dim]);
            buffer.slice_assign([row.clone(), 0..heads, to..to + n, 0..dim], source)
        }),
        RowMoves::Gather(rows) => {
            let device = buffer.device();
            let gathered = buffer
                .clone()
                .slice([row.clone(), 0..heads, 0..len, 0..dim])
                .select(2, index_tensor::<B>(rows.iter().copied(), &device));
            buffer.slice_assign([row, 0..heads, 0..rows.len(), 0..dim], gathered)
        }
    }
}

/// Replaces sequence `seq`'s first `len` rows by the weighted groups: new row `i` is
/// `sum_w w * old[m]` over `groups[i]` (`m` are rows). One gather, one scale, one scatter-add.
fn merge_rows<B: Backend>(
    buffer: Tensor<B, 4>,
    seq: usize,
    len: usize,
    groups: &[Vec<(usize, f32)>],
) -> Tensor<B, 4> {
    let [_, heads, _, dim] = buffer.dims();
    let device = buffer.device();
    let dtype = buffer.dtype();
    let members: Vec<(usize, usize, f32)> = groups
        .iter()
        .enumerate()
        .flat_map(|(new, g)| g.iter().map(move |&(old, w)| (new, old, w)))
        .collect();
    let m = members.len();
    let sources = index_tensor::<B>(members.iter().map(|x| x.1), &device);
    let targets = index_tensor::<B>(members.iter().map(|x| x.0), &device);
    let weights = Tensor::<B, 4>::from_data(
        TensorData::new(
            members.iter().map(|x| x.2).collect::<Vec<f32>>(),
            [1, 1, m, 1],
        ),
        (&device, dtype),
    );
    let row = seq..seq + 1;
    let gathered = buffer
        .clone()
        .slice([row.clone(), 0..heads, 0..len, 0..dim])
        .select(2, sources)
        * weights;
    let merged = Tensor::zeros([1, heads, groups.len(), dim], (&device, dtype)).select_assign(
        2,
        targets,
        gathered,
        IndexingUpdateOp::Add,
    );
    buffer.slice_assign([row, 0..heads, 0..groups.len(), 0..dim], merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{Decision, MergeWeighting};
    use burn::backend::Flex;
    use burn::tensor::DType;

    type B = Flex;

    /// An empty cache of `batch` sequences, two heads of width 3.
    fn empty(batch: usize, capacity: usize, tracks_scores: bool) -> LayerCache<B> {
        let shape = CacheShape {
            batch,
            kv_heads: 2,
            head_dim: 3,
        };
        LayerCache::new(
            shape,
            capacity,
            tracks_scores,
            DType::F32,
            &Default::default(),
        )
    }

    /// A cache of `batch` sequences whose key (and value, negated) for slot p is p + 100 b.
    fn numbered(batch: usize, lens: &[usize], capacity: usize) -> LayerCache<B> {
        let mut cache = empty(batch, capacity, false);
        for p in 0..*lens.iter().max().unwrap() {
            append_numbered(&mut cache, p);
        }
        cache
    }

    /// Slot values of sequence `b`, head 1, dim 2, in slot order (read through the row
    /// map).
    fn column(cache: &LayerCache<B>, b: usize, values: bool) -> Vec<f32> {
        let t = if values { cache.values() } else { cache.keys() };
        let v: Vec<f32> = t
            .narrow(0, b, 1)
            .narrow(1, 1, 1)
            .narrow(3, 2, 1)
            .into_data()
            .into_vec()
            .unwrap();
        cache.rows(b).unwrap().iter().map(|&r| v[r]).collect()
    }

    /// The patched burn-flex writes in place only when nothing else holds the buffer: a
    /// clone taken before a write, and a view of the buffer written back into it (the
    /// removal's tail shift), must both see the values as they were.
    #[test]
    fn in_place_writes_leave_other_handles_of_the_buffer_untouched() {
        let device = Default::default();
        let data: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let buffer =
            Tensor::<B, 4>::from_data(TensorData::new(data.clone(), [1, 2, 6, 2]), &device);
        let before = buffer.clone();
        let tail = buffer.clone().slice([0..1, 0..2, 3..6, 0..2]);
        let shifted = buffer.slice_assign([0..1, 0..2, 1..4, 0..2], tail.clone());
        let got: Vec<f32> = shifted.into_data().into_vec().unwrap();
        let mut want = data.clone();
        for head in 0..2 {
            for (to, from) in (1..4).zip(3..6) {
                for d in 0..2 {
                    want[head * 12 + to * 2 + d] = data[head * 12 + from * 2 + d];
                }
            }
        }
        assert_eq!(got, want, "rows 3..6 moved to 1..4 of each head");
        assert_eq!(
            before.into_data().into_vec::<f32>().unwrap(),
            data,
            "the clone is unchanged"
        );
        let tail_now: Vec<f32> = tail.into_data().into_vec().unwrap();
        assert_eq!(
            tail_now[..2],
            data[6..8],
            "the view still reads the old rows"
        );
    }

    /// A prompt of at least the capacity, appended to an empty cache, becomes its buffers
    /// (no copy); the next appends land after it, and the caller's handle on the prompt's
    /// keys is not written through.
    #[test]
    fn a_prefill_into_an_empty_cache_keeps_its_rows_and_the_next_appends() {
        let device = Default::default();
        let mut cache = empty(1, 4, false);
        let data: Vec<f32> = (0..6 * 2 * 3).map(|x| x as f32).collect();
        let prompt = Tensor::<B, 4>::from_data(TensorData::new(data, [1, 2, 6, 3]), &device);
        let positions: Vec<usize> = (0..6).collect();
        cache
            .append(
                prompt.clone(),
                -prompt.clone(),
                &[&positions],
                &[SlotKind::Text; 6],
            )
            .unwrap();
        assert_eq!(cache.capacity(), 6);
        append_numbered(&mut cache, 6);
        append_numbered(&mut cache, 7);
        assert_eq!(cache.len(0), 8);
        // Head 1, dim 2 of prompt token i is 6 * 3 + 3 i + 2.
        let want: Vec<f32> = (0..6)
            .map(|i| (20 + 3 * i) as f32)
            .chain([6.0, 7.0])
            .collect();
        assert_eq!(column(&cache, 0, false), want);
        let negated: Vec<f32> = want.iter().map(|x| -x).collect();
        assert_eq!(column(&cache, 0, true), negated);
        let untouched: Vec<f32> = prompt.into_data().into_vec().unwrap();
        assert_eq!(untouched, (0..36).map(|x| x as f32).collect::<Vec<_>>());
    }

    #[test]
    fn growth_keeps_every_slot() {
        let cache = numbered(2, &[9, 9], 2);
        assert!(cache.capacity() >= 9);
        assert_eq!(
            column(&cache, 1, false),
            (100..109).map(|x| x as f32).collect::<Vec<_>>()
        );
        assert_eq!(cache.bytes_used(), 2 * 9 * 2 * 2 * 3 * 4);
    }

    #[test]
    fn set_capacity_keeps_the_rows_in_use_and_refuses_to_cut_them() {
        let mut cache = numbered(2, &[9, 9], 2);
        let plan = Plan::new(Decision::Keep(vec![0, 4, 8]), 9, "t", 0).unwrap();
        cache.apply(1, &plan).unwrap();
        assert!(cache.set_capacity(8).is_err(), "sequence 0 holds 9 slots");
        assert_eq!(cache.len(0), 9);
        cache.set_capacity(9).unwrap();
        assert_eq!(cache.capacity(), 9);
        assert_eq!(cache.bytes_reserved(), 2 * 2 * 2 * 9 * 3 * 4);
        assert_eq!(
            column(&cache, 0, false),
            (0..9).map(|x| x as f32).collect::<Vec<_>>()
        );
        assert_eq!(column(&cache, 1, false), vec![100.0, 104.0, 108.0]);
        assert_eq!(column(&cache, 1, true), vec![-100.0, -104.0, -108.0]);
        // Appends after a resize land in the new buffers.
        append_numbered(&mut cache, 9);
        assert!(cache.capacity() >= 10);
        assert_eq!(column(&cache, 1, false), vec![100.0, 104.0, 108.0, 109.0]);
    }

    #[test]
    fn keep_paths_agree_with_the_slot_table() {
        for kept in [
            vec![0, 1, 2],
            vec![0, 3, 4, 5, 6, 7],
            vec![0, 2, 5, 7],
            vec![1, 2, 6],
        ] {
            let mut cache = numbered(2, &[8, 8], 8);
            let plan = Plan::new(Decision::Keep(kept.clone()), 8, "t", 0).unwrap();
            cache.apply(1, &plan).unwrap();
            let expected: Vec<f32> = kept.iter().map(|&p| (p + 100) as f32).collect();
            assert_eq!(column(&cache, 1, false), expected, "{kept:?}");
            let negated: Vec<f32> = expected.iter().map(|x| -x).collect();
            assert_eq!(column(&cache, 1, true), negated);
            assert_eq!(cache.table(1).unwrap().positions(), kept.as_slice());
            assert_eq!(
                column(&cache, 0, false),
                (0..8).map(|x| x as f32).collect::<Vec<_>>()
            );
        }
    }

    /// Appends slot `p` (key `p + 100 b`) to every sequence.
    fn append_numbered(cache: &mut LayerCache<B>, p: usize) {
        let device = Default::default();
        let batch = cache.shape().batch;
        let data: Vec<f32> = (0..batch)
            .flat_map(|b| vec![(p + 100 * b) as f32; 6])
            .collect();
        let k = Tensor::<B, 4>::from_data(TensorData::new(data, [batch, 2, 1, 3]), &device);
        let pos: Vec<Vec<usize>> = (0..batch).map(|_| vec![p]).collect();
        let refs: Vec<&[usize]> = pos.iter().map(Vec::as_slice).collect();
        cache
            .append(k.clone(), -k, &refs, &[SlotKind::Text])
            .unwrap();
    }

    /// A sink plus a window of 5 sliding over 30 steps: each removal moves one row (the
    /// newest, into the hole) instead of shifting the window, and slot order still reads
    /// the sink and the last five slots, oldest first; a merge afterwards reads its members
    /// through the row map and leaves rows in slot order.
    #[test]
    fn a_sliding_window_moves_one_row_per_step_and_reads_in_slot_order() {
        let mut cache = numbered(2, &[6, 6], 8);
        let mut permuted = 0;
        for p in 6..36 {
            append_numbered(&mut cache, p);
            let plan = Plan::new(Decision::Keep(vec![0, 2, 3, 4, 5, 6]), 7, "t", 0).unwrap();
            cache.apply(1, &plan).unwrap();
            let want: Vec<f32> = std::iter::once(100.0)
                .chain((p - 4..=p).map(|x| (x + 100) as f32))
                .collect();
            assert_eq!(column(&cache, 1, false), want, "step {p}");
            assert_eq!(
                cache.table(1).unwrap().positions()[1..],
                [p - 4, p - 3, p - 2, p - 1, p]
            );
            permuted += usize::from(cache.rows(1).unwrap() != [0, 1, 2, 3, 4, 5]);
        }
        // The window's rows rotate: back in slot order every fifth step.
        assert_eq!(permuted, 24, "rows were moved, not shifted");
        assert_eq!(cache.len(0), 36, "the other sequence kept everything");
        assert_eq!(column(&cache, 0, false)[35], 35.0);
        // Merge slot 2 into slot 1 (mean) and drop slot 3.
        let plan = Plan::new(
            Decision::Merge {
                keep: vec![0, 1, 4, 5],
                into: vec![(2, 1)],
                weighting: MergeWeighting::Mean,
            },
            6,
            "t",
            0,
        )
        .unwrap();
        cache.apply(1, &plan).unwrap();
        assert_eq!(column(&cache, 1, false), vec![100.0, 131.5, 134.0, 135.0]);
        assert_eq!(cache.rows(1).unwrap(), &[0, 1, 2, 3]);
    }

    /// Attention rows come in buffer-row order; the slot scores must land on the slots.
    #[test]
    fn row_ordered_scores_accumulate_onto_their_slots() {
        let mut cache = empty(1, 4, true);
        for p in 0..4 {
            append_numbered(&mut cache, p);
        }
        let plan = Plan::new(Decision::Keep(vec![0, 2, 3]), 4, "t", 0).unwrap();
        cache.apply(0, &plan).unwrap();
        assert_eq!(
            cache.rows(0).unwrap(),
            &[0, 2, 1],
            "slot 3 moved into row 1"
        );
        // Row r scores 10 * (key in row r): slot scores must be 10 * the slot's key.
        cache.accumulate_rows(0, &[0.0, 30.0, 20.0]).unwrap();
        assert_eq!(
            cache.table(0).unwrap().scores().unwrap(),
            &[0.0, 20.0, 30.0]
        );
        assert!(cache.accumulate_rows(0, &[1.0]).is_err());
        assert!(cache.accumulate_rows(1, &[]).is_err(), "no sequence 1");
    }

    #[test]
    fn ragged_sequences_append_at_their_own_length() {
        let mut cache = numbered(2, &[4, 4], 4);
        let plan = Plan::new(Decision::Keep(vec![0, 3]), 4, "t", 0).unwrap();
        cache.apply(0, &plan).unwrap();
        let device = Default::default();
        let data: Vec<f32> = [7.0f32, 107.0].iter().flat_map(|&x| vec![x; 6]).collect();
        let k = Tensor::<B, 4>::from_data(TensorData::new(data, [2, 2, 1, 3]), &device);
        cache
            .append(k.clone(), k, &[&[7], &[7]], &[SlotKind::Text])
            .unwrap();
        assert_eq!(column(&cache, 0, false), vec![0.0, 3.0, 7.0]);
        assert_eq!(
            column(&cache, 1, false),
            vec![100.0, 101.0, 102.0, 103.0, 107.0]
        );
    }

    #[test]
    fn a_bad_append_changes_nothing() {
        let mut cache = numbered(1, &[3], 4);
        let device = Default::default();
        let k = Tensor::<B, 4>::zeros([1, 2, 1, 3], &device);
        let err = cache
            .append(k.clone(), k, &[&[1]], &[SlotKind::Text])
            .unwrap_err();
        assert!(err.to_string().contains("positions"), "{err}");
        assert_eq!(cache.len(0), 3);
        let wrong = Tensor::<B, 4>::zeros([1, 3, 1, 3], &device);
        assert!(
            cache
                .append(wrong.clone(), wrong, &[&[5]], &[SlotKind::Text])
                .is_err()
        );
        assert!(cache.apply(3, &Plan::identity(3)).is_err());
    }
}
