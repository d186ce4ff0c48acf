//! The record of live mappings: runs of equal, back-to-back pieces keyed by IOVA, and the
//! queries and updates the ledger's policy makes on them.

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::RawFd;

use crate::backend::DmaProt;

/// What a mapping maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MappingSource {
    /// Host memory of this process.
    HostVa {
        /// Address of the mapping's first byte.
        addr: usize,
    },
    /// A file by descriptor and offset. The ledger does not own the fd; the number is recorded
    /// as it was passed, for reports.
    File {
        /// The fd passed to the map call.
        fd: RawFd,
        /// Offset in the file of the mapping's first byte.
        offset: u64,
    },
}

/// One live mapping: exactly what one successful backend map call created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// First IOVA.
    pub iova: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// Device access.
    pub prot: DmaProt,
    /// What it maps.
    pub source: MappingSource,
}

impl Mapping {
    /// Last IOVA of the mapping (inclusive).
    pub fn last(&self) -> u64 {
        self.iova + (self.len - 1)
    }
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x}]", self.iova, self.last())
    }
}

/// `count` mappings of `piece_len` bytes each, back to back from the IOVA that keys the run, with
/// their sources back to back too. Each piece is one kernel mapping; keeping runs instead of one
/// entry per piece makes the record's size grow with the number of runs, not with the number of
/// 4 KiB granules mapped one by one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Run {
    pub(super) piece_len: u64,
    pub(super) count: u64,
    pub(super) prot: DmaProt,
    pub(super) source: MappingSource,
}

impl Run {
    /// Last IOVA of the run starting at `start` (cannot overflow: every piece was checked).
    pub(super) fn last(&self, start: u64) -> u64 {
        start + self.piece_len * (self.count - 1) + (self.piece_len - 1)
    }

    /// Bytes in the run (fits: a run lies inside the 64-bit space and is not all of it).
    pub(super) fn bytes(&self) -> u64 {
        self.piece_len * self.count
    }

    /// Piece `i` of the run starting at `start`.
    pub(super) fn piece(&self, start: u64, i: u64) -> Mapping {
        let delta = i * self.piece_len;
        Mapping {
            iova: start + delta,
            len: self.piece_len,
            prot: self.prot,
            source: self.source.advance(delta),
        }
    }

    /// The piece of the run starting at `start` that contains `iova` (inside the run).
    pub(super) fn piece_at(&self, start: u64, iova: u64) -> Mapping {
        self.piece(start, (iova - start) / self.piece_len)
    }

    /// True when a piece of `piece_len` bytes at `iova` from `source` continues this run.
    pub(super) fn continues(
        &self,
        start: u64,
        iova: u64,
        piece_len: u64,
        prot: DmaProt,
        source: MappingSource,
    ) -> bool {
        self.piece_len == piece_len
            && self.prot == prot
            && self.last(start).checked_add(1) == Some(iova)
            && self.source.advance(self.bytes()) == source
    }
}

impl MappingSource {
    /// The source `delta` bytes further on.
    pub(super) fn advance(self, delta: u64) -> Self {
        match self {
            MappingSource::HostVa { addr } => MappingSource::HostVa {
                addr: addr.wrapping_add(delta as usize),
            },
            MappingSource::File { fd, offset } => MappingSource::File {
                fd,
                offset: offset.wrapping_add(delta),
            },
        }
    }
}

/// The live mappings, as runs keyed by IOVA. Runs never overlap; adjacent compatible runs are
/// merged when a piece is added, and split where an unmap begins or ends inside one.
#[derive(Debug, Default)]
pub(super) struct Record {
    pub(super) runs: BTreeMap<u64, Run>,
    /// Live mappings (pieces) in all runs.
    pub(super) mappings: u64,
}

impl Record {
    /// The run containing `iova`, with its start.
    pub(super) fn containing(&self, iova: u64) -> Option<(u64, &Run)> {
        match self.runs.range(..=iova).next_back() {
            Some((&start, run)) if run.last(start) >= iova => Some((start, run)),
            _ => None,
        }
    }

    /// The live mapping containing `iova`.
    pub(super) fn mapping_at(&self, iova: u64) -> Option<Mapping> {
        self.containing(iova)
            .map(|(start, run)| run.piece_at(start, iova))
    }

