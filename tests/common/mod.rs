//! Shared test rig: guest RAM over a software backing, emulated IOMMUs, and one checker for the
//! five invariants.
#![allow(dead_code)]

pub mod gate;

use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use discard_manager::{Attribute, GpaRange, View};
use gmem_dma::{
    DeviceConfig, DeviceId, DiscardPolicy, GuestRam, MemoryAttributes, RecordingAttributes, Region,
    RegionBacking, RegionSpec,
};
use iommu::DmaBackend;
use iommu::EmulatedIommu;
use iommu::emulated::{Call, CallKind, TableEntry, UnmapStyle};

pub const PAGE: u64 = 4096;

type Rule<Call, Out> = Box<dyn FnMut(&Call) -> Option<Out> + Send>;

/// Failure rules that compose. The emulated IOMMU and the recording attribute table each keep
/// one injector, which a second injection replaces; [`iommu_faults`] and [`attribute_faults`]
/// install one that asks every rule added here. Every rule sees every call (so a rule that
/// counts calls keeps counting) and the call fails with the first answer given.
pub struct Rules<Call, Out>(Arc<Mutex<Vec<Rule<Call, Out>>>>);

impl<Call, Out> Clone for Rules<Call, Out> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<Call, Out> Rules<Call, Out> {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(Vec::new())))
    }

    /// Adds a rule; the earlier ones stay.
    pub fn add(&self, rule: impl FnMut(&Call) -> Option<Out> + Send + 'static) {
        self.0.lock().unwrap().push(Box::new(rule));
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    fn ask(&self, call: &Call) -> Option<Out> {
        let mut first = None;
        for rule in self.0.lock().unwrap().iter_mut() {
            let answer = rule(call);
            if first.is_none() {
                first = answer;
            }
        }
        first
    }
}

/// Composable failures of `iommu`'s calls: a rule sees (kind, iova, len) and answers an errno.
pub fn iommu_faults(iommu: &EmulatedIommu) -> Rules<(CallKind, u64, u64), i32> {
    let rules = Rules::new();
    let asked = rules.clone();
    iommu.inject_failures(move |kind, iova, len| asked.ask(&(*kind, iova, len)));
    rules
}

/// Composable failures of `backing`'s hole punches: a rule sees (side, range) and answers
/// `Some(())` to fail it.
pub fn punch_faults(backing: &RegionBacking) -> Rules<(View, GpaRange), ()> {
    let rules = Rules::new();
    let asked = rules.clone();
    backing.inject_punch_failures(move |side, range| asked.ask(&(side, range)).is_some());
    rules
}

/// Composable failures of `attrs`'s calls: a rule sees (range, attribute) and answers
/// `Some(())` to fail it.
pub fn attribute_faults(attrs: &RecordingAttributes) -> Rules<(GpaRange, Attribute), ()> {
    let rules = Rules::new();
    let asked = rules.clone();
    attrs.inject_failures(move |range, attribute| asked.ask(&(range, attribute)).is_some());
    rules
}

/// A failure the property tests inject into one operation.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    Attribute,
    Map {
        dev: usize,
    },
    Unmap {
        dev: usize,
    },
    /// Every unmap of the device fails during the operation, retries included: stale mappings
    /// survive the call.
    UnmapAll {
        dev: usize,
    },
    Punch,
    /// A listener that is not a device refuses its next populate (the test's own listener).
    Listener,
}

/// Any fault against one of three devices; `Listener` only when `with_listener`.
pub fn fault(with_listener: bool) -> proptest::strategy::BoxedStrategy<Fault> {
    use proptest::prelude::*;
    let devices = prop_oneof![
        Just(Fault::Attribute),
        (0..3usize).prop_map(|dev| Fault::Map { dev }),
        (0..3usize).prop_map(|dev| Fault::Unmap { dev }),
        (0..3usize).prop_map(|dev| Fault::UnmapAll { dev }),
        Just(Fault::Punch),
    ];
    if with_listener {
        prop_oneof![5 => devices, 1 => Just(Fault::Listener)].boxed()
    } else {
        devices.boxed()
    }
}

