//! Property tests: random map / map-pieces / unmap / unmap-all / device-access sequences through
//! a `Ledger` on the emulated IOMMU, with random injected backend failures.
//!
//! After every operation they check, against an independent model of what should be mapped:
//! - the ledger's record equals the emulated page table equals the model (iova, length, access,
//!   host address or file offset), and the budgets of all three agree;
//! - a refused operation (overlap, outside the IOVA ranges, over budget, bisecting unmap) made no
//!   backend call and changed nothing; a failed one (injected errno) changed nothing either;
//! - every unmap call the ledger issued covered whole mappings only and was not empty, and no call
//!   that was not an injected failure failed (the ledger's checks anticipate every kernel rule);
//! - a device access succeeds exactly when the model says every page is mapped with that access;
//! - an unmap of several ranges removes exactly the mappings inside them (never one in a gap
//!   between them) with one call per group of ranges whose gaps hold no mapping.
//!
//! The same runs against the cutting style (IOMMUFD with type1 v1 semantics): there an unmap may
//! bisect a mapping, the model cuts it at the range's ends as the kernel does, and no window
//! opens: every page that was mapped outside the unmap range is still mapped afterwards.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use gmem_dma_iommu::emulated::{Call, CallKind, EmulatedIommu, TableTarget, UnmapStyle};
use gmem_dma_iommu::{DmaBackend, DmaProt, IovaRange, Ledger, LedgerError, MappingSource};
use proptest::prelude::*;

const PAGE: u64 = 4096;
/// Pages the operations may name: usable IOVA is pages [0, 40) and [48, 64); the rest is a hole
/// or beyond the top.
const SPACE_PAGES: u64 = 72;

fn usable_ranges() -> Vec<IovaRange> {
    vec![
        IovaRange {
            start: 0,
            last: 40 * PAGE - 1,
        },
        IovaRange {
            start: 48 * PAGE,
            last: 64 * PAGE - 1,
        },
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        page: u64,
        pages: u64,
        file: bool,
        read_only: bool,
    },
    MapPieces {
        page: u64,
        pieces: u64,
        piece_pages: u64,
        file: bool,
    },
    /// `shift` moves the start half a page up (a misaligned cut point where it falls inside a
    /// mapping).
    Unmap {
        page: u64,
        pages: u64,
        shift: bool,
    },
    /// Ranges laid out from `page`: each `(gap, pages)` skips `gap` pages, then covers
    /// `pages`; `swap` exchanges the first two (an unsorted list).
    UnmapRanges {
        page: u64,
        ranges: Vec<(u64, u64)>,
        swap: bool,
    },
    UnmapAll,
    CheckBudget {
        additional: u64,
    },
    DeviceWrite {
        page: u64,
        pages: u64,
    },
    DeviceRead {
        page: u64,
        pages: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SPACE_PAGES, 1..5u64, any::<bool>(), any::<bool>())
            .prop_map(|(page, pages, file, read_only)| Op::Map { page, pages, file, read_only }),
        3 => (0..SPACE_PAGES, 1..9u64, 1..3u64, any::<bool>()).prop_map(
            |(page, pieces, piece_pages, file)| Op::MapPieces { page, pieces, piece_pages, file }
        ),
        4 => (0..SPACE_PAGES, 1..12u64, prop::bool::weighted(0.15))
            .prop_map(|(page, pages, shift)| Op::Unmap { page, pages, shift }),
        3 => (
            0..SPACE_PAGES,
            prop::collection::vec((0..6u64, 1..6u64), 1..5),
            prop::bool::weighted(0.1)
        )
            .prop_map(|(page, ranges, swap)| Op::UnmapRanges { page, ranges, swap }),
        1 => Just(Op::UnmapAll),
        1 => (0..50u64).prop_map(|additional| Op::CheckBudget { additional }),
        1 => (0..SPACE_PAGES, 1..4u64).prop_map(|(page, pages)| Op::DeviceWrite { page, pages }),
        1 => (0..SPACE_PAGES, 1..4u64).prop_map(|(page, pages)| Op::DeviceRead { page, pages }),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ModelMapping {
    len: u64,
    prot: DmaProt,
    file: bool,
    /// Host offset into the backing memory, or file offset.
    source: u64,
}

/// What should be mapped, kept by the test independently of the ledger.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Model {
    mappings: BTreeMap<u64, ModelMapping>,
    budget: Option<u64>,
}

