//! The mapping ledger: the one record of what is mapped in a DMA backend, and the only way the
//! rest of the project maps and unmaps.
//!
//! The kernel never splits a mapping (notes/kernel-uapi.md 1.3, 2.2): an unmap must cover whole
//! earlier mappings. Type1v2 refuses a bisecting unmap, but IOMMUFD fails with `ENOENT` *after*
//! removing whatever whole areas came before the bisected one, and neither says how much it
//! removed on failure. So the [`Ledger`] keeps its own exact record and checks every request
//! against it before the kernel sees it:
//! - a map that is empty, has no access, is misaligned to the smallest IOMMU page, wraps around,
//!   falls outside the IOVA ranges (when the backend reports any), overlaps a live mapping or exceeds the mapping budget is
//!   refused with nothing changed;
//! - an unmap whose range would bisect a mapping is refused, naming the mapping; any other unmap
//!   becomes the fewest kernel calls that cover whole mappings (one, gaps allowed, unless the span
//!   would not fit one call's length), and no call at all for a range holding no mapping (native
//!   IOMMUFD answers `ENOENT` there);
//! - [`Ledger::unmap_ranges`] unmaps several sorted, disjoint ranges together: consecutive ones
//!   share a call when no mapping lies in the gap between them (a call never sweeps away a
//!   mapping outside the ranges), every range checked before the first call;
//! - [`Ledger::map_va_pieces`] / [`Ledger::map_file_pieces`] map a range as equal pieces, all or
//!   nothing.
//!
//! The record keeps runs of equal, back-to-back pieces (one entry for a 1 GiB range mapped as
//! 262144 separate 4 KiB mappings), so its memory and its queries grow with the number of runs,
//! like the discard manager's extents, while every piece stays a mapping of its own.
//!
//! ```
//! # use std::os::fd::AsFd;
//! # use std::sync::Arc;
//! use iommu::emulated::{CallKind, EmulatedIommu};
//! use iommu::{DmaProt, Ledger, LedgerError};
//!
//! let iommu = Arc::new(EmulatedIommu::builder().mapping_budget(Some(100)).build());
//! let ledger = Ledger::new(iommu.clone())?;
//! # let path = std::env::temp_dir().join(format!("ledger-doc-{}", std::process::id()));
//! # let file = std::fs::File::options().read(true).write(true).create(true).open(&path)?;
//! # std::fs::remove_file(&path)?;
//! # file.set_len(0x4000)?;
//! // Four 4 KiB granules of a file, each its own mapping, so each can be unmapped alone later.
//! ledger.map_file_pieces(0x10_0000, 0x4000, file.as_fd(), 0, 0x1000, DmaProt::READ_WRITE)?;
//! assert_eq!(ledger.remaining_budget(), Some(96));
//!
//! // Half of a mapping cannot be unmapped: refused before the backend sees it.
//! assert!(matches!(ledger.unmap(0x10_0000, 0x800), Err(LedgerError::Bisects { .. })));
//! // Three whole mappings become one backend call.
//! assert_eq!(ledger.unmap(0x10_1000, 0x3000)?.calls, 1);
//! let last = iommu.calls().last().map(|c| (c.kind, c.iova, c.len));
//! assert_eq!(last, Some((CallKind::Unmap, 0x10_1000, 0x3000)));
//! assert!(ledger.is_mapped(0x10_0000, 0x1000));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Locking
//! One mutex guards the record, the budget and the statistics, and is held across the backend
//! calls of one operation: checking the record and changing the kernel must be one step, or two
//! threads could both pass the overlap check. The kernel serialises calls on one container or
//! IOAS anyway.

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::backend::{Capabilities, DmaBackend, DmaError, DmaProt, IovaRange};

/// Longest single unmap call the ledger issues: IOMMUFD refuses `length >= ULONG_MAX`
/// (`EOVERFLOW`), so a span that long is split into more calls.
const MAX_UNMAP_CALL_LEN: u64 = u64::MAX - 1;

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

/// What an unmap did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnmapReport {
    /// Backend unmap calls issued.
    pub calls: u64,
    /// Bytes the backend reported unmapped.
    pub bytes: u64,
    /// Mappings removed from the record.
    pub mappings: u64,
}

/// Counters kept since the ledger was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LedgerStats {
    /// Successful backend map calls (one per mapping).
    pub map_calls: u64,
    /// Successful backend unmap calls.
    pub unmap_calls: u64,
    /// Backend calls (map or unmap) that returned an error.
    pub failed_calls: u64,
    /// Requests the ledger refused before calling the backend.
    pub refused: u64,
    /// Bytes mapped by successful map calls.
    pub bytes_mapped: u64,
    /// Bytes the backend reported unmapped.
    pub bytes_unmapped: u64,
    /// Live mappings now.
    pub mappings: u64,
    /// Most live mappings at any one time.
    pub peak_mappings: u64,
}

/// A request the ledger refused, or a backend call that failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Reading the backend's capabilities when creating the ledger failed.
    #[error("reading the backend's capabilities failed")]
    Capabilities(#[source] DmaError),
    /// A range of length zero.
    #[error("empty range at iova {iova:#x}")]
    EmptyRange {
        /// Start of the range.
        iova: u64,
    },
    /// A map with neither read nor write access.
    #[error("map of iova {iova:#x} len {len:#x} grants the device no access")]
    NoAccess {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        len: u64,
    },
    /// An address, length, offset or piece length not aligned to the smallest IOMMU page.
    #[error("{what} {value:#x} is not aligned to the IOMMU page size {page_size:#x}")]
    Misaligned {
        /// Which value: "iova", "length", "host address", "file offset" or "piece length".
        what: &'static str,
        /// The value.
        value: u64,
        /// The alignment required.
        page_size: u64,
    },
    /// The range (or its host address or file offset range) wraps around the address space.
    #[error("{what} range at {start:#x} len {len:#x} wraps around")]
    Overflow {
        /// Which range: "iova", "host address" or "file offset".
        what: &'static str,
        /// Start of the range.
        start: u64,
        /// Length of the range.
        len: u64,
    },
    /// The IOVA range is not inside any usable IOVA range of the backend.
    #[error("iova {iova:#x} len {len:#x} is outside the backend's IOVA ranges {ranges:x?}")]
    OutsideIovaRanges {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        len: u64,
        /// The usable ranges, as read when the ledger was created.
        ranges: Vec<IovaRange>,
    },
    /// The map overlaps a live mapping.
    #[error("map of iova {iova:#x} len {len:#x} overlaps live mapping {existing}")]
    Overlap {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        len: u64,
        /// The lowest live mapping it overlaps.
        existing: Mapping,
    },
    /// More mappings were asked for than the backend's budget has left.
    #[error("{requested} more mappings requested but the mapping budget has {remaining} left")]
    BudgetExceeded {
        /// Mappings asked for.
        requested: u64,
        /// Mappings the budget has left.
        remaining: u64,
    },
    /// The piece length is zero or does not divide the range length.
    #[error("piece length {piece_len:#x} does not divide length {len:#x} into whole pieces")]
    PieceLength {
        /// Length of the range.
        len: u64,
        /// The piece length asked for.
        piece_len: u64,
    },
    /// The unmap range would cut a live mapping in two; the kernel cannot split mappings.
    #[error("unmap of iova {iova:#x} len {len:#x} would bisect live mapping {mapping}")]
    Bisects {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        len: u64,
        /// The mapping it would bisect.
        mapping: Mapping,
    },
    /// A list of ranges to unmap is not sorted and disjoint: the range at `iova` starts at or
    /// before the end of the one before it.
    #[error(
        "unmap range at iova {iova:#x} does not start after the previous range's last byte {previous_last:#x}"
    )]
    Unsorted {
        /// Start of the offending range.
        iova: u64,
        /// Last byte of the range before it.
        previous_last: u64,
    },
    /// The backend refused or failed a map; nothing is left mapped by this request.
    #[error("backend map failed")]
    Map(#[source] DmaError),
    /// A map of pieces failed, and unmapping the pieces it had already mapped failed too. Those
    /// pieces stay mapped and recorded (unmap them later or drop the ledger).
    #[error(
        "map of iova {iova:#x} len {len:#x} failed ({map_error}), and undoing the {left_mapped} \
         pieces already mapped failed"
    )]
    Rollback {
        /// Start of the whole request.
        iova: u64,
        /// Length of the whole request.
        len: u64,
        /// Why the map failed.
        map_error: DmaError,
        /// Pieces of this request still mapped and recorded.
        left_mapped: u64,
        /// Why undoing failed.
        #[source]
        source: Box<LedgerError>,
    },
    /// A backend unmap call failed. Its mappings stay recorded as mapped (type1v2 removes nothing
    /// on error; the ledger never issues the bisecting unmaps after which IOMMUFD removes part).
    #[error("backend unmap failed after {done_calls} successful calls")]
    Unmap {
        /// Unmap calls of this request that succeeded before (their mappings are gone).
        done_calls: u64,
        /// The failure.
        #[source]
        source: DmaError,
    },
    /// The backend reported unmapping a different number of bytes than the ledger recorded in
    /// the call's range (or returned [`DmaError::PartialUnmap`]): the record and the kernel
    /// disagreed. The kernel holds no mapping in the
    /// range after a successful unmap, so the ledger drops its records there and, where the
    /// backend reports a mapping budget, re-reads the budget from it.
    #[error(
        "unmap of iova {iova:#x} len {len:#x} removed {unmapped:#x} bytes, the ledger recorded \
         {expected:#x}"
    )]
    UnmapMismatch {
        /// Start of the call's range.
        iova: u64,
        /// Length of the call's range.
        len: u64,
        /// Bytes the ledger had recorded there.
        expected: u64,
        /// Bytes the backend reported.
        unmapped: u64,
    },
}

