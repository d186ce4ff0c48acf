//! The conversion engine against the emulated IOMMU and the recording attribute table: the order
//! of steps, each failure's rollback, the budget, the discard policies, devices coming and going.

mod common;

use std::sync::Arc;

use common::{MAPPING_STYLES, PAGE, Rig, emulated, per_style, range};
use discard_manager::{Attribute, View};
use gmem_dma::{
    AttachError, ConversionError, DeviceConfig, DiscardPolicy, MapBy, handle_memory_fault,
    hypercall_return,
};
use iommu::emulated::CallKind;
use iommu::{EmulatedIommu, FileMapSupport};

const BASE: u64 = 0x1_0000_0000;

fn rig(policy: DiscardPolicy) -> Rig {
    let rig = Rig::new(BASE, 16, policy);
    rig.touch(View::Private, rig.region.range());
    rig
}

#[test]
fn sharing_maps_each_granule_or_the_run_and_unsharing_unmaps_them_in_one_call() {
    for style in MAPPING_STYLES {
        let rig = rig(DiscardPolicy::Eager);
        let dev = rig.attach("nic", emulated(style), DeviceConfig::shared());
        let r = range(BASE + 4 * PAGE, 4 * PAGE);
        let c = rig.convert(r, Attribute::Shared).unwrap();
        assert_eq!(c.runs(), [r]);
        let calls = dev.iommu.take_calls();
        assert_eq!(
            calls.iter().filter(|c| c.kind == CallKind::MapVa).count(),
            per_style(style, 4, 1)
        );
        rig.check(&[&dev], &[calls], Some(r));
        rig.convert(r, Attribute::Private).unwrap();
        let calls = dev.iommu.take_calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(
            (calls[0].kind, calls[0].iova, calls[0].len),
            (CallKind::Unmap, r.start(), r.len())
        );
        rig.check(&[&dev], &[calls], Some(r));
        // Eager: the shared side was freed at the end of the conversion.
        assert_eq!(
            rig.region.backing().allocated_bytes(View::Shared).unwrap(),
            0
        );
    }
}

#[test]
fn converting_part_of_a_shared_range_leaves_the_rest_mapped() {
    for style in MAPPING_STYLES {
        let rig = rig(DiscardPolicy::Eager);
        let dev = rig.attach("nic", emulated(style), DeviceConfig::shared());
        rig.convert(range(BASE, 8 * PAGE), Attribute::Shared)
            .unwrap();
        dev.iommu.take_calls();
        let middle = range(BASE + 3 * PAGE, 2 * PAGE);
        rig.convert(middle, Attribute::Private).unwrap();
        let calls = dev.iommu.take_calls();
        // No window: only the middle two pages were unmapped; DMA to the rest still works.
        rig.check(&[&dev], &[calls], Some(middle));
        let mut buf = [0u8; 1];
        dev.iommu.dma_read(BASE + 2 * PAGE, &mut buf).unwrap();
        dev.iommu.dma_read(BASE + 5 * PAGE, &mut buf).unwrap();
        assert!(dev.iommu.dma_read(BASE + 3 * PAGE, &mut buf).is_err());
    }
}

#[test]
fn a_failed_unmap_fails_the_conversion_to_private_and_changes_nothing() {
    for style in MAPPING_STYLES {
        let rig = rig(DiscardPolicy::Eager);
        let dev = rig.attach("nic", emulated(style), DeviceConfig::shared());
        let r = range(BASE, 4 * PAGE);
        rig.convert(r, Attribute::Shared).unwrap();
        dev.iommu.take_calls();
        let before = rig.snapshot(&[&dev]);
        dev.iommu
            .inject_failures(|kind, _, _| (*kind == CallKind::Unmap).then_some(libc::EIO));
        let err = rig.convert(r, Attribute::Private).unwrap_err();
        assert!(matches!(err, ConversionError::Unmap { .. }), "{err:?}");
        assert_eq!(
            gmem_dma::answer::conversion_failure(&err).errno,
            libc::EBUSY
        );
        assert_eq!(hypercall_return(&Err(err)) as i64, -i64::from(libc::EBUSY));
        // Isolation: the conversion did not succeed, the pages stay shared and mapped, KVM was
        // never asked, and no backing was freed.
        assert_eq!(rig.snapshot(&[&dev]), before);
        assert!(
            rig.attrs
                .calls()
                .iter()
                .all(|c| c.attribute == Attribute::Shared || c.range != r)
        );
        dev.iommu.clear_failures();
        rig.convert(r, Attribute::Private).unwrap();
        let calls = dev.iommu.take_calls();
        rig.check(&[&dev], &[calls], Some(r));
    }
}

