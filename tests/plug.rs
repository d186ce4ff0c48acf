//! virtio-mem plug and unplug through `GuestRam`, and region removal: the procedures of
//! `gmem_dma::plug`, then random sequences of conversions, plugs, unplugs, removals and flushes
//! with injected failures, checking every invariant after every step (the checker of
//! `tests/common`, extended to plugged state) and that the bytes held back are exactly the
//! bytes backed where no page is in use.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Dev, Fault, Faults, PAGE, Rig, fault, iommu_faults, policy, range};
use discard_manager::{Attribute, View};
use gmem_dma::{
    ConversionError, DeviceConfig, DiscardPolicy, GuestRam, MapBy, RecordingAttributes,
    RegionBacking, RegionSpec, RemovalError,
};
use iommu::EmulatedIommu;
use iommu::emulated::{CallKind, UnmapStyle};
use proptest::prelude::*;

const BASE: u64 = 0x4000_0000;
const PAGES: u64 = 32;

/// A confidential region of `PAGES` pages, plugged or not, over a software backing.
fn rig(policy: DiscardPolicy, plugged: bool) -> Rig {
    let attrs = Arc::new(RecordingAttributes::new());
    let ram = Arc::new(GuestRam::new(attrs.clone()));
    let region = add(&ram, policy, plugged);
    Rig { ram, attrs, region }
}

fn add(ram: &GuestRam, policy: DiscardPolicy, plugged: bool) -> Arc<gmem_dma::Region> {
    let backing = RegionBacking::software(BASE, PAGES * PAGE).unwrap();
    let spec = RegionSpec {
        granularity: PAGE,
        initial: Attribute::Private,
        policy,
        initially_plugged: plugged,
    };
    ram.add_region(backing, spec).unwrap()
}

fn page(p: u64) -> u64 {
    BASE + p * PAGE
}

/// A shared-view device (by address) and a trusted-IO one.
fn devices(rig: &Rig) -> [Dev; 2] {
    [attach(rig, 0), attach(rig, 2)]
}

/// A plugged region in use: every page backed, both devices attached, a lazy policy with room
/// to spare (conversions hold, an unplug or a removal must not), pages `0..shared` shared.
fn used(shared: u64) -> (Rig, [Dev; 2]) {
    let rig = rig(
        DiscardPolicy::Lazy {
            budget_bytes: 1 << 20,
        },
        true,
    );
    rig.touch(View::Private, rig.region.range());
    let devs = devices(&rig);
    rig.convert(range(page(0), shared * PAGE), Attribute::Shared)
        .unwrap();
    (rig, devs)
}

#[test]
fn unplug_unmaps_both_views_frees_both_sides_and_holds_nothing_back() {
    let (rig, [nic, tdisp]) = used(8);
    assert_eq!(rig.region.held_back().private_bytes, 8 * PAGE);
    // Pages 4..12: four shared (mapped by the nic), four private (mapped by tdisp).
    let unplug = rig.ram.unplug(range(page(4), 8 * PAGE)).unwrap();
    assert_eq!(unplug.runs(), [range(page(4), 8 * PAGE)]);
    assert_eq!(nic.iommu.mapping_count(), 4, "pages 0..4 stay mapped");
    assert_eq!(tdisp.iommu.mapping_count() as u64, PAGES - 12);
    let b = rig.region.backing();
    let r = range(page(4), 8 * PAGE);
    assert!(
        b.resident_pages(View::Shared, r)
            .unwrap()
            .iter()
            .all(|&p| !p)
    );
    assert!(
        b.resident_pages(View::Private, r)
            .unwrap()
            .iter()
            .all(|&p| !p)
    );
    // Only the vacated private side of pages 0..4 is still held.
    assert_eq!(rig.region.held_back().total(), 4 * PAGE);
    assert_eq!(unplug.held.total(), 4 * PAGE);
    let state = rig.region.state().counts().unwrap();
    assert_eq!(state.unplugged_bytes, 8 * PAGE);
    rig.check(&[&nic, &tdisp], &[vec![], vec![]], None);
    rig.check_held_exactly();
}