/// `count` mappings of `piece_len` bytes each, back to back from the IOVA that keys the run, with
/// their sources back to back too. Each piece is one kernel mapping; keeping runs instead of one
/// entry per piece makes the record's size grow with the number of runs, not with the number of
/// 4 KiB granules mapped one by one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    piece_len: u64,
    count: u64,
    prot: DmaProt,
    source: MappingSource,
}

impl Run {
    /// Last IOVA of the run starting at `start` (cannot overflow: every piece was checked).
    fn last(&self, start: u64) -> u64 {
        start + self.piece_len * (self.count - 1) + (self.piece_len - 1)
    }

    /// Bytes in the run (fits: a run lies inside the 64-bit space and is not all of it).
    fn bytes(&self) -> u64 {
        self.piece_len * self.count
    }

    /// Piece `i` of the run starting at `start`.
    fn piece(&self, start: u64, i: u64) -> Mapping {
        let delta = i * self.piece_len;
        Mapping {
            iova: start + delta,
            len: self.piece_len,
            prot: self.prot,
            source: self.source.advance(delta),
        }
    }

    /// The piece of the run starting at `start` that contains `iova` (inside the run).
    fn piece_at(&self, start: u64, iova: u64) -> Mapping {
        self.piece(start, (iova - start) / self.piece_len)
    }

