//! A set of byte ranges kept as disjoint, merged extents `[start, end)`.
//!
//! Used for the recorded KVM attribute table (the private ranges) and for backing frees a
//! discard policy holds back. Cost grows with the number of extents, not with their size.

use std::collections::BTreeMap;

use discard_manager::GpaRange;

/// The range from the start of the first of `runs` (sorted) to the end of the last; `None` for
/// no runs.
pub(crate) fn span(runs: &[GpaRange]) -> Option<GpaRange> {
    let (first, last) = (runs.first()?, runs.last()?);
    GpaRange::new(first.start(), last.end() - first.start())
}

/// Disjoint, non-adjacent extents `[start, end)`, keyed by start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    extents: BTreeMap<u64, u64>,
    bytes: u64,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `[start, end)`, merging with touching or overlapping extents.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        // Every extent that overlaps or touches [start, end] is absorbed, last first (no list
        // of them is built: this runs on every conversion). Growing `end` finds no new extent
        // (none starts inside an absorbed one), nor does lowering `start` (none touches one).
        while let Some((&s, &e)) = self.extents.range(..=end).next_back() {
            if e < start {
                break;
            }
            self.extents.remove(&s);
            self.bytes -= e - s;
            start = start.min(s);
            end = end.max(e);
        }
        self.extents.insert(start, end);
        self.bytes += end - start;
    }

    /// Removes `[start, end)`, splitting extents that straddle its ends.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // Last overlapping extent first; a piece kept on its left ends at `start`, which
        // stops the walk, and one kept on its right starts at `end`, outside it.
        while let Some((&s, &e)) = self.extents.range(..end).next_back() {
            if e <= start {
                break;
            }
            self.extents.remove(&s);
            self.bytes -= e - s;
            if s < start {
                self.extents.insert(s, start);
                self.bytes += start - s;
            }
            if e > end {
                self.extents.insert(end, e);
                self.bytes += e - end;
            }
        }
    }

    /// The parts of `[start, end)` that are in the set, in order.
    pub fn intersection(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self
            .extents
            .range(..end)
            .rev()
            .take_while(|&(_, &e)| e > start)
            .map(|(&s, &e)| (s.max(start), e.min(end)))
            .collect();
        out.reverse();
        out
    }

    /// True when every byte of `[start, end)` is in the set.
    pub fn contains(&self, start: u64, end: u64) -> bool {
        self.intersection(start, end)
            .first()
            .is_some_and(|&(s, e)| s == start && e == end)
    }

    /// Total bytes in the set.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.extents.len()
    }

    /// True when the set holds no byte.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// The extents in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.extents.iter().map(|(&s, &e)| (s, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn insert_merges_touching_extents_and_remove_splits() {
        let mut s = RangeSet::new();
        s.insert(0, 10);
        s.insert(20, 30);
        s.insert(10, 20);
        assert_eq!(s.iter().collect::<Vec<_>>(), [(0, 30)]);
        s.remove(5, 25);
        assert_eq!(s.iter().collect::<Vec<_>>(), [(0, 5), (25, 30)]);
        assert_eq!(s.bytes(), 10);
        assert!(s.contains(0, 5));
        assert!(!s.contains(0, 6));
        assert_eq!(s.intersection(3, 27), [(3, 5), (25, 27)]);
    }

    proptest! {
        #[test]
        fn matches_a_bitmap_model(ops in proptest::collection::vec((any::<bool>(), 0u64..64, 1u64..16), 1..40)) {
            let mut set = RangeSet::new();
            let mut model = [false; 80];
            for (add, start, len) in ops {
                let end = start + len;
                if add { set.insert(start, end) } else { set.remove(start, end) }
                for b in &mut model[start as usize..end as usize] { *b = add; }
            }
            prop_assert_eq!(set.bytes(), model.iter().filter(|&&b| b).count() as u64);
            for (i, &b) in model.iter().enumerate() {
                prop_assert_eq!(set.contains(i as u64, i as u64 + 1), b);
            }
            // Extents are merged: none touches the next.
            let ext: Vec<_> = set.iter().collect();
            for w in ext.windows(2) { prop_assert!(w[0].1 < w[1].0); }
        }
    }
}