impl Model {
    fn overlaps(&self, iova: u64, len: u64) -> bool {
        self.mappings
            .iter()
            .any(|(&s, m)| s < iova + len && iova < s + m.len)
    }

    fn bisects(&self, iova: u64, len: u64) -> bool {
        self.mappings.iter().any(|(&s, m)| {
            let inside = s >= iova && s + m.len <= iova + len;
            let intersects = s < iova + len && iova < s + m.len;
            intersects && !inside
        })
    }

    /// The mapping that holds both `at - 1` and `at`, which an unmap starting or ending at `at`
    /// cuts.
    fn straddling(&self, at: u64) -> Option<u64> {
        self.mappings
            .iter()
            .find(|&(&s, m)| s < at && at < s + m.len)
            .map(|(&s, _)| s)
    }

    /// Cuts the mapping straddling `at` in two, as the kernel splits an area.
    fn cut(&mut self, at: u64) {
        if let Some(s) = self.straddling(at) {
            let m = self.mappings[&s];
            let left = at - s;
            self.mappings.insert(s, ModelMapping { len: left, ..m });
            self.mappings.insert(
                at,
                ModelMapping {
                    len: m.len - left,
                    source: m.source + left,
                    ..m
                },
            );
        }
    }

    /// True when an end of `[iova, iova + len)` falls inside a mapping off a page boundary.
    fn misaligned_cut(&self, iova: u64, len: u64) -> bool {
        [iova, iova + len]
            .iter()
            .any(|&at| at % PAGE != 0 && self.straddling(at).is_some())
    }

    /// Whether `page` is mapped.
    fn maps_page(&self, page: u64) -> bool {
        self.target(page * PAGE).is_some()
    }

    fn inside(&self, iova: u64, len: u64) -> Vec<u64> {
        self.mappings
            .iter()
            .filter(|&(&s, m)| s >= iova && s + m.len <= iova + len)
            .map(|(&s, _)| s)
            .collect()
    }

    /// Which memory the byte at `iova` reaches: (file or host memory, offset in it).
    fn target(&self, iova: u64) -> Option<(bool, u64)> {
        let (&s, m) = self.mappings.range(..=iova).next_back()?;
        (iova < s + m.len).then_some((m.file, m.source + (iova - s)))
    }

    /// What reading `[iova, iova + data.len())` back returns after a device wrote `data` there:
    /// two IOVAs may reach the same memory (sources shift by a page for odd requests), and then
    /// the later byte of the write is the one that stays.
    fn read_back_after_write(&self, iova: u64, data: &[u8]) -> Vec<u8> {
        let mut memory = BTreeMap::new();
        for (i, &byte) in (iova..).zip(data) {
            memory.insert(self.target(i), byte);
        }
        (iova..iova + data.len() as u64)
            .map(|i| memory[&self.target(i)])
            .collect()
    }

    fn covered(&self, iova: u64, len: u64, write: bool) -> bool {
        (0..len / PAGE).all(|i| {
            let p = iova + i * PAGE;
            self.mappings.iter().any(|(&s, m)| {
                s <= p && p < s + m.len && if write { m.prot.write } else { m.prot.read }
            })
        })
    }
}

/// Page-aligned host memory and a memfd of the same size; mapping at IOVA x uses host offset x or
/// file offset x.
struct Backing {
    _storage: Vec<u8>,
    base: *mut u8,
    file: OwnedFd,
}