/// The composable failure rules of a rig: one set per device, KVM attributes, hole punches.
pub struct Faults {
    pub devs: Vec<Rules<(CallKind, u64, u64), i32>>,
    pub attrs: Rules<(GpaRange, Attribute), ()>,
    pub punch: Rules<(View, GpaRange), ()>,
}

impl Faults {
    pub fn new(rig: &Rig, devs: &[Dev]) -> Self {
        Self {
            devs: devs.iter().map(|d| iommu_faults(&d.iommu)).collect(),
            attrs: attribute_faults(&rig.attrs),
            punch: punch_faults(rig.region.backing()),
        }
    }

    /// Makes the `nth` matching call (0-based) during one operation fail; the faults of one
    /// operation compose (a map that fails and whose undo fails too, say). `listener` arms
    /// the test's own listener for [`Fault::Listener`].
    pub fn install(&self, faults: &[(Fault, usize)], listener: impl Fn()) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for &(f, nth) in faults {
            let count = Arc::new(AtomicUsize::new(0));
            let hit = move || count.fetch_add(1, Ordering::SeqCst) == nth;
            match f {
                Fault::Attribute => self.attrs.add(move |_| hit().then_some(())),
                Fault::Map { dev } => self.devs[dev]
                    .add(move |&(k, _, _)| (k != CallKind::Unmap && hit()).then_some(libc::ENOMEM)),
                Fault::Unmap { dev } => self.devs[dev]
                    .add(move |&(k, _, _)| (k == CallKind::Unmap && hit()).then_some(libc::EIO)),
                Fault::UnmapAll { dev } => {
                    self.devs[dev].add(|&(k, _, _)| (k == CallKind::Unmap).then_some(libc::EIO))
                }
                Fault::Punch => self.punch.add(move |_| hit().then_some(())),
                Fault::Listener => listener(),
            }
        }
    }

    pub fn clear(&self) {
        self.attrs.clear();
        self.punch.clear();
        for d in &self.devs {
            d.clear();
        }
    }
}

/// Any discard policy, with budgets of a few pages.
pub fn policy() -> impl proptest::strategy::Strategy<Value = DiscardPolicy> {
    use proptest::prelude::*;
    prop_oneof![
        Just(DiscardPolicy::Eager),
        (0..8u64).prop_map(|p| DiscardPolicy::Lazy {
            budget_bytes: p * PAGE
        }),
        (1..4usize, 1..8u64).prop_map(|(r, b)| DiscardPolicy::Batched {
            max_ranges: r,
            max_bytes: b * PAGE
        }),
    ]
}

pub fn range(start: u64, len: u64) -> GpaRange {
    GpaRange::new(start, len).unwrap()
}

/// Guest RAM changing attributes through `attributes`, holding `backing` as one region of 4 KiB
/// granules, every granule `initial`.
pub fn ram_with_region(
    backing: RegionBacking,
    attributes: Arc<dyn MemoryAttributes>,
    initial: Attribute,
    policy: DiscardPolicy,
) -> (Arc<GuestRam>, Arc<Region>) {
    let ram = Arc::new(GuestRam::new(attributes));
    let region = ram
        .add_region(
            backing,
            RegionSpec {
                granularity: PAGE,
                initial,
                policy,
                initially_plugged: true,
            },
        )
        .unwrap();
    (ram, region)
}

/// One device as the tests see it: its IOMMU and its id.
pub struct Dev {
    pub iommu: Arc<EmulatedIommu>,
    pub id: DeviceId,
    pub view: View,
}

pub struct Rig {
    pub ram: Arc<GuestRam>,
    pub attrs: Arc<RecordingAttributes>,
    pub region: Arc<Region>,
}

impl Rig {
    /// A confidential region (all private) of `pages` pages at `base`, software backing.
    pub fn new(base: u64, pages: u64, policy: DiscardPolicy) -> Self {
        Self::with_backing(RegionBacking::software(base, pages * PAGE).unwrap(), policy)
    }

    /// A confidential region (all private) over `backing`.
    pub fn with_backing(backing: RegionBacking, policy: DiscardPolicy) -> Self {
        let attrs = Arc::new(RecordingAttributes::new());
        let (ram, region) = ram_with_region(backing, attrs.clone(), Attribute::Private, policy);
        Self { ram, attrs, region }
    }