    /// True when a piece of `piece_len` bytes at `iova` from `source` continues this run.
    fn continues(
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
    fn advance(self, delta: u64) -> Self {
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
struct Record {
    runs: BTreeMap<u64, Run>,
    /// Live mappings (pieces) in all runs.
    mappings: u64,
}

impl Record {
    /// The run containing `iova`, with its start.
    fn containing(&self, iova: u64) -> Option<(u64, &Run)> {
        match self.runs.range(..=iova).next_back() {
            Some((&start, run)) if run.last(start) >= iova => Some((start, run)),
            _ => None,
        }
    }

    /// The live mapping containing `iova`.
    fn mapping_at(&self, iova: u64) -> Option<Mapping> {
        self.containing(iova)
            .map(|(start, run)| run.piece_at(start, iova))
    }

    /// The lowest live mapping overlapping `[iova, last]`.
    fn first_overlap(&self, iova: u64, last: u64) -> Option<Mapping> {
        self.mapping_at(iova).or_else(|| {
            self.runs
                .range(iova..=last)
                .next()
                .map(|(&start, run)| run.piece(start, 0))
        })
    }

    /// The run that is exactly `[iova, last]`, if there is one (a buffer unmapped as it was
    /// mapped: the common case, answered with one lookup).
    fn exact_run(&self, iova: u64, last: u64) -> Option<Run> {
        match self.runs.range(..=last).next_back() {
            Some((&start, run)) if start == iova && run.last(start) == last => Some(*run),
            _ => None,
        }
    }

    /// True when a live mapping overlaps `[iova, last]`.
    fn overlaps(&self, iova: u64, last: u64) -> bool {
        self.last_run_to(last)
            .is_some_and(|(start, run)| run.last(start) >= iova)
    }

    /// The run starting last at or before `last`: since runs are disjoint and sorted, the only
    /// one that can overlap a range ending at `last`, and when none does, the run just before
    /// that range (one lookup for both questions).
    fn last_run_to(&self, last: u64) -> Option<(u64, Run)> {
        self.runs
            .range(..=last)
            .next_back()
            .map(|(&start, run)| (start, *run))
    }

    /// A live mapping that `[iova, last]` would cut in two: any such one straddles an end.
    fn bisected(&self, iova: u64, last: u64) -> Option<Mapping> {
        let at_start = self.mapping_at(iova).filter(|m| m.iova < iova);
        at_start.or_else(|| self.mapping_at(last).filter(|m| m.last() > last))
    }

    /// Records `count` new back-to-back mappings of `piece_len` bytes from `iova` (one call
    /// per request, not per piece), extending or joining neighbouring runs they continue.
    /// `before` is the run starting last before `iova` (the new pieces overlap nothing).
    fn push(
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
    fn split_at(&mut self, at: u64) {
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
    fn remove_runs(&mut self, first: u64, last: u64) -> u64 {
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
    fn first_run_in(&self, first: u64, last: u64) -> Option<(u64, Run)> {
        self.runs
            .range(first..)
            .next()
            .filter(|&(&start, _)| start <= last)
            .map(|(&start, run)| (start, *run))
    }

    /// Mappings in the runs starting in `[first, last]`.
    fn count_runs(&self, first: u64, last: u64) -> u64 {
        self.runs.range(first..=last).map(|(_, r)| r.count).sum()
    }

    /// True when `[iova, last]` is covered by live mappings without a gap.
    fn covers(&self, iova: u64, last: u64) -> bool {
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
    fn mappings(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.runs
            .iter()
            .flat_map(|(&start, run)| (0..run.count).map(move |i| run.piece(start, i)))
    }
}

#[derive(Debug)]
struct State {
    record: Record,
    budget: Option<u64>,
    stats: LedgerStats,
}

/// Where a map request's memory comes from.
#[derive(Clone, Copy)]
enum Source<'a> {
    Va(*mut u8),
    File { file: BorrowedFd<'a>, offset: u64 },
}

impl Source<'_> {
    /// The source `delta` bytes further on.
    fn advance(self, delta: u64) -> Self {
        match self {
            Source::Va(p) => Source::Va(p.wrapping_add(delta as usize)),
            Source::File { file, offset } => Source::File {
                file,
                offset: offset + delta,
            },
        }
    }

    fn record(self) -> MappingSource {
        match self {
            Source::Va(p) => MappingSource::HostVa { addr: p as usize },
            Source::File { file, offset } => MappingSource::File {
                fd: file.as_raw_fd(),
                offset,
            },
        }
    }
}

/// The record of every live mapping in one DMA backend; see the [module docs](self).
///
/// Dropping the ledger unmaps whatever is still mapped; use [`Ledger::close`] to see teardown
/// errors.
pub struct Ledger {
    backend: Arc<dyn DmaBackend>,
    caps: Capabilities,
    page_size: u64,
    state: Mutex<State>,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("Ledger")
            .field("backend", &self.backend)
            .field("mappings", &state.record.mappings)
            .field("runs", &state.record.runs.len())
            .field("budget", &state.budget)
            .finish()
    }
}

impl Ledger {
    /// A ledger over `backend`, which must hold no mappings the ledger does not make. Reads the
    /// capabilities (page size, IOVA ranges, mapping budget) once, now.
    ///
    /// # Errors
    /// [`LedgerError::Capabilities`] when the backend cannot report them.
    pub fn new(backend: Arc<dyn DmaBackend>) -> Result<Self, LedgerError> {
        let caps = backend.capabilities().map_err(LedgerError::Capabilities)?;
        Ok(Self {
            page_size: caps.min_page_size(),
            state: Mutex::new(State {
                record: Record::default(),
                budget: caps.mapping_budget,
                stats: LedgerStats::default(),
            }),
            caps,
            backend,
        })
    }

    /// The backend. Mapping or unmapping through it directly puts the ledger out of step.
    pub fn backend(&self) -> &Arc<dyn DmaBackend> {
        &self.backend
    }

    /// The capabilities as read when the ledger was created (the budget in them is the initial
    /// one; see [`Ledger::remaining_budget`]).
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The smallest IOMMU page size: the alignment of every map.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held can only come from a bug between two consistent
        // states (no backend call panics by contract); keep the record usable rather than
        // poisoning every later teardown.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Maps `[iova, iova + len)` to host memory at `host_addr` as one mapping.
    ///
    /// # Safety
    /// As [`DmaBackend::map_va`]: `[host_addr, host_addr + len)` must stay mapped in this process
    /// until this mapping has been unmapped through this ledger (an `unmap`, `unmap_all` or
    /// `close` that covered it returned success, or the ledger was dropped; if that teardown
    /// failed, until the backend itself is closed), and while it is mapped a device may read and
    /// write it at any time, so no Rust reference assuming exclusive or immutable access may exist
    /// to it.
    ///
    /// # Errors
    /// A refusal ([`LedgerError::Overlap`], [`LedgerError::Misaligned`],
    /// [`LedgerError::BudgetExceeded`], ...) before any backend call, or [`LedgerError::Map`];
    /// either way nothing changed.
    pub unsafe fn map_va(
        &self,
        iova: u64,
        len: u64,
        host_addr: *mut u8,
        prot: DmaProt,
    ) -> Result<(), LedgerError> {
        self.map(iova, len, len, prot, Source::Va(host_addr))
    }

    /// Maps `[iova, iova + len)` to host memory at `host_addr` as `len / piece_len` mappings of
    /// `piece_len` bytes each, all or nothing: the budget is checked for all of them first, and
    /// if a piece fails, the pieces this call mapped are unmapped (in one call) before the error
    /// returns.
    ///
    /// # Safety
    /// As [`Ledger::map_va`], for every piece.
    ///
    /// # Errors
    /// As [`Ledger::map_va`], plus [`LedgerError::PieceLength`]; and [`LedgerError::Rollback`]
    /// when undoing a failed request failed too (the error says what stays mapped).
    pub unsafe fn map_va_pieces(
        &self,
        iova: u64,
        len: u64,
        host_addr: *mut u8,
        piece_len: u64,
        prot: DmaProt,
    ) -> Result<(), LedgerError> {
        self.map(iova, len, piece_len, prot, Source::Va(host_addr))
    }

    /// Maps `[iova, iova + len)` to `[offset, offset + len)` of `file` as one mapping. The
    /// backend keeps its own reference to the file while mapped (the kernel pins the pages).
    ///
    /// # Errors
    /// As [`Ledger::map_va`].
    pub fn map_file(
        &self,
        iova: u64,
        len: u64,
        file: BorrowedFd<'_>,
        offset: u64,
        prot: DmaProt,
    ) -> Result<(), LedgerError> {
        self.map(iova, len, len, prot, Source::File { file, offset })
    }

    /// Maps `[iova, iova + len)` to `[offset, offset + len)` of `file` as `len / piece_len`
    /// mappings, all or nothing, like [`Ledger::map_va_pieces`].
    ///
    /// # Errors
    /// As [`Ledger::map_va_pieces`].
    pub fn map_file_pieces(
        &self,
        iova: u64,
        len: u64,
        file: BorrowedFd<'_>,
        offset: u64,
        piece_len: u64,
        prot: DmaProt,
    ) -> Result<(), LedgerError> {
        self.map(iova, len, piece_len, prot, Source::File { file, offset })
    }

    fn map(
        &self,
        iova: u64,
        len: u64,
        piece_len: u64,
        prot: DmaProt,
        source: Source<'_>,
    ) -> Result<(), LedgerError> {
        let mut state = self.lock();
        let (pieces, before) = match self.check_map(&state, iova, len, piece_len, prot, source) {
            Ok(checked) => checked,
            Err(e) => {
                state.stats.refused += 1;
                return Err(e);
            }
        };
        for i in 0..pieces {
            let delta = i * piece_len;
            let piece_iova = iova + delta;
            let piece_source = source.advance(delta);
            let result = match piece_source {
                // SAFETY: `map_va`/`map_va_pieces` pass their caller's contract on for the
                // whole range, and this piece lies inside it; the ledger only unmaps it through
                // this same backend.
                Source::Va(p) => unsafe { self.backend.map_va(piece_iova, piece_len, p, prot) },
                Source::File { file, offset } => self
                    .backend
                    .map_file(piece_iova, piece_len, file, offset, prot),
            };
            if let Err(map_error) = result {
                state.stats.failed_calls += 1;
                Self::record_mapped(&mut state, iova, piece_len, i, prot, source, before);
                return Err(self.undo_pieces(&mut state, iova, len, delta, map_error));
            }
        }
        Self::record_mapped(&mut state, iova, piece_len, pieces, prot, source, before);
        Ok(())
    }

    /// Records the `count` pieces a map request made from `iova` (in one record update: the
    /// record grows by runs, and the lock is held, so nobody sees it between the calls).
    fn record_mapped(
        state: &mut State,
        iova: u64,
        piece_len: u64,
        count: u64,
        prot: DmaProt,
        source: Source<'_>,
        before: Option<(u64, Run)>,
    ) {
        state
            .record
            .push(iova, piece_len, count, prot, source.record(), before);
        if let Some(budget) = state.budget.as_mut() {
            *budget -= count;
        }
        let live = state.record.mappings;
        let stats = &mut state.stats;
        stats.map_calls += count;
        stats.bytes_mapped += piece_len * count;
        stats.mappings = live;
        stats.peak_mappings = stats.peak_mappings.max(live);
    }

    /// After a failed piece: unmaps the `done` bytes this request mapped, returns the error.
    fn undo_pieces(
        &self,
        state: &mut State,
        iova: u64,
        len: u64,
        done: u64,
        map_error: DmaError,
    ) -> LedgerError {
        if done == 0 {
            return LedgerError::Map(map_error);
        }
        match self.remove_whole(state, iova, iova + (done - 1)) {
            Ok(_) => LedgerError::Map(map_error),
            Err(undo) => LedgerError::Rollback {
                iova,
                len,
                map_error,
                left_mapped: state.record.count_runs(iova, iova + (done - 1)),
                source: Box::new(undo),
            },
        }
    }

    /// Every check a map request must pass before the backend sees it; returns the piece count
    /// and the run recorded last before `iova` (for [`Record::push`]).
    fn check_map(
        &self,
        state: &State,
        iova: u64,
        len: u64,
        piece_len: u64,
        prot: DmaProt,
        source: Source<'_>,
    ) -> Result<(u64, Option<(u64, Run)>), LedgerError> {
        if len == 0 {
            return Err(LedgerError::EmptyRange { iova });
        }
        if !(prot.read || prot.write) {
            return Err(LedgerError::NoAccess { iova, len });
        }
        let (source_what, source_start) = match source {
            Source::Va(p) => ("host address", p as u64),
            Source::File { offset, .. } => ("file offset", offset),
        };
        let page_size = self.page_size;
        let misaligned = (iova | len | piece_len | source_start) & (page_size - 1) != 0;
        // Which one, only when one is.
        for (what, value) in [
            ("iova", iova),
            ("length", len),
            ("piece length", piece_len),
            (source_what, source_start),
        ]
        .into_iter()
        .filter(|_| misaligned)
        {
            if value & (page_size - 1) != 0 {
                return Err(LedgerError::Misaligned {
                    what,
                    value,
                    page_size,
                });
            }
        }
        if piece_len == 0 || len % piece_len != 0 {
            return Err(LedgerError::PieceLength { len, piece_len });
        }
        let Some(last) = iova.checked_add(len - 1) else {
            return Err(LedgerError::Overflow {
                what: "iova",
                start: iova,
                len,
            });
        };
        if source_start.checked_add(len - 1).is_none() {
            return Err(LedgerError::Overflow {
                what: source_what,
                start: source_start,
                len,
            });
        }
        // An empty list means the backend reported none, and then the kernel restricts nothing
        // (type1's `vfio_iommu_iova_dma_valid()` accepts any IOVA when its list is empty).
        let ranges = &self.caps.iova_ranges;
        if !ranges.is_empty() && !ranges.iter().any(|r| r.contains(iova, len)) {
            return Err(LedgerError::OutsideIovaRanges {
                iova,
                len,
                ranges: self.caps.iova_ranges.clone(),
            });
        }
        let before = state.record.last_run_to(last);
        if before.is_some_and(|(start, run)| run.last(start) >= iova) {
            if let Some(existing) = state.record.first_overlap(iova, last) {
                return Err(LedgerError::Overlap {
                    iova,
                    len,
                    existing,
                });
            }
        }
        let pieces = len / piece_len;
        Self::check_budget_in(state, pieces)?;
        Ok((pieces, before))
    }

    fn check_budget_in(state: &State, additional: u64) -> Result<(), LedgerError> {
        match state.budget {
            Some(remaining) if additional > remaining => Err(LedgerError::BudgetExceeded {
                requested: additional,
                remaining,
            }),
            _ => Ok(()),
        }
    }

    /// Unmaps every mapping inside `[iova, iova + len)` with the fewest backend calls, each
    /// covering whole mappings; a range holding no mapping issues no call and reports zeros.
    ///
    /// # Errors
    /// [`LedgerError::Bisects`] (nothing called, nothing changed) when a mapping straddles either
    /// end of the range; [`LedgerError::EmptyRange`] / [`LedgerError::Overflow`] for a bad
    /// range; [`LedgerError::Unmap`] when a call failed (its mappings stay recorded);
    /// [`LedgerError::UnmapMismatch`] when the backend reported other byte counts.
    pub fn unmap(&self, iova: u64, len: u64) -> Result<UnmapReport, LedgerError> {
        let mut state = self.lock();
        // Fast path: the range is exactly one recorded run (a buffer unmapped as it was
        // mapped): it bisects nothing and needs no split, so one lookup and one call.
        let exact = len.checked_sub(1).and_then(|l| iova.checked_add(l));
        if let Some((last, run)) =
            exact.and_then(|last| Some((last, state.record.exact_run(iova, last)?)))
        {
            if last - iova < MAX_UNMAP_CALL_LEN {
                let mut report = UnmapReport::default();
                self.unmap_call(&mut state, &mut report, iova, last, run.bytes(), run.count)?;
                return Ok(report);
            }
        }
        let last = match Self::check_unmap(&state, iova, len) {
            Ok(last) => last,
            Err(e) => {
                state.stats.refused += 1;
                return Err(e);
            }
        };
        self.remove_whole(&mut state, iova, last)
    }

    /// Unmaps every mapping inside the sorted, disjoint ranges `ranges` (each `(iova, len)`)
    /// with the fewest backend calls: consecutive ranges share one call when the ledger records
    /// no mapping in the gap between them (a call may span gaps holding nothing, as type1v2 and
    /// IOMMUFD allow; it must never sweep away a mapping outside the ranges), within the call
    /// length limit. An empty list, or ranges holding no mapping, issue no call.
    ///
    /// Every range is checked before any call: a refusal changes nothing.
    ///
    /// # Errors
    /// As [`Ledger::unmap`] for each range, plus [`LedgerError::Unsorted`] when a range does not
    /// start after the one before it. A failed call leaves its own mappings and those of every
    /// later call recorded; the calls before it (`done_calls`) are done.
    pub fn unmap_ranges(&self, ranges: &[(u64, u64)]) -> Result<UnmapReport, LedgerError> {
        let mut state = self.lock();
        if let Err(e) = Self::check_unmap_ranges(&state, ranges) {
            state.stats.refused += 1;
            return Err(e);
        }
        let mut report = UnmapReport::default();
        let mut i = 0;
        while i < ranges.len() {
            let (first, mut last) = Self::range_last(ranges[i]);
            let mut j = i + 1;
            // Join the next range while nothing recorded lies between: a call over the gap
            // then removes exactly the mappings of the joined ranges.
            while let Some(&next) = ranges.get(j) {
                let (next_first, next_last) = Self::range_last(next);
                let gap_holds_mapping =
                    next_first > last + 1 && state.record.overlaps(last + 1, next_first - 1);
                if gap_holds_mapping {
                    break;
                }
                last = next_last;
                j += 1;
            }
            self.remove_whole_into(&mut state, &mut report, first, last)?;
            i = j;
        }
        Ok(report)
    }

    /// `(iova, last)` of a range [`Ledger::check_unmap_ranges`] accepted.
    fn range_last((iova, len): (u64, u64)) -> (u64, u64) {
        (iova, iova + (len - 1))
    }

    /// Checks every range of [`Ledger::unmap_ranges`] before any call.
    fn check_unmap_ranges(state: &State, ranges: &[(u64, u64)]) -> Result<(), LedgerError> {
        let mut previous_last: Option<u64> = None;
        for &(iova, len) in ranges {
            let last = Self::check_unmap(state, iova, len)?;
            if let Some(previous_last) = previous_last.filter(|&p| iova <= p) {
                return Err(LedgerError::Unsorted {
                    iova,
                    previous_last,
                });
            }
            previous_last = Some(last);
        }
        Ok(())
    }

    fn check_unmap(state: &State, iova: u64, len: u64) -> Result<u64, LedgerError> {
        if len == 0 {
            return Err(LedgerError::EmptyRange { iova });
        }
        let Some(last) = iova.checked_add(len - 1) else {
            return Err(LedgerError::Overflow {
                what: "iova",
                start: iova,
                len,
            });
        };
        match state.record.bisected(iova, last) {
            Some(mapping) => Err(LedgerError::Bisects { iova, len, mapping }),
            None => Ok(last),
        }
    }

    /// Unmaps every recorded mapping inside `[first, last]` (the caller made sure none
    /// straddles either end), merging them into as few calls as the call length limit allows.
    fn remove_whole(
        &self,
        state: &mut State,
        first: u64,
        last: u64,
    ) -> Result<UnmapReport, LedgerError> {
        let mut report = UnmapReport::default();
        self.remove_whole_into(state, &mut report, first, last)?;
        Ok(report)
    }

    /// [`Ledger::remove_whole`], adding to `report` (whose calls count as done on failure).
    fn remove_whole_into(
        &self,
        state: &mut State,
        report: &mut UnmapReport,
        first: u64,
        last: u64,
    ) -> Result<(), LedgerError> {
        // Runs may still straddle the ends on piece boundaries: cut them there. This changes how
        // the record is stored, not which mappings it holds.
        state.record.split_at(first);
        if let Some(after) = last.checked_add(1) {
            state.record.split_at(after);
        }
        while let Some((call_start, run)) = state.record.first_run_in(first, last) {
            if run.last(call_start) - call_start > MAX_UNMAP_CALL_LEN - 1 {
                // One run longer than a call may be (only possible from IOVA 0): cut it.
                let fit = (MAX_UNMAP_CALL_LEN / run.piece_len).max(1);
                state.record.split_at(call_start + fit * run.piece_len);
            }
            let mut call_last = call_start;
            let mut expected = 0u64;
            let mut count = 0u64;
            let runs = state.record.runs.range(call_start..);
            for (&start, run) in runs.take_while(|&(&start, _)| start <= last) {
                if count > 0 && run.last(start) - call_start > MAX_UNMAP_CALL_LEN - 1 {
                    break;
                }
                call_last = run.last(start);
                expected += run.bytes();
                count += run.count;
            }
            self.unmap_call(state, report, call_start, call_last, expected, count)?;
            if call_last >= last {
                break;
            }
        }
        Ok(())
    }

    /// One backend unmap call over `[call_start, call_last]`, which holds `count` whole recorded
    /// mappings of `expected` bytes; updates the record, the budget, the statistics and `report`.
    fn unmap_call(
        &self,
        state: &mut State,
        report: &mut UnmapReport,
        call_start: u64,
        call_last: u64,
        expected: u64,
        count: u64,
    ) -> Result<(), LedgerError> {
        let call_len = call_last - call_start + 1;
        let unmapped = match self.backend.unmap(call_start, call_len) {
            Ok(unmapped) => unmapped,
            // The call succeeded but the backend found the count impossible: handled below
            // as the mismatch it is.
            Err(DmaError::PartialUnmap { unmapped, .. }) => unmapped,
            Err(source) => {
                state.stats.failed_calls += 1;
                return Err(LedgerError::Unmap {
                    done_calls: report.calls,
                    source,
                });
            }
        };
        // The kernel holds nothing in the call's range now, whatever it reported.
        state.record.remove_runs(call_start, call_last);
        report.calls += 1;
        report.bytes = report.bytes.saturating_add(unmapped);
        report.mappings += count;
        let live = state.record.mappings;
        let stats = &mut state.stats;
        stats.unmap_calls += 1;
        stats.bytes_unmapped = stats.bytes_unmapped.saturating_add(unmapped);
        stats.mappings = live;
        if unmapped != expected {
            // The record was wrong; trust the backend's own count where it keeps one.
            state.budget = match self.backend.capabilities() {
                Ok(caps) if caps.mapping_budget.is_some() => caps.mapping_budget,
                _ => state.budget.map(|b| b + count),
            };
            return Err(LedgerError::UnmapMismatch {
                iova: call_start,
                len: call_len,
                expected,
                unmapped,
            });
        }
        if let Some(budget) = state.budget.as_mut() {
            *budget += count;
        }
        Ok(())
    }

    /// Unmaps every recorded mapping, with as few calls as possible.
    ///
    /// # Errors
    /// As [`Ledger::unmap`], without the refusals.
    pub fn unmap_all(&self) -> Result<UnmapReport, LedgerError> {
        let mut state = self.lock();
        self.remove_whole(&mut state, 0, u64::MAX)
    }

    /// Unmaps everything and consumes the ledger, returning what teardown did or why it failed
    /// (dropping it does the same but can only swallow the error).
    ///
    /// # Errors
    /// As [`Ledger::unmap_all`]. The mappings that could not be unmapped are tried once more
    /// when the ledger drops.
    pub fn close(self) -> Result<UnmapReport, LedgerError> {
        self.unmap_all()
    }

    /// The live mappings, in IOVA order.
    pub fn mappings(&self) -> Vec<Mapping> {
        self.lock().record.mappings().collect()
    }

    /// Number of live mappings.
    pub fn mapping_count(&self) -> u64 {
        self.lock().record.mappings
    }

    /// Number of runs the record keeps for them (equal pieces back to back count once): what the
    /// record's memory grows with.
    pub fn record_runs(&self) -> u64 {
        self.lock().record.runs.len() as u64
    }

    /// The live mapping containing `iova`, if any.
    pub fn mapping_at(&self, iova: u64) -> Option<Mapping> {
        self.lock().record.mapping_at(iova)
    }

    /// True when every byte of `[iova, iova + len)` is covered by live mappings (false for an
    /// empty or wrapping range).
    pub fn is_mapped(&self, iova: u64, len: u64) -> bool {
        match len.checked_sub(1).and_then(|l| iova.checked_add(l)) {
            Some(last) => self.lock().record.covers(iova, last),
            None => false,
        }
    }

    /// Mappings the budget has left (`None`: no count limit).
    pub fn remaining_budget(&self) -> Option<u64> {
        self.lock().budget
    }

    /// Succeeds when `additional` more mappings fit the budget now, so a caller can refuse a
    /// whole operation up front.
    ///
    /// # Errors
    /// [`LedgerError::BudgetExceeded`] naming what is left.
    pub fn check_budget(&self, additional: u64) -> Result<(), LedgerError> {
        Self::check_budget_in(&self.lock(), additional)
    }

    /// Counters since creation.
    pub fn stats(&self) -> LedgerStats {
        self.lock().stats
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let nothing_mapped = state.record.mappings == 0;
        if nothing_mapped {
            return;
        }
        // Drop cannot report the error: `close` is the way to see it. Whatever stays mapped is
        // released by the kernel when the container or IOAS fd closes.
        let _ = self.unmap_all();
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::backend::IovaRange;
    use crate::emulated::test_support::{HostMem, memfd};
    use crate::emulated::{Call, CallKind, EmulatedIommu, UnmapStyle};

    const PAGE: u64 = 4096;

    fn ledger_on(iommu: EmulatedIommu) -> (Arc<EmulatedIommu>, Ledger) {
        let iommu = Arc::new(iommu);
        let ledger = Ledger::new(iommu.clone()).unwrap();
        (iommu, ledger)
    }

    fn map(ledger: &Ledger, mem: &HostMem, iova: u64, len: u64) -> Result<(), LedgerError> {
        // SAFETY: every test keeps `mem` alive until after the ledger (declared later, dropped
        // first) has unmapped everything; only the emulator touches it while mapped.
        unsafe { ledger.map_va(iova, len, mem.at(iova), DmaProt::READ_WRITE) }
    }

    fn map_pieces(
        ledger: &Ledger,
        mem: &HostMem,
        iova: u64,
        len: u64,
        piece: u64,
    ) -> Result<(), LedgerError> {
        // SAFETY: as in `map`.
        unsafe { ledger.map_va_pieces(iova, len, mem.at(iova), piece, DmaProt::READ_WRITE) }
    }

    fn unmap_calls(iommu: &EmulatedIommu) -> Vec<(u64, u64)> {
        iommu
            .calls()
            .iter()
            .filter(|c| c.kind == CallKind::Unmap)
            .map(|c| (c.iova, c.len))
            .collect()
    }

    fn spans(ledger: &Ledger) -> Vec<(u64, u64)> {
        ledger.mappings().iter().map(|m| (m.iova, m.len)).collect()
    }

    #[test]
    fn overlapping_map_is_refused_before_the_backend_and_names_the_mapping() {
        let mem = HostMem::new(16 * PAGE as usize);
        let (iommu, ledger) = ledger_on(EmulatedIommu::new());
        map(&ledger, &mem, 4 * PAGE, 2 * PAGE).unwrap();
        iommu.take_calls();
        let err = map(&ledger, &mem, 2 * PAGE, 4 * PAGE).unwrap_err();
        match err {
            LedgerError::Overlap { existing, .. } => {
                assert_eq!((existing.iova, existing.len), (4 * PAGE, 2 * PAGE))
            }
            other => panic!("expected Overlap, got {other:?}"),
        }
        let err = map_pieces(&ledger, &mem, 5 * PAGE, 4 * PAGE, PAGE).unwrap_err();
        assert!(matches!(err, LedgerError::Overlap { .. }), "{err:?}");
        assert!(
            iommu.calls().is_empty(),
            "a refused map must not reach the backend"
        );
        assert_eq!(ledger.stats().refused, 2);
        assert_eq!(spans(&ledger), [(4 * PAGE, 2 * PAGE)]);
    }

    #[test]
    fn misaligned_empty_or_outside_maps_are_refused_before_the_backend() {
        let mem = HostMem::new(16 * PAGE as usize);
        let (iommu, ledger) = ledger_on(
            EmulatedIommu::builder()
                .iova_ranges(vec![IovaRange {
                    start: 0,
                    last: 8 * PAGE - 1,
                }])
                .build(),
        );
        let cases: [(u64, u64, u64, &str); 4] = [
            (0x800, PAGE, 0, "iova"),
            (0, PAGE + 0x200, 0, "length"),
            (0, PAGE, 0x10, "host address"),
            (0, 2 * PAGE, 0, "piece length"),
        ];
        for (iova, len, host_off, what_expected) in cases {
            let piece = if what_expected == "piece length" {
                0x800
            } else {
                len
            };
            // SAFETY: refused before anything is mapped.
            let err = unsafe {
                ledger.map_va_pieces(iova, len, mem.at(host_off), piece, DmaProt::READ_WRITE)
            }
            .unwrap_err();
            match err {
                LedgerError::Misaligned { what, .. } => assert_eq!(what, what_expected),
                other => panic!("expected Misaligned, got {other:?}"),
            }
        }
        assert!(matches!(
            map(&ledger, &mem, 0, 0),
            Err(LedgerError::EmptyRange { .. })
        ));
        assert!(matches!(
            map(&ledger, &mem, 7 * PAGE, 2 * PAGE),
            Err(LedgerError::OutsideIovaRanges { .. })
        ));
        assert!(matches!(
            map_pieces(&ledger, &mem, 0, 3 * PAGE, 2 * PAGE),
            Err(LedgerError::PieceLength { .. })
        ));
        let none = DmaProt {
            read: false,
            write: false,
        };
        // SAFETY: refused before anything is mapped.
        let err = unsafe { ledger.map_va(0, PAGE, mem.at(0), none) }.unwrap_err();
        assert!(matches!(err, LedgerError::NoAccess { .. }));
        assert!(iommu.calls().is_empty());
        assert!(ledger.mappings().is_empty());
        // A backend that reports no IOVA ranges is not restricted (type1 without the capability).
        let (_, unrestricted) = ledger_on(EmulatedIommu::builder().iova_ranges(vec![]).build());
        // SAFETY: `mem` outlives `unrestricted`, which unmaps it when dropped.
        unsafe { unrestricted.map_va(1 << 60, PAGE, mem.at(0), DmaProt::READ_WRITE) }.unwrap();
        assert!(unrestricted.is_mapped(1 << 60, PAGE));
    }

    #[test]
    fn budget_is_read_at_creation_counted_and_checked_up_front() {
        let mem = HostMem::new(16 * PAGE as usize);
        let (iommu, ledger) = ledger_on(EmulatedIommu::builder().mapping_budget(Some(3)).build());
        assert_eq!(ledger.remaining_budget(), Some(3));
        ledger.check_budget(3).unwrap();
        map(&ledger, &mem, 0, PAGE).unwrap();
        assert_eq!(ledger.remaining_budget(), Some(2));
        match ledger.check_budget(3) {
            Err(LedgerError::BudgetExceeded {
                requested: 3,
                remaining: 2,
            }) => {}
            other => panic!("expected BudgetExceeded, got {other:?}"),
        }
        iommu.take_calls();
        let err = map_pieces(&ledger, &mem, 4 * PAGE, 3 * PAGE, PAGE).unwrap_err();
        assert!(matches!(
            err,
            LedgerError::BudgetExceeded {
                requested: 3,
                remaining: 2
            }
        ));
        assert!(
            iommu.calls().is_empty(),
            "the budget refusal must come before any map"
        );
        map_pieces(&ledger, &mem, 4 * PAGE, 2 * PAGE, PAGE).unwrap();
        assert_eq!(ledger.remaining_budget(), Some(0));
        assert_eq!(iommu.capabilities().unwrap().mapping_budget, Some(0));
        ledger.unmap(4 * PAGE, 2 * PAGE).unwrap();
        assert_eq!(ledger.remaining_budget(), Some(2));
        assert_eq!(iommu.capabilities().unwrap().mapping_budget, Some(2));
        let (_, unlimited) = ledger_on(EmulatedIommu::new());
        assert_eq!(unlimited.remaining_budget(), None);
        unlimited.check_budget(u64::MAX).unwrap();
    }

    #[test]
    fn bisecting_unmap_is_refused_before_the_backend_and_names_the_mapping() {
        let mem = HostMem::new(16 * PAGE as usize);
        let (iommu, ledger) = ledger_on(EmulatedIommu::new());
        map(&ledger, &mem, 2 * PAGE, 2 * PAGE).unwrap();
        map(&ledger, &mem, 6 * PAGE, 4 * PAGE).unwrap();
        for (iova, len, bisected) in [
            (3 * PAGE, PAGE, 2 * PAGE),
            (0, 3 * PAGE, 2 * PAGE),
            (3 * PAGE, 4 * PAGE, 2 * PAGE),
            (4 * PAGE, 3 * PAGE, 6 * PAGE),
            (2 * PAGE + 1, 16 * PAGE, 2 * PAGE),
        ] {
            match ledger.unmap(iova, len) {
                Err(LedgerError::Bisects { mapping, .. }) => assert_eq!(mapping.iova, bisected),
                other => panic!("unmap({iova:#x}, {len:#x}): expected Bisects, got {other:?}"),
            }
        }
        assert!(unmap_calls(&iommu).is_empty());
        assert_eq!(ledger.mappings().len(), 2);
    }

    #[test]
    fn unmap_merges_whole_mappings_into_one_call_and_skips_empty_ranges() {
        let mem = HostMem::new(32 * PAGE as usize);
        // IOMMUFD style: an empty or bisecting unmap call would fail with ENOENT.
        let (iommu, ledger) = ledger_on(
            EmulatedIommu::builder()
                .unmap_style(UnmapStyle::Iommufd)
                .build(),
        );
        map_pieces(&ledger, &mem, 4 * PAGE, 4 * PAGE, PAGE).unwrap();
        map(&ledger, &mem, 12 * PAGE, 2 * PAGE).unwrap();
        map(&ledger, &mem, 20 * PAGE, PAGE).unwrap();
        // Nothing in [8, 12): no call at all.
        assert_eq!(
            ledger.unmap(8 * PAGE, 4 * PAGE).unwrap(),
            UnmapReport::default()
        );
        assert!(unmap_calls(&iommu).is_empty());
        // The request is wider than the mappings; the call covers exactly first..last mapping.
        let report = ledger.unmap(0, 16 * PAGE).unwrap();
        assert_eq!(
            report,
            UnmapReport {
                calls: 1,
                bytes: 6 * PAGE,
                mappings: 5
            }
        );
        assert_eq!(unmap_calls(&iommu), [(4 * PAGE, 10 * PAGE)]);
        assert_eq!(spans(&ledger), [(20 * PAGE, PAGE)]);
        assert!(ledger.is_mapped(20 * PAGE, PAGE));
        assert!(!ledger.is_mapped(4 * PAGE, PAGE));
    }

    #[test]
    fn unmap_ranges_joins_ranges_whose_gaps_hold_nothing_into_one_call() {
        let mem = HostMem::new(32 * PAGE as usize);
        // IOMMUFD style: a bisecting or empty call would fail with ENOENT.
        let (iommu, ledger) = ledger_on(
            EmulatedIommu::builder()
                .unmap_style(UnmapStyle::Iommufd)
                .build(),
        );
        // [shared A][private B][shared C]: A and C mapped per page, nothing in B.
        map_pieces(&ledger, &mem, 2 * PAGE, 3 * PAGE, PAGE).unwrap();
        map_pieces(&ledger, &mem, 8 * PAGE, 2 * PAGE, PAGE).unwrap();
        map(&ledger, &mem, 20 * PAGE, PAGE).unwrap();
        let report = ledger
            .unmap_ranges(&[(2 * PAGE, 3 * PAGE), (8 * PAGE, 2 * PAGE)])
            .unwrap();
        assert_eq!(
            report,
            UnmapReport {
                calls: 1,
                bytes: 5 * PAGE,
                mappings: 5
            }
        );
        assert_eq!(unmap_calls(&iommu), [(2 * PAGE, 8 * PAGE)]);
        assert_eq!(spans(&ledger), [(20 * PAGE, PAGE)]);
        assert_eq!(ledger.stats().unmap_calls, 1);
        // Nothing mapped in any range: no call; an empty list: no call either.
        iommu.take_calls();
        let none = ledger.unmap_ranges(&[(0, PAGE), (4 * PAGE, PAGE)]).unwrap();
        assert_eq!(none, UnmapReport::default());
        assert_eq!(ledger.unmap_ranges(&[]).unwrap(), UnmapReport::default());
        assert!(unmap_calls(&iommu).is_empty());
    }

    #[test]
    fn unmap_ranges_never_sweeps_a_mapping_in_a_gap() {
        let mem = HostMem::new(32 * PAGE as usize);
        let (iommu, ledger) = ledger_on(EmulatedIommu::new());
        map_pieces(&ledger, &mem, 0, 2 * PAGE, PAGE).unwrap();
        // Between the first two ranges: a mapping the caller does not unmap.
        map(&ledger, &mem, 4 * PAGE, PAGE).unwrap();
        map(&ledger, &mem, 6 * PAGE, PAGE).unwrap();
        map(&ledger, &mem, 9 * PAGE, PAGE).unwrap();
        let report = ledger
            .unmap_ranges(&[(0, 2 * PAGE), (6 * PAGE, PAGE), (8 * PAGE, 2 * PAGE)])
            .unwrap();
        assert_eq!((report.calls, report.mappings), (2, 4));
        assert_eq!(
            unmap_calls(&iommu),
            [(0, 2 * PAGE), (6 * PAGE, 4 * PAGE)],
            "the second call joins the last two ranges over their empty gap"
        );
        assert_eq!(spans(&ledger), [(4 * PAGE, PAGE)]);
    }

    #[test]
    fn unmap_ranges_checks_every_range_before_any_call() {
        let mem = HostMem::new(32 * PAGE as usize);
        let (iommu, ledger) = ledger_on(EmulatedIommu::new());
        map(&ledger, &mem, 0, PAGE).unwrap();
        map(&ledger, &mem, 4 * PAGE, 2 * PAGE).unwrap();
        iommu.take_calls();
        // The second range bisects [4, 6): the first, valid, is not unmapped either.
        match ledger.unmap_ranges(&[(0, PAGE), (5 * PAGE, PAGE)]) {
            Err(LedgerError::Bisects { mapping, .. }) => assert_eq!(mapping.iova, 4 * PAGE),
            other => panic!("expected Bisects, got {other:?}"),
        }
        // Overlapping, unsorted, empty and wrapping lists are refused the same way.
        let unsorted = ledger.unmap_ranges(&[(4 * PAGE, 2 * PAGE), (0, PAGE)]);
        assert!(
            matches!(unsorted, Err(LedgerError::Unsorted { iova: 0, previous_last }) if previous_last == 6 * PAGE - 1),
            "{unsorted:?}"
        );
        let overlapping = ledger.unmap_ranges(&[(0, 2 * PAGE), (PAGE, PAGE)]);
        assert!(matches!(overlapping, Err(LedgerError::Unsorted { .. })));
        let empty = ledger.unmap_ranges(&[(0, PAGE), (8 * PAGE, 0)]);
        assert!(matches!(empty, Err(LedgerError::EmptyRange { .. })));
        let wraps = ledger.unmap_ranges(&[(u64::MAX - PAGE + 1, 2 * PAGE)]);
        assert!(matches!(wraps, Err(LedgerError::Overflow { .. })));
        assert!(iommu.calls().is_empty());
        assert_eq!(spans(&ledger), [(0, PAGE), (4 * PAGE, 2 * PAGE)]);
        assert_eq!(ledger.stats().refused, 5);
    }

    #[test]
    fn unmap_ranges_reports_the_calls_done_before_a_failure() {
        let mem = HostMem::new(32 * PAGE as usize);
        let (iommu, ledger) = ledger_on(EmulatedIommu::new());
        map(&ledger, &mem, 0, PAGE).unwrap();
        map(&ledger, &mem, 2 * PAGE, PAGE).unwrap();
        map(&ledger, &mem, 4 * PAGE, PAGE).unwrap();
        iommu.inject_failures(|kind, iova, _| {
            (*kind == CallKind::Unmap && iova == 4 * PAGE).then_some(libc::EIO)
        });
        // [2] sits in the gap, so two calls: the first succeeds, the second fails.
        let err = ledger
            .unmap_ranges(&[(0, PAGE), (4 * PAGE, PAGE)])
            .unwrap_err();
        assert!(
            matches!(err, LedgerError::Unmap { done_calls: 1, .. }),
            "{err:?}"
        );
        assert_eq!(spans(&ledger), [(2 * PAGE, PAGE), (4 * PAGE, PAGE)]);
        assert_eq!(iommu.mapping_count(), 2);
        assert_eq!(ledger.stats().failed_calls, 1);
    }

    #[test]
    fn unmap_covers_a_single_page_of_a_pieced_range() {
        let mem = HostMem::new(8 * PAGE as usize);
        let (iommu, ledger) = ledger_on(EmulatedIommu::new());
        map_pieces(&ledger, &mem, 0, 8 * PAGE, PAGE).unwrap();
        assert_eq!(ledger.mapping_count(), 8);
        ledger.unmap(3 * PAGE, PAGE).unwrap();
        assert_eq!(unmap_calls(&iommu), [(3 * PAGE, PAGE)]);
        assert!(ledger.is_mapped(0, 3 * PAGE));
        assert!(!ledger.is_mapped(0, 4 * PAGE));
        assert!(ledger.is_mapped(4 * PAGE, 4 * PAGE));
        assert_eq!(
            ledger.mapping_at(5 * PAGE + 7).map(|m| m.iova),
            Some(5 * PAGE)
        );
        assert_eq!(ledger.mapping_at(3 * PAGE), None);
    }

    #[test]
    fn the_record_grows_with_runs_not_with_granules() {
        let mem = HostMem::new(1024 * PAGE as usize);
        let (iommu, ledger) = ledger_on(EmulatedIommu::builder().record_calls(false).build());
        map_pieces(&ledger, &mem, 0, 512 * PAGE, PAGE).unwrap();
        // Continues the run from the same memory, one page at a time.
        for page in 512..1024 {
            map(&ledger, &mem, page * PAGE, PAGE).unwrap();
        }
        assert_eq!((ledger.mapping_count(), ledger.record_runs()), (1024, 1));
        // A page flips to private in the middle: two runs, each piece still its own mapping.
        ledger.unmap(100 * PAGE, PAGE).unwrap();
        assert_eq!((ledger.mapping_count(), ledger.record_runs()), (1023, 2));
        assert_eq!(ledger.mappings().len(), 1023);
        assert_eq!(
            ledger.mapping_at(101 * PAGE + 5),
            Some(Mapping {
                iova: 101 * PAGE,
                len: PAGE,
                prot: DmaProt::READ_WRITE,
                source: MappingSource::HostVa {
                    addr: mem.at(101 * PAGE) as usize
                },
            })
        );
        // And back: the hole is filled and the runs join again.
        map(&ledger, &mem, 100 * PAGE, PAGE).unwrap();
        assert_eq!((ledger.mapping_count(), ledger.record_runs()), (1024, 1));
        // Memory that does not continue the run (another host page) starts a run of its own.
        ledger.unmap(1023 * PAGE, PAGE).unwrap();
        // SAFETY: as in `map`.
        unsafe { ledger.map_va(1023 * PAGE, PAGE, mem.at(0), DmaProt::READ_WRITE) }.unwrap();
        assert_eq!(ledger.record_runs(), 2);
        // Still: half a piece cannot be unmapped, and a run is unmapped in one call.
        assert!(matches!(
            ledger.unmap(5 * PAGE, PAGE / 2),
            Err(LedgerError::Bisects { mapping, .. }) if mapping.iova == 5 * PAGE
        ));
        let report = ledger.unmap(8 * PAGE, 100 * PAGE).unwrap();
        assert_eq!((report.calls, report.mappings), (1, 100));
        assert_eq!(iommu.mapping_count(), 924);
        assert_eq!(ledger.record_runs(), 3);
    }

    #[test]
    fn failed_piece_unmaps_what_the_call_mapped_in_one_call() {
        let mem = HostMem::new(16 * PAGE as usize);
        let (iommu, ledger) = ledger_on(EmulatedIommu::builder().mapping_budget(Some(10)).build());
        map(&ledger, &mem, 0, PAGE).unwrap();
        iommu.inject_failures(|kind, iova, _| {
            (*kind == CallKind::MapVa && iova == 7 * PAGE).then_some(libc::ENOMEM)
        });
        iommu.take_calls();
        let err = map_pieces(&ledger, &mem, 4 * PAGE, 8 * PAGE, PAGE).unwrap_err();
        assert!(matches!(err, LedgerError::Map(DmaError::MapVa { iova, .. }) if iova == 7 * PAGE));
        let calls: Vec<(CallKind, u64, u64)> = iommu
            .calls()
            .iter()
            .map(|c| (c.kind, c.iova, c.len))
            .collect();
        assert_eq!(
            calls,
            [
                (CallKind::MapVa, 4 * PAGE, PAGE),
                (CallKind::MapVa, 5 * PAGE, PAGE),
                (CallKind::MapVa, 6 * PAGE, PAGE),
                (CallKind::MapVa, 7 * PAGE, PAGE),
                (CallKind::Unmap, 4 * PAGE, 3 * PAGE),
            ]
        );
        assert_eq!(spans(&ledger), [(0, PAGE)]);
        assert_eq!(iommu.mapping_count(), 1);
        assert_eq!(ledger.remaining_budget(), Some(9));
        assert_eq!(iommu.capabilities().unwrap().mapping_budget, Some(9));
    }

    #[test]
    fn failed_rollback_is_reported_and_the_record_stays_exact() {
        let mem = HostMem::new(16 * PAGE as usize);
        let (iommu, ledger) = ledger_on(EmulatedIommu::new());
        iommu.inject_failures(|kind, iova, _| match kind {
            CallKind::MapVa if iova == 2 * PAGE => Some(libc::ENOMEM),
            CallKind::Unmap => Some(libc::EIO),
            _ => None,
        });
        let err = map_pieces(&ledger, &mem, 0, 4 * PAGE, PAGE).unwrap_err();
        match &err {
            LedgerError::Rollback {
                left_mapped,
                source,
                ..
            } => {
                assert_eq!(*left_mapped, 2);
                assert!(matches!(**source, LedgerError::Unmap { .. }));
            }
            other => panic!("expected Rollback, got {other:?}"),
        }
        assert_eq!(spans(&ledger), [(0, PAGE), (PAGE, PAGE)]);
        assert_eq!(iommu.mapping_count(), 2);
        iommu.clear_failures();
        assert_eq!(ledger.unmap_all().unwrap().mappings, 2);
        assert_eq!(iommu.mapping_count(), 0);
    }

    #[test]
    fn failed_unmap_call_keeps_the_record() {
        let mem = HostMem::new(8 * PAGE as usize);
        let (iommu, ledger) = ledger_on(EmulatedIommu::new());
        map(&ledger, &mem, 0, 2 * PAGE).unwrap();
        iommu.inject_failures(|kind, _, _| (*kind == CallKind::Unmap).then_some(libc::EIO));
        let err = ledger.unmap(0, 2 * PAGE).unwrap_err();
        assert!(matches!(err, LedgerError::Unmap { done_calls: 0, .. }));
        assert_eq!(spans(&ledger), [(0, 2 * PAGE)]);
        assert_eq!(ledger.stats().failed_calls, 1);
        iommu.clear_failures();
        ledger.unmap(0, 2 * PAGE).unwrap();
    }

    #[test]
    fn byte_count_mismatch_is_an_error_and_the_record_follows_the_kernel() {
        let mem = HostMem::new(8 * PAGE as usize);
        let (iommu, ledger) = ledger_on(EmulatedIommu::builder().mapping_budget(Some(10)).build());
        map(&ledger, &mem, 0, PAGE).unwrap();
        map(&ledger, &mem, PAGE, PAGE).unwrap();
        // Someone unmaps behind the ledger's back.
        assert_eq!(iommu.unmap(PAGE, PAGE).unwrap(), PAGE);
        let err = ledger.unmap(0, 2 * PAGE).unwrap_err();
        match err {
            LedgerError::UnmapMismatch {
                iova: 0,
                len,
                expected,
                unmapped,
            } => {
                assert_eq!((len, expected, unmapped), (2 * PAGE, 2 * PAGE, PAGE))
            }
            other => panic!("expected UnmapMismatch, got {other:?}"),
        }
        assert!(ledger.mappings().is_empty());
        // Budget re-read from the backend rather than counted from a wrong record.
        assert_eq!(ledger.remaining_budget(), Some(10));
    }

    /// Reports one page more than it unmapped, as a kernel bug would, through the backends'
    /// `PartialUnmap`.
    #[derive(Debug)]
    struct OverReporting(EmulatedIommu);

    impl DmaBackend for OverReporting {
        fn capabilities(&self) -> Result<Capabilities, DmaError> {
            self.0.capabilities()
        }
        unsafe fn map_va(
            &self,
            iova: u64,
            len: u64,
            a: *mut u8,
            p: DmaProt,
        ) -> Result<(), DmaError> {
            // SAFETY: the caller's contract, passed on unchanged.
            unsafe { self.0.map_va(iova, len, a, p) }
        }
        fn map_file(
            &self,
            iova: u64,
            len: u64,
            f: BorrowedFd<'_>,
            o: u64,
            p: DmaProt,
        ) -> Result<(), DmaError> {
            self.0.map_file(iova, len, f, o, p)
        }
        fn unmap(&self, iova: u64, len: u64) -> Result<u64, DmaError> {
            let unmapped = self.0.unmap(iova, len)? + PAGE;
            Err(DmaError::PartialUnmap {
                kind: crate::BackendKind::Emulated,
                iova,
                len,
                unmapped,
            })
        }
    }

    #[test]
    fn partial_unmap_from_the_backend_is_a_mismatch_and_the_record_is_cleared() {
        let mem = HostMem::new(4 * PAGE as usize);
        let backend = Arc::new(OverReporting(EmulatedIommu::new()));
        let ledger = Ledger::new(backend.clone()).unwrap();
        map(&ledger, &mem, 0, 2 * PAGE).unwrap();
        match ledger.unmap(0, 2 * PAGE) {
            Err(LedgerError::UnmapMismatch {
                expected, unmapped, ..
            }) => {
                assert_eq!((expected, unmapped), (2 * PAGE, 3 * PAGE))
            }
            other => panic!("expected UnmapMismatch, got {other:?}"),
        }
        assert!(ledger.mappings().is_empty());
        assert_eq!(backend.0.mapping_count(), 0);
    }

    #[test]
    fn map_file_pieces_record_fd_and_offsets() {
        let fd = memfd(8 * PAGE);
        let (iommu, ledger) = ledger_on(EmulatedIommu::new());
        ledger
            .map_file_pieces(
                0x10_0000,
                4 * PAGE,
                fd.as_fd(),
                2 * PAGE,
                2 * PAGE,
                DmaProt::READ_ONLY,
            )
            .unwrap();
        let m = ledger.mappings();
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[1].source,
            MappingSource::File {
                fd: fd.as_raw_fd(),
                offset: 4 * PAGE
            }
        );
        assert_eq!(m[1].prot, DmaProt::READ_ONLY);
        assert_eq!(iommu.page_table()[1].iova, 0x10_0000 + 2 * PAGE);
    }

    #[test]
    fn stats_count_calls_bytes_and_peak() {
        let mem = HostMem::new(8 * PAGE as usize);
        let (_iommu, ledger) = ledger_on(EmulatedIommu::new());
        map_pieces(&ledger, &mem, 0, 4 * PAGE, PAGE).unwrap();
        ledger.unmap(0, 2 * PAGE).unwrap();
        map(&ledger, &mem, 6 * PAGE, PAGE).unwrap();
        ledger.unmap_all().unwrap();
        assert_eq!(
            ledger.stats(),
            LedgerStats {
                map_calls: 5,
                unmap_calls: 2,
                failed_calls: 0,
                refused: 0,
                bytes_mapped: 5 * PAGE,
                bytes_unmapped: 5 * PAGE,
                mappings: 0,
                peak_mappings: 4,
            }
        );
    }

    #[test]
    fn drop_and_close_unmap_everything() {
        let mem = HostMem::new(8 * PAGE as usize);
        let (iommu, ledger) = ledger_on(EmulatedIommu::new());
        map_pieces(&ledger, &mem, 0, 2 * PAGE, PAGE).unwrap();
        map(&ledger, &mem, 4 * PAGE, PAGE).unwrap();
        drop(ledger);
        assert_eq!(iommu.mapping_count(), 0);
        let last: Vec<Call> = iommu
            .calls()
            .into_iter()
            .filter(|c| c.kind == CallKind::Unmap)
            .collect();
        assert_eq!(last.len(), 1, "teardown merges into one call: {last:?}");
        assert_eq!(last[0].result, Ok(3 * PAGE));

        let ledger = Ledger::new(iommu.clone()).unwrap();
        map(&ledger, &mem, 0, PAGE).unwrap();
        iommu.inject_failures(|kind, _, _| (*kind == CallKind::Unmap).then_some(libc::EIO));
        assert!(matches!(ledger.close(), Err(LedgerError::Unmap { .. })));
        // Drop retried once more (and failed again): the mapping is still there.
        assert_eq!(iommu.mapping_count(), 1);
        iommu.clear_failures();
        let ledger = Ledger::new(iommu.clone()).unwrap();
        assert!(ledger.mappings().is_empty());
        assert_eq!(ledger.close().unwrap(), UnmapReport::default());
    }

    #[test]
    fn the_ledger_and_its_errors_can_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Ledger>();
        send_sync::<LedgerError>();
        send_sync::<EmulatedIommu>();
    }

    #[test]
    fn concurrent_single_page_flips_keep_the_record_exact() {
        let mem = HostMem::new(64 * PAGE as usize);
        let (iommu, ledger) = ledger_on(EmulatedIommu::builder().record_calls(false).build());
        let base = mem.at(0) as usize;
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let ledger = &ledger;
                s.spawn(move || {
                    for round in 0..200u64 {
                        let page = (t * 16 + round % 16) * PAGE;
                        let host = (base + page as usize) as *mut u8;
                        // SAFETY: `mem` outlives the scope and the ledger unmaps before drop.
                        unsafe { ledger.map_va(page, PAGE, host, DmaProt::READ_WRITE) }.unwrap();
                        ledger.unmap(page, PAGE).unwrap();
                    }
                });
            }
        });
        assert_eq!(ledger.stats().map_calls, 800);
        assert_eq!(ledger.stats().unmap_calls, 800);
        assert_eq!(iommu.mapping_count(), 0);
    }
}
