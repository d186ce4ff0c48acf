//! What a transaction changed.

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

/// A list that keeps its first two items inline, so the common single-run transaction
/// returns its [`Change`] without a heap allocation.
#[derive(Clone, Debug)]
struct SmallList<T: Copy> {
    inline: [T; 2],
    len: usize,
    heap: Vec<T>,
}

impl<T: Copy> SmallList<T> {
    fn new(filler: T) -> Self {
        Self {
            inline: [filler; 2],
            len: 0,
            heap: Vec::new(),
        }
    }

    fn as_slice(&self) -> &[T] {
        if self.heap.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.heap
        }
    }

    fn last_mut(&mut self) -> Option<&mut T> {
        if self.heap.is_empty() {
            self.inline[..self.len].last_mut()
        } else {
            self.heap.last_mut()
        }
    }

    fn push(&mut self, item: T) {
        if self.len < self.inline.len() {
            self.inline[self.len] = item;
        } else {
            if self.heap.is_empty() {
                self.heap.extend_from_slice(&self.inline);
            }
            self.heap.push(item);
        }
        self.len += 1;
    }
}

impl<T: Copy + PartialEq> PartialEq for SmallList<T> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Copy + Eq> Eq for SmallList<T> {}

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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    kind: ChangeKind,
    runs: SmallList<GpaRange>,
    discarded: SmallList<ViewRange>,
    populated: SmallList<ViewRange>,
}

impl Change {
    pub(crate) fn new(kind: ChangeKind) -> Self {
        let filler = GpaRange::from_bounds(0, 1);
        let view_filler = ViewRange {
            view: View::Shared,
            range: filler,
        };
        Self {
            kind,
            runs: SmallList::new(filler),
            discarded: SmallList::new(view_filler),
            populated: SmallList::new(view_filler),
        }
    }

    /// The kind of transaction (and for a conversion, the target attribute).
    pub fn kind(&self) -> ChangeKind {
        self.kind
    }

    /// Maximal runs whose source state changes, in address order.
    pub fn runs(&self) -> &[GpaRange] {
        self.runs.as_slice()
    }

    /// Maximal runs leaving a view, in address order (notified first, as discard).
    pub fn discarded(&self) -> &[ViewRange] {
        self.discarded.as_slice()
    }

    /// Maximal runs joining a view, in address order (notified last, as populate).
    pub fn populated(&self) -> &[ViewRange] {
        self.populated.as_slice()
    }

    /// `true` when nothing changes: the whole range was already in the requested state.
    pub fn is_empty(&self) -> bool {
        self.runs.as_slice().is_empty()
    }

    /// Total bytes in [`Change::runs`].
    pub fn bytes(&self) -> u64 {
        self.runs().iter().map(GpaRange::len).sum()
    }

    pub(crate) fn push_run(&mut self, range: GpaRange) {
        if let Some(last) = self.runs.last_mut() {
            if last.end() == range.start() {
                *last = GpaRange::from_bounds(last.start(), range.end());
                return;
            }
        }
        self.runs.push(range);
    }

    pub(crate) fn push_discarded(&mut self, view: View, range: GpaRange) {
        push_view_run(&mut self.discarded, view, range);
    }

    pub(crate) fn push_populated(&mut self, view: View, range: GpaRange) {
        push_view_run(&mut self.populated, view, range);
    }
}

fn push_view_run(list: &mut SmallList<ViewRange>, view: View, range: GpaRange) {
    if let Some(last) = list.last_mut() {
        if last.view == view && last.range.end() == range.start() {
            last.range = GpaRange::from_bounds(last.range.start(), range.end());
            return;
        }
    }
    list.push(ViewRange { view, range });
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