    pub fn attach(&self, name: &str, iommu: EmulatedIommu, config: DeviceConfig) -> Dev {
        let iommu = Arc::new(iommu);
        let id = self.ram.attach_device(name, iommu.clone(), config).unwrap();
        Dev {
            iommu,
            id,
            view: config.view(),
        }
    }

    /// Converts and, on success, uses the gaining side of what changed (as the guest would).
    pub fn convert(
        &self,
        r: GpaRange,
        to: Attribute,
    ) -> Result<gmem_dma::Conversion, gmem_dma::ConversionError> {
        let c = self.ram.convert(r, to)?;
        for &run in c.runs() {
            self.touch(to.view(), run);
        }
        Ok(c)
    }

    /// Every device's stale mappings (earlier failed unmaps), as extents `[start, end)`.
    pub fn stale_extents(&self) -> Vec<(u64, u64)> {
        self.region
            .stale_mappings()
            .into_iter()
            .flat_map(|(_, s)| s)
            .map(|s| (s.start(), s.end()))
            .collect()
    }

    pub fn base(&self) -> u64 {
        self.region.range().start()
    }

    /// Writes a byte into every page of `r` on `side`, so the backing holds memory there.
    pub fn touch(&self, side: View, r: GpaRange) {
        let b = self.region.backing();
        let mut gpa = r.start();
        while gpa < r.end() {
            match side {
                View::Shared => {
                    let p = b.host_addr(gpa).unwrap();
                    // SAFETY: `p` is inside the live shared mapping; no Rust reference to it.
                    unsafe { p.write_volatile(0x5a) };
                }
                // A guest_memfd cannot be written from the host (only the guest can).
                View::Private if b.private_kind() == gmem_dma::FileKind::GuestMemfd => {}
                View::Private => {
                    b.private_file()
                        .write_all_at(&[0xa5], b.file_offset(gpa))
                        .unwrap();
                }
            }
            gpa += PAGE;
        }
    }

    /// Writes `data` at `gpa` through the region's shared mapping (volatile; a device may
    /// access it at the same time).
    pub fn write_shared(&self, gpa: u64, data: &[u8]) {
        let host = self.region.backing().host_addr(gpa).unwrap();
        for (i, &b) in data.iter().enumerate() {
            // SAFETY: inside the live shared mapping; only raw-pointer access to guest RAM.
            unsafe { host.add(i).write_volatile(b) };
        }
    }

    /// Reads `len` bytes at `gpa` through the region's shared mapping (volatile).
    pub fn read_shared(&self, gpa: u64, len: usize) -> Vec<u8> {
        let host = self.region.backing().host_addr(gpa).unwrap();
        // SAFETY: as in `write_shared`.
        (0..len)
            .map(|i| unsafe { host.add(i).read_volatile() })
            .collect()
    }

    /// Everything the invariants compare, captured at one moment.
    pub fn snapshot(&self, devs: &[&Dev]) -> Snapshot {
        let all = self.region.range();
        let b = self.region.backing();
        Snapshot {
            runs: self
                .region
                .state()
                .runs(all)
                .unwrap()
                .iter()
                .map(|r| (r.range, r.attribute))
                .collect(),
            private: self.attrs.private_ranges(),
            tables: devs.iter().map(|d| d.iommu.page_table()).collect(),
            shared_resident: b.resident_pages(View::Shared, all).unwrap(),
            private_resident: b.resident_pages(View::Private, all).unwrap_or_default(),
        }
    }

    /// Checks invariants 1, 3 and 5 and that manager, KVM table, IOMMUs and ledgers agree.
    /// `new_calls[i]` are the calls device `i` received during the last operation, which was
    /// a conversion of `op_range` (for invariant 2).
    pub fn check(&self, devs: &[&Dev], new_calls: &[Vec<Call>], op_range: Option<GpaRange>) {
        self.check_allowing(devs, new_calls, op_range, &[]);
    }