#[test]
fn a_failed_merged_unmap_fails_the_conversion_and_changes_nothing() {
    for style in MAPPING_STYLES {
        let rig = rig(DiscardPolicy::Eager);
        let dev = rig.attach("nic", emulated(style), DeviceConfig::shared());
        // Two separate shared runs: the discard unmaps them in one ledger call over the gap.
        rig.convert(range(BASE, 2 * PAGE), Attribute::Shared)
            .unwrap();
        rig.convert(range(BASE + 4 * PAGE, 2 * PAGE), Attribute::Shared)
            .unwrap();
        dev.iommu.take_calls();
        let before = rig.snapshot(&[&dev]);
        dev.iommu
            .inject_failures(|kind, _, _| (*kind == CallKind::Unmap).then_some(libc::EIO));
        let r = range(BASE, 8 * PAGE);
        let err = rig.convert(r, Attribute::Private).unwrap_err();
        assert!(
            matches!(err, ConversionError::Unmap { count: 1, .. }),
            "{err:?}"
        );
        dev.iommu.clear_failures();
        let calls = dev.iommu.take_calls();
        let unmaps = unmap_calls(&calls);
        // One merged call, which failed: the rollback found both runs still mapped.
        assert_eq!(unmaps, [(BASE, 6 * PAGE)]);
        assert_eq!(rig.snapshot(&[&dev]), before);
        rig.check(&[&dev], &[calls], Some(r));
    }
}

#[test]
fn unsharing_a_mixed_range_unmaps_its_shared_runs_in_one_call() {
    for style in MAPPING_STYLES {
        let rig = rig(DiscardPolicy::Eager);
        let dev = rig.attach("nic", emulated(style), DeviceConfig::shared());
        // [shared A][private B][shared C][private][shared E]
        for (start, len) in [(0, 2), (4, 3), (9, 1)] {
            rig.convert(range(BASE + start * PAGE, len * PAGE), Attribute::Shared)
                .unwrap();
        }
        dev.iommu.take_calls();
        let r = range(BASE, 12 * PAGE);
        let c = rig.convert(r, Attribute::Private).unwrap();
        assert_eq!(c.runs().len(), 3);
        let calls = dev.iommu.take_calls();
        let unmaps = unmap_calls(&calls);
        assert_eq!(unmaps, [(BASE, 10 * PAGE)], "one call from A to E");
        assert_eq!(dev.iommu.mapping_count(), 0);
        rig.check(&[&dev], &[calls], Some(r));
    }
}

#[test]
fn a_stale_mapping_between_the_runs_is_not_swept_by_the_merged_unmap() {
    for style in MAPPING_STYLES {
        let rig = rig(DiscardPolicy::Eager);
        // Two trusted-IO devices (private view): `t1` will keep a stale mapping of B.
        let t1 = rig.attach("t1", emulated(style), DeviceConfig::trusted_io());
        let t2 = rig.attach("t2", emulated(style), DeviceConfig::trusted_io());
        let b = range(BASE + 2 * PAGE, 2 * PAGE);
        rig.convert(b, Attribute::Shared).unwrap();
        // B back to private: t1 maps it, t2 fails, and undoing t1's map fails too.
        t1.iommu.inject_failures(move |kind, iova, _| {
            (*kind == CallKind::Unmap && iova == b.start()).then_some(libc::EIO)
        });
        t2.iommu.inject_failures(move |kind, iova, _| {
            (*kind == CallKind::MapFile && iova == b.start()).then_some(libc::ENOMEM)
        });
        let err = rig.convert(b, Attribute::Private).unwrap_err();
        assert!(matches!(err, ConversionError::Map { .. }), "{err:?}");
        t2.iommu.clear_failures();
        let stale = rig.region.stale_mappings();
        assert_eq!(
            stale,
            [("t1".to_string(), vec![b])],
            "t1 still maps B, which stayed shared"
        );
        t1.iommu.take_calls();
        t2.iommu.take_calls();
        // [private A][shared B, stale on t1][private C] to shared: both devices lose A and C.
        let r = range(BASE, 6 * PAGE);
        let punches = rig.region.backing().punch_stats().calls;
        rig.convert(r, Attribute::Shared).unwrap();
        // The stale mapping may pin B's private page: only A's and C's are freed, one by one.
        assert_eq!(rig.region.backing().punch_stats().calls - punches, 2);
        let unmaps = |dev: &common::Dev| -> Vec<(u64, u64, bool)> {
            dev.iommu
                .take_calls()
                .iter()
                .filter(|c| c.kind == CallKind::Unmap)
                .map(|c| (c.iova, c.len, c.result.is_ok()))
                .collect()
        };
        assert_eq!(
            unmaps(&t1),
            [
                (b.start(), b.len(), false), // the stale retry, still failing
                (BASE, 2 * PAGE, true),
                (BASE + 4 * PAGE, 2 * PAGE, true),
            ],
            "B lies between A and C: two calls, B stays mapped"
        );
        assert_eq!(
            unmaps(&t2),
            [(BASE, 6 * PAGE, true)],
            "nothing between: one call"
        );
        assert!(t1.iommu.page_table().iter().any(|e| e.iova == b.start()));
        assert!(
            t1.iommu
                .page_table()
                .iter()
                .any(|e| e.iova <= b.start() + PAGE && b.end() <= e.iova + e.len),
            "t1 still maps all of B"
        );
        assert_eq!(rig.region.stale_mappings().len(), 1);
        // Once the kernel lets go, the next conversion's retry unmaps it.
        t1.iommu.clear_failures();
        rig.convert(range(BASE + 8 * PAGE, PAGE), Attribute::Shared)
            .unwrap();
        assert!(rig.region.stale_mappings().is_empty());
        assert_eq!(t1.iommu.mapping_count(), per_style(style, 16 - 7, 2));
        rig.check(
            &[&t1, &t2],
            &[t1.iommu.take_calls(), t2.iommu.take_calls()],
            None,
        );
    }
}

