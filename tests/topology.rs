//! The topologies real VMMs use (issue 13): several devices in one IOMMU address space, several
//! regions per address space, shared- and private-view devices side by side, memory dropped in
//! any order, and the budget of an address space shared by regions converting in parallel.
//! The property tests (random operations with composed faults, one thread and several) are in
//! `topology_props` below.

mod common;

use std::sync::Arc;

use common::{PAGE, iommu_faults, range};
use discard_manager::{Attribute, View};
use gmem_dma::{
    AttachError, ConversionError, DeviceConfig, DiscardPolicy, GuestRam, MapBy,
    RecordingAttributes, RegionBacking, RegionSpec,
};
use iommu::emulated::CallKind;
use iommu::{DmaBackend, EmulatedIommu};

const A: u64 = 0x4000_0000;
const B: u64 = 0x8000_0000;
const PAGES: u64 = 16;

fn spec(policy: DiscardPolicy) -> RegionSpec {
    RegionSpec {
        granularity: PAGE,
        initial: Attribute::Private,
        policy,
        initially_plugged: true,
    }
}

/// Guest RAM with two confidential regions of `PAGES` pages at `A` and `B`.
fn two_regions(policy: DiscardPolicy) -> (Arc<GuestRam>, Arc<RecordingAttributes>) {
    let attrs = Arc::new(RecordingAttributes::new());
    let ram = Arc::new(GuestRam::new(attrs.clone()));
    for base in [A, B] {
        ram.add_region(
            RegionBacking::software(base, PAGES * PAGE).unwrap(),
            spec(policy),
        )
        .unwrap();
    }
    (ram, attrs)
}

fn backend(iommu: &Arc<EmulatedIommu>) -> Arc<dyn DmaBackend> {
    iommu.clone()
}

#[test]
fn two_devices_in_one_address_space_share_one_mapping_per_granule() {
    let (ram, _) = two_regions(DiscardPolicy::Eager);
    let iommu = Arc::new(EmulatedIommu::new());
    let a = ram
        .attach_device("a", backend(&iommu), DeviceConfig::shared())
        .unwrap();
    let b = ram
        .attach_device("b", backend(&iommu), DeviceConfig::shared())
        .unwrap();
    // On main this failed in the middle with EEXIST: two ledgers over one page table.
    ram.convert(range(A, 2 * PAGE), Attribute::Shared).unwrap();
    ram.convert(range(B, PAGE), Attribute::Shared).unwrap();
    assert_eq!(iommu.mapping_count(), 3);
    assert_eq!(ram.device_mappings(a), ram.device_mappings(b));
    // One of two leaving unmaps nothing; both still reach the pages through it.
    let report = ram.detach_device(a).unwrap();
    assert_eq!(report.mappings, 0);
    assert_eq!(iommu.mapping_count(), 3);
    iommu.dma_write(A, &[1]).unwrap();
    // The last one leaving unmaps everything.
    let report = ram.detach_device(b).unwrap();
    assert_eq!(report.mappings, 3);
    assert_eq!(iommu.mapping_count(), 0);
    // A conversion to private is refused for neither (nothing left to block it).
    ram.convert(range(A, 2 * PAGE), Attribute::Private).unwrap();
}

#[test]
fn a_conversion_to_private_unmaps_for_every_device_of_the_address_space() {
    let (ram, _) = two_regions(DiscardPolicy::Eager);
    let iommu = Arc::new(EmulatedIommu::new());
    for name in ["a", "b", "c"] {
        ram.attach_device(name, backend(&iommu), DeviceConfig::shared())
            .unwrap();
    }
    let r = range(A, 4 * PAGE);
    ram.convert(r, Attribute::Shared).unwrap();
    assert_eq!(iommu.mapping_count(), 4);
    let rules = iommu_faults(&iommu);
    rules.add(|&(kind, _, _)| (kind == CallKind::Unmap).then_some(libc::EIO));
    // Blocked for all of them: the error names the address space's devices.
    let err = ram.convert(r, Attribute::Private).unwrap_err();
    assert!(matches!(err, ConversionError::Unmap { .. }), "{err:?}");
    assert!(err.to_string().contains("a+b+c"), "{err}");
    rules.clear();
    ram.convert(r, Attribute::Private).unwrap();
    assert_eq!(iommu.mapping_count(), 0);
}