    /// The lowest live mapping overlapping `[iova, last]`.
    pub(super) fn first_overlap(&self, iova: u64, last: u64) -> Option<Mapping> {
        self.mapping_at(iova).or_else(|| {
            self.runs
                .range(iova..=last)
                .next()
                .map(|(&start, run)| run.piece(start, 0))
        })
    }

    /// The run that is exactly `[iova, last]`, if there is one (a buffer unmapped as it was
    /// mapped: the common case, answered with one lookup).
    pub(super) fn exact_run(&self, iova: u64, last: u64) -> Option<Run> {
        match self.runs.range(..=last).next_back() {
            Some((&start, run)) if start == iova && run.last(start) == last => Some(*run),
            _ => None,
        }
    }

    /// True when a live mapping overlaps `[iova, last]`.
    pub(super) fn overlaps(&self, iova: u64, last: u64) -> bool {
        self.last_run_to(last)
            .is_some_and(|(start, run)| run.last(start) >= iova)
    }

    /// The run starting last at or before `last`: since runs are disjoint and sorted, the only
    /// one that can overlap a range ending at `last`, and when none does, the run just before
    /// that range (one lookup for both questions).
    pub(super) fn last_run_to(&self, last: u64) -> Option<(u64, Run)> {
        self.runs
            .range(..=last)
            .next_back()
            .map(|(&start, run)| (start, *run))
    }

    /// A live mapping that `[iova, last]` would cut in two: any such one straddles an end.
    pub(super) fn bisected(&self, iova: u64, last: u64) -> Option<Mapping> {
        let at_start = self.mapping_at(iova).filter(|m| m.iova < iova);
        at_start.or_else(|| self.mapping_at(last).filter(|m| m.last() > last))
    }

    /// The live mapping that holds both `at - 1` and `at`: the one an unmap starting at `at`, or
    /// ending just before it, would cut.
    pub(super) fn straddling(&self, at: u64) -> Option<Mapping> {
        self.mapping_at(at).filter(|m| m.iova < at)
    }

    /// Cuts the mapping straddling `at` in two there, as the kernel splits an area (one more
    /// mapping; the halves keep their access and their sources), and returns true; returns
    /// false when no mapping straddles `at`. Either way `at` then starts a run if one holds it.
    pub(super) fn cut_at(&mut self, at: u64) -> bool {
        let Some((start, run)) = self.containing(at).map(|(s, r)| (s, *r)) else {
            return false;
        };
        let into_piece = (at - start) % run.piece_len;
        if into_piece == 0 {
            self.split_at(at);
            return false;
        }
        // Isolate the piece holding `at` as a run of its own, then replace it by its halves.
        let piece_start = at - into_piece;
        self.split_at(piece_start);
        if let Some(next) = piece_start.checked_add(run.piece_len) {
            self.split_at(next);
        }
        let piece = run.piece_at(start, at);
        self.runs.insert(
            piece_start,
            Run {
                piece_len: into_piece,
                count: 1,
                prot: piece.prot,
                source: piece.source,
            },
        );
        self.runs.insert(
            at,
            Run {
                piece_len: run.piece_len - into_piece,
                count: 1,
                prot: piece.prot,
                source: piece.source.advance(into_piece),
            },
        );
        self.mappings += 1;
        true
    }

    /// Undoes [`Record::cut_at`] at `at` when both halves are still recorded (the call that was
    /// to cut there failed); returns whether it joined them.
    pub(super) fn join_at(&mut self, at: u64) -> bool {
        let Some(right) = self.runs.get(&at).copied() else {
            return false;
        };
        let Some((left_start, left)) = at
            .checked_sub(1)
            .and_then(|before| self.containing(before))
            .map(|(s, r)| (s, *r))
        else {
            return false;
        };
        let halves = left.count == 1
            && right.count == 1
            && left.prot == right.prot
            && left.source.advance(left.piece_len) == right.source;
        if !halves {
            return false;
        }
        self.runs.remove(&at);
        self.runs.insert(
            left_start,
            Run {
                piece_len: left.piece_len + right.piece_len,
                ..left
            },
        );
        self.mappings -= 1;
        true
    }