    /// As [`Rig::check`]; unmaps inside `stale_before` (private pages left mapped by earlier
    /// failed unmaps, which a conversion retries first) are not a window.
    pub fn check_allowing(
        &self,
        devs: &[&Dev],
        new_calls: &[Vec<Call>],
        op_range: Option<GpaRange>,
        stale_before: &[(u64, u64)],
    ) {
        let all = self.region.range();
        let mgr = self.region.state();
        let runs = mgr.runs(all).unwrap();
        // KVM's table equals the manager's attributes.
        let private: Vec<(u64, u64)> = merge(
            runs.iter()
                .filter(|r| r.attribute == Attribute::Private)
                .map(|r| (r.range.start(), r.range.end())),
        );
        assert_eq!(
            self.attrs.private_ranges(),
            private,
            "KVM attributes vs manager"
        );
        let stale: Vec<(String, Vec<(u64, u64)>)> = self
            .region
            .stale_mappings()
            .into_iter()
            .map(|(name, ranges)| (name, ranges.iter().map(|r| (r.start(), r.end())).collect()))
            .collect();
        for (i, d) in devs.iter().enumerate() {
            let name = &self
                .ram
                .devices()
                .into_iter()
                .find(|x| x.0 == d.id)
                .unwrap()
                .1;
            let stale_of: Vec<(u64, u64)> = stale
                .iter()
                .filter(|(n, _)| n == name)
                .flat_map(|(_, s)| s.clone())
                .collect();
            let table = d.iommu.page_table();
            let ledger = self.ram.device_mappings(d.id).unwrap();
            // Exact ledger: the record equals the page table, mapping for mapping.
            let t: Vec<(u64, u64)> = table.iter().map(|e| (e.iova, e.len)).collect();
            let l: Vec<(u64, u64)> = ledger.iter().map(|m| (m.iova, m.len)).collect();
            assert_eq!(t, l, "ledger vs emulated page table of {name}");
            // Exactly the device's view is mapped (plus reported stale granules): one mapping
            // per granule where the IOMMU cannot cut a mapping; where it can, mappings of
            // whole runs (and of what cuts left of them) that cover exactly the same bytes.
            let mut expected: Vec<(u64, u64)> = mgr
                .view_runs(d.view, all)
                .unwrap()
                .iter()
                .map(|r| (r.start(), r.end()))
                .chain(stale_of.iter().copied())
                .collect();
            expected.sort_unstable();
            if cuts_mappings(d) {
                let covered = merge(t.iter().map(|&(iova, len)| (iova, iova + len)));
                assert_eq!(
                    covered,
                    merge(expected.into_iter()),
                    "mappings of {name} vs its view"
                );
            } else {
                let mut granules_of: Vec<(u64, u64)> =
                    expected.iter().flat_map(|&(s, e)| granules(s, e)).collect();
                granules_of.sort_unstable();
                assert_eq!(t, granules_of, "mappings of {name} vs its view");
            }
            // Isolation: a shared-view mapping never covers a private page, unless the page is
            // a stale mapping the engine reports (only ever after a failed call).
            if d.view == View::Shared {
                for e in &table {
                    for (g, _) in granules(e.iova, e.iova + e.len) {
                        let private_hit = runs.iter().any(|run| {
                            run.attribute == Attribute::Private
                                && run.range.start() <= g
                                && g < run.range.end()
                        });
                        if private_hit {
                            assert!(
                                stale_of.iter().any(|&(s, end)| s <= g && g < end),
                                "isolation: {name} maps private page {g:#x} (mapping {:#x}+{:#x})",
                                e.iova,
                                e.len
                            );
                        }
                    }
                }
            }
            // Every call the rules refused would be a bug (bisecting unmap, overlap, ...).
            for c in &new_calls[i] {
                assert!(c.result.is_ok() || c.injected, "{name}: refused call {c:?}");
                // No window: every page an unmap covers is in the converted range, or was a
                // stale (private, still mapped) page before the call.
                if let (CallKind::Unmap, Some(op)) = (c.kind, op_range) {
                    for (g, _) in granules(c.iova, c.iova + c.len) {
                        let in_op = op.start() <= g && g < op.end();
                        let was_stale = stale_before.iter().any(|&(s, e)| s <= g && g < e);
                        assert!(
                            in_op || was_stale,
                            "no window: {name} unmapped {g:#x} (call {:#x}+{:#x}) outside {op}",
                            c.iova,
                            c.len
                        );
                    }
                }
            }
        }
        self.check_backings(&runs);
    }