#[test]
fn a_failed_map_rolls_back_the_attribute_and_keeps_both_backings() {
    for style in MAPPING_STYLES {
        let rig = rig(DiscardPolicy::Eager);
        let dev = rig.attach("nic", emulated(style), DeviceConfig::shared());
        let before = rig.snapshot(&[&dev]);
        // The map of the third page (the whole run's, where the IOMMU cuts) fails.
        dev.iommu.inject_failures(|kind, iova, len| {
            let third = BASE + 2 * PAGE;
            (*kind == CallKind::MapVa && iova <= third && third < iova + len)
                .then_some(libc::ENOMEM)
        });
        let r = range(BASE, 4 * PAGE);
        let err = rig.convert(r, Attribute::Shared).unwrap_err();
        match &err {
            ConversionError::Map {
                device,
                view,
                range: refused,
                ..
            } => {
                assert_eq!((device.as_str(), *view, *refused), ("nic", View::Shared, r));
            }
            other => panic!("{other:?}"),
        }
        dev.iommu.clear_failures();
        // The attribute went to shared and back; the private data was not punched.
        let attr_calls = rig.attrs.calls();
        let last_two: Vec<_> = attr_calls[attr_calls.len() - 2..]
            .iter()
            .map(|c| c.attribute)
            .collect();
        assert_eq!(last_two, [Attribute::Shared, Attribute::Private]);
        assert_eq!(rig.snapshot(&[&dev]), before);
        assert_eq!(rig.region.backing().punch_stats().calls, 0);
        let calls = dev.iommu.take_calls();
        rig.check(&[&dev], &[calls], Some(r));
    }
}

#[test]
fn a_failed_attribute_change_remaps_the_shared_view() {
    for style in MAPPING_STYLES {
        let rig = rig(DiscardPolicy::Eager);
        let dev = rig.attach("nic", emulated(style), DeviceConfig::shared());
        let r = range(BASE, 4 * PAGE);
        rig.convert(r, Attribute::Shared).unwrap();
        let before = rig.snapshot(&[&dev]);
        rig.attrs.inject_failures(|_, a| a == Attribute::Private);
        let err = rig.convert(r, Attribute::Private).unwrap_err();
        assert!(matches!(err, ConversionError::Attribute(_)), "{err:?}");
        assert_eq!(gmem_dma::answer::conversion_failure(&err).errno, libc::EIO);
        rig.attrs.clear_failures();
        assert_eq!(rig.snapshot(&[&dev]), before);
        let calls = dev.iommu.take_calls();
        rig.check(&[&dev], &[calls], Some(r));
    }
}