impl Backing {
    fn new() -> Self {
        let len = ((SPACE_PAGES + 1) * PAGE) as usize;
        let mut storage = vec![0u8; len + PAGE as usize];
        let p = storage.as_mut_ptr();
        let base = p.wrapping_add(p.align_offset(PAGE as usize));
        // SAFETY: the name is NUL-terminated; the result is checked.
        let fd = unsafe { libc::memfd_create(c"ledger-properties".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let file = unsafe { OwnedFd::from_raw_fd(fd) };
        std::fs::File::from(file.try_clone().unwrap())
            .set_len(len as u64)
            .unwrap();
        Self {
            _storage: storage,
            base,
            file,
        }
    }
}

/// A deterministic failure plan: each backend call fails with probability 1/`one_in`.
fn injector(seed: u64, one_in: u64) -> impl FnMut(&CallKind, u64, u64) -> Option<i32> + Send {
    let mut x = seed | 1;
    move |_, _, _| {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (one_in > 0 && x % one_in == 0)
            .then_some([libc::ENOMEM, libc::EIO, libc::EFAULT][(x % 3) as usize])
    }
}

struct Harness {
    backing: Backing,
    iommu: Arc<EmulatedIommu>,
    ledger: Ledger,
    model: Model,
    style: UnmapStyle,
    /// How often each outcome happened, to show the random sequences reach every path.
    outcomes: BTreeMap<&'static str, u64>,
}

impl Harness {
    fn new(style: UnmapStyle, budget: Option<u64>, seed: u64, fail_one_in: u64) -> Self {
        let iommu = Arc::new(
            EmulatedIommu::builder()
                .iova_ranges(usable_ranges())
                .mapping_budget(budget)
                .unmap_style(style)
                .build(),
        );
        iommu.inject_failures(injector(seed, fail_one_in));
        let ledger = Ledger::new(iommu.clone()).unwrap();
        Self {
            backing: Backing::new(),
            iommu,
            ledger,
            model: Model {
                mappings: BTreeMap::new(),
                // The cutting style models IOMMUFD, which has no mapping budget.
                budget: budget.filter(|_| style != UnmapStyle::Cutting),
            },
            style,
            outcomes: BTreeMap::new(),
        }
    }

    fn map(&mut self, iova: u64, len: u64, piece: u64, file: bool, prot: DmaProt) {
        let before = self.model.clone();
        // Requests starting on odd pages take their memory one page further on, so neighbouring
        // requests are sometimes contiguous in their source and sometimes not.
        let source = iova + (iova / PAGE % 2) * PAGE;
        let result = if file {
            self.ledger
                .map_file_pieces(iova, len, self.backing.file.as_fd(), source, piece, prot)
        } else {
            // SAFETY: `backing` lives in the harness with the ledger; `finish` closes the ledger
            // before dropping it, and the emulator never touches memory when unmapping, so even a
            // panicking test (fields drop in order) never lets a device access freed memory.
            unsafe {
                self.ledger.map_va_pieces(
                    iova,
                    len,
                    self.backing.base.wrapping_add(source as usize),
                    piece,
                    prot,
                )
            }
        };
        let calls = self.iommu.take_calls();
        let pieces = len / piece;
        let inside_ranges = usable_ranges().iter().any(|r| r.contains(iova, len));
        match result {
            Ok(()) => {
                self.note("map ok");
                assert!(inside_ranges && !before.overlaps(iova, len));
                assert!(before.budget.is_none_or(|b| b >= pieces));
                for i in 0..pieces {
                    self.model.mappings.insert(
                        iova + i * piece,
                        ModelMapping {
                            len: piece,
                            prot,
                            file,
                            source: source + i * piece,
                        },
                    );
                }
                if let Some(b) = self.model.budget.as_mut() {
                    *b -= pieces;
                }
                assert_eq!(
                    calls.len() as u64,
                    pieces,
                    "one map call per piece: {calls:?}"
                );
            }
            Err(LedgerError::OutsideIovaRanges { .. }) => {
                self.note("map outside ranges");
                assert!(!inside_ranges);
                assert!(calls.is_empty());
            }
            Err(LedgerError::Overlap { existing, .. }) => {
                self.note("map overlap");
                assert!(inside_ranges && before.overlaps(iova, len));
                assert!(before.mappings.contains_key(&existing.iova));
                assert!(calls.is_empty());
            }
            Err(LedgerError::BudgetExceeded {
                requested,
                remaining,
            }) => {
                self.note("map over budget");
                assert!(inside_ranges && !before.overlaps(iova, len));
                assert_eq!(requested, pieces);
                assert_eq!(Some(remaining), before.budget);
                assert!(remaining < pieces);
                assert!(calls.is_empty());
            }
            Err(LedgerError::Map(_)) => {
                self.note("map failed");
                // Something was injected; nothing may be left of this request.
                assert!(calls.iter().any(|c| c.injected), "{calls:?}");
            }
            Err(LedgerError::Rollback { left_mapped, .. }) => {
                self.note("map rollback failed");
                assert!(calls.iter().filter(|c| c.injected).count() >= 2);
                for i in 0..left_mapped {
                    self.model.mappings.insert(
                        iova + i * piece,
                        ModelMapping {
                            len: piece,
                            prot,
                            file,
                            source: source + i * piece,
                        },
                    );
                }
                if let Some(b) = self.model.budget.as_mut() {
                    *b -= left_mapped;
                }
            }
            Err(other) => panic!("map({iova:#x}, {len:#x}, {piece:#x}): unexpected {other:?}"),
        }
        self.check_calls(&before, &calls);
    }

    fn unmap(&mut self, range: Option<(u64, u64)>) {
        let before = self.model.clone();
        let (iova, len) = range.unwrap_or((0, u64::MAX));
        let result = match range {
            Some((iova, len)) => self.ledger.unmap(iova, len),
            None => self.ledger.unmap_all(),
        };
        let calls = self.iommu.take_calls();
        // A backend that cuts splits the mappings straddling the ends first; the unmap then
        // covers whole mappings of the table as cut.
        let cutting = self.style == UnmapStyle::Cutting;
        let mut cut = before.clone();
        if cutting {
            cut.cut(iova);
            cut.cut(iova.saturating_add(len));
        }
        let inside = cut.inside(iova, len);
        match result {
            Ok(report) => {
                self.note("unmap ok");
                if cutting {
                    assert!(!before.misaligned_cut(iova, len));
                    if cut.mappings.len() > before.mappings.len() {
                        self.note("unmap cut");
                    }
                } else {
                    assert!(range.is_none() || !before.bisects(iova, len));
                }
                assert_eq!(report.mappings, inside.len() as u64);
                let bytes: u64 = inside.iter().map(|s| cut.mappings[s].len).sum();
                assert_eq!(report.bytes, bytes);
                assert_eq!(
                    report.calls,
                    u64::from(!inside.is_empty()),
                    "one merged call"
                );
                assert_eq!(calls.len() as u64, report.calls);
                self.model = cut;
                for s in inside {
                    self.model.mappings.remove(&s);
                    if let Some(b) = self.model.budget.as_mut() {
                        *b += 1;
                    }
                }
                self.check_no_window(&before, iova, len);
            }
            Err(LedgerError::Bisects { mapping, .. }) => {
                self.note("unmap bisects");
                assert!(!cutting, "a backend that cuts has no bisecting unmap");
                assert!(before.bisects(iova, len));
                assert!(before.mappings.contains_key(&mapping.iova));
                assert!(
                    calls.is_empty(),
                    "a bisecting unmap must not reach the backend"
                );
            }
            Err(LedgerError::Misaligned {
                what: "cut point",
                value,
                ..
            }) => {
                self.note("unmap cut point misaligned");
                assert!(cutting && before.misaligned_cut(iova, len));
                assert!(value == iova || value == iova + len);
                assert!(
                    calls.is_empty(),
                    "a misaligned cut must not reach the backend"
                );
            }
            Err(LedgerError::Unmap { done_calls: 0, .. }) => {
                self.note("unmap failed");
                assert!(calls.len() == 1 && calls[0].injected, "{calls:?}");
            }
            Err(other) => panic!("unmap({iova:#x}, {len:#x}): unexpected {other:?}"),
        }
        self.check_calls(&before, &calls);
    }

    /// No window: every page that was mapped before an unmap and lies outside its range is
    /// still mapped in the emulated page table.
    fn check_no_window(&self, before: &Model, iova: u64, len: u64) {
        let table = self.iommu.page_table();
        let end = iova.saturating_add(len);
        for page in (0..SPACE_PAGES).filter(|&p| before.maps_page(p)) {
            let (first, after) = (page * PAGE, (page + 1) * PAGE);
            if first < end && iova < after {
                continue;
            }
            assert!(
                table
                    .iter()
                    .any(|e| e.iova <= first && after <= e.iova + e.len),
                "page {page} lost its mapping to unmap({iova:#x}, {len:#x})"
            );
        }
    }

    /// `ranges` (sorted, disjoint, each inside the space or not) as the ledger should group
    /// them: consecutive ranges join while no mapping lies in the gap between them.
    fn expected_unmap_calls(before: &Model, ranges: &[(u64, u64)]) -> u64 {
        let mut calls = 0;
        let mut group_has_mapping = false;
        for (i, &(iova, len)) in ranges.iter().enumerate() {
            if i > 0 {
                let (prev, prev_len) = ranges[i - 1];
                let gap = (prev + prev_len, iova - (prev + prev_len));
                if gap.1 > 0 && before.overlaps(gap.0, gap.1) {
                    calls += u64::from(group_has_mapping);
                    group_has_mapping = false;
                }
            }
            // (Where the request was accepted, a mapping overlapping a range lies inside its
            // group: nothing bisects it, or it was cut at the group's ends.)
            group_has_mapping |= before.overlaps(iova, len);
        }
        calls + u64::from(group_has_mapping)
    }

    /// `[first, end)` of each group of sorted `ranges` that the ledger joins into one call:
    /// consecutive ranges join while no mapping lies in the gap between them.
    fn call_groups(before: &Model, ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut groups: Vec<(u64, u64)> = Vec::new();
        for &(iova, len) in ranges {
            match groups.last_mut() {
                Some((_, end)) if iova == *end || !before.overlaps(*end, iova - *end) => {
                    *end = iova + len
                }
                _ => groups.push((iova, iova + len)),
            }
        }
        groups
    }

    fn unmap_ranges(&mut self, ranges: &[(u64, u64)]) {
        let before = self.model.clone();
        let result = self.ledger.unmap_ranges(ranges);
        let calls = self.iommu.take_calls();
        let sorted = ranges.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0);
        // On a backend that cuts, each call cuts at its ends: the ends of each group of ranges
        // joined into one call (the ranges here are aligned).
        let cutting = self.style == UnmapStyle::Cutting;
        let mut cut = before.clone();
        if cutting && sorted {
            for (first, end) in Self::call_groups(&before, ranges) {
                cut.cut(first);
                cut.cut(end);
            }
        }
        let bisects = !cutting && ranges.iter().any(|&(iova, len)| before.bisects(iova, len));
        // A mapping cut at the ends of a group may span two of its ranges.
        let inside: Vec<u64> = if cutting && sorted {
            Self::call_groups(&before, ranges)
                .into_iter()
                .flat_map(|(first, end)| cut.inside(first, end - first))
                .collect()
        } else {
            ranges
                .iter()
                .flat_map(|&(iova, len)| cut.inside(iova, len))
                .collect()
        };
        match result {
            Ok(report) => {
                self.note("unmap ranges ok");
                assert!(sorted && !bisects);
                assert_eq!(report.mappings, inside.len() as u64);
                let bytes: u64 = inside.iter().map(|s| cut.mappings[s].len).sum();
                assert_eq!(report.bytes, bytes);
                assert_eq!(
                    report.calls,
                    Self::expected_unmap_calls(&cut, ranges),
                    "one call per group of ranges with empty gaps: {ranges:x?} {calls:x?}"
                );
                let ranges_with_mappings = ranges
                    .iter()
                    .filter(|&&(iova, len)| !cut.inside(iova, len).is_empty())
                    .count() as u64;
                if report.calls < ranges_with_mappings {
                    self.note("unmap ranges joined");
                }
                assert_eq!(calls.len() as u64, report.calls);
                self.model = cut;
                for s in inside {
                    self.model.mappings.remove(&s);
                    if let Some(b) = self.model.budget.as_mut() {
                        *b += 1;
                    }
                }
            }
            Err(LedgerError::Unsorted { .. }) => {
                self.note("unmap ranges unsorted");
                assert!(!sorted);
                assert!(calls.is_empty());
            }
            Err(LedgerError::Bisects { mapping, .. }) => {
                self.note("unmap ranges bisects");
                assert!(bisects);
                assert!(before.mappings.contains_key(&mapping.iova));
                assert!(calls.is_empty(), "nothing is called before every check");
            }
            Err(LedgerError::Unmap { done_calls, .. }) => {
                self.note("unmap ranges failed");
                let (last, done) = calls.split_last().expect("a failed call");
                assert!(
                    last.injected && done.len() as u64 == done_calls,
                    "{calls:?}"
                );
                // What the successful calls removed is gone (cut at their ends where the
                // backend cuts); everything else stays whole.
                for c in done {
                    self.model.cut(c.iova);
                    self.model.cut(c.iova + c.len);
                    for s in self.model.inside(c.iova, c.len) {
                        self.model.mappings.remove(&s);
                        if let Some(b) = self.model.budget.as_mut() {
                            *b += 1;
                        }
                    }
                }
            }
            Err(other) => panic!("unmap_ranges({ranges:x?}): unexpected {other:?}"),
        }
        self.check_calls(&before, &calls);
    }

    /// Every call the ledger made failed only by injection, and every unmap call covered whole
    /// mappings of the table as it was at that moment (replaying the op's calls in order from
    /// the state before the operation) and was not empty.
    fn check_calls(&self, before: &Model, calls: &[Call]) {
        let mut table = before.clone();
        for c in calls {
            assert!(
                c.injected || c.result.is_ok(),
                "a backend rule was hit: {c:?}"
            );
            match (c.kind, c.result) {
                (CallKind::MapVa | CallKind::MapFile, Ok(_)) => {
                    assert!(
                        !table.overlaps(c.iova, c.len),
                        "overlapping map call: {c:?}"
                    );
                    let m = ModelMapping {
                        len: c.len,
                        prot: DmaProt::READ_WRITE,
                        file: c.kind == CallKind::MapFile,
                        source: 0, // only the IOVA matters for whole-mapping checks
                    };
                    table.mappings.insert(c.iova, m);
                }
                (CallKind::Unmap, result) => {
                    // A backend that cuts splits the areas at the call's ends first.
                    let mut cut = table.clone();
                    if self.style == UnmapStyle::Cutting {
                        cut.cut(c.iova);
                        cut.cut(c.iova + c.len);
                    }
                    assert!(
                        !cut.bisects(c.iova, c.len),
                        "unmap call bisects a mapping: {c:?}"
                    );
                    let inside = cut.inside(c.iova, c.len);
                    assert!(!inside.is_empty(), "unmap call on an empty range: {c:?}");
                    if result.is_ok() {
                        table = cut;
                        for s in inside {
                            table.mappings.remove(&s);
                        }
                    }
                }
                _ => {}
            }
        }
        if self.style != UnmapStyle::Type1v2 {
            assert!(calls.iter().all(|c| c.result != Err(libc::ENOENT)));
        }
    }

    fn note(&mut self, outcome: &'static str) {
        *self.outcomes.entry(outcome).or_default() += 1;
    }

    fn device_access(&mut self, iova: u64, len: u64, write: bool) {
        let expect_ok = self.model.covered(iova, len, write);
        let faults_before = self.iommu.faults().len();
        let result = if write {
            let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8 ^ 0x5a).collect();
            let r = self.iommu.dma_write(iova, &data);
            if r.is_ok() && self.model.covered(iova, len, false) {
                let mut back = vec![0u8; len as usize];
                self.iommu.dma_read(iova, &mut back).unwrap();
                assert_eq!(back, self.model.read_back_after_write(iova, &data));
            }
            r
        } else {
            let mut buf = vec![0u8; len as usize];
            self.iommu.dma_read(iova, &mut buf)
        };
        self.note(if expect_ok {
            "device access ok"
        } else {
            "device fault"
        });
        assert_eq!(
            result.is_ok(),
            expect_ok,
            "device access {iova:#x}+{len:#x} write={write}"
        );
        assert_eq!(
            self.iommu.faults().len(),
            faults_before + usize::from(!expect_ok)
        );
    }