#[test]
fn conversions_of_unplugged_memory_are_refused_and_change_nothing() {
    let rig = rig(DiscardPolicy::Eager, false);
    let [nic, tdisp] = devices(&rig);
    assert_eq!(
        tdisp.iommu.mapping_count(),
        0,
        "nothing plugged, nothing mapped"
    );
    rig.ram.plug(range(page(0), 2 * PAGE), None).unwrap();
    rig.touch(View::Private, range(page(0), 2 * PAGE));
    let err = rig
        .ram
        .convert(range(page(0), 4 * PAGE), Attribute::Shared)
        .unwrap_err();
    match &err {
        ConversionError::Unplugged { unplugged, .. } => {
            assert_eq!(
                *unplugged,
                range(page(2), 2 * PAGE),
                "clipped to the request"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        gmem_dma::answer::conversion_failure(&err).errno,
        libc::EINVAL
    );
    assert_eq!(nic.iommu.mapping_count(), 0);
    assert_eq!(tdisp.iommu.mapping_count(), 2);
    rig.check(&[&nic, &tdisp], &[vec![], vec![]], None);
}

#[test]
fn plug_takes_the_regions_attribute_or_the_one_the_vmm_gives() {
    let rig = rig(DiscardPolicy::Eager, false);
    let [nic, tdisp] = devices(&rig);
    // The region's attribute: private on this confidential VM.
    let p = rig.ram.plug(range(page(0), 4 * PAGE), None).unwrap();
    assert_eq!(p.bytes(), 4 * PAGE);
    rig.touch(View::Private, range(page(0), 4 * PAGE));
    assert_eq!(tdisp.iommu.mapping_count(), 4);
    // The VMM says shared: KVM's attribute follows, the nic maps them.
    rig.ram
        .plug(range(page(8), 4 * PAGE), Some(Attribute::Shared))
        .unwrap();
    assert_eq!(nic.iommu.mapping_count(), 4);
    assert_eq!(rig.attrs.attribute_at(page(8)), Attribute::Shared);
    rig.touch(View::Shared, range(page(8), 4 * PAGE));
    // Plugging a plugged range again changes nothing (its attribute is kept).
    let again = rig
        .ram
        .plug(range(page(0), 4 * PAGE), Some(Attribute::Shared))
        .unwrap();
    assert!(again.runs().is_empty());
    assert_eq!(rig.attrs.attribute_at(page(0)), Attribute::Private);
    rig.check(&[&nic, &tdisp], &[vec![], vec![]], None);
    // Unplug then plug again: the pages come back zeroed.
    rig.touch(View::Shared, range(page(8), PAGE));
    rig.ram.unplug(range(page(8), 4 * PAGE)).unwrap();
    rig.ram
        .plug(range(page(8), 4 * PAGE), Some(Attribute::Shared))
        .unwrap();
    let mut buf = [0xffu8; 16];
    nic.iommu.dma_read(page(8), &mut buf).unwrap();
    assert_eq!(buf, [0; 16], "a re-plugged page reads zero");
}

#[test]
fn a_plug_over_the_budget_is_refused_before_anything_changed() {
    let rig = rig(DiscardPolicy::Eager, false);
    let small = EmulatedIommu::builder().mapping_budget(Some(3)).build();
    let nic = rig.attach("nic", small, DeviceConfig::shared());
    let err = rig
        .ram
        .plug(range(page(0), 4 * PAGE), Some(Attribute::Shared))
        .unwrap_err();
    assert!(
        matches!(err, ConversionError::MappingBudget { needed: 4, .. }),
        "{err:?}"
    );
    assert_eq!(
        rig.region.state().counts().unwrap().unplugged_bytes,
        PAGES * PAGE
    );
    assert!(
        rig.attrs
            .calls()
            .iter()
            .all(|c| c.range == rig.region.range())
    );
    rig.check(&[&nic], &[vec![]], None);
}

#[test]
fn a_failed_map_rolls_a_plug_back_with_the_attribute() {
    let rig = rig(DiscardPolicy::Eager, false);
    let [nic, tdisp] = devices(&rig);
    let faults = iommu_faults(&nic.iommu);
    let count = AtomicUsize::new(0);
    faults.add(move |&(k, _, _)| {
        (k != CallKind::Unmap && count.fetch_add(1, Ordering::SeqCst) == 2).then_some(libc::ENOMEM)
    });
    let err = rig
        .ram
        .plug(range(page(0), 4 * PAGE), Some(Attribute::Shared))
        .unwrap_err();
    assert!(matches!(err, ConversionError::Map { .. }), "{err:?}");
    // Still unplugged and private, in the manager and in KVM; nothing mapped.
    assert_eq!(
        rig.region.state().counts().unwrap().unplugged_bytes,
        PAGES * PAGE
    );
    assert_eq!(rig.attrs.private_ranges(), [(BASE, page(PAGES))]);
    assert_eq!(nic.iommu.mapping_count(), 0);
    rig.check(&[&nic, &tdisp], &[vec![], vec![]], None);
}

#[test]
fn a_failed_unmap_rolls_an_unplug_back_and_a_stale_range_is_refused() {
    let rig = rig(DiscardPolicy::Eager, true);
    rig.touch(View::Private, rig.region.range());
    let [nic, tdisp] = devices(&rig);
    rig.convert(range(page(0), 4 * PAGE), Attribute::Shared)
        .unwrap();
    let faults = iommu_faults(&nic.iommu);
    faults.add(|&(k, _, _)| (k == CallKind::Unmap).then_some(libc::EIO));
    let err = rig.ram.unplug(range(page(0), 8 * PAGE)).unwrap_err();
    assert!(matches!(err, ConversionError::Unmap { .. }), "{err:?}");
    assert_eq!(rig.region.state().counts().unwrap().unplugged_bytes, 0);
    assert_eq!(nic.iommu.mapping_count(), 4);
    assert_eq!(tdisp.iommu.mapping_count() as u64, PAGES - 4);
    rig.check(&[&nic, &tdisp], &[vec![], vec![]], None);
    faults.clear();
    // Now the unplug goes through.
    rig.ram.unplug(range(page(0), 8 * PAGE)).unwrap();
    assert_eq!(nic.iommu.mapping_count(), 0);
    rig.check(&[&nic, &tdisp], &[vec![], vec![]], None);
    rig.check_held_exactly();
}

#[test]
fn removing_a_region_unmaps_every_device_and_frees_the_backing() {
    let (rig, [nic, tdisp]) = used(4);
    let backing = Arc::downgrade(rig.region.backing());
    let removal = rig.ram.remove_region(rig.region.range()).unwrap();
    assert_eq!(removal.devices, 2);
    assert_eq!(removal.freed_bytes, 2 * PAGES * PAGE);
    assert_eq!(nic.iommu.mapping_count(), 0);
    assert_eq!(tdisp.iommu.mapping_count(), 0);
    assert!(rig.ram.regions().is_empty());
    assert_eq!(rig.ram.held_back().total(), 0);
    // KVM's table is left as a new region expects.
    assert!(rig.attrs.private_ranges().is_empty());
    let err = rig
        .ram
        .convert(range(page(0), PAGE), Attribute::Private)
        .unwrap_err();
    assert!(matches!(err, ConversionError::NoRegion { .. }), "{err:?}");
    let Rig { region, .. } = rig;
    drop(region);
    assert!(
        backing.upgrade().is_none(),
        "nothing keeps the backing alive"
    );
}

#[test]
fn a_removed_region_whose_unmaps_fail_stays_alive_while_mapped() {
    let rig = rig(DiscardPolicy::Eager, true);
    let nic = rig.attach("nic", EmulatedIommu::new(), DeviceConfig::shared());
    rig.convert(range(page(0), 4 * PAGE), Attribute::Shared)
        .unwrap();
    nic.iommu.dma_write(page(1), &[0x77; 8]).unwrap();
    let faults = iommu_faults(&nic.iommu);
    faults.add(|&(k, _, _)| (k == CallKind::Unmap).then_some(libc::EIO));
    let backing = Arc::downgrade(rig.region.backing());
    let err = rig.ram.remove_region(rig.region.range()).unwrap_err();
    match &err {
        RemovalError::StillMapped { stale, .. } => assert_eq!(stale[0].0, "nic (detached)"),
        other => panic!("{other:?}"),
    }
    assert!(rig.ram.regions().is_empty(), "the region left guest RAM");
    let Rig { ram, region, .. } = rig;
    drop(region);
    // The mapping still names the memory: it is alive, and not freed.
    assert!(backing.upgrade().is_some());
    let mut buf = [0u8; 8];
    nic.iommu.dma_read(page(1), &mut buf).unwrap();
    assert_eq!(buf, [0x77; 8]);
    faults.clear();
    // Guest RAM's teardown unmaps what is left, then frees the memory.
    drop(ram);
    assert_eq!(nic.iommu.mapping_count(), 0);
    assert!(backing.upgrade().is_none());
}

#[derive(Clone, Debug)]
enum Op {
    Convert {
        start: u64,
        pages: u64,
        to: Attribute,
    },
    Plug {
        start: u64,
        pages: u64,
        to: Option<Attribute>,
    },
    Unplug {
        start: u64,
        pages: u64,
    },
    Flush,
    /// Remove the region and add a fresh one (plugged or not) in its place.
    Replace {
        plugged: bool,
    },
}

fn attribute() -> impl Strategy<Value = Attribute> {
    prop_oneof![Just(Attribute::Shared), Just(Attribute::Private)]
}

fn op() -> impl Strategy<Value = (Op, Vec<(Fault, usize)>)> {
    let span = (0..PAGES, 1..10u64).prop_map(|(s, p)| (s, p.min(PAGES - s)));
    let op = prop_oneof![
        6 => (span.clone(), attribute()).prop_map(|((start, pages), to)| Op::Convert { start, pages, to }),
        3 => (span.clone(), proptest::option::of(attribute()))
            .prop_map(|((start, pages), to)| Op::Plug { start, pages, to }),
        3 => span.prop_map(|(start, pages)| Op::Unplug { start, pages }),
        1 => Just(Op::Flush),
        1 => any::<bool>().prop_map(|plugged| Op::Replace { plugged }),
    ];
    (
        op,
        proptest::collection::vec((fault(false), 0..3usize), 0..3),
    )
}

const NAMES: [&str; 3] = ["nic-va", "nic-file", "tdisp"];

fn attach(rig: &Rig, i: usize) -> Dev {
    let (iommu, config) = match i {
        0 => (EmulatedIommu::new(), DeviceConfig::shared()),
        1 => (
            EmulatedIommu::builder()
                .unmap_style(UnmapStyle::Iommufd)
                .mapping_budget(Some(20))
                .build(),
            DeviceConfig::shared_by(MapBy::File),
        ),
        _ => (EmulatedIommu::new(), DeviceConfig::trusted_io()),
    };
    rig.attach(NAMES[i], iommu, config)
}

/// What a failed call must leave as it was (stale mappings excepted, as in
/// `tests/fault_injection.rs`).
fn unchanged(rig: &Rig, before: &common::Snapshot, devs: &[Dev], e: &ConversionError) {
    let refs: Vec<&Dev> = devs.iter().collect();
    let after = rig.snapshot(&refs);
    assert_eq!(after.runs, before.runs, "{e}: manager changed");
    assert_eq!(after.private, before.private, "{e}: KVM attributes changed");
    assert_eq!(
        after.shared_resident, before.shared_resident,
        "{e}: shared backing changed"
    );
    assert_eq!(
        after.private_resident, before.private_resident,
        "{e}: private backing changed"
    );
}

fn run(policy: DiscardPolicy, ops: Vec<(Op, Vec<(Fault, usize)>)>) {
    let mut rig = rig(policy, true);
    rig.touch(View::Private, rig.region.range());
    let mut devs: Vec<Dev> = (0..3).map(|i| attach(&rig, i)).collect();
    let mut faults = Faults::new(&rig, &devs);
    for (op, injected) in ops {
        let refs: Vec<&Dev> = devs.iter().collect();
        let before = rig.snapshot(&refs);
        let plugged_before = rig.region.state().counts().unwrap().unplugged_bytes;
        let stale_before: Vec<(u64, u64)> = rig.stale_extents();
        for d in &devs {
            d.iommu.take_calls();
        }
        faults.install(&injected, || {});
        let (op_range, result) = match op {
            Op::Convert { start, pages, to } => {
                let r = range(page(start), pages * PAGE);
                (Some(r), rig.convert(r, to).map(|_| ()))
            }
            Op::Plug { start, pages, to } => {
                let r = range(page(start), pages * PAGE);
                let result = rig.ram.plug(r, to);
                if let Ok(p) = &result {
                    // The guest uses what it was given.
                    let side = to.unwrap_or(Attribute::Private).view();
                    for &run in p.runs() {
                        rig.touch(side, run);
                    }
                }
                (Some(r), result.map(|_| ()))
            }
            Op::Unplug { start, pages } => {
                let r = range(page(start), pages * PAGE);
                let result = rig.ram.unplug(r);
                if result.is_ok() {
                    let counts = rig.region.state().counts().unwrap();
                    assert!(counts.unplugged_bytes >= plugged_before);
                    assert!(
                        !rig.region
                            .state()
                            .runs(r)
                            .unwrap()
                            .iter()
                            .any(|x| x.plugged)
                    );
                }
                (Some(r), result.map(|_| ()))
            }
            Op::Flush => {
                rig.ram.flush_discards();
                (None, Ok(()))
            }
            Op::Replace { plugged } => {
                faults.clear();
                let range = rig.region.range();
                match rig.ram.remove_region(range) {
                    Ok(_) => {
                        for d in &devs {
                            assert_eq!(d.iommu.mapping_count(), 0, "a removed region stays mapped");
                        }
                    }
                    Err(RemovalError::StillMapped { .. }) => {
                        // Stale mappings from earlier failures: guest RAM keeps the devices'
                        // ledgers (and the old memory) alive. The devices leave (their teardown
                        // unmaps what is left) and fresh ones come for the new region.
                        for d in &devs {
                            rig.ram.detach_device(d.id).unwrap();
                            assert_eq!(d.iommu.mapping_count(), 0);
                        }
                        devs.clear();
                    }
                    Err(e) => panic!("{e}"),
                }
                rig = Rig {
                    ram: rig.ram.clone(),
                    attrs: rig.attrs.clone(),
                    region: add(&rig.ram, policy, plugged),
                };
                if plugged {
                    rig.touch(View::Private, rig.region.range());
                }
                if devs.is_empty() {
                    devs = (0..3).map(|i| attach(&rig, i)).collect();
                }
                faults = Faults::new(&rig, &devs);
                (None, Ok(()))
            }
        };
        faults.clear();
        let mut calls: Vec<_> = devs.iter().map(|d| d.iommu.take_calls()).collect();
        match &result {
            Ok(()) => {}
            Err(ConversionError::RollbackFailed { detached, .. }) => {
                for name in detached {
                    let i = NAMES.iter().position(|n| n == name).unwrap();
                    calls[i].clear();
                    devs[i] = attach(&rig, i);
                    faults.devs[i] = iommu_faults(&devs[i].iommu);
                }
            }
            Err(e) => {
                assert!(
                    !matches!(e, ConversionError::AttributeRollback { .. }),
                    "{e:?}"
                );
                assert_ne!(gmem_dma::answer::conversion_failure(e).errno, 0);
                unchanged(&rig, &before, &devs, e);
            }
        }
        let refs: Vec<&Dev> = devs.iter().collect();
        rig.check_allowing(&refs, &calls, op_range, &stale_before);
        rig.check_held_exactly();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_plugs_unplugs_conversions_and_removals_keep_every_invariant(
        policy in policy(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        run(policy, ops);
    }
}