#[test]
fn a_conversion_beyond_the_mapping_budget_is_refused_up_front() {
    let rig = rig(DiscardPolicy::Eager);
    let dev = rig.attach(
        "type1-nic",
        EmulatedIommu::builder().mapping_budget(Some(3)).build(),
        DeviceConfig::shared(),
    );
    let before = rig.snapshot(&[&dev]);
    let calls_before = rig.attrs.calls().len();
    let err = rig
        .convert(range(BASE, 4 * PAGE), Attribute::Shared)
        .unwrap_err();
    match &err {
        ConversionError::MappingBudget { device, needed, .. } => {
            assert_eq!((device.as_str(), *needed), ("type1-nic", 4));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("no room for the 4 mappings"));
    assert_eq!(
        gmem_dma::answer::conversion_failure(&err).errno,
        libc::ENOSPC
    );
    assert_eq!(rig.snapshot(&[&dev]), before);
    assert_eq!(rig.attrs.calls().len(), calls_before, "KVM was not asked");
    assert!(dev.iommu.take_calls().is_empty(), "the IOMMU was not asked");
    // Three pages fit.
    rig.convert(range(BASE, 3 * PAGE), Attribute::Shared)
        .unwrap();
    assert_eq!(rig.ram.device_budget(dev.id), Some(0));
}

#[test]
fn a_failed_free_after_success_is_held_back_and_retried() {
    for style in MAPPING_STYLES {
        let rig = rig(DiscardPolicy::Eager);
        let dev = rig.attach("nic", emulated(style), DeviceConfig::shared());
        let r = range(BASE, 2 * PAGE);
        rig.region.backing().inject_punch_failures(|_, _| true);
        let c = rig.convert(r, Attribute::Shared).unwrap();
        assert_eq!(c.flushed.failed_ranges, 1);
        assert_eq!(c.held.private_bytes, 2 * PAGE);
        assert_eq!(c.held.failed_bytes, 2 * PAGE);
        // The conversion stands: the pages are shared and mapped.
        let calls = dev.iommu.take_calls();
        rig.check(&[&dev], &[calls], Some(r));
        rig.region.backing().clear_punch_failures();
        let f = rig.ram.flush_discards();
        assert_eq!(f.punched_bytes, 2 * PAGE);
        assert_eq!(rig.ram.held_back().total(), 0);
        assert_eq!(
            rig.region.backing().allocated_bytes(View::Private).unwrap(),
            14 * PAGE
        );
    }
}

fn flip_flop(policy: DiscardPolicy) -> u64 {
    let rig = rig(policy);
    let dev = rig.attach("nic", EmulatedIommu::new(), DeviceConfig::shared());
    let bounce = range(BASE + 8 * PAGE, PAGE);
    for _ in 0..50 {
        rig.convert(bounce, Attribute::Shared).unwrap();
        rig.convert(bounce, Attribute::Private).unwrap();
    }
    let calls = dev.iommu.take_calls();
    rig.check(&[&dev], &[calls], None);
    rig.region.backing().punch_stats().calls
}

#[test]
fn lazy_discard_makes_flip_flops_free_and_eager_punches_every_time() {
    assert_eq!(flip_flop(DiscardPolicy::Eager), 100);
    assert_eq!(
        flip_flop(DiscardPolicy::Lazy {
            budget_bytes: 64 * PAGE
        }),
        0
    );
    // A budget below one page flushes every time, like eager.
    assert_eq!(flip_flop(DiscardPolicy::Lazy { budget_bytes: 0 }), 100);
}

#[test]
fn batched_discard_coalesces_adjacent_frees() {
    let rig = rig(DiscardPolicy::Batched {
        max_ranges: 4,
        max_bytes: 8 * PAGE,
    });
    for p in 0..8 {
        let c = rig
            .convert(range(BASE + p * PAGE, PAGE), Attribute::Shared)
            .unwrap();
        assert_eq!(c.flushed.punched_ranges, u64::from(p == 7), "page {p}");
    }
    // Eight single-page conversions, one fallocate.
    assert_eq!(rig.region.backing().punch_stats().calls, 1);
    rig.check(&[], &[], None);
}

#[test]
fn trusted_io_device_maps_private_memory_by_file() {
    for style in MAPPING_STYLES {
        let rig = rig(DiscardPolicy::Eager);
        let tio = rig.attach("tdisp", emulated(style), DeviceConfig::trusted_io());
        let nic = rig.attach("nic", emulated(style), DeviceConfig::shared());
        // The whole region starts private: the trusted device maps it all, by file.
        assert_eq!(tio.iommu.mapping_count(), per_style(style, 16, 1));
        assert!(
            tio.iommu
                .calls()
                .iter()
                .all(|c| c.kind == CallKind::MapFile)
        );
        let mut buf = [0u8; 1];
        tio.iommu.dma_read(BASE + PAGE, &mut buf).unwrap();
        assert_eq!(buf, [0xa5], "the device reads the private backing");
        let r = range(BASE, 4 * PAGE);
        rig.convert(r, Attribute::Shared).unwrap();
        // Cutting: pages 0-3 were cut from the one mapping of the region.
        assert_eq!(tio.iommu.mapping_count(), per_style(style, 12, 1));
        assert_eq!(nic.iommu.mapping_count(), per_style(style, 4, 1));
        let calls = [tio.iommu.take_calls(), nic.iommu.take_calls()];
        rig.check(&[&tio, &nic], &calls, None);
    }
}

#[test]
fn a_backend_that_cannot_map_guest_memfd_is_refused_at_attach_with_the_reason() {
    let rig = rig(DiscardPolicy::Eager);
    let mainline = Arc::new(
        EmulatedIommu::builder()
            .map_file(FileMapSupport::Memfd)
            .build(),
    );
    let err = rig
        .ram
        .attach_device("tdisp", mainline.clone(), DeviceConfig::trusted_io())
        .unwrap_err();
    assert!(matches!(err, AttachError::Unsupported { .. }), "{err:?}");
    assert!(err.to_string().contains("guest_memfd"), "{err}");
    let type1 = Arc::new(
        EmulatedIommu::builder()
            .map_file(FileMapSupport::None)
            .build(),
    );
    let by_file = DeviceConfig::shared_by(MapBy::File);
    assert!(rig.ram.attach_device("nic", type1, by_file).is_err());
    assert!(rig.ram.devices().is_empty());
    assert_eq!(mainline.mapping_count(), 0);
}

#[test]
fn attaching_to_a_running_guest_replays_the_shared_view_and_detaching_unmaps_it() {
    for style in MAPPING_STYLES {
        let rig = rig(DiscardPolicy::Eager);
        rig.convert(range(BASE, 2 * PAGE), Attribute::Shared)
            .unwrap();
        rig.convert(range(BASE + 8 * PAGE, 3 * PAGE), Attribute::Shared)
            .unwrap();
        let offset = 0x8000_0000;
        let dev = rig.attach(
            "nic",
            emulated(style),
            DeviceConfig::shared().with_iova_offset(offset),
        );
        let iovas: Vec<u64> = dev
            .iommu
            .page_table()
            .iter()
            .map(|e| e.iova - offset)
            .collect();
        let expected: &[u64] = per_style(style, &[0, 1, 8, 9, 10], &[0, 8]);
        assert_eq!(
            iovas,
            expected.iter().map(|p| BASE + p * PAGE).collect::<Vec<_>>(),
            "identity + offset, one mapping per granule, or per run where the IOMMU cuts"
        );
        let n = per_style(style, 5, 2);
        let stats = rig.ram.device_stats(dev.id).unwrap();
        assert_eq!(
            (stats.map_calls, stats.mappings, stats.unmap_calls),
            (n, n, 0)
        );
        let report = rig.ram.detach_device(dev.id).unwrap();
        assert_eq!(report.mappings, n);
        assert_eq!(report.calls, 2, "one unmap per run");
        assert_eq!(dev.iommu.mapping_count(), 0);
        assert_eq!(
            rig.ram.device_stats(dev.id),
            None,
            "a detached device has no ledger"
        );
        // Conversions after detach do not reach it.
        rig.convert(range(BASE + 4 * PAGE, PAGE), Attribute::Shared)
            .unwrap();
        assert_eq!(dev.iommu.mapping_count(), 0);
    }
}

#[test]
fn conversions_outside_every_region_are_refused() {
    let rig = rig(DiscardPolicy::Eager);
    let err = rig.convert(range(0, PAGE), Attribute::Shared).unwrap_err();
    assert!(matches!(err, ConversionError::NoRegion { .. }));
    let err = rig
        .convert(range(BASE + 1, PAGE), Attribute::Shared)
        .unwrap_err();
    assert!(matches!(err, ConversionError::Range(_)), "{err:?}");
    assert_eq!(
        gmem_dma::answer::conversion_failure(&err).errno,
        libc::EINVAL
    );
}

#[test]
fn dma_to_pages_that_stay_shared_never_faults_while_their_neighbours_flip() {
    for style in MAPPING_STYLES {
        use std::sync::atomic::{AtomicBool, Ordering};
        let rig = rig(DiscardPolicy::Lazy {
            budget_bytes: 4 * PAGE,
        });
        let dev = rig.attach("nic", emulated(style), DeviceConfig::shared());
        rig.convert(range(BASE, 8 * PAGE), Attribute::Shared)
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let device = {
            let (iommu, stop) = (dev.iommu.clone(), stop.clone());
            // The device keeps DMAing to pages 3 and 4, which stay shared throughout.
            std::thread::spawn(move || {
                let mut transfers = 0u64;
                let mut buf = [0u8; 2 * PAGE as usize];
                while !stop.load(Ordering::Relaxed) || transfers == 0 {
                    iommu.dma_write(BASE + 3 * PAGE, &buf).unwrap();
                    iommu.dma_read(BASE + 3 * PAGE, &mut buf).unwrap();
                    transfers += 1;
                }
                transfers
            })
        };
        // Meanwhile the guest flips the pages right next to them, alone and in runs.
        for i in 0..200u64 {
            let to = if i % 2 == 0 {
                Attribute::Private
            } else {
                Attribute::Shared
            };
            let r = match i % 4 {
                0 | 1 => range(BASE + 2 * PAGE, PAGE),
                _ => range(BASE + 5 * PAGE, 3 * PAGE),
            };
            rig.convert(r, to).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let transfers = device
            .join()
            .expect("no DMA to a page that stayed shared faulted");
        assert!(transfers > 0);
        let faults = dev.iommu.faults();
        assert!(faults.is_empty(), "{faults:?}");
        let calls = dev.iommu.take_calls();
        rig.check(&[&dev], &[calls], None);
    }
}

/// Attribute calls made since `skip` calls, as (start, len, attribute, ok).
fn attribute_calls(rig: &Rig, skip: usize) -> Vec<(u64, u64, Attribute, bool)> {
    rig.attrs.calls()[skip..]
        .iter()
        .map(|c| (c.range.start(), c.range.len(), c.attribute, c.ok))
        .collect()
}

/// A region with [shared 0..2][private 2..4][shared 4..5][private 5..8][shared 8..10], rest
/// private, and a shared-view device.
fn mixed_rig(policy: DiscardPolicy) -> (Rig, common::Dev) {
    let rig = rig(policy);
    let dev = rig.attach("nic", EmulatedIommu::new(), DeviceConfig::shared());
    for (start, len) in [(0, 2), (4, 1), (8, 2)] {
        rig.convert(range(BASE + start * PAGE, len * PAGE), Attribute::Shared)
            .unwrap();
    }
    rig.region.flush();
    dev.iommu.take_calls();
    (rig, dev)
}

#[test]
fn a_mixed_request_sets_the_attribute_and_punches_once_like_qemu() {
    let (rig, dev) = mixed_rig(DiscardPolicy::Eager);
    // To shared: the changed runs are [2,4), [5,8), [10,12).
    let (attrs, punches) = (rig.attrs.calls().len(), rig.region.backing().punch_stats());
    let r = range(BASE, 12 * PAGE);
    let c = rig.convert(r, Attribute::Shared).unwrap();
    assert_eq!(c.runs().len(), 3);
    assert_eq!(c.bytes(), 7 * PAGE);
    assert_eq!(
        attribute_calls(&rig, attrs),
        [(BASE + 2 * PAGE, 10 * PAGE, Attribute::Shared, true)],
        "one call from the first changed run to the last"
    );
    let after = rig.region.backing().punch_stats();
    assert_eq!(
        after.calls - punches.calls,
        1,
        "one punch of the private side"
    );
    assert_eq!(c.flushed.punched_bytes, 7 * PAGE, "the vacated runs' bytes");
    let calls = dev.iommu.take_calls();
    assert_eq!(
        calls.iter().filter(|c| c.kind == CallKind::MapVa).count(),
        7
    );
    rig.check(&[&dev], &[calls], Some(r));
    // And back: [0,12) has been all shared, three runs to private again after one flips.
    rig.convert(range(BASE + 3 * PAGE, 2 * PAGE), Attribute::Private)
        .unwrap();
    rig.convert(range(BASE + 7 * PAGE, PAGE), Attribute::Private)
        .unwrap();
    dev.iommu.take_calls();
    let (attrs, punches) = (rig.attrs.calls().len(), rig.region.backing().punch_stats());
    let c = rig.convert(r, Attribute::Private).unwrap();
    assert_eq!(c.runs().len(), 3);
    assert_eq!(
        attribute_calls(&rig, attrs),
        [(BASE, 12 * PAGE, Attribute::Private, true)]
    );
    assert_eq!(rig.region.backing().punch_stats().calls - punches.calls, 1);
    let calls = dev.iommu.take_calls();
    assert_eq!(calls.len(), 1, "one merged unmap: {calls:?}");
    rig.check(&[&dev], &[calls], Some(r));
}

#[test]
fn a_failed_spanning_attribute_change_changes_nothing_and_sets_nothing_back() {
    let (rig, dev) = mixed_rig(DiscardPolicy::Eager);
    let before = rig.snapshot(&[&dev]);
    let attrs = rig.attrs.calls().len();
    rig.attrs.inject_failures(|_, to| to == Attribute::Private);
    let r = range(BASE, 12 * PAGE);
    let err = rig.convert(r, Attribute::Private).unwrap_err();
    assert!(matches!(err, ConversionError::Attribute(_)), "{err:?}");
    rig.attrs.clear_failures();
    // KVM's call is all or nothing: one failed call, nothing to set back.
    assert_eq!(
        attribute_calls(&rig, attrs),
        [(BASE, 10 * PAGE, Attribute::Private, false)]
    );
    assert_eq!(rig.snapshot(&[&dev]), before);
    rig.check(&[&dev], &[dev.iommu.take_calls()], Some(r));
}

#[test]
fn undoing_a_spanning_attribute_change_sets_back_exactly_the_changed_runs() {
    let (rig, dev) = mixed_rig(DiscardPolicy::Eager);
    let before = rig.snapshot(&[&dev]);
    let attrs = rig.attrs.calls().len();
    // The device refuses a page of the last run: the whole conversion is undone.
    dev.iommu.inject_failures(|kind, iova, _| {
        (*kind == CallKind::MapVa && iova == BASE + 11 * PAGE).then_some(libc::ENOMEM)
    });
    let r = range(BASE, 12 * PAGE);
    let err = rig.convert(r, Attribute::Shared).unwrap_err();
    assert!(matches!(err, ConversionError::Map { .. }), "{err:?}");
    dev.iommu.clear_failures();
    assert_eq!(
        attribute_calls(&rig, attrs),
        [
            (BASE + 2 * PAGE, 10 * PAGE, Attribute::Shared, true),
            // Set back run by run, last first: the shared pages between stay shared.
            (BASE + 10 * PAGE, 2 * PAGE, Attribute::Private, true),
            (BASE + 5 * PAGE, 3 * PAGE, Attribute::Private, true),
            (BASE + 2 * PAGE, 2 * PAGE, Attribute::Private, true),
        ]
    );
    assert_eq!(rig.snapshot(&[&dev]), before);
    rig.check(&[&dev], &[dev.iommu.take_calls()], Some(r));
}

#[test]
fn lazy_discard_holds_exactly_the_vacated_runs_of_a_mixed_request() {
    let (rig, dev) = mixed_rig(DiscardPolicy::Lazy {
        budget_bytes: 1 << 20,
    });
    let r = range(BASE, 12 * PAGE);
    let c = rig.convert(r, Attribute::Private).unwrap();
    // The shared pages between the runs were never shared-backed after the flush: not held.
    assert_eq!(c.held.shared_bytes, 5 * PAGE);
    assert!(rig.region.holds(View::Shared, range(BASE, 2 * PAGE)));
    assert!(!rig.region.holds(View::Shared, range(BASE + 2 * PAGE, PAGE)));
    rig.check(&[&dev], &[dev.iommu.take_calls()], Some(r));
}

#[test]
fn a_stale_mapping_refuses_a_conversion_to_private_until_its_retry_succeeds() {
    for style in MAPPING_STYLES {
        let rig = rig(DiscardPolicy::Eager);
        let s1 = rig.attach("s1", emulated(style), DeviceConfig::shared());
        let s2 = rig.attach("s2", emulated(style), DeviceConfig::shared());
        let b = range(BASE + 2 * PAGE, PAGE);
        // B to shared: s1 maps it, s2 fails, and undoing s1's map fails: s1 keeps B mapped
        // although B stayed private.
        s1.iommu
            .inject_failures(|kind, _, _| (*kind == CallKind::Unmap).then_some(libc::EIO));
        s2.iommu
            .inject_failures(|kind, _, _| (*kind == CallKind::MapVa).then_some(libc::ENOMEM));
        let err = rig.convert(b, Attribute::Shared).unwrap_err();
        assert!(matches!(err, ConversionError::Map { .. }), "{err:?}");
        s2.iommu.clear_failures();
        assert_eq!(rig.region.stale_mappings(), [("s1".to_string(), vec![b])]);
        // Converting a range holding B to private would report success with B mapped: refused.
        let r = range(BASE, 4 * PAGE);
        let err = rig.convert(r, Attribute::Private).unwrap_err();
        assert!(
            matches!(&err, ConversionError::StaleMapping { device, .. } if device == "s1"),
            "{err:?}"
        );
        assert_eq!(
            gmem_dma::answer::conversion_failure(&err).errno,
            libc::EBUSY
        );
        // Elsewhere conversions go on, and retry B each time.
        rig.convert(range(BASE + 8 * PAGE, PAGE), Attribute::Shared)
            .unwrap();
        assert_eq!(rig.region.stale_mappings().len(), 1);
        s1.iommu.clear_failures();
        rig.convert(r, Attribute::Private).unwrap();
        assert!(rig.region.stale_mappings().is_empty());
        assert_eq!(s1.iommu.mapping_count(), 1, "only the page at 8 is mapped");
        rig.check(
            &[&s1, &s2],
            &[s1.iommu.take_calls(), s2.iommu.take_calls()],
            None,
        );
    }
}

/// The (iova, len) of each unmap call in `calls`.
fn unmap_calls(calls: &[iommu::emulated::Call]) -> Vec<(u64, u64)> {
    calls
        .iter()
        .filter(|c| c.kind == CallKind::Unmap)
        .map(|c| (c.iova, c.len))
        .collect()
}

#[test]
fn a_map_whose_undo_fails_keeps_its_pieces_stale_until_an_unmap_removes_them() {
    // Pieces exist only where the IOMMU cannot cut: there a run is one mapping per granule.
    // Issue 13, defect 1: the 2nd page's map fails and undoing the 1st page's map fails too.
    let rig = rig(DiscardPolicy::Eager);
    let dev = rig.attach("nic", EmulatedIommu::new(), DeviceConfig::shared());
    let faults = common::iommu_faults(&dev.iommu);
    faults.add(|&(kind, iova, _)| {
        (kind == CallKind::MapVa && iova == BASE + PAGE).then_some(libc::ENOMEM)
    });
    faults.add(|&(kind, _, _)| (kind == CallKind::Unmap).then_some(libc::EIO));
    let r = range(BASE, 2 * PAGE);
    let err = rig.convert(r, Attribute::Shared).unwrap_err();
    assert!(matches!(err, ConversionError::Map { .. }), "{err:?}");
    // The pages stayed private, yet the device still maps the first: that is a stale mapping.
    assert_eq!(dev.iommu.mapping_count(), 1);
    assert_eq!(
        rig.region.stale_mappings(),
        [("nic".to_string(), vec![range(BASE, PAGE)])]
    );
    // Isolation: converting the page to private cannot succeed while the device reaches it.
    let err = rig
        .convert(range(BASE, PAGE), Attribute::Private)
        .unwrap_err();
    assert!(
        matches!(&err, ConversionError::StaleMapping { device, .. } if device == "nic"),
        "{err:?}"
    );
    // Once the kernel lets go, the retry removes it and the page can be shared again.
    faults.clear();
    rig.convert(range(BASE, PAGE), Attribute::Private).unwrap();
    assert!(rig.region.stale_mappings().is_empty());
    assert_eq!(dev.iommu.mapping_count(), 0);
    rig.convert(r, Attribute::Shared).unwrap();
    rig.check(&[&dev], &[dev.iommu.take_calls()], None);
}

#[test]
fn a_failed_rollback_detaches_the_device_and_keeps_what_it_still_maps_tracked() {
    for style in MAPPING_STYLES {
        // Issue 13, defect 2: pages 2-3 of 4 shared pages to private; KVM refuses, the device
        // cannot re-map 2-3 (a double fault) and cannot unmap 0-1 when it is cut off.
        let rig = rig(DiscardPolicy::Eager);
        let dev = rig.attach("nic", emulated(style), DeviceConfig::shared());
        rig.convert(range(BASE, 4 * PAGE), Attribute::Shared)
            .unwrap();
        let faults = common::iommu_faults(&dev.iommu);
        faults.add(|&(kind, iova, _)| {
            (kind == CallKind::Unmap && iova < BASE + 2 * PAGE).then_some(libc::EIO)
        });
        faults.add(|&(kind, _, _)| (kind == CallKind::MapVa).then_some(libc::ENOMEM));
        rig.attrs.inject_failures(|_, to| to == Attribute::Private);
        let err = rig
            .convert(range(BASE + 2 * PAGE, 2 * PAGE), Attribute::Private)
            .unwrap_err();
        rig.attrs.clear_failures();
        match &err {
            ConversionError::RollbackFailed { detached, .. } => assert_eq!(detached, &["nic"]),
            other => panic!("{other:?}"),
        }
        // The error and the device list agree: the device is detached.
        assert!(rig.ram.devices().is_empty(), "{:?}", rig.ram.devices());
        // Its IOMMU still maps pages 0-1 (their unmap failed): tracked, not forgotten.
        assert_eq!(dev.iommu.mapping_count(), per_style(style, 2, 1));
        assert_eq!(
            rig.region.stale_mappings(),
            [("nic (detached)".to_string(), vec![range(BASE, 2 * PAGE)])]
        );
        // Isolation: converting them to private is refused while the device reaches them.
        let err = rig
            .convert(range(BASE, 2 * PAGE), Attribute::Private)
            .unwrap_err();
        assert!(
            matches!(err, ConversionError::StaleMapping { .. }),
            "{err:?}"
        );
        let mut buf = [0u8; 1];
        dev.iommu.dma_read(BASE, &mut buf).unwrap();
        faults.clear();
        rig.convert(range(BASE, 2 * PAGE), Attribute::Private)
            .unwrap();
        assert!(rig.region.stale_mappings().is_empty());
        assert_eq!(dev.iommu.mapping_count(), 0);
        assert!(dev.iommu.dma_read(BASE, &mut buf).is_err());
        rig.check(&[], &[], None);
    }
}

#[test]
fn after_a_failed_attribute_undo_the_next_request_over_the_page_repairs_kvm() {
    for style in MAPPING_STYLES {
        // Issue 13, defect 7: to shared, the device refuses the map and KVM refuses to set the
        // attribute back: KVM says shared, the manager says private.
        let rig = rig(DiscardPolicy::Eager);
        let dev = rig.attach("nic", emulated(style), DeviceConfig::shared());
        let page = range(BASE + 5 * PAGE, PAGE);
        dev.iommu
            .inject_failures(|kind, _, _| (*kind == CallKind::MapVa).then_some(libc::ENOMEM));
        rig.attrs.inject_failures(|_, to| to == Attribute::Private);
        let err = rig.convert(page, Attribute::Shared).unwrap_err();
        assert!(
            matches!(err, ConversionError::AttributeRollback { .. }),
            "{err:?}"
        );
        dev.iommu.clear_failures();
        // The guest's private access to the page faults (KVM thinks it is shared). The exit asks
        // for private, which the manager already says: the answer must make KVM agree, or the
        // guest faults on the same access forever. While KVM still refuses, the answer is an
        // error, never a success with nothing done.
        let flags = u64::from(kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE);
        let err = handle_memory_fault(&rig.ram, flags, page.start(), page.len()).unwrap_err();
        assert!(err.to_string().contains("disagrees"), "{err}");
        // A request elsewhere is not held up by it.
        rig.convert(range(BASE, PAGE), Attribute::Shared).unwrap();
        rig.attrs.clear_failures();
        handle_memory_fault(&rig.ram, flags, page.start(), page.len()).unwrap();
        assert_eq!(
            rig.attrs.private_ranges(),
            [(BASE + PAGE, BASE + 16 * PAGE)]
        );
        rig.check(&[&dev], &[dev.iommu.take_calls()], None);
    }
}

#[test]
fn a_device_detached_while_its_unmaps_fail_keeps_its_mappings_tracked_until_removed() {
    for style in MAPPING_STYLES {
        let rig = rig(DiscardPolicy::Eager);
        let dev = rig.attach("nic", emulated(style), DeviceConfig::shared());
        let r = range(BASE, 2 * PAGE);
        rig.convert(r, Attribute::Shared).unwrap();
        dev.iommu
            .inject_failures(|kind, _, _| (*kind == CallKind::Unmap).then_some(libc::EIO));
        assert!(rig.ram.detach_device(dev.id).is_err());
        assert!(rig.ram.devices().is_empty());
        // The device still reaches both pages: tracked, and a conversion to private is refused.
        assert_eq!(
            rig.region.stale_mappings(),
            [("nic (detached)".to_string(), vec![r])]
        );
        let err = rig.convert(r, Attribute::Private).unwrap_err();
        assert!(
            matches!(err, ConversionError::StaleMapping { .. }),
            "{err:?}"
        );
        dev.iommu.clear_failures();
        rig.convert(r, Attribute::Private).unwrap();
        assert!(rig.region.stale_mappings().is_empty());
        assert_eq!(dev.iommu.mapping_count(), 0);
        rig.check(&[], &[], None);
    }
}
