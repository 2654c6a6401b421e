//! Which buffer row holds each slot of one sequence.
//!
//! Attention does not care in which order a sequence's slots sit in the key and value
//! buffers, as long as its mask and its score rows use the same order. So removing a slot
//! need not shift every later slot down (for a window policy that is a copy of the whole
//! window, in every layer, at every step): the rows past the new length move into the
//! holes instead, and a [`RowMap`] remembers which row holds which slot. The rows in use
//! stay exactly `0..len`, so appends, masks and the buffers' shapes are as without it.
//!
//! Slot order (what policies see, oldest first) is the [`crate::SlotTable`]'s; row order
//! is the buffers'. They agree until the first removal that moves rows.

/// Where sequence slot `i` lives: row `rows()[i]` of the buffers. Always a permutation of
/// `0..len`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowMap {
    row_of: Vec<usize>,
}

/// How to carry out a keep plan on the buffers, as computed by [`RowMap::keep`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowMoves {
    /// Nothing moves: the kept slots already occupy rows `0..kept`.
    None,
    /// Copy runs of rows, `(from, to, n)`: rows `from..from + n` to `to..to + n`. Sources
    /// lie at or past the new length and targets before it, so runs never overlap.
    Runs(Vec<(usize, usize, usize)>),
    /// Gather these rows, in this order, into rows `0..kept` (slot order restored).
    Gather(Vec<usize>),
}

impl RowMap {
    /// Slots mapped.
    pub fn len(&self) -> usize {
        self.row_of.len()
    }

    /// True when no slot is mapped.
    pub fn is_empty(&self) -> bool {
        self.row_of.is_empty()
    }

    /// The row of every slot, in slot order.
    pub fn rows(&self) -> &[usize] {
        &self.row_of
    }

    /// True while slot `i` sits in row `i` for every slot.
    pub fn is_identity(&self) -> bool {
        self.row_of.iter().enumerate().all(|(i, &r)| i == r)
    }

    /// Maps `n` new slots to the next `n` rows.
    pub fn push(&mut self, n: usize) {
        let len = self.len();
        self.row_of.extend(len..len + n);
    }

    /// Slot `i` in row `i`, for `len` slots (after the buffers were rewritten in slot
    /// order).
    pub fn reset(&mut self, len: usize) {
        self.row_of.clear();
        self.row_of.extend(0..len);
    }

    /// Keeps the slots `kept` (ascending slot indices) and says how the buffers follow:
    /// each kept slot in a row at or past the new length moves into a freed row before
    /// it. When that takes more than `max_runs` runs of rows, the kept rows are gathered
    /// in slot order instead (one gather costs about as much as a few short copies), and
    /// the map becomes the identity.
    pub fn keep(&mut self, kept: &[usize], max_runs: usize) -> RowMoves {
        let new_len = kept.len();
        let kept_rows: Vec<usize> = kept.iter().map(|&s| self.row_of[s]).collect();
        let mut new_rows = kept_rows.clone();
        let mut occupied = vec![false; new_len];
        for &r in new_rows.iter().filter(|&&r| r < new_len) {
            occupied[r] = true;
        }
        let mut holes = (0..new_len).filter(|&r| !occupied[r]);
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for row in new_rows.iter_mut().filter(|r| **r >= new_len) {
            let hole = holes
                .next()
                .expect("as many holes as kept rows past the end");
            match runs.last_mut() {
                Some((from, to, n)) if *from + *n == *row && *to + *n == hole => *n += 1,
                _ => runs.push((*row, hole, 1)),
            }
            *row = hole;
        }
        if runs.is_empty() {
            self.row_of = new_rows;
            return RowMoves::None;
        }
        if runs.len() > max_runs {
            self.reset(new_len);
            return RowMoves::Gather(kept_rows);
        }
        self.row_of = new_rows;
        RowMoves::Runs(runs)
    }

