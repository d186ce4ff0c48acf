//! Unit tests of the ledger against the emulated IOMMU.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;

use super::*;
use crate::backend::IovaRange;
use crate::backend::{Capabilities, DmaBackend, DmaError, DmaProt, FdAccess};
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
fn maps_any_is_true_exactly_when_a_mapping_overlaps_the_range() {
    let mem = HostMem::new(32 * PAGE as usize);
    let (_iommu, ledger) = ledger_on(EmulatedIommu::new());
    map(&ledger, &mem, 4 * PAGE, 2 * PAGE).unwrap();
    assert!(ledger.maps_any(0, 5 * PAGE));
    assert!(ledger.maps_any(5 * PAGE, PAGE));
    assert!(ledger.maps_any(5 * PAGE + 1, 10 * PAGE));
    assert!(!ledger.maps_any(0, 4 * PAGE));
    assert!(!ledger.maps_any(6 * PAGE, 10 * PAGE));
    // Empty and wrapping ranges hold nothing.
    assert!(!ledger.maps_any(4 * PAGE, 0));
    assert!(!ledger.maps_any(u64::MAX, 2));
    ledger.unmap(4 * PAGE, 2 * PAGE).unwrap();
    assert!(!ledger.maps_any(0, 32 * PAGE));
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
    unsafe fn map_va(&self, iova: u64, len: u64, a: *mut u8, p: DmaProt) -> Result<(), DmaError> {
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

fn cutting() -> EmulatedIommu {
    EmulatedIommu::builder()
        .unmap_style(UnmapStyle::Cutting)
        .build()
}

fn table_spans(iommu: &EmulatedIommu) -> Vec<(u64, u64)> {
    iommu.page_table().iter().map(|e| (e.iova, e.len)).collect()
}

#[test]
fn on_a_cutting_backend_one_run_mapping_is_cut_page_by_page_without_a_window() {
    let mem = HostMem::new(64 * PAGE as usize);
    let (iommu, ledger) = ledger_on(cutting());
    assert!(ledger.capabilities().cuts_mappings);
    // 64 pages shared in one request: one mapping, one call.
    map(&ledger, &mem, 0, 64 * PAGE).unwrap();
    assert_eq!((ledger.mapping_count(), iommu.mapping_count()), (1, 1));
    iommu.take_calls();
    for page in [10, 11, 40, 63, 0] {
        let report = ledger.unmap(page * PAGE, PAGE).unwrap();
        assert_eq!(
            report,
            UnmapReport {
                calls: 1,
                bytes: PAGE,
                mappings: 1
            }
        );
        assert_eq!(spans(&ledger), table_spans(&iommu));
    }
    assert_eq!(
        unmap_calls(&iommu),
        [
            (10 * PAGE, PAGE),
            (11 * PAGE, PAGE),
            (40 * PAGE, PAGE),
            (63 * PAGE, PAGE),
            (0, PAGE)
        ]
    );
    assert_eq!(
        spans(&ledger),
        [
            (PAGE, 9 * PAGE),
            (12 * PAGE, 28 * PAGE),
            (41 * PAGE, 22 * PAGE)
        ]
    );
    // Every page that was not cut is still reachable; the cut ones fault.
    let mut page = [0u8; PAGE as usize];
    for p in 0..64u64 {
        let cut = [0, 10, 11, 40, 63].contains(&p);
        assert_eq!(
            iommu.dma_read(p * PAGE, &mut page).is_err(),
            cut,
            "page {p}"
        );
    }
    // The halves keep their sources.
    assert_eq!(
        ledger.mapping_at(12 * PAGE).map(|m| m.source),
        Some(MappingSource::HostVa {
            addr: mem.at(12 * PAGE) as usize
        })
    );
    // A re-share of a cut page is a mapping of its own; the rest unmaps in one call.
    map(&ledger, &mem, 10 * PAGE, PAGE).unwrap();
    iommu.take_calls();
    let report = ledger.unmap_all().unwrap();
    assert_eq!((report.calls, report.bytes), (1, 60 * PAGE));
    assert_eq!(iommu.mapping_count(), 0);
}

#[test]
fn on_a_cutting_backend_misaligned_cut_points_are_refused_before_the_kernel() {
    let mem = HostMem::new(16 * PAGE as usize);
    let (iommu, ledger) = ledger_on(cutting());
    map(&ledger, &mem, 0, 8 * PAGE).unwrap();
    iommu.take_calls();
    for (iova, len, at) in [
        (2 * PAGE + 0x800, PAGE, 2 * PAGE + 0x800),
        (2 * PAGE, PAGE + 0x800, 3 * PAGE + 0x800),
        (1, PAGE, 1),
    ] {
        match ledger.unmap(iova, len) {
            Err(LedgerError::Misaligned {
                what: "cut point",
                value,
                page_size,
            }) => assert_eq!((value, page_size), (at, PAGE)),
            other => panic!("unmap({iova:#x}, {len:#x}): expected a cut point, got {other:?}"),
        }
    }
    assert!(iommu.calls().is_empty());
    // Unaligned ends outside every mapping cut nothing: the call covers the mapping only.
    map(&ledger, &mem, 10 * PAGE, 2 * PAGE).unwrap();
    iommu.take_calls();
    let report = ledger.unmap(9 * PAGE + 0x800, 3 * PAGE).unwrap();
    assert_eq!((report.calls, report.bytes), (1, 2 * PAGE));
    assert_eq!(unmap_calls(&iommu), [(10 * PAGE, 2 * PAGE)]);
    assert_eq!(ledger.stats().refused, 3);
}

#[test]
fn on_a_cutting_backend_a_failed_call_leaves_the_mapping_whole() {
    let mem = HostMem::new(16 * PAGE as usize);
    let (iommu, ledger) = ledger_on(cutting());
    map(&ledger, &mem, 0, 16 * PAGE).unwrap();
    iommu.inject_failures(|kind, _, _| (*kind == CallKind::Unmap).then_some(libc::EIO));
    let err = ledger.unmap(4 * PAGE, 2 * PAGE).unwrap_err();
    assert!(
        matches!(err, LedgerError::Unmap { done_calls: 0, .. }),
        "{err:?}"
    );
    assert_eq!(spans(&ledger), [(0, 16 * PAGE)]);
    assert_eq!(spans(&ledger), table_spans(&iommu));
    assert_eq!(ledger.stats().mappings, 1);
    iommu.clear_failures();
    // Two sub-ranges in one list: each cut, one call each (the gap holds a mapping).
    let report = ledger
        .unmap_ranges(&[(4 * PAGE, 2 * PAGE), (8 * PAGE, PAGE)])
        .unwrap();
    assert_eq!((report.calls, report.bytes), (2, 3 * PAGE));
    assert_eq!(
        spans(&ledger),
        [(0, 4 * PAGE), (6 * PAGE, 2 * PAGE), (9 * PAGE, 7 * PAGE)]
    );
    assert_eq!(spans(&ledger), table_spans(&iommu));
    // The kernel cuts both ends before unmapping: four areas for a moment.
    assert_eq!(ledger.stats().peak_mappings, 4);
}

#[test]
fn pieces_are_cut_like_any_mapping_and_a_backend_that_cannot_cut_still_refuses() {
    let mem = HostMem::new(16 * PAGE as usize);
    let (iommu, ledger) = ledger_on(cutting());
    // Two-page pieces: a one-page unmap cuts the piece it falls in.
    map_pieces(&ledger, &mem, 0, 8 * PAGE, 2 * PAGE).unwrap();
    ledger.unmap(3 * PAGE, 2 * PAGE).unwrap();
    assert_eq!(
        spans(&ledger),
        [
            (0, 2 * PAGE),
            (2 * PAGE, PAGE),
            (5 * PAGE, PAGE),
            (6 * PAGE, 2 * PAGE)
        ]
    );
    assert_eq!(spans(&ledger), table_spans(&iommu));
    let (_, type1) = ledger_on(EmulatedIommu::new());
    assert!(!type1.capabilities().cuts_mappings);
    map(&type1, &mem, 0, 8 * PAGE).unwrap();
    assert!(matches!(
        type1.unmap(3 * PAGE, PAGE),
        Err(LedgerError::Bisects { .. })
    ));
}

#[test]
fn a_cutting_backend_seen_without_cutting_keeps_whole_mappings_whole() {
    let mem = HostMem::new(4 * PAGE as usize);
    let iommu = Arc::new(cutting());
    let ledger = Ledger::new(Arc::new(crate::WithoutCutting(iommu.clone()))).unwrap();
    assert!(!ledger.capabilities().cuts_mappings);
    map(&ledger, &mem, 0, 4 * PAGE).unwrap();
    // Per granule, as on type1: a bisecting unmap is refused before the backend sees it.
    assert!(matches!(
        ledger.unmap(PAGE, PAGE),
        Err(LedgerError::Bisects { .. })
    ));
    assert_eq!(table_spans(&iommu), [(0, 4 * PAGE)]);
    assert_eq!(ledger.unmap(0, 4 * PAGE).unwrap().bytes, 4 * PAGE);
}

/// `fd` opened again through `/proc/self/fd` with the access mode of `options` (a second open
/// file description of the same memfd).
fn reopen(fd: BorrowedFd<'_>, options: &std::fs::OpenOptions) -> std::fs::File {
    options
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap()
}

#[test]
fn a_writable_map_file_of_a_read_only_fd_is_refused_before_the_backend() {
    let fd = memfd(4 * PAGE);
    let read_only = reopen(fd.as_fd(), std::fs::File::options().read(true));
    let (iommu, ledger) = ledger_on(EmulatedIommu::new());
    for pieces in [4 * PAGE, PAGE] {
        match ledger.map_file_pieces(
            0,
            4 * PAGE,
            read_only.as_fd(),
            0,
            pieces,
            DmaProt::READ_WRITE,
        ) {
            Err(LedgerError::FileAccess {
                fd,
                fd_access,
                requested,
                ..
            }) => {
                assert_eq!(fd, read_only.as_raw_fd());
                assert_eq!(fd_access, FdAccess::ReadOnly);
                assert_eq!(requested, DmaProt::READ_WRITE);
            }
            other => panic!("expected FileAccess, got {other:?}"),
        }
    }
    assert!(iommu.calls().is_empty(), "the backend saw a refused map");
    assert_eq!(ledger.mapping_count(), 0);
    assert_eq!(ledger.stats().refused, 2);
    let message = ledger
        .map_file(0, PAGE, read_only.as_fd(), 0, DmaProt::READ_WRITE)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("read-write") && message.contains("O_RDONLY"),
        "{message}"
    );
    // What the fd grants is still mapped.
    ledger
        .map_file(0, PAGE, read_only.as_fd(), PAGE, DmaProt::READ_ONLY)
        .unwrap();
    assert_eq!(ledger.mapping_count(), 1);
}

#[test]
fn a_readable_map_file_of_a_write_only_fd_is_refused_and_a_path_fd_grants_nothing() {
    use std::os::unix::fs::OpenOptionsExt;
    let fd = memfd(2 * PAGE);
    let write_only = reopen(fd.as_fd(), std::fs::File::options().write(true));
    let path_only = reopen(
        fd.as_fd(),
        std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_PATH),
    );
    let (iommu, ledger) = ledger_on(EmulatedIommu::new());
    for (file, access) in [
        (&write_only, FdAccess::WriteOnly),
        (&path_only, FdAccess::PathOnly),
    ] {
        for prot in [DmaProt::READ_ONLY, DmaProt::READ_WRITE] {
            match ledger.map_file(0, PAGE, file.as_fd(), 0, prot) {
                Err(LedgerError::FileAccess { fd_access, .. }) => assert_eq!(fd_access, access),
                other => panic!("{access:?} {prot:?}: expected FileAccess, got {other:?}"),
            }
        }
    }
    assert!(iommu.calls().is_empty(), "the backend saw a refused map");
    assert_eq!(ledger.mapping_count(), 0);
    // The read-write original grants both.
    ledger
        .map_file(0, PAGE, fd.as_fd(), 0, DmaProt::READ_WRITE)
        .unwrap();
}
