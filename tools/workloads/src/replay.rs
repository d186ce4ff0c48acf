//! The model of what a workload's requests do, computed independently of the library: which
//! conversions the VMM must refuse (they touch unplugged memory), and what is shared and what is
//! unplugged after each request. `dma-map` checks a run against it after every step.

use std::collections::BTreeMap;

use crate::{Action, Request, Target, Workload};

/// A set of byte offsets kept as disjoint, non-adjacent extents `[start, end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extents(BTreeMap<u64, u64>);

impl Extents {
    /// The extents touching `[start, end)`: overlapping it or adjacent to it.
    fn touching(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.0
            .range(..=end)
            .rev()
            .take_while(|&(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect()
    }

    /// Adds `[start, end)`, merging what it touches.
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        for (s, e) in self.touching(start, end) {
            self.0.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    /// Takes `[start, end)` out, cutting the extents it overlaps.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        for (s, e) in self.touching(start, end) {
            self.0.remove(&s);
            if s < start {
                self.0.insert(s, start);
            }
            if e > end {
                self.0.insert(end, e);
            }
        }
    }

    /// The parts of the set inside `[start, end)`, in address order.
    pub fn within(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self
            .touching(start, end)
            .into_iter()
            .map(|(s, e)| (s.max(start), e.min(end)))
            .filter(|(s, e)| s < e)
            .collect();
        out.reverse();
        out
    }

    /// True when some of `[start, end)` is in the set.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        !self.within(start, end).is_empty()
    }

    /// True when `offset` is in the set.
    pub fn contains(&self, offset: u64) -> bool {
        self.0
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, &e)| offset < e)
    }

    /// Bytes in the set.
    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }

    /// The extents, in address order.
    pub fn to_vec(&self) -> Vec<(u64, u64)> {
        self.0.iter().map(|(&s, &e)| (s, e)).collect()
    }
}

/// What the VMM must do with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Carry it out.
    Applied,
    /// Refuse it: a conversion of a range holding unplugged memory, which the guest was not
    /// given. Nothing changes.
    RefusedUnplugged,
}

/// A workload's state, request by request: what is shared (plugged and shared: what a device
/// may map) and what is unplugged; everything else is plugged and private. The default is a
/// region with nothing shared and nothing unplugged.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    shared: Extents,
    unplugged: Extents,
}

impl Replay {
    /// The state at the start of `w`: everything private, plugged but for what `w` says.
    pub fn new(w: &Workload) -> Self {
        let mut unplugged = Extents::default();
        for &(start, end) in &w.unplugged_at_start {
            unplugged.insert(start, end);
        }
        Replay {
            shared: Extents::default(),
            unplugged,
        }
    }

    /// What the VMM must do with `r` in this state, changing nothing.
    pub fn outcome(&self, r: &Request) -> Outcome {
        match r.action {
            Action::Convert(_) if self.unplugged.overlaps(r.gpa, r.gpa + r.len) => {
                Outcome::RefusedUnplugged
            }
            _ => Outcome::Applied,
        }
    }

    /// Applies `r` as the VMM must: a conversion over unplugged memory is refused; a plug gives
    /// the unplugged memory of its range its attribute and leaves plugged memory as it is; an
    /// unplug takes the range out of the shared view whatever its attribute.
    pub fn apply(&mut self, r: &Request) -> Outcome {
        let (start, end) = (r.gpa, r.gpa + r.len);
        if self.outcome(r) == Outcome::RefusedUnplugged {
            return Outcome::RefusedUnplugged;
        }
        match r.action {
            Action::Convert(Target::Shared) => self.shared.insert(start, end),
            Action::Convert(Target::Private) => self.shared.remove(start, end),
            Action::Plug(to) => {
                for (s, e) in self.unplugged.within(start, end) {
                    if to == Target::Shared {
                        self.shared.insert(s, e);
                    }
                }
                self.unplugged.remove(start, end);
            }
            Action::Unplug => {
                self.shared.remove(start, end);
                self.unplugged.insert(start, end);
            }
        }
        Outcome::Applied
    }

    /// What is plugged and shared.
    pub fn shared(&self) -> &Extents {
        &self.shared
    }

    /// What is unplugged.
    pub fn unplugged(&self) -> &Extents {
        &self.unplugged
    }
}

/// The shared extents `[start, end)` after every request of `w` applied in order ([`Replay`]):
/// the oracle a run's final state is checked against, computed independently of the library.
pub fn final_shared(w: &Workload) -> Vec<(u64, u64)> {
    let mut replay = Replay::new(w);
    for r in &w.requests {
        replay.apply(r);
    }
    replay.shared().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(action: Action, gpa: u64, len: u64) -> Request {
        Request {
            time_ns: 0,
            action,
            gpa,
            len,
        }
    }

    #[test]
    fn extents_merge_what_touches_and_cut_what_overlaps() {
        let mut x = Extents::default();
        x.insert(0x1000, 0x3000);
        x.insert(0x3000, 0x4000); // adjacent: merges
        x.insert(0x8000, 0x9000);
        assert_eq!(x.to_vec(), [(0x1000, 0x4000), (0x8000, 0x9000)]);
        x.remove(0x2000, 0x2800);
        assert_eq!(
            x.to_vec(),
            [(0x1000, 0x2000), (0x2800, 0x4000), (0x8000, 0x9000)]
        );
        assert_eq!(
            x.within(0x1800, 0x8800),
            [(0x1800, 0x2000), (0x2800, 0x4000), (0x8000, 0x8800)]
        );
        assert!(x.overlaps(0x3fff, 0x5000) && !x.overlaps(0x4000, 0x8000));
        assert!(x.contains(0x1000) && !x.contains(0x2000) && !x.contains(0x9000));
        assert_eq!(x.bytes(), 0x1000 + 0x1800 + 0x1000);
    }

    #[test]
    fn conversions_over_unplugged_memory_are_refused_and_change_nothing() {
        let w = Workload {
            name: String::new(),
            region_size: 0x10_0000,
            unplugged_at_start: vec![(0x8_0000, 0x10_0000)],
            requests: vec![],
        };
        let mut m = Replay::new(&w);
        let shared = |m: &Replay| m.shared().to_vec();
        // Straddling the boundary: refused, although half of it is plugged.
        let straddle = req(Action::Convert(Target::Shared), 0x7_f000, 0x2000);
        assert_eq!(m.apply(&straddle), Outcome::RefusedUnplugged);
        assert!(shared(&m).is_empty());
        assert_eq!(
            m.apply(&req(Action::Convert(Target::Shared), 0x7_e000, 0x2000)),
            Outcome::Applied
        );
        // A plug gives the unplugged part its attribute and leaves the plugged part alone.
        m.apply(&req(Action::Plug(Target::Shared), 0x7_0000, 0x2_0000));
        assert_eq!(shared(&m), [(0x7_e000, 0x9_0000)]);
        assert_eq!(m.unplugged().to_vec(), [(0x9_0000, 0x10_0000)]);
        assert_eq!(m.apply(&straddle), Outcome::Applied);
        // An unplug takes shared memory out of the shared view.
        m.apply(&req(Action::Unplug, 0x8_0000, 0x1_0000));
        assert_eq!(shared(&m), [(0x7_e000, 0x8_0000)]);
        assert_eq!(
            m.unplugged().to_vec(),
            [(0x8_0000, 0x10_0000)],
            "merged with its neighbour"
        );
        m.apply(&req(Action::Plug(Target::Private), 0x8_0000, 0x1_0000));
        assert_eq!(shared(&m), [(0x7_e000, 0x8_0000)]);
    }
}