    /// A row-ordered score row (one value per buffer row) in slot order.
    pub fn to_slot_order(&self, by_row: &[f32]) -> Vec<f32> {
        self.row_of.iter().map(|&r| by_row[r]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(len: usize) -> RowMap {
        let mut m = RowMap::default();
        m.push(len);
        m
    }

    /// Applies `moves` to a buffer holding `rows[i]` = the slot in row `i`.
    fn follow(buffer: &mut Vec<usize>, moves: &RowMoves, new_len: usize) {
        match moves {
            RowMoves::None => {}
            RowMoves::Runs(runs) => {
                for &(from, to, n) in runs {
                    for k in 0..n {
                        buffer[to + k] = buffer[from + k];
                    }
                }
            }
            RowMoves::Gather(rows) => *buffer = rows.iter().map(|&r| buffer[r]).collect(),
        }
        buffer.truncate(new_len);
    }

    #[test]
    fn removing_one_slot_moves_only_the_last_row() {
        let mut m = map(10);
        let kept: Vec<usize> = (0..10).filter(|&s| s != 1).collect();
        assert_eq!(m.keep(&kept, 4), RowMoves::Runs(vec![(9, 1, 1)]));
        assert_eq!(m.rows(), &[0, 2, 3, 4, 5, 6, 7, 8, 1]);
    }

    #[test]
    fn keeping_a_prefix_moves_nothing() {
        let mut m = map(6);
        assert_eq!(m.keep(&[0, 1, 2], 4), RowMoves::None);
        assert!(m.is_identity());
    }

    #[test]
    fn a_window_after_sinks_is_one_run_and_scattered_removals_a_gather() {
        let mut m = map(10);
        assert_eq!(
            m.keep(&[0, 5, 6, 7, 8, 9], 4),
            RowMoves::Runs(vec![(6, 1, 4)])
        );
        assert_eq!(m.rows(), &[0, 5, 1, 2, 3, 4]);
        let mut m = map(12);
        let kept = [0, 2, 4, 6, 8, 10];
        assert_eq!(
            m.keep(&kept, 2),
            RowMoves::Gather(kept.to_vec()),
            "three runs over a limit of two"
        );
        assert!(m.is_identity());
    }

    /// Property: through any sequence of appends and removals the buffer, moved as told,
    /// holds in row `rows()[i]` the slot that the slot order says is `i`-th.
    #[test]
    fn rows_follow_the_slots_through_appends_and_removals() {
        let mut state = 0x2545_f491_u64;
        let mut next = |n: usize| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as usize) % n.max(1)
        };
        for max_runs in [0, 1, 4] {
            let mut m = RowMap::default();
            let mut slots: Vec<usize> = Vec::new(); // slot order: ids
            let mut buffer: Vec<usize> = Vec::new(); // row order: ids
            let mut id = 0;
            for _ in 0..300 {
                let add = 1 + next(3);
                for _ in 0..add {
                    slots.push(id);
                    buffer.push(id);
                    id += 1;
                }
                m.push(add);
                let len = slots.len();
                let kept: Vec<usize> = (0..len).filter(|_| next(4) != 0).collect();
                let moves = m.keep(&kept, max_runs);
                follow(&mut buffer, &moves, kept.len());
                slots = kept.iter().map(|&s| slots[s]).collect();
                let mut sorted = m.rows().to_vec();
                sorted.sort_unstable();
                assert_eq!(
                    sorted,
                    (0..slots.len()).collect::<Vec<_>>(),
                    "a permutation"
                );
                let seen: Vec<usize> = m.rows().iter().map(|&r| buffer[r]).collect();
                assert_eq!(seen, slots);
            }
        }
    }

    #[test]
    fn scores_come_back_in_slot_order() {
        let mut m = map(4);
        m.keep(&[0, 2, 3], 4); // row 3 moves to row 1
        assert_eq!(m.rows(), &[0, 2, 1]);
        assert_eq!(m.to_slot_order(&[10.0, 11.0, 12.0]), vec![10.0, 12.0, 11.0]);
    }
}