    /// The ledger, the emulated page table and the model agree.
    fn check_state(&self) {
        let ledger = self.ledger.mappings();
        let table = self.iommu.page_table();
        assert_eq!(ledger.len(), table.len());
        assert_eq!(ledger.len(), self.model.mappings.len());
        let base = self.backing.base as usize;
        for ((l, t), (&s, m)) in ledger.iter().zip(&table).zip(&self.model.mappings) {
            assert_eq!((l.iova, l.len, l.prot), (t.iova, t.len, t.prot));
            assert_eq!((l.iova, l.len, l.prot), (s, m.len, m.prot));
            match (l.source, t.target) {
                (MappingSource::HostVa { addr }, TableTarget::HostVa { addr: t_addr }) => {
                    assert!(!m.file);
                    assert_eq!(addr, t_addr);
                    assert_eq!(addr, base + m.source as usize);
                }
                (MappingSource::File { offset, .. }, TableTarget::File { offset: t_off }) => {
                    assert!(m.file);
                    assert_eq!(offset, t_off);
                    assert_eq!(offset, m.source);
                }
                other => panic!("source mismatch: {other:?}"),
            }
        }
        let budget = self.iommu.capabilities().unwrap().mapping_budget;
        assert_eq!(self.ledger.remaining_budget(), budget);
        assert_eq!(self.ledger.remaining_budget(), self.model.budget);
        let stats = self.ledger.stats();
        assert_eq!(stats.mappings, ledger.len() as u64);
        assert!(stats.peak_mappings >= stats.mappings);
    }