    /// Invariant 5, and exactness: the bytes held back are exactly the bytes backed where
    /// the page is not in use (the other side of a plugged page, either side of an unplugged
    /// one). Needs every page in use to have been touched (a page never touched is not backed).
    pub fn check_held_exactly(&self) {
        let runs = self.region.state().runs(self.region.range()).unwrap();
        let double = self.check_backings(&runs);
        let held = self.region.held_back();
        assert_eq!(double, held.total(), "held back vs backed where not in use");
        // Every held byte is verified where both sides report residency; elsewhere the
        // private side's are the upper bound.
        let b = self.region.backing();
        let unverified = match b.reports_residency(View::Private) {
            true => 0,
            false => held.private_bytes,
        };
        assert_eq!(held.unverified_bytes, unverified, "unverified held bytes");
    }

    /// Invariant 5: a page is backed on its own side, and on the other side only if held back;
    /// an unplugged page on neither side unless held. Returns the bytes backed not in use.
    fn check_backings(&self, runs: &[discard_manager::Run]) -> u64 {
        let all = self.region.range();
        let b = self.region.backing();
        let shared = b.resident_pages(View::Shared, all).unwrap();
        // A classic guest_memfd cannot say which pages it holds: then only the shared side
        // (the memfd) is checked.
        let private = b.resident_pages(View::Private, all).ok();
        let mut double = 0;
        for run in runs {
            let mut gpa = run.range.start();
            while gpa < run.range.end() {
                let p = ((gpa - all.start()) / PAGE) as usize;
                let private_p = private.as_ref().map(|v| v[p]);
                if !run.plugged {
                    let sides = [
                        (shared[p], View::Shared),
                        (private_p.unwrap_or(false), View::Private),
                    ];
                    for (_, side) in sides.into_iter().filter(|s| s.0) {
                        double += PAGE;
                        assert!(
                            self.region.holds(side, range(gpa, PAGE)),
                            "unplugged page {gpa:#x} is backed on the {side} side without being held",
                        );
                    }
                    gpa += PAGE;
                    continue;
                }
                let (own, other, other_side) = match run.attribute {
                    Attribute::Shared => (shared[p], private_p.unwrap_or(false), View::Private),
                    Attribute::Private => (private_p.unwrap_or(true), shared[p], View::Shared),
                };
                assert!(own, "page {gpa:#x} lost its {:?} backing", run.attribute);
                if other {
                    double += PAGE;
                    assert!(
                        self.region.holds(other_side, range(gpa, PAGE)),
                        "page {gpa:#x} ({:?}) is backed on the {other_side} side without being held",
                        run.attribute
                    );
                }
                gpa += PAGE;
            }
        }
        assert!(
            double <= self.region.held_back().total(),
            "double allocation beyond the reported bound"
        );
        double
    }
}

#[derive(Debug, PartialEq)]
pub struct Snapshot {
    pub runs: Vec<(GpaRange, Attribute)>,
    pub private: Vec<(u64, u64)>,
    pub tables: Vec<Vec<TableEntry>>,
    pub shared_resident: Vec<bool>,
    pub private_resident: Vec<bool>,
}

/// True when `dev`'s IOMMU cuts mappings (the cutting unmap style), so the engine maps runs.
pub fn cuts_mappings(dev: &Dev) -> bool {
    dev.iommu.capabilities().unwrap().cuts_mappings
}

/// The emulated IOMMU unmap styles the engine's invariants are proved on: per-granule mappings
/// (a type1 container) and per-run mappings cut later (IOMMUFD with type1 (v1) semantics).
pub const MAPPING_STYLES: [UnmapStyle; 2] = [UnmapStyle::Type1v2, UnmapStyle::Cutting];

/// An emulated IOMMU of `style`.
pub fn emulated(style: UnmapStyle) -> EmulatedIommu {
    EmulatedIommu::builder().unmap_style(style).build()
}

/// `per_granule` on an IOMMU of `style` that cannot cut mappings, `per_run` on one that can.
pub fn per_style<T>(style: UnmapStyle, per_granule: T, per_run: T) -> T {
    match style {
        UnmapStyle::Cutting => per_run,
        _ => per_granule,
    }
}

pub fn granules(start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> {
    (start..end).step_by(PAGE as usize).map(|g| (g, PAGE))
}

fn merge(it: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in it {
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}
