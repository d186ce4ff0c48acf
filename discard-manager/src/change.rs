//! What a transaction changed.

use std::fmt;

use crate::range::{Attribute, GpaRange, View};

/// The kind of transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// Set the attribute of a range (`KVM_SET_MEMORY_ATTRIBUTES` / guest_memfd conversion).
    Convert {
        /// The attribute the range now has.
        to: Attribute,
    },
    /// Plug a range (virtio-mem plug).
    Plug,
    /// Unplug a range (virtio-mem unplug).
    Unplug,
}

/// A range of one view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ViewRange {
    /// The view.
    pub view: View,
    /// The range, granule-aligned.
    pub range: GpaRange,
}

/// What a transaction changed (or, inside a [`crate::TransactionStep`], is changing).
///
/// * [`Change::runs`]: the maximal runs whose *source* state changes (the attribute for a
///   conversion, the plug state for plug/unplug), in address order. These are exactly the
///   ranges on which the caller's own step (the KVM attribute change, a backing discard)
///   must act. Granules already in the requested state are not included.
/// * [`Change::discarded`]: the maximal view runs that leave a view, in address order.
///   A conversion of unplugged granules changes the attribute but no view.
/// * [`Change::populated`]: the maximal view runs that join a view, in address order.
///
/// Listeners receive `discarded` and `populated`, clipped to their own ranges.
#[derive(Clone)]
pub struct Change {
    kind: ChangeKind,
    // The common transaction (one run, left by at most one view and joined by at most one,
    // all over that run) is stored inline, 64 bytes with no heap allocation: it is built and
    // returned on every conversion, so its size is copies on the hot path (it was 96 bytes
    // as three separate `Option`s). `items[0]` is the discarded run and `items[1]` the
    // populated one, each present when its flag says so; while `has_run`, both hold the
    // run's range (so that the three lists are slices of `items`), present or not. Any
    // other shape moves the three lists to `heap`, which then replaces them.
    has_run: bool,
    has_discarded: bool,
    has_populated: bool,
    items: [ViewRange; 2],
    heap: Option<Box<HeapLists>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct HeapLists {
    runs: Vec<GpaRange>,
    discarded: Vec<ViewRange>,
    populated: Vec<ViewRange>,
}

/// Which list an item goes to; its slot in the inline items.
#[derive(Clone, Copy)]
enum Which {
    Discarded = 0,
    Populated = 1,
}

impl Change {
    pub(crate) fn new(kind: ChangeKind) -> Self {
        // Absent items: any valid value (never exposed).
        let unused = ViewRange {
            view: View::Shared,
            range: GpaRange::from_bounds(0, 1),
        };
        Self {
            kind,
            has_run: false,
            has_discarded: false,
            has_populated: false,
            items: [unused; 2],
            heap: None,
        }
    }

    /// The change of one run `range` moving from view `old` to view `new` (`None` =
    /// unplugged; the two differ unless both are `None`): the fast path's change.
    pub(crate) fn single(
        kind: ChangeKind,
        range: GpaRange,
        old: Option<View>,
        new: Option<View>,
    ) -> Self {
        debug_assert!(old != new || old.is_none());
        let item = |view: Option<View>| ViewRange {
            view: view.unwrap_or(View::Shared),
            range,
        };
        Self {
            kind,
            has_run: true,
            has_discarded: old.is_some(),
            has_populated: new.is_some(),
            items: [item(old), item(new)],
            heap: None,
        }
    }

    /// The kind of transaction (and for a conversion, the target attribute).
    pub fn kind(&self) -> ChangeKind {
        self.kind
    }

    /// Maximal runs whose source state changes, in address order.
    pub fn runs(&self) -> &[GpaRange] {
        match &self.heap {
            Some(h) => &h.runs,
            None if self.has_run => std::slice::from_ref(&self.items[0].range),
            None => &[],
        }
    }

    /// Maximal runs leaving a view, in address order (notified first, as discard).
    pub fn discarded(&self) -> &[ViewRange] {
        match &self.heap {
            Some(h) => &h.discarded,
            None => self.inline(Which::Discarded),
        }
    }

    /// Maximal runs joining a view, in address order (notified last, as populate).
    pub fn populated(&self) -> &[ViewRange] {
        match &self.heap {
            Some(h) => &h.populated,
            None => self.inline(Which::Populated),
        }
    }

    /// The inline list `which`: its item, or nothing.
    fn inline(&self, which: Which) -> &[ViewRange] {
        let has = match which {
            Which::Discarded => self.has_discarded,
            Which::Populated => self.has_populated,
        };
        if has {
            std::slice::from_ref(&self.items[which as usize])
        } else {
            &[]
        }
    }

    /// `true` when nothing changes: the whole range was already in the requested state.
    pub fn is_empty(&self) -> bool {
        self.runs().is_empty()
    }

    /// Total bytes in [`Change::runs`].
    pub fn bytes(&self) -> u64 {
        self.runs().iter().map(GpaRange::len).sum()
    }

    /// The heap lists, created from the inline ones on first use: for any shape the inline
    /// fields do not hold.
    fn heap(&mut self) -> &mut HeapLists {
        if self.heap.is_none() {
            self.heap = Some(Box::new(HeapLists {
                runs: self.runs().to_vec(),
                discarded: self.discarded().to_vec(),
                populated: self.populated().to_vec(),
            }));
        }
        self.heap.get_or_insert_default()
    }