#[test]
fn a_shared_and_a_trusted_io_device_cannot_share_an_address_space() {
    let (ram, _) = two_regions(DiscardPolicy::Eager);
    let iommu = Arc::new(EmulatedIommu::new());
    ram.attach_device("nic", backend(&iommu), DeviceConfig::shared())
        .unwrap();
    ram.convert(range(A, 4 * PAGE), Attribute::Shared).unwrap();
    // On main this attach succeeded and a later merged unmap removed the trusted device's
    // mapping of a page that stayed private.
    let err = ram
        .attach_device("tdisp", backend(&iommu), DeviceConfig::trusted_io())
        .unwrap_err();
    assert!(
        matches!(
            &err,
            AttachError::MixedViews {
                view: View::Private,
                serves: View::Shared,
                ..
            }
        ),
        "{err:?}"
    );
    // A different configuration of the same view is refused too (the mappings are shared).
    let err = ram
        .attach_device(
            "nic2",
            backend(&iommu),
            DeviceConfig::shared_by(MapBy::File),
        )
        .unwrap_err();
    assert!(
        matches!(err, AttachError::AddressSpaceConfig { .. }),
        "{err:?}"
    );
    assert_eq!(ram.devices().len(), 1);
    assert_eq!(iommu.mapping_count(), 4);
}

#[test]
fn dropping_guest_ram_while_holding_another_region_unmaps_the_dropped_memory() {
    let (ram, _) = two_regions(DiscardPolicy::Eager);
    let iommu = Arc::new(EmulatedIommu::new());
    ram.attach_device("nic", backend(&iommu), DeviceConfig::shared())
        .unwrap();
    ram.convert(range(A, 2 * PAGE), Attribute::Shared).unwrap();
    ram.convert(range(B, 2 * PAGE), Attribute::Shared).unwrap();
    let region_b = ram.region_of(range(B, PAGE)).unwrap();
    drop(ram);
    // On main region A's mappings stayed in the IOMMU, pointing at its unmapped memory.
    let left: Vec<u64> = iommu.page_table().iter().map(|e| e.iova).collect();
    assert!(left.iter().all(|&iova| iova >= B), "{left:x?}");
    drop(region_b);
    assert_eq!(iommu.mapping_count(), 0);
}

#[test]
fn memory_an_iommu_still_maps_after_failed_unmaps_outlives_its_region() {
    let (ram, _) = two_regions(DiscardPolicy::Eager);
    let iommu = Arc::new(EmulatedIommu::new());
    ram.attach_device("nic", backend(&iommu), DeviceConfig::shared())
        .unwrap();
    ram.convert(range(A, 2 * PAGE), Attribute::Shared).unwrap();
    let region_b = ram.region_of(range(B, PAGE)).unwrap();
    let rules = iommu_faults(&iommu);
    rules.add(|&(kind, _, _)| (kind == CallKind::Unmap).then_some(libc::EIO));
    drop(ram);
    // The mapping of A could not be removed: the device still reaches it, so the memory it
    // names must still be there (a write through it lands in memory the backing still owns;
    // on main it landed in an unmapped host range).
    assert!(iommu.page_table().iter().any(|e| e.iova == A));
    iommu.dma_write(A, &[0x5a; 16]).unwrap();
    let mut back = [0u8; 16];
    iommu.dma_read(A, &mut back).unwrap();
    assert_eq!(back, [0x5a; 16]);
    rules.clear();
    // The last holder goes: the address space unmaps what is left, then lets the memory go.
    drop(region_b);
    assert_eq!(iommu.mapping_count(), 0);
}

#[test]
fn a_failed_attach_leaves_nothing_mapped() {
    let (ram, _) = two_regions(DiscardPolicy::Eager);
    let first = Arc::new(EmulatedIommu::new());
    ram.attach_device("first", backend(&first), DeviceConfig::shared())
        .unwrap();
    ram.convert(range(A, 3 * PAGE), Attribute::Shared).unwrap();
    ram.convert(range(B, 3 * PAGE), Attribute::Shared).unwrap();
    let iommu = Arc::new(EmulatedIommu::new());
    let rules = iommu_faults(&iommu);
    rules.add(|&(kind, iova, _)| {
        (kind == CallKind::MapVa && iova == B + PAGE).then_some(libc::ENOMEM)
    });
    let err = ram
        .attach_device("second", backend(&iommu), DeviceConfig::shared())
        .unwrap_err();
    assert!(matches!(err, AttachError::Replay { .. }), "{err:?}");
    assert_eq!(iommu.mapping_count(), 0);
    assert_eq!(ram.devices().len(), 1);
    rules.clear();
    // The same backend attaches cleanly afterwards (no second ledger, no leftovers).
    ram.attach_device("second", backend(&iommu), DeviceConfig::shared())
        .unwrap();
    assert_eq!(iommu.mapping_count(), 6);
}