    /// Records `count` new back-to-back mappings of `piece_len` bytes from `iova` (one call
    /// per request, not per piece), extending or joining neighbouring runs they continue.
    /// `before` is the run starting last before `iova` (the new pieces overlap nothing).
    pub(super) fn push(
        &mut self,
        iova: u64,
        piece_len: u64,
        count: u64,
        prot: DmaProt,
        source: MappingSource,
        before: Option<(u64, Run)>,
    ) {
        if count == 0 {
            return;
        }
        self.mappings += count;
        let bytes = piece_len * count;
        let next_start = iova.checked_add(bytes);
        let follower = next_start.and_then(|n| {
            self.runs
                .get(&n)
                .filter(|r| {
                    r.piece_len == piece_len && r.prot == prot && source.advance(bytes) == r.source
                })
                .map(|r| (n, r.count))
        });
        let extended = match before {
            Some((start, run)) if run.continues(start, iova, piece_len, prot, source) => {
                if let Some(run) = self.runs.get_mut(&start) {
                    run.count += count + follower.map_or(0, |(_, c)| c);
                }
                true
            }
            _ => false,
        };
        if !extended {
            let count = count + follower.map_or(0, |(_, c)| c);
            self.runs.insert(
                iova,
                Run {
                    piece_len,
                    count,
                    prot,
                    source,
                },
            );
        }
        if let Some((n, _)) = follower {
            self.runs.remove(&n);
        }
    }

    /// Makes `at` the start of a run if it falls inside one, on a piece boundary (callers check
    /// boundaries first: an unmap never cuts a piece).
    pub(super) fn split_at(&mut self, at: u64) {
        let Some((start, run)) = self.containing(at).map(|(s, r)| (s, *r)) else {
            return;
        };
        if start == at {
            return;
        }
        let head = (at - start) / run.piece_len;
        let tail = Run {
            count: run.count - head,
            source: run.source.advance(head * run.piece_len),
            ..run
        };
        if let Some(r) = self.runs.get_mut(&start) {
            r.count = head;
        }
        self.runs.insert(at, tail);
    }

    /// Removes every run starting in `[first, last]`; returns the mappings removed.
    pub(super) fn remove_runs(&mut self, first: u64, last: u64) -> u64 {
        let mut removed = 0;
        // Usually a run starts at `first`: take it without a search.
        let mut found = self.runs.remove(&first).map(|run| (first, run));
        loop {
            if found.is_none() {
                let Some(start) = self.first_run_in(first, last).map(|(s, _)| s) else {
                    break;
                };
                found = self.runs.remove(&start).map(|run| (start, run));
            }
            let Some((start, run)) = found.take() else {
                break;
            };
            removed += run.count;
            // Runs are disjoint and removed in address order: none starts after this one
            // inside the range once it reaches the end.
            if run.last(start) >= last {
                break;
            }
        }
        self.mappings -= removed;
        removed
    }

    /// The first run starting in `[first, last]`. Searched by its lower bound only: a
    /// `first..=last` range search descends the tree once per bound, twice the work when the
    /// bounds are far apart (an unmap spanning the gaps of a conversion).
    pub(super) fn first_run_in(&self, first: u64, last: u64) -> Option<(u64, Run)> {
        self.runs
            .range(first..)
            .next()
            .filter(|&(&start, _)| start <= last)
            .map(|(&start, run)| (start, *run))
    }

    /// Mappings in the runs starting in `[first, last]`.
    pub(super) fn count_runs(&self, first: u64, last: u64) -> u64 {
        self.runs.range(first..=last).map(|(_, r)| r.count).sum()
    }

    /// True when `[iova, last]` is covered by live mappings without a gap.
    pub(super) fn covers(&self, iova: u64, last: u64) -> bool {
        let mut cur = iova;
        loop {
            match self.containing(cur) {
                Some((start, run)) => {
                    let end = run.last(start);
                    if end >= last {
                        return true;
                    }
                    cur = end + 1;
                }
                None => return false,
            }
        }
    }

    /// Every live mapping, in IOVA order.
    pub(super) fn mappings(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.runs
            .iter()
            .flat_map(|(&start, run)| (0..run.count).map(move |i| run.piece(start, i)))
    }
}
