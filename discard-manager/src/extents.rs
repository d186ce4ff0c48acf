//! Per-granule state kept as maximal runs (extents), never per page.
//!
//! The map holds one entry per run: `start granule -> state`; a run extends to the next key
//! (or to the end of the region). Invariants, checked by `check_invariants` in tests: key 0
//! exists, and two consecutive entries never hold the same state (runs are maximal).
//! So memory, queries and replays grow with the number of runs, not with the region size.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Included};

use crate::range::{Attribute, View};

/// Combined state of one granule: the two sources of truth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct State {
    pub(crate) plugged: bool,
    pub(crate) attribute: Attribute,
}

impl State {
    /// The view this granule belongs to, `None` when unplugged.
    pub(crate) fn view(self) -> Option<View> {
        self.plugged.then(|| self.attribute.view())
    }

    fn index(self) -> usize {
        usize::from(self.plugged) * 2 + usize::from(self.attribute == Attribute::Private)
    }
}

/// One clipped run of a planned update: granules `[start, end)`, state before and after.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Piece {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) old: State,
    pub(crate) new: State,
}

/// A computed but not yet applied update of `[a, b)`. Valid until the map changes; the
/// manager holds its lock from `plan` to `commit`, so nothing changes in between.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub(crate) pieces: Vec<Piece>,
    /// State of the granule just before the range, if any.
    left: Option<State>,
    /// State of the granule just after the range, if any.
    right: Option<State>,
    key_at_start: bool,
    key_at_end: bool,
}

pub(crate) struct Extents {
    map: BTreeMap<u64, State>,
    granules: u64,
    /// Granules per state, indexed by `State::index`.
    totals: [u64; 4],
}

impl Extents {
    pub(crate) fn new(granules: u64, initial: State) -> Self {
        let mut totals = [0; 4];
        totals[initial.index()] = granules;
        Self {
            map: BTreeMap::from([(0, initial)]),
            granules,
            totals,
        }
    }

    /// Number of runs (map entries).
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Granules currently in `state`.
    pub(crate) fn total(&self, plugged: bool, attribute: Attribute) -> u64 {
        self.totals[State { plugged, attribute }.index()]
    }

    /// Maximal runs overlapping `[a, b)`, clipped to it, in address order.
    pub(crate) fn runs(&self, a: u64, b: u64) -> RunIter<'_> {
        if a >= b {
            // `range` panics on an empty range with both bounds excluded.
            return RunIter {
                rest: self.map.range(0..0),
                cur: None,
                end: b,
            };
        }
        let first = self.map.range(..=a).next_back().map(|(_, &s)| (a, s));
        RunIter {
            rest: self.map.range((Excluded(a), Excluded(b))),
            cur: first,
            end: b,
        }
    }

    /// Computes the update that sets every granule `g` in `[a, b)` to `f(state(g))`, into
    /// `plan` (whose buffer is reused, so the hot path does not allocate).
    pub(crate) fn plan(&self, a: u64, b: u64, f: impl Fn(State) -> State, plan: &mut Plan) {
        plan.pieces.clear();
        let mut before = self.map.range(..=a).rev();
        // Key 0 always exists, so some run contains `a`.
        let Some((&k0, &s0)) = before.next() else {
            return;
        };
        plan.key_at_start = k0 == a;
        plan.left = if k0 < a {
            Some(s0)
        } else {
            before.next().map(|(_, &s)| s)
        };
        plan.key_at_end = false;
        plan.right = None;
        let (mut start, mut state) = (a, s0);
        for (&k, &s) in self.map.range((Excluded(a), Included(b))) {
            if k == b {
                plan.key_at_end = true;
                plan.right = Some(s);
                break;
            }
            plan.pieces.push(Piece {
                start,
                end: k,
                old: state,
                new: f(state),
            });
            (start, state) = (k, s);
        }
        plan.pieces.push(Piece {
            start,
            end: b,
            old: state,
            new: f(state),
        });
        if !plan.key_at_end && b < self.granules {
            plan.right = Some(state);
        }
    }

    /// Applies a plan made by [`Extents::plan`] on the unchanged map, keeping runs maximal.
    pub(crate) fn commit(&mut self, plan: &Plan) {
        let mut prev = plan.left;
        for (i, p) in plan.pieces.iter().enumerate() {
            let len = p.end - p.start;
            self.totals[p.old.index()] -= len;
            self.totals[p.new.index()] += len;
            let exists = i > 0 || plan.key_at_start;
            let needed = prev != Some(p.new);
            self.set_key(p.start, exists, needed, p.old, p.new);
            prev = Some(p.new);
        }
        if let (Some(right), Some(end)) = (plan.right, plan.pieces.last().map(|p| p.end)) {
            self.set_key(end, plan.key_at_end, prev != Some(right), right, right);
        }
    }

    fn set_key(&mut self, key: u64, exists: bool, needed: bool, old: State, new: State) {
        match (exists, needed) {
            (true, true) if old != new => {
                self.map.insert(key, new);
            }
            (true, false) => {
                self.map.remove(&key);
            }
            (false, true) => {
                self.map.insert(key, new);
            }
            _ => {}
        }
    }

    /// Estimated heap bytes of the map, from the layout of std's B-tree nodes (B = 6: a
    /// leaf holds up to 11 entries plus a parent link, an internal node adds 12 child
    /// pointers, every non-root node holds at least 5 entries). It is an upper bound for
    /// that layout; the benchmark measures the real figure with a counting allocator.
    pub(crate) fn heap_bytes_estimate(&self) -> usize {
        #[allow(dead_code)]
        struct LeafLayout {
            parent: usize,
            keys: [u64; 11],
            vals: [State; 11],
            parent_idx: u16,
            len: u16,
        }
        #[allow(dead_code)]
        struct InternalLayout {
            leaf: LeafLayout,
            edges: [usize; 12],
        }
        let entries = self.map.len();
        if entries <= 11 {
            return size_of::<LeafLayout>();
        }
        let nodes = entries.div_ceil(5) + 1;
        let internal = nodes.div_ceil(6) + 1;
        nodes * size_of::<LeafLayout>()
            + internal * (size_of::<InternalLayout>() - size_of::<LeafLayout>())
    }

    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        assert_eq!(self.map.keys().next(), Some(&0), "key 0 missing");
        let mut prev: Option<State> = None;
        for (&k, &s) in &self.map {
            assert!(k < self.granules, "key {k} beyond the region");
            assert_ne!(prev, Some(s), "run at {k} is not maximal");
            prev = Some(s);
        }
        assert_eq!(self.totals.iter().sum::<u64>(), self.granules);
    }
}