#[test]
fn a_backend_whose_devices_left_with_stale_mappings_is_attached_again_once_they_are_gone() {
    let (ram, _) = two_regions(DiscardPolicy::Eager);
    let iommu = Arc::new(EmulatedIommu::new());
    ram.attach_device("nic", backend(&iommu), DeviceConfig::shared())
        .unwrap();
    ram.convert(range(A, 2 * PAGE), Attribute::Shared).unwrap();
    let rules = iommu_faults(&iommu);
    rules.add(|&(kind, _, _)| (kind == CallKind::Unmap).then_some(libc::EIO));
    let id = ram.devices()[0].0;
    assert!(ram.detach_device(id).is_err());
    // Its address space still maps two pages: a second ledger over the backend would not know
    // them, so the backend is refused until they are gone.
    let err = ram
        .attach_device("nic", backend(&iommu), DeviceConfig::shared())
        .unwrap_err();
    assert!(
        matches!(err, AttachError::StaleMappings { mappings: 2, .. }),
        "{err:?}"
    );
    rules.clear();
    let id = ram
        .attach_device("nic", backend(&iommu), DeviceConfig::shared())
        .unwrap();
    assert_eq!(ram.device_mappings(id).unwrap().len(), 2);
    assert_eq!(iommu.mapping_count(), 2);
    assert!(ram.regions().iter().all(|r| r.stale_mappings().is_empty()));
}

#[test]
fn a_rollback_that_cuts_a_device_off_detaches_it_even_when_the_attribute_undo_fails_too() {
    let attrs = Arc::new(RecordingAttributes::new());
    let ram = GuestRam::new(attrs.clone());
    ram.add_region(
        RegionBacking::software(A, PAGES * PAGE).unwrap(),
        spec(DiscardPolicy::Eager),
    )
    .unwrap();
    let nic = Arc::new(EmulatedIommu::new());
    let tdisp = Arc::new(EmulatedIommu::new());
    ram.attach_device("nic", backend(&nic), DeviceConfig::shared())
        .unwrap();
    ram.attach_device("tdisp", backend(&tdisp), DeviceConfig::trusted_io())
        .unwrap();
    let r = range(A, 2 * PAGE);
    ram.convert(r, Attribute::Shared).unwrap();
    // The trusted-IO map fails, setting the attribute back fails, and so does the nic's re-map.
    iommu_faults(&tdisp).add(|&(kind, _, _)| (kind == CallKind::MapFile).then_some(libc::EIO));
    iommu_faults(&nic).add(|&(kind, _, _)| (kind == CallKind::MapVa).then_some(libc::EIO));
    common::attribute_faults(&attrs).add(|&(_, to)| (to == Attribute::Shared).then_some(()));
    let err = ram.convert(r, Attribute::Private).unwrap_err();
    // On main this returned AttributeRollback and the nic, cut off the region, stayed listed
    // (and its address space kept a device but no listener there).
    assert!(
        matches!(&err, ConversionError::RollbackFailed { detached, .. } if detached == &["nic"]),
        "{err:?}"
    );
    let names: Vec<String> = ram.devices().into_iter().map(|d| d.1).collect();
    assert_eq!(names, ["tdisp"]);
}

#[test]
fn an_empty_iova_range_list_means_unrestricted() {
    let (ram, _) = two_regions(DiscardPolicy::Eager);
    // type1 without VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE reports no ranges.
    let iommu = Arc::new(EmulatedIommu::builder().iova_ranges(Vec::new()).build());
    let id = ram
        .attach_device("nic", backend(&iommu), DeviceConfig::shared())
        .unwrap();
    ram.convert(range(A, PAGE), Attribute::Shared).unwrap();
    assert_eq!(ram.device_mappings(id).unwrap().len(), 1);
}

#[test]
fn detaching_an_unknown_device_is_an_error() {
    let (ram, _) = two_regions(DiscardPolicy::Eager);
    let iommu = Arc::new(EmulatedIommu::new());
    let id = ram
        .attach_device("nic", backend(&iommu), DeviceConfig::shared())
        .unwrap();
    ram.detach_device(id).unwrap();
    let err = ram.detach_device(id).unwrap_err();
    assert!(
        matches!(err, gmem_dma::DetachError::UnknownDevice { id: gone } if gone == id),
        "{err:?}"
    );
}

/// The KVM attribute table, with a rendezvous in the attribute step of conversions to shared:
/// two conversions meet there (both past their budget checks, neither has mapped yet) unless
/// one cannot get there within the timeout, which is what a lock held across the check and the
/// maps makes happen.
#[derive(Debug)]
struct Rendezvous {
    inner: RecordingAttributes,
    arrived: std::sync::Mutex<u32>,
    met: std::sync::Condvar,
}

impl gmem_dma::MemoryAttributes for Rendezvous {
    fn set(
        &self,
        range: discard_manager::GpaRange,
        attribute: Attribute,
    ) -> Result<(), gmem_dma::AttributeError> {
        if attribute == Attribute::Shared {
            let mut arrived = self.arrived.lock().unwrap();
            *arrived += 1;
            self.met.notify_all();
            let _ = self
                .met
                .wait_timeout_while(arrived, std::time::Duration::from_millis(300), |a| {
                    *a % 2 == 1
                })
                .unwrap();
        }
        self.inner.set(range, attribute)
    }
}