    fn run(&mut self, op: &Op) {
        match *op {
            Op::Map {
                page,
                pages,
                file,
                read_only,
            } => {
                let prot = if read_only {
                    DmaProt::READ_ONLY
                } else {
                    DmaProt::READ_WRITE
                };
                self.map(page * PAGE, pages * PAGE, pages * PAGE, file, prot);
            }
            Op::MapPieces {
                page,
                pieces,
                piece_pages,
                file,
            } => {
                let piece = piece_pages * PAGE;
                self.map(
                    page * PAGE,
                    pieces * piece,
                    piece,
                    file,
                    DmaProt::READ_WRITE,
                );
            }
            Op::Unmap { page, pages, shift } => {
                let iova = page * PAGE + if shift { PAGE / 2 } else { 0 };
                self.unmap(Some((iova, pages * PAGE)))
            }
            Op::UnmapRanges {
                page,
                ref ranges,
                swap,
            } => {
                let mut at = page;
                let mut list: Vec<(u64, u64)> = ranges
                    .iter()
                    .map(|&(gap, pages)| {
                        let range = ((at + gap) * PAGE, pages * PAGE);
                        at += gap + pages;
                        range
                    })
                    .collect();
                if swap && list.len() > 1 {
                    list.swap(0, 1);
                }
                self.unmap_ranges(&list);
            }
            Op::UnmapAll => self.unmap(None),
            Op::CheckBudget { additional } => {
                let ok = self.ledger.check_budget(additional).is_ok();
                assert_eq!(ok, self.model.budget.is_none_or(|b| additional <= b));
            }
            Op::DeviceWrite { page, pages } => self.device_access(page * PAGE, pages * PAGE, true),
            Op::DeviceRead { page, pages } => self.device_access(page * PAGE, pages * PAGE, false),
        }
        self.check_state();
    }