/// Iterator over `(start, end, state)` of clipped maximal runs.
pub(crate) struct RunIter<'a> {
    rest: std::collections::btree_map::Range<'a, u64, State>,
    cur: Option<(u64, State)>,
    end: u64,
}

impl Iterator for RunIter<'_> {
    type Item = (u64, u64, State);

    fn next(&mut self) -> Option<Self::Item> {
        let (start, state) = self.cur?;
        match self.rest.next() {
            Some((&k, &s)) => {
                self.cur = Some((k, s));
                Some((start, k, state))
            }
            None => {
                self.cur = None;
                Some((start, self.end, state))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARED: State = State {
        plugged: true,
        attribute: Attribute::Shared,
    };
    const PRIVATE: State = State {
        plugged: true,
        attribute: Attribute::Private,
    };

    fn set(e: &mut Extents, a: u64, b: u64, to: State) {
        let mut plan = Plan::default();
        e.plan(a, b, |_| to, &mut plan);
        e.commit(&plan);
        e.check_invariants();
    }

    #[test]
    fn flipping_one_granule_splits_then_merges_back() {
        let mut e = Extents::new(100, PRIVATE);
        set(&mut e, 40, 41, SHARED);
        assert_eq!(
            e.runs(0, 100).collect::<Vec<_>>(),
            [(0, 40, PRIVATE), (40, 41, SHARED), (41, 100, PRIVATE)]
        );
        assert_eq!(e.total(true, Attribute::Shared), 1);
        set(&mut e, 40, 41, PRIVATE);
        assert_eq!(e.len(), 1);
        assert_eq!(e.total(true, Attribute::Private), 100);
    }

    #[test]
    fn runs_are_clipped_to_the_query() {
        let mut e = Extents::new(100, PRIVATE);
        set(&mut e, 10, 20, SHARED);
        assert_eq!(
            e.runs(15, 25).collect::<Vec<_>>(),
            [(15, 20, SHARED), (20, 25, PRIVATE)]
        );
        assert_eq!(e.runs(0, 5).collect::<Vec<_>>(), [(0, 5, PRIVATE)]);
    }

    #[test]
    fn plan_reports_old_and_new_state_per_run() {
        let mut e = Extents::new(100, PRIVATE);
        set(&mut e, 10, 20, SHARED);
        let mut plan = Plan::default();
        e.plan(5, 15, |_| SHARED, &mut plan);
        let got: Vec<_> = plan
            .pieces
            .iter()
            .map(|p| (p.start, p.end, p.old, p.new))
            .collect();
        assert_eq!(got, [(5, 10, PRIVATE, SHARED), (10, 15, SHARED, SHARED)]);
        e.commit(&plan);
        e.check_invariants();
        assert_eq!(
            e.runs(0, 100).collect::<Vec<_>>(),
            [(0, 5, PRIVATE), (5, 20, SHARED), (20, 100, PRIVATE)]
        );
    }

    #[test]
    fn random_updates_match_a_per_granule_vector() {
        let states = [
            SHARED,
            PRIVATE,
            State {
                plugged: false,
                attribute: Attribute::Shared,
            },
            State {
                plugged: false,
                attribute: Attribute::Private,
            },
        ];
        let mut e = Extents::new(64, PRIVATE);
        let mut model = vec![PRIVATE; 64];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let a = x % 64;
            let b = a + 1 + (x >> 8) % (64 - a);
            let to = states[(x >> 20) as usize % 4];
            set(&mut e, a, b, to);
            model[a as usize..b as usize].fill(to);
            let flat: Vec<State> = e
                .runs(0, 64)
                .flat_map(|(s, t, st)| (s..t).map(move |_| st))
                .collect();
            assert_eq!(flat, model);
        }
    }
}