#[test]
fn regions_racing_for_a_shared_budget_lose_with_mapping_budget_and_leave_private_pages_alone() {
    let attrs = Arc::new(Rendezvous {
        inner: RecordingAttributes::new(),
        arrived: std::sync::Mutex::new(0),
        met: std::sync::Condvar::new(),
    });
    let ram = Arc::new(GuestRam::new(attrs.clone()));
    for base in [A, B] {
        ram.add_region(
            RegionBacking::software(base, PAGES * PAGE).unwrap(),
            spec(DiscardPolicy::Eager),
        )
        .unwrap();
    }
    // One type1 container for both regions, room for one mapping.
    let type1 = Arc::new(EmulatedIommu::builder().mapping_budget(Some(1)).build());
    ram.attach_device("nic", backend(&type1), DeviceConfig::shared())
        .unwrap();
    // A trusted-IO device in its own address space maps every private page.
    let tdisp = Arc::new(EmulatedIommu::new());
    ram.attach_device("tdisp", backend(&tdisp), DeviceConfig::trusted_io())
        .unwrap();
    let unmaps_before = tdisp
        .calls()
        .iter()
        .filter(|c| c.kind == CallKind::Unmap)
        .count();
    let threads: Vec<_> = [A, B]
        .into_iter()
        .map(|base| {
            let ram = Arc::clone(&ram);
            std::thread::spawn(move || ram.convert(range(base, PAGE), Attribute::Shared))
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    // On main both passed the check (under their own region's lock), met in the attribute
    // step, and the loser failed in populate (Map: guest EIO), after the trusted-IO device's
    // private page had been unmapped (and was re-mapped by the rollback).
    let lost = results.into_iter().find_map(Result::err).unwrap();
    assert!(
        matches!(lost, ConversionError::MappingBudget { .. }),
        "lost with {lost:?}"
    );
    assert_eq!(
        gmem_dma::answer::conversion_failure(&lost).errno,
        libc::ENOSPC
    );
    let unmaps = tdisp
        .calls()
        .iter()
        .filter(|c| c.kind == CallKind::Unmap)
        .count();
    assert_eq!(
        unmaps - unmaps_before,
        1,
        "only the winner's page left the private view"
    );
}

#[test]
fn a_failed_conversion_to_shared_frees_what_pinning_faulted_in() {
    let (ram, _) = two_regions(DiscardPolicy::Eager);
    // Maps allocate their pages, as type1 / IOMMUFD pinning does.
    let iommu = Arc::new(EmulatedIommu::builder().fault_in(true).build());
    ram.attach_device("nic", backend(&iommu), DeviceConfig::shared())
        .unwrap();
    let rules = iommu_faults(&iommu);
    rules.add(|&(kind, iova, _)| {
        (kind == CallKind::MapVa && iova == A + PAGE).then_some(libc::ENOMEM)
    });
    let r = range(A, 2 * PAGE);
    let err = ram.convert(r, Attribute::Shared).unwrap_err();
    assert!(matches!(err, ConversionError::Map { .. }), "{err:?}");
    let region = ram.region_of(r).unwrap();
    let resident = region.backing().resident_pages(View::Shared, r).unwrap();
    // On main the first page stayed allocated on the shared side while private again, and
    // held_back() said 0.
    let held = ram.held_back().shared_bytes;
    let double: u64 = resident.iter().filter(|&&p| p).count() as u64 * PAGE;
    assert!(double <= held, "{resident:?} resident, {held} held back");
    assert_eq!(double, 0, "the faulted-in page is freed");
    rules.clear();
    ram.convert(r, Attribute::Shared).unwrap();
    assert_eq!(
        region.backing().resident_pages(View::Shared, r).unwrap(),
        [true, true]
    );
}

/// Random operations over two regions and three address spaces (two shared-view ones, one of
/// them budgeted and faulting pages in as pinning does, and a trusted-IO one), each with up to
/// two devices joining and leaving, while every kernel call (IOMMU map and unmap, KVM
/// attribute, hole punch) fails at random. The invariants are checked after every operation
/// (one thread) or at every quiescent point (several threads). `GMEM_DMA_SOAK_OPS` sets the
/// number of operations of the single-thread run (the threaded run does a fifth of it).
mod topology_props {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Barrier, Mutex};

    use super::common::{PAGE, Rules, attribute_faults, iommu_faults, punch_faults, range};
    use super::{A, B, PAGES, spec};
    use discard_manager::{Attribute, View};
    use gmem_dma::{
        ConversionError, ConversionQueue, DeviceConfig, DeviceId, DiscardPolicy, GuestRam, MapBy,
        RecordingAttributes, Region, RegionBacking,
    };
    use iommu::emulated::UnmapStyle;
    use iommu::{DmaBackend, EmulatedIommu};

    const SPACES: usize = 3;
    const SLOTS: usize = 2;
    /// One kernel call in this many fails.
    const FAIL_ONE_IN: u64 = 12;

    /// xorshift64*: small, seeded, reproducible.
    #[derive(Clone)]
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[derive(Default)]
    struct Counts {
        ops: AtomicU64,
        calls: AtomicU64,
        injected: AtomicU64,
        checks: AtomicU64,
        rollback_failed: AtomicU64,
        budget_refused: AtomicU64,
        failed_ops: AtomicU64,
    }

    struct Space {
        iommu: Arc<EmulatedIommu>,
        config: DeviceConfig,
    }

    struct World {
        ram: Arc<GuestRam>,
        attrs: Arc<RecordingAttributes>,
        regions: Vec<Arc<Region>>,
        spaces: Vec<Space>,
        counts: Arc<Counts>,
        /// Regions whose KVM attributes an `AttributeRollback` said may disagree.
        unsynced: Mutex<BTreeSet<usize>>,
    }

    /// A rule that fails one call in `FAIL_ONE_IN`, counting calls and failures.
    fn random_failures<C, O>(rules: &Rules<C, O>, seed: u64, counts: &Arc<Counts>, fail: O)
    where
        O: Clone + Send + 'static,
        C: 'static,
    {
        let mut rng = Rng(seed | 1);
        let counts = Arc::clone(counts);
        rules.add(move |_| {
            counts.calls.fetch_add(1, Ordering::Relaxed);
            (rng.below(FAIL_ONE_IN) == 0).then(|| {
                counts.injected.fetch_add(1, Ordering::Relaxed);
                fail.clone()
            })
        });
    }

    /// With `GMEM_DMA_TRACE` set, prints every operation (to find the one that broke an
    /// invariant).
    fn trace(what: impl FnOnce() -> String) {
        if std::env::var_os("GMEM_DMA_TRACE").is_some() {
            eprintln!("{}", what());
        }
    }

    fn name(space: usize, slot: usize) -> String {
        format!("s{space}d{slot}")
    }

    impl World {
        fn new(seed: u64, policy: DiscardPolicy) -> Self {
            let counts = Arc::new(Counts::default());
            let attrs = Arc::new(RecordingAttributes::new());
            let ram = Arc::new(GuestRam::new(attrs.clone()));
            let regions: Vec<Arc<Region>> = [A, B]
                .into_iter()
                .map(|base| {
                    ram.add_region(
                        RegionBacking::software(base, PAGES * PAGE).unwrap(),
                        spec(policy),
                    )
                    .unwrap()
                })
                .collect();
            let spaces = vec![
                // type1-like: a budget smaller than guest RAM, pages pinned (faulted in).
                Space {
                    iommu: Arc::new(
                        EmulatedIommu::builder()
                            .mapping_budget(Some(PAGES * 3 / 2))
                            .fault_in(true)
                            .record_calls(std::env::var_os("GMEM_DMA_TRACE").is_some())
                            .build(),
                    ),
                    config: DeviceConfig::shared(),
                },
                // IOMMUFD-like, mapping the memfd by file.
                Space {
                    iommu: Arc::new(
                        EmulatedIommu::builder()
                            .unmap_style(UnmapStyle::Iommufd)
                            .record_calls(std::env::var_os("GMEM_DMA_TRACE").is_some())
                            .build(),
                    ),
                    config: DeviceConfig::shared_by(MapBy::File),
                },
                // Trusted IO: the private view.
                Space {
                    iommu: Arc::new(
                        EmulatedIommu::builder()
                            .record_calls(std::env::var_os("GMEM_DMA_TRACE").is_some())
                            .build(),
                    ),
                    config: DeviceConfig::trusted_io(),
                },
            ];
            let world = Self {
                ram,
                attrs,
                regions,
                spaces,
                counts,
                unsynced: Mutex::new(BTreeSet::new()),
            };
            for s in 0..SPACES {
                for slot in 0..SLOTS {
                    world.attach(s, slot).unwrap();
                }
            }
            // Faults only from here on: every device starts attached.
            let mut rng = Rng(seed);
            for s in &world.spaces {
                random_failures(
                    &iommu_faults(&s.iommu),
                    rng.next(),
                    &world.counts,
                    libc::EIO,
                );
            }
            random_failures(
                &attribute_faults(&world.attrs),
                rng.next(),
                &world.counts,
                (),
            );
            for r in &world.regions {
                random_failures(&punch_faults(r.backing()), rng.next(), &world.counts, ());
            }
            world
        }

        fn backend(&self, space: usize) -> Arc<dyn DmaBackend> {
            self.spaces[space].iommu.clone()
        }

        fn device(&self, space: usize, slot: usize) -> Option<DeviceId> {
            let name = name(space, slot);
            self.ram
                .devices()
                .into_iter()
                .find(|d| d.1 == name)
                .map(|d| d.0)
        }

        fn attach(&self, space: usize, slot: usize) -> Result<DeviceId, gmem_dma::AttachError> {
            let config = self.spaces[space].config;
            self.ram
                .attach_device(&name(space, slot), self.backend(space), config)
        }

        /// One random operation; says what a conversion did (isolation is checked strictly
        /// over one that succeeded to private, all-or-nothing over one that failed).
        fn random_op(&self, rng: &mut Rng, queue: Option<&ConversionQueue>) -> Outcome {
            self.counts.ops.fetch_add(1, Ordering::Relaxed);
            match rng.below(20) {
                0 => {
                    let (space, slot) = (
                        rng.below(SPACES as u64) as usize,
                        rng.below(SLOTS as u64) as usize,
                    );
                    match self.device(space, slot) {
                        Some(id) => {
                            let r = self.ram.detach_device(id);
                            trace(|| format!("detach {} -> {r:?}", name(space, slot)));
                            if r.is_err() {
                                self.counts.failed_ops.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        None => {
                            let r = self.attach(space, slot);
                            trace(|| format!("attach {} -> {r:?}", name(space, slot)));
                            if r.is_err() {
                                self.counts.failed_ops.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Outcome::Other
                }
                1 => {
                    self.ram.flush_discards();
                    Outcome::Other
                }
                _ => {
                    let region = rng.below(2) as usize;
                    let base = self.regions[region].range().start();
                    let start = rng.below(PAGES);
                    let pages = 1 + rng.below(6).min(PAGES - start - 1);
                    let r = range(base + start * PAGE, pages * PAGE);
                    let to = if rng.below(2) == 0 {
                        Attribute::Shared
                    } else {
                        Attribute::Private
                    };
                    // Requests here are far below the queue's chunk size: one chunk, so a queue
                    // failure is exactly the conversion's.
                    let result = match queue {
                        Some(q) => q
                            .convert(r, to)
                            .map(|c| c.runs().len())
                            .map_err(|e| match e {
                                gmem_dma::QueueError::Conversion { source, .. } => *source,
                                other => panic!("the queue answered {other} for {r}"),
                            }),
                        None => self.ram.convert(r, to).map(|c| c.runs().len()),
                    };
                    trace(|| {
                        let calls: Vec<String> = self
                            .spaces
                            .iter()
                            .enumerate()
                            .flat_map(|(i, s)| {
                                s.iommu.take_calls().into_iter().map(move |c| {
                                    format!(
                                        "s{i}:{:?}{:#x}+{:#x}{}",
                                        c.kind,
                                        c.iova,
                                        c.len,
                                        if c.result.is_ok() { "" } else { "!" }
                                    )
                                })
                            })
                            .collect();
                        format!(
                            "convert {r} {to:?} -> {:?} {}",
                            result.as_ref().ok(),
                            calls.join(" ")
                        )
                    });
                    match result {
                        Ok(_) if to == Attribute::Private => {
                            Outcome::ToPrivate(Private { region, range: r })
                        }
                        Ok(_) => Outcome::Other,
                        Err(e) => {
                            self.counts.failed_ops.fetch_add(1, Ordering::Relaxed);
                            match e {
                                ConversionError::RollbackFailed { .. } => {
                                    self.counts.rollback_failed.fetch_add(1, Ordering::Relaxed);
                                    // Setting the attribute back may have failed too.
                                    super::lock_set(&self.unsynced).insert(region);
                                    return Outcome::Other;
                                }
                                ConversionError::MappingBudget { .. } => {
                                    self.counts.budget_refused.fetch_add(1, Ordering::Relaxed);
                                }
                                ConversionError::AttributeRollback { .. } => {
                                    super::lock_set(&self.unsynced).insert(region);
                                    return Outcome::Other;
                                }
                                // The budget is checked up front under the address
                                // space's lock: a map never runs out of it.
                                ConversionError::Map { source, .. } => assert!(
                                    !matches!(
                                        source.downcast_ref::<iommu::LedgerError>(),
                                        Some(iommu::LedgerError::BudgetExceeded { .. })
                                    ),
                                    "a map ran out of budget: {source}"
                                ),
                                ConversionError::Unmap { .. }
                                | ConversionError::Attribute(_)
                                | ConversionError::StaleMapping { .. } => {}
                                other => panic!("unexpected failure {other:?}"),
                            }
                            Outcome::Failed
                        }
                    }
                }
            }
        }

        /// The stale granules of space `space` (attached or departed), over every region.
        fn stale_of(&self, space: usize) -> BTreeSet<u64> {
            let prefix = format!("s{space}d");
            let mut out = BTreeSet::new();
            for r in &self.regions {
                for (n, ranges) in r.stale_mappings() {
                    if n.starts_with(&prefix) {
                        for s in ranges {
                            out.extend((s.start()..s.end()).step_by(PAGE as usize));
                        }
                    }
                }
            }
            out
        }

        /// Every invariant that holds at a quiescent point; panics naming the one broken.
        fn check(&self, converted_private: Option<Private>) {
            self.counts.checks.fetch_add(1, Ordering::Relaxed);
            let devices = self.ram.devices();
            // KVM's table equals the manager's attributes, except for a region an
            // AttributeRollback reported, until repaired.
            let mut private = Vec::new();
            for r in &self.regions {
                for run in r.state().runs(r.range()).unwrap() {
                    if run.attribute == Attribute::Private {
                        match private.last_mut() {
                            Some((_, e)) if *e == run.range.start() => *e = run.range.end(),
                            _ => private.push((run.range.start(), run.range.end())),
                        }
                    }
                }
            }
            if self.attrs.private_ranges() == private {
                super::lock_set(&self.unsynced).clear();
            } else {
                assert!(
                    !super::lock_set(&self.unsynced).is_empty(),
                    "KVM attributes disagree with the manager without an AttributeRollback"
                );
            }
            for (i, s) in self.spaces.iter().enumerate() {
                let view = s.config.view();
                let members: Vec<DeviceId> = devices
                    .iter()
                    .filter(|d| d.1.starts_with(&format!("s{i}d")))
                    .map(|d| d.0)
                    .collect();
                let table = s.iommu.page_table();
                let mut mapped = BTreeSet::new();
                for e in &table {
                    mapped.extend((e.iova..e.iova + e.len).step_by(PAGE as usize));
                }
                // Exact ledger: every device of the space sees the one record, equal to the
                // page table.
                for &id in &members {
                    let ledger: Vec<(u64, u64)> = self
                        .ram
                        .device_mappings(id)
                        .unwrap()
                        .iter()
                        .map(|m| (m.iova, m.len))
                        .collect();
                    let t: Vec<(u64, u64)> = table.iter().map(|e| (e.iova, e.len)).collect();
                    assert_eq!(ledger, t, "ledger vs page table of space {i}");
                }
                // Exactly the view (while a device is attached) plus the reported stale
                // granules: one mapping per granule per address space.
                let stale = self.stale_of(i);
                let mut expected = stale.clone();
                if !members.is_empty() {
                    for r in &self.regions {
                        for run in r.state().view_runs(view, r.range()).unwrap() {
                            expected.extend((run.start()..run.end()).step_by(PAGE as usize));
                        }
                    }
                }
                assert_eq!(mapped, expected, "mappings of space {i} ({view} view)");
                // Isolation: a successful conversion to private leaves no shared-view mapping
                // (not even a stale one) over its range.
                if let (View::Shared, Some(p)) = (view, converted_private) {
                    assert!(
                        !mapped
                            .iter()
                            .any(|&g| p.range.start() <= g && g < p.range.end()),
                        "isolation: space {i} maps a page of {} converted to private",
                        p.range
                    );
                }
            }
            // No double allocation beyond what the policy holds back and reports.
            for r in &self.regions {
                let all = r.range();
                let b = r.backing();
                let shared = b.resident_pages(View::Shared, all).unwrap();
                let privat = b.resident_pages(View::Private, all).unwrap();
                let mut double = 0;
                for run in r.state().runs(all).unwrap() {
                    let mut g = run.range.start();
                    while g < run.range.end() {
                        let p = ((g - all.start()) / PAGE) as usize;
                        let (other, side) = match run.attribute {
                            Attribute::Shared => (privat[p], View::Private),
                            Attribute::Private => (shared[p], View::Shared),
                        };
                        if other {
                            double += PAGE;
                            assert!(
                                r.holds(side, range(g, PAGE)),
                                "page {g:#x} ({:?}) backed on the {side} side unheld",
                                run.attribute
                            );
                        }
                        g += PAGE;
                    }
                }
                assert!(
                    double <= r.held_back().total(),
                    "double allocation unreported"
                );
            }
        }

        /// The manager's runs of every region and KVM's private ranges.
        fn attribute_state(&self) -> AttributeState {
            let runs = self
                .regions
                .iter()
                .flat_map(|r| r.state().runs(r.range()).unwrap())
                .map(|run| (run.range, run.attribute))
                .collect();
            (runs, self.attrs.private_ranges())
        }

        fn report(&self, what: &str) -> (u64, u64, u64) {
            let c = &self.counts;
            let (ops, calls, injected, checks) = (
                c.ops.load(Ordering::Relaxed),
                c.calls.load(Ordering::Relaxed),
                c.injected.load(Ordering::Relaxed),
                c.checks.load(Ordering::Relaxed),
            );
            println!(
                "{what}: {ops} operations ({} failed), {calls} kernel calls, {injected} failures \
                 injected ({:.1}%), {checks} invariant checks, 0 violations; {} RollbackFailed, \
                 {} MappingBudget refusals",
                c.failed_ops.load(Ordering::Relaxed),
                100.0 * injected as f64 / calls.max(1) as f64,
                c.rollback_failed.load(Ordering::Relaxed),
                c.budget_refused.load(Ordering::Relaxed),
            );
            (ops, calls, injected)
        }
    }

    /// The manager's runs of every region, and KVM's private ranges.
    type AttributeState = (Vec<(discard_manager::GpaRange, Attribute)>, Vec<(u64, u64)>);

    /// What one operation did.
    enum Outcome {
        /// A conversion to private succeeded.
        ToPrivate(Private),
        /// A conversion failed, saying KVM still agrees with the manager.
        Failed,
        Other,
    }

    impl Outcome {
        fn private(&self) -> Option<Private> {
            match self {
                Outcome::ToPrivate(p) => Some(*p),
                _ => None,
            }
        }
    }

    #[derive(Clone, Copy)]
    struct Private {
        #[allow(dead_code)]
        region: usize,
        range: discard_manager::GpaRange,
    }

    fn ops() -> u64 {
        std::env::var("GMEM_DMA_SOAK_OPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000)
    }

    fn seed() -> u64 {
        std::env::var("GMEM_DMA_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0x005e_ed13)
    }

    #[test]
    fn random_operations_with_composed_faults_keep_every_invariant() {
        let total = ops();
        let seed = seed();
        println!("seed {seed} (GMEM_DMA_SEED), {total} operations (GMEM_DMA_SOAK_OPS)");
        let policies = [
            DiscardPolicy::Eager,
            DiscardPolicy::Lazy {
                budget_bytes: 4 * PAGE,
            },
        ];
        let mut sums = (0, 0, 0);
        let mut rollback_failed = 0;
        for (k, policy) in policies.into_iter().enumerate() {
            let world = World::new(seed + k as u64, policy);
            let mut rng = Rng(seed ^ (0x9e37_79b9 + k as u64));
            world.check(None);
            for _ in 0..total / policies.len() as u64 {
                let before = world.attribute_state();
                // A conversion first repairs KVM attributes an earlier AttributeRollback left
                // disagreeing: compare only from a state where KVM agrees.
                let synced = super::lock_set(&world.unsynced).is_empty();
                let outcome = world.random_op(&mut rng, None);
                // All or nothing: a failed conversion leaves the manager and KVM as they were.
                if let (Outcome::Failed, true) = (&outcome, synced) {
                    assert_eq!(
                        world.attribute_state(),
                        before,
                        "a failed conversion changed state"
                    );
                }
                world.check(outcome.private());
            }
            let (o, c, i) = world.report(&format!("single thread, {policy:?}"));
            sums = (sums.0 + o, sums.1 + c, sums.2 + i);
            rollback_failed += world.counts.rollback_failed.load(Ordering::Relaxed);
        }
        assert!(sums.0 >= total, "{} operations", sums.0);
        assert!(
            sums.2 * 20 >= sums.1,
            "at least 5% of kernel calls fail: {sums:?}"
        );
        // The composed faults reach the branch where a rollback fails (map and undo failing).
        assert!(rollback_failed > 0, "RollbackFailed never reached");
    }

    #[test]
    fn concurrent_vcpus_attach_detach_and_flush_keep_every_invariant() {
        const VCPUS: usize = 2;
        const PER_ROUND: u64 = 8;
        let total = ops() / 5;
        let seed = seed();
        let world = Arc::new(World::new(
            seed,
            DiscardPolicy::Lazy {
                budget_bytes: 4 * PAGE,
            },
        ));
        let queue = Arc::new(ConversionQueue::start(Arc::clone(&world.ram)).unwrap());
        let rounds = total / (PER_ROUND * (VCPUS as u64 + 1));
        let barrier = Arc::new(Barrier::new(VCPUS + 2));
        // vCPU threads convert (one through the queue, one directly); one more thread
        // attaches, detaches and flushes (and converts); this one checks between rounds.
        let threads: Vec<_> = (0..=VCPUS)
            .map(|t| {
                let (world, queue, barrier) =
                    (Arc::clone(&world), Arc::clone(&queue), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    let mut rng = Rng(seed ^ (0x1234_5678 * (t as u64 + 1)));
                    for _ in 0..rounds {
                        for _ in 0..PER_ROUND {
                            let q = (t == 0).then_some(&*queue);
                            let _ = world.random_op(&mut rng, q);
                        }
                        barrier.wait();
                        barrier.wait();
                    }
                })
            })
            .collect();
        for _ in 0..rounds {
            barrier.wait();
            world.check(None);
            barrier.wait();
        }
        for t in threads {
            t.join().unwrap();
        }
        let (ops, calls, injected) = world.report(&format!("{} threads", VCPUS + 1));
        assert!(ops >= rounds * PER_ROUND * (VCPUS as u64 + 1));
        assert!(injected * 20 >= calls, "at least 5% of kernel calls fail");
        drop(queue);
    }
}

fn lock_set<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