    pub(crate) fn push_run(&mut self, range: GpaRange) {
        // Inline while there is no view run yet (they must then cover the whole run).
        if self.heap.is_none() && !self.has_discarded && !self.has_populated {
            let run = &self.items[0].range;
            let merged = if !self.has_run {
                Some(range)
            } else if run.end() == range.start() {
                Some(GpaRange::from_bounds(run.start(), range.end()))
            } else {
                None
            };
            if let Some(run) = merged {
                self.has_run = true;
                self.items[0].range = run;
                self.items[1].range = run;
                return;
            }
        }
        let runs = &mut self.heap().runs;
        match runs.last_mut() {
            Some(last) if last.end() == range.start() => {
                *last = GpaRange::from_bounds(last.start(), range.end());
            }
            _ => runs.push(range),
        }
    }

    pub(crate) fn push_discarded(&mut self, view: View, range: GpaRange) {
        self.push_view_run(Which::Discarded, ViewRange { view, range });
    }

    pub(crate) fn push_populated(&mut self, view: View, range: GpaRange) {
        self.push_view_run(Which::Populated, ViewRange { view, range });
    }

    fn push_view_run(&mut self, which: Which, item: ViewRange) {
        if self.heap.is_none() && self.has_run {
            let has = match which {
                Which::Discarded => &mut self.has_discarded,
                Which::Populated => &mut self.has_populated,
            };
            let slot = &mut self.items[which as usize];
            // The first of its list, over the whole run: still the inline shape.
            if !*has && slot.range == item.range {
                *has = true;
                slot.view = item.view;
                return;
            }
        }
        let h = self.heap();
        let list = match which {
            Which::Discarded => &mut h.discarded,
            Which::Populated => &mut h.populated,
        };
        if list.last_mut().is_some_and(|last| extend(last, item)) {
            return;
        }
        list.push(item);
    }
}

impl PartialEq for Change {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.runs() == other.runs()
            && self.discarded() == other.discarded()
            && self.populated() == other.populated()
    }
}

impl Eq for Change {}

impl fmt::Debug for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Change")
            .field("kind", &self.kind)
            .field("runs", &self.runs())
            .field("discarded", &self.discarded())
            .field("populated", &self.populated())
            .finish()
    }
}

/// Extends `last` by `item` when they are adjacent runs of the same view.
fn extend(last: &mut ViewRange, item: ViewRange) -> bool {
    if last.view == item.view && last.range.end() == item.range.start() {
        last.range = GpaRange::from_bounds(last.range.start(), item.range.end());
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, len: u64) -> GpaRange {
        GpaRange::new(start, len).unwrap()
    }

    fn vr(view: View, range: GpaRange) -> ViewRange {
        ViewRange { view, range }
    }

    #[test]
    fn adjacent_runs_merge_and_lists_spill_to_the_heap() {
        let mut c = Change::new(ChangeKind::Plug);
        assert!(c.is_empty());
        c.push_run(r(0, 0x1000));
        c.push_run(r(0x1000, 0x1000));
        assert_eq!(c.runs(), [r(0, 0x2000)]);
        for i in 0..5 {
            c.push_run(r(0x10000 * (i + 1), 0x1000));
        }
        assert_eq!(c.runs().len(), 6);
        assert_eq!(c.runs()[5], r(0x50000, 0x1000));
        assert_eq!(c.bytes(), 0x2000 + 5 * 0x1000);
    }

    #[test]
    fn the_one_run_change_is_small_and_other_shapes_keep_every_run() {
        // Returned by every conversion: a copy of at most four 16-byte moves.
        assert!(size_of::<Change>() <= 64, "{}", size_of::<Change>());
        let single = Change::single(
            ChangeKind::Plug,
            r(0x1000, 0x1000),
            None,
            Some(View::Shared),
        );
        assert_eq!(single.runs(), [r(0x1000, 0x1000)]);
        assert_eq!(single.discarded(), []);
        assert_eq!(single.populated(), [vr(View::Shared, r(0x1000, 0x1000))]);
        // Built piece by piece, the same change is equal to it.
        let mut built = Change::new(ChangeKind::Plug);
        built.push_run(r(0x1000, 0x1000));
        built.push_populated(View::Shared, r(0x1000, 0x1000));
        assert_eq!(built, single);
        // A plugged and an unplugged granule converted together: one run, views over part
        // of it only (the inline form cannot hold that).
        let mut c = Change::new(ChangeKind::Convert {
            to: Attribute::Private,
        });
        c.push_run(r(0, 0x1000));
        c.push_discarded(View::Shared, r(0, 0x1000));
        c.push_populated(View::Private, r(0, 0x1000));
        c.push_run(r(0x1000, 0x1000));
        assert_eq!(c.runs(), [r(0, 0x2000)]);
        assert_eq!(c.discarded(), [vr(View::Shared, r(0, 0x1000))]);
        assert_eq!(c.populated(), [vr(View::Private, r(0, 0x1000))]);
        // And the other way round: the run first, then a view run over part of it.
        let mut d = Change::new(ChangeKind::Unplug);
        d.push_run(r(0, 0x2000));
        d.push_discarded(View::Private, r(0x1000, 0x1000));
        assert_eq!(d.runs(), [r(0, 0x2000)]);
        assert_eq!(d.discarded(), [vr(View::Private, r(0x1000, 0x1000))]);
        assert_eq!(d.populated(), []);
    }

    #[test]
    fn view_runs_merge_only_within_the_same_view() {
        let mut c = Change::new(ChangeKind::Plug);
        c.push_populated(View::Shared, r(0, 0x1000));
        c.push_populated(View::Private, r(0x1000, 0x1000));
        c.push_populated(View::Private, r(0x2000, 0x1000));
        assert_eq!(
            c.populated(),
            [
                ViewRange {
                    view: View::Shared,
                    range: r(0, 0x1000)
                },
                ViewRange {
                    view: View::Private,
                    range: r(0x1000, 0x2000)
                }
            ]
        );
    }
}