    /// Tears down through `close` with failures off: everything the model holds is unmapped.
    /// Returns the outcome counts.
    fn finish(self) -> BTreeMap<&'static str, u64> {
        self.iommu.clear_failures();
        let expected = self.model.mappings.len() as u64;
        let report = self.ledger.close().unwrap();
        assert_eq!(report.mappings, expected);
        assert_eq!(self.iommu.mapping_count(), 0);
        assert_eq!(self.iommu.capabilities().unwrap().mapping_budget, {
            self.model.budget.map(|b| b + expected)
        });
        // `backing` drops only now, after every mapping of it is gone.
        drop(self.backing);
        self.outcomes
    }
}

fn style() -> impl Strategy<Value = UnmapStyle> {
    prop_oneof![
        Just(UnmapStyle::Type1v2),
        Just(UnmapStyle::Iommufd),
        Just(UnmapStyle::Cutting)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn ledger_stays_exact_under_random_operations_and_failures(
        style in style(),
        budget in prop_oneof![Just(None), (2..40u64).prop_map(Some)],
        seed in any::<u64>(),
        fail_one_in in prop_oneof![Just(0u64), 3..20u64],
        ops in prop::collection::vec(op(), 50..150),
    ) {
        let mut h = Harness::new(style, budget, seed, fail_one_in);
        for op in &ops {
            h.run(op);
        }
        h.finish();
    }
}

/// The random sequences above are only worth something if they reach every path: run a fixed
/// set of them and require each outcome to have happened.
#[test]
fn random_sequences_reach_every_outcome() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let mut totals: BTreeMap<&'static str, u64> = BTreeMap::new();
    for case in 0..96u64 {
        let style = match case {
            64.. => UnmapStyle::Cutting,
            _ if case % 2 == 0 => UnmapStyle::Type1v2,
            _ => UnmapStyle::Iommufd,
        };
        let budget = (case % 4 == 1).then_some(6 + case % 20);
        let mut h = Harness::new(
            style,
            budget,
            case.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            4 + case % 6,
        );
        let ops = prop::collection::vec(op(), 150)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        for op in &ops {
            h.run(op);
        }
        for (outcome, n) in h.finish() {
            *totals.entry(outcome).or_default() += n;
        }
    }
    for outcome in [
        "map ok",
        "map outside ranges",
        "map overlap",
        "map over budget",
        "map failed",
        "map rollback failed",
        "unmap ok",
        "unmap bisects",
        "unmap failed",
        "unmap cut",
        "unmap cut point misaligned",
        "unmap ranges ok",
        "unmap ranges joined",
        "unmap ranges unsorted",
        "unmap ranges bisects",
        "unmap ranges failed",
        "device access ok",
        "device fault",
    ] {
        assert!(
            totals.get(outcome).copied().unwrap_or(0) > 0,
            "never reached {outcome:?}: {totals:?}"
        );
    }
}

