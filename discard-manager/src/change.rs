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
    // The common transaction (one run, at most one discard and one populate) keeps its
    // lists inline, so that `Change` is small to return and needs no heap allocation;
    // anything larger moves all three lists to `heap`, which then replaces them.
    run: Option<GpaRange>,
    discarded: Option<ViewRange>,
    populated: Option<ViewRange>,
    heap: Option<Box<HeapLists>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct HeapLists {
    runs: Vec<GpaRange>,
    discarded: Vec<ViewRange>,
    populated: Vec<ViewRange>,
}

/// Which list an item goes to.
#[derive(Clone, Copy)]
enum Which {
    Discarded,
    Populated,
}

impl Change {
    pub(crate) fn new(kind: ChangeKind) -> Self {
        Self {
            kind,
            run: None,
            discarded: None,
            populated: None,
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
        let in_view = |view: Option<View>| view.map(|view| ViewRange { view, range });
        Self {
            kind,
            run: Some(range),
            discarded: in_view(old),
            populated: in_view(new),
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
            None => self.run.as_slice(),
        }
    }

    /// Maximal runs leaving a view, in address order (notified first, as discard).
    pub fn discarded(&self) -> &[ViewRange] {
        match &self.heap {
            Some(h) => &h.discarded,
            None => self.discarded.as_slice(),
        }
    }

    /// Maximal runs joining a view, in address order (notified last, as populate).
    pub fn populated(&self) -> &[ViewRange] {
        match &self.heap {
            Some(h) => &h.populated,
            None => self.populated.as_slice(),
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

    /// The heap lists, created from the inline ones on first use.
    fn heap(&mut self) -> &mut HeapLists {
        let (run, discarded, populated) = (self.run, self.discarded, self.populated);
        self.heap.get_or_insert_with(|| {
            Box::new(HeapLists {
                runs: run.into_iter().collect(),
                discarded: discarded.into_iter().collect(),
                populated: populated.into_iter().collect(),
            })
        })
    }

    pub(crate) fn push_run(&mut self, range: GpaRange) {
        if self.heap.is_none() {
            match &mut self.run {
                None => {
                    self.run = Some(range);
                    return;
                }
                Some(last) if last.end() == range.start() => {
                    *last = GpaRange::from_bounds(last.start(), range.end());
                    return;
                }
                Some(_) => {}
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
        if self.heap.is_none() {
            let slot = match which {
                Which::Discarded => &mut self.discarded,
                Which::Populated => &mut self.populated,
            };
            match slot {
                None => {
                    *slot = Some(item);
                    return;
                }
                Some(last) => {
                    if extend(last, item) {
                        return;
                    }
                }
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
