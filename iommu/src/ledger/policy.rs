//! The ledger's policy: which map and unmap requests reach the backend, as which calls, and how
//! the record, the budget and the statistics follow each call.

use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::record::{Record, Run};
use super::{LedgerError, Mapping, MappingSource};
use crate::backend::{Capabilities, DmaBackend, DmaError, DmaProt, FdAccess};

/// Longest single unmap call the ledger issues: IOMMUFD refuses `length >= ULONG_MAX`
/// (`EOVERFLOW`), so a span that long is split into more calls.
const MAX_UNMAP_CALL_LEN: u64 = u64::MAX - 1;

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

/// A cut made in the record, or undone after the call that was to make it failed.
#[derive(Clone, Copy)]
enum CutChange {
    Cut,
    Joined,
}

/// The record of every live mapping in one DMA backend; see the [module docs](crate::ledger).
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
        if let Source::File { file, .. } = source {
            Self::check_file_access(iova, len, file, prot)?;
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

    /// A device gets no access to a file that the descriptor the VMM hands in does not grant:
    /// the kernel does not check (Linux 7.3's `iopt_map_file_pages()` and `memfd_pin_folios()`
    /// only `fget` the fd, so a device-writable mapping of an `O_RDONLY` memfd is accepted and
    /// the device writes the file). Every backend's map by file comes through here.
    fn check_file_access(
        iova: u64,
        len: u64,
        file: BorrowedFd<'_>,
        prot: DmaProt,
    ) -> Result<(), LedgerError> {
        let fd = file.as_raw_fd();
        let fd_access =
            FdAccess::of(file).map_err(|source| LedgerError::FileMode { fd, source })?;
        if !fd_access.grants(prot) {
            return Err(LedgerError::FileAccess {
                iova,
                len,
                fd,
                fd_access,
                requested: prot,
            });
        }
        Ok(())
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
        let last = match self.check_unmap(&state, iova, len) {
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
        if let Err(e) = self.check_unmap_ranges(&state, ranges) {
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
    fn check_unmap_ranges(&self, state: &State, ranges: &[(u64, u64)]) -> Result<(), LedgerError> {
        let mut previous_last: Option<u64> = None;
        for &(iova, len) in ranges {
            let last = self.check_unmap(state, iova, len)?;
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

    /// The checks of an unmap range. Where the backend cuts mappings, a mapping may straddle
    /// either end, but then that end must be aligned to the IOVA alignment (the kernel's
    /// `iopt_area_split()` refuses the cut with `EINVAL`, or, one byte into an area, does not
    /// cut and the unmap fails with `ENOENT`); elsewhere no mapping may straddle either end.
    fn check_unmap(&self, state: &State, iova: u64, len: u64) -> Result<u64, LedgerError> {
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
        if !self.caps.cuts_mappings {
            return match state.record.bisected(iova, last) {
                Some(mapping) => Err(LedgerError::Bisects { iova, len, mapping }),
                None => Ok(last),
            };
        }
        let page_size = self.page_size;
        for at in [Some(iova), last.checked_add(1)].into_iter().flatten() {
            let misaligned = at & (page_size - 1) != 0;
            if misaligned && state.record.straddling(at).is_some() {
                return Err(LedgerError::Misaligned {
                    what: "cut point",
                    value: at,
                    page_size,
                });
            }
        }
        Ok(last)
    }

    /// Unmaps every recorded mapping inside `[first, last]` (the caller made sure none
    /// straddles either end, or that the backend cuts there), merging them into as few calls as
    /// the call length limit allows.
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
        // Runs may still straddle the ends on piece boundaries: split them there, which changes
        // how the record is stored, not which mappings it holds. Where the backend cuts, a
        // mapping straddling an end is cut there as the kernel will cut it: one more mapping.
        let ends = [Some(first), last.checked_add(1)];
        let cuts = ends.map(|at| at.filter(|&at| self.cut_record_at(state, at)));
        if let Err(e) = self.remove_cut_whole(state, report, first, last) {
            if matches!(e, LedgerError::Unmap { .. }) {
                // The call that was to cut there failed: the kernel holds the mapping whole.
                for at in cuts.into_iter().flatten() {
                    if state.record.join_at(at) {
                        Self::follow_cut(state, CutChange::Joined);
                    }
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// Makes `at` a boundary of the record: splits a run there, and, where the backend cuts,
    /// cuts the mapping straddling `at` (returns whether it cut one).
    fn cut_record_at(&self, state: &mut State, at: u64) -> bool {
        if !self.caps.cuts_mappings {
            state.record.split_at(at);
            return false;
        }
        let cut = state.record.cut_at(at);
        if cut {
            Self::follow_cut(state, CutChange::Cut);
        }
        cut
    }

    /// Follows a cut in the record, or its undoing, in the budget and the statistics: each
    /// changes the number of live mappings by one without a map or unmap call of its own.
    fn follow_cut(state: &mut State, change: CutChange) {
        if let Some(budget) = state.budget.as_mut() {
            *budget = match change {
                CutChange::Cut => budget.saturating_sub(1),
                CutChange::Joined => *budget + 1,
            };
        }
        let live = state.record.mappings;
        state.stats.mappings = live;
        state.stats.peak_mappings = state.stats.peak_mappings.max(live);
    }

    /// The calls of [`Ledger::remove_whole_into`] once both ends are record boundaries.
    fn remove_cut_whole(
        &self,
        state: &mut State,
        report: &mut UnmapReport,
        first: u64,
        last: u64,
    ) -> Result<(), LedgerError> {
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

    /// True when some live mapping overlaps `[iova, iova + len)` (false for an empty or
    /// wrapping range).
    pub fn maps_any(&self, iova: u64, len: u64) -> bool {
        match len.checked_sub(1).and_then(|l| iova.checked_add(l)) {
            Some(last) => self.lock().record.overlaps(iova, last),
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