/// A shared ledger used from several threads at once stays exact: each thread flips its own
/// pages, all of them through one ledger, while another thread unmaps everything now and then.
#[test]
fn concurrent_use_keeps_ledger_and_table_equal() {
    let iommu = Arc::new(
        EmulatedIommu::builder()
            .mapping_budget(Some(1000))
            .record_calls(false)
            .build(),
    );
    let ledger = Ledger::new(iommu.clone()).unwrap();
    let backing = Backing::new();
    let base = backing.base as usize;
    let errors = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let (ledger, errors) = (&ledger, &errors);
            s.spawn(move || {
                for round in 0..300u64 {
                    let iova = (t * 16 + round % 16) * PAGE;
                    let host = (base + iova as usize) as *mut u8;
                    // SAFETY: `backing` outlives the scope; the ledger is closed before it drops.
                    let r = unsafe { ledger.map_va(iova, PAGE, host, DmaProt::READ_WRITE) };
                    // A concurrent unmap_all may have removed it, or it may still be there.
                    if let Err(e) = r {
                        if !matches!(e, LedgerError::Overlap { .. }) {
                            errors.lock().unwrap().push(e.to_string());
                        }
                    }
                    if round % 3 == 0 {
                        if let Err(e) = ledger.unmap(iova, PAGE) {
                            errors.lock().unwrap().push(e.to_string());
                        }
                    }
                }
            });
        }
        s.spawn(|| {
            for _ in 0..50 {
                if let Err(e) = ledger.unmap_all() {
                    errors.lock().unwrap().push(e.to_string());
                }
                std::thread::yield_now();
            }
        });
    });
    assert_eq!(errors.into_inner().unwrap(), Vec::<String>::new());
    let table: Vec<(u64, u64)> = iommu.page_table().iter().map(|e| (e.iova, e.len)).collect();
    let record: Vec<(u64, u64)> = ledger.mappings().iter().map(|m| (m.iova, m.len)).collect();
    assert_eq!(record, table);
    assert_eq!(ledger.remaining_budget(), Some(1000 - record.len() as u64));
    ledger.close().unwrap();
    assert_eq!(iommu.mapping_count(), 0);
    drop(backing);
}
