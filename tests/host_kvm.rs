//! Guest RAM regions on this machine's own KVM: real guest_memfd, real memslots, real hole
//! punches, with the emulated IOMMU as the device. KVM attributes come from the recording table
//! where the VM has none (a default VM, as on the CI host).

mod common;

use std::sync::Arc;

use common::{PAGE, ram_with_region, range};
use discard_manager::{Attribute, View};
use gmem_dma::{
    AttachError, BackingModel, DeviceConfig, DiscardPolicy, KvmAttributes, KvmSupport, MapBy,
    MemoryAttributes, ModelChoice, RecordingAttributes, RegionBacking,
};
use iommu::{EmulatedIommu, FileMapSupport};
use kvm_ioctls::{Kvm, VmFd};
use vm_rig::Feature;

const BASE: u64 = 0x1_0000_0000;
const SIZE: u64 = 2 << 20;

fn vm() -> (Kvm, VmFd, KvmSupport) {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let support = KvmSupport::probe(&kvm, &vm);
    (kvm, vm, support)
}

/// The attribute table the VM supports: KVM's own, or the recording one.
fn attributes(vm: VmFd, support: &KvmSupport) -> Arc<dyn MemoryAttributes> {
    if support.has_private_attribute() {
        Arc::new(KvmAttributes::new(Arc::new(vm)))
    } else {
        Arc::new(RecordingAttributes::new())
    }
}

/// Guest RAM over a classic backing on this machine's KVM, bound to memslot 0, with `initial`
/// attribute and `policy` (the `Kvm` keeps the VM's KVM open).
fn classic_ram(
    initial: Attribute,
    policy: DiscardPolicy,
) -> (Kvm, Arc<gmem_dma::GuestRam>, Arc<gmem_dma::Region>) {
    let (kvm, vm, support) = vm();
    let backing = RegionBacking::classic(&vm, BASE, SIZE).unwrap();
    backing.bind(&vm, 0).unwrap();
    let (ram, region) = ram_with_region(backing, attributes(vm, &support), initial, policy);
    (kvm, ram, region)
}

#[test]
fn probe_reports_guest_memfd_and_picks_in_place_where_offered() {
    if !vm_rig::need(
        "probe_reports_guest_memfd_and_picks_in_place_where_offered",
        &[Feature::Kvm, Feature::GuestMemfdMmap],
    ) {
        return;
    }
    let (_kvm, _vm, support) = vm();
    assert!(support.guest_memfd && support.user_memory2, "{support:?}");
    assert!(support.has_mmap_init_shared(), "{support:?}");
    assert_eq!(
        support.choose_model(ModelChoice::Auto),
        Ok(BackingModel::InPlace)
    );
    assert_eq!(
        support.choose_model(ModelChoice::Classic),
        Ok(BackingModel::Classic)
    );
    // It is plain data a tool can print.
    let json = serde_json::to_string(&support).unwrap();
    assert!(json.contains("guest_memfd_flags"), "{json}");
}

#[test]
fn classic_region_binds_a_memslot_maps_for_dma_and_frees_the_memfd_on_conversion() {
    if !vm_rig::need(
        "classic_region_binds_a_memslot_maps_for_dma_and_frees_the_memfd_on_conversion",
        &[Feature::Kvm, Feature::GuestMemfdMmap],
    ) {
        return;
    }
    let (_kvm, ram, region) = classic_ram(Attribute::Private, DiscardPolicy::Eager);
    let iommu = Arc::new(EmulatedIommu::new());
    let dev = ram
        .attach_device("nic", iommu.clone(), DeviceConfig::shared())
        .unwrap();
    let shared = range(BASE + 0x10_0000, 64 * PAGE);
    ram.convert(shared, Attribute::Shared).unwrap();
    assert_eq!(iommu.mapping_count(), 64);
    // The device writes the shared pages; the memfd now holds them.
    iommu
        .dma_write(shared.start(), &vec![0x42; 64 * PAGE as usize])
        .unwrap();
    let b = region.backing();
    assert_eq!(b.allocated_bytes(View::Shared).unwrap(), 64 * PAGE);
    // SAFETY: the address is inside the live shared mapping; no reference to it exists.
    let byte = unsafe { b.host_addr(shared.start() + 5).unwrap().read_volatile() };
    assert_eq!(
        byte, 0x42,
        "the device wrote the memfd the memslot points at"
    );
    // Back to private: unmapped, then the memfd pages are really freed.
    ram.convert(shared, Attribute::Private).unwrap();
    assert_eq!(iommu.mapping_count(), 0);
    assert_eq!(b.allocated_bytes(View::Shared).unwrap(), 0);
    let mut buf = [0u8; 1];
    assert!(
        iommu.dma_read(shared.start(), &mut buf).is_err(),
        "isolation"
    );
    // The guest_memfd side was punched for the pages that became shared (fallocate succeeded;
    // guest_memfd reports no st_blocks, so the count of frees is what can be checked here).
    assert_eq!(b.punch_stats().calls, 2);
    assert_eq!(ram.device_mappings(dev).unwrap().len(), 0);
}

#[test]
fn in_place_region_maps_the_guest_memfd_by_address_and_frees_nothing_on_conversion() {
    if !vm_rig::need(
        "in_place_region_maps_the_guest_memfd_by_address_and_frees_nothing_on_conversion",
        &[Feature::Kvm, Feature::GuestMemfdMmap],
    ) {
        return;
    }
    let (_kvm, vm, support) = vm();
    assert_eq!(
        support.choose_model(ModelChoice::InPlace),
        Ok(BackingModel::InPlace)
    );
    let backing = RegionBacking::in_place(&vm, BASE, SIZE).unwrap();
    backing.bind(&vm, 0).unwrap();
    // An ordinary (non-confidential) guest: everything starts shared.
    let (ram, region) = ram_with_region(
        backing,
        attributes(vm, &support),
        Attribute::Shared,
        DiscardPolicy::Eager,
    );
    // Mainline MAP_FILE refuses guest_memfd: a by-file device is refused at attach.
    let mainline = Arc::new(
        EmulatedIommu::builder()
            .map_file(FileMapSupport::Memfd)
            .build(),
    );
    let by_file = DeviceConfig::shared_by(MapBy::File);
    let err = ram
        .attach_device("nic-file", mainline, by_file)
        .unwrap_err();
    assert!(matches!(err, AttachError::Unsupported { .. }), "{err}");
    let iommu = Arc::new(EmulatedIommu::new());
    ram.attach_device("nic", iommu.clone(), DeviceConfig::shared())
        .unwrap();
    assert_eq!(iommu.mapping_count() as u64, SIZE / PAGE);
    let r = range(BASE, 16 * PAGE);
    iommu
        .dma_write(r.start(), &vec![7u8; r.len() as usize])
        .unwrap();
    let b = region.backing();
    let resident = b.resident_pages(View::Shared, r).unwrap();
    assert!(
        resident.iter().all(|&p| p),
        "the device's writes landed in the guest_memfd"
    );
    // Conversions flip the attribute and the mappings, but both views are the same pages:
    // nothing is freed.
    ram.convert(r, Attribute::Private).unwrap();
    ram.convert(r, Attribute::Shared).unwrap();
    assert_eq!(b.punch_stats().calls, 0);
    assert_eq!(iommu.mapping_count() as u64, SIZE / PAGE);
    let mut buf = [0u8; 4];
    iommu.dma_read(r.start(), &mut buf).unwrap();
    assert_eq!(buf, [7; 4], "in place: the data survived the round trip");
    // A hole punch really frees guest_memfd memory: not resident, reads back zero.
    b.punch_hole(View::Shared, r).unwrap();
    let resident = b.resident_pages(View::Shared, r).unwrap();
    assert!(resident.iter().all(|&p| !p), "{resident:?}");
    iommu.dma_read(r.start(), &mut buf).unwrap();
    assert_eq!(buf, [0; 4]);
}

#[test]
fn unbinding_a_memslot_frees_its_guest_range_for_another_region() {
    if !vm_rig::need(
        "unbinding_a_memslot_frees_its_guest_range_for_another_region",
        &[Feature::Kvm, Feature::GuestMemfdMmap],
    ) {
        return;
    }
    let (_kvm, vm, _support) = vm();
    let first = RegionBacking::classic(&vm, BASE, SIZE).unwrap();
    let second = RegionBacking::classic(&vm, BASE, SIZE).unwrap();
    first.bind(&vm, 0).unwrap();
    // KVM refuses a second slot over a guest range a live slot covers...
    assert!(second.bind(&vm, 1).is_err());
    first.unbind(&vm, 0).unwrap();
    // ...and accepts it once that slot is gone.
    second.bind(&vm, 1).unwrap();
    second.unbind(&vm, 1).unwrap();
}

/// Guest RAM over `backing` (all private, plugged), with one shared-view device.
fn plug_rig(
    backing: RegionBacking,
    attributes: Arc<dyn MemoryAttributes>,
) -> (
    Arc<gmem_dma::GuestRam>,
    Arc<gmem_dma::Region>,
    Arc<EmulatedIommu>,
) {
    let (ram, region) = ram_with_region(
        backing,
        attributes,
        Attribute::Private,
        DiscardPolicy::Lazy { budget_bytes: SIZE },
    );
    let iommu = Arc::new(EmulatedIommu::new());
    ram.attach_device("nic", iommu.clone(), DeviceConfig::shared())
        .unwrap();
    (ram, region, iommu)
}

#[test]
fn an_unplugged_range_of_a_classic_region_holds_no_memfd_pages_and_replugs_zeroed() {
    if !vm_rig::need(
        "an_unplugged_range_of_a_classic_region_holds_no_memfd_pages_and_replugs_zeroed",
        &[Feature::Kvm, Feature::GuestMemfdMmap],
    ) {
        return;
    }
    let (_kvm, vm, support) = vm();
    let backing = RegionBacking::classic(&vm, BASE, SIZE).unwrap();
    backing.bind(&vm, 0).unwrap();
    let (ram, region, iommu) = plug_rig(backing, attributes(vm, &support));
    let block = range(BASE + 0x10_0000, 0x10_0000);
    ram.convert(block, Attribute::Shared).unwrap();
    iommu
        .dma_write(block.start(), &vec![0x42; block.len() as usize])
        .unwrap();
    let b = region.backing();
    assert_eq!(b.allocated_bytes(View::Shared).unwrap(), block.len());
    // Lazy: the vacated guest_memfd side is held (a classic guest_memfd cannot say it holds
    // nothing: no SEEK_DATA), and the unplug frees it with the memfd side.
    assert!(region.held_back().private_bytes > 0);
    let unplug = ram.unplug(block).unwrap();
    assert_eq!(
        unplug.held.total(),
        0,
        "nothing of an unplugged block is held"
    );
    assert_eq!(iommu.mapping_count(), 0);
    assert_eq!(b.allocated_bytes(View::Shared).unwrap(), 0);
    let resident = b.resident_pages(View::Shared, block).unwrap();
    assert!(resident.iter().all(|&p| !p), "SEEK_DATA finds memfd data");
    // This kernel's guest_memfd has no lseek: the private side is checked by the punch count.
    assert!(matches!(
        b.backed_ranges(View::Private, block),
        Err(gmem_dma::BackingError::Residency { .. })
    ));
    assert_eq!(b.punch_stats().bytes, 2 * block.len());
    // Re-plugged shared: mapped again, and zeroed.
    ram.plug(block, Some(Attribute::Shared)).unwrap();
    let mut buf = vec![0xffu8; 4096];
    iommu.dma_read(block.start() + 0x8000, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0), "a re-plugged page reads zero");
}

#[test]
fn a_classic_guest_memfd_range_never_private_or_flushed_is_not_held_a_vacated_one_is_unverified() {
    let name = "a_classic_guest_memfd_range_never_private_or_flushed_is_not_held_a_vacated_one_is_unverified";
    if !vm_rig::need(name, &[Feature::Kvm, Feature::GuestMemfdMmap]) {
        return;
    }
    // Shared from the start: no page of the guest_memfd has been private.
    let (_kvm, ram, region) = classic_ram(
        Attribute::Shared,
        DiscardPolicy::Lazy { budget_bytes: SIZE },
    );
    let never_private = range(BASE, SIZE / 2);
    let flipped = range(BASE + SIZE / 2, SIZE / 2);
    ram.convert(flipped, Attribute::Private).unwrap();
    let back = ram.convert(flipped, Attribute::Shared).unwrap();
    // Private until now: the guest may have faulted guest_memfd pages in there, and the
    // guest_memfd cannot say (no lseek, no i_blocks): held, and flagged as unverified.
    assert_eq!(back.held.private_bytes, flipped.len());
    assert_eq!(back.held.unverified_bytes, flipped.len());
    assert_eq!(
        back.held.shared_bytes, 0,
        "the memfd side was never touched"
    );
    assert_eq!(region.held_back().unverified_bytes, flipped.len());
    assert_eq!(ram.flush_discards().punched_bytes, flipped.len());
    assert_eq!(region.held_back(), gmem_dma::HeldBack::default());
    // Unplugging everything while every guest_memfd free fails: what was never private, and
    // what was freed by the flush and has not been private since, holds nothing there, so
    // nothing is held; the memfd side is freed.
    let b = region.backing();
    b.inject_punch_failures(|side, _| side == View::Private);
    let unplug = ram.unplug(region.range()).unwrap();
    b.clear_punch_failures();
    assert!(unplug.flushed.failed_ranges > 0, "the frees were tried");
    assert_eq!(
        unplug.held,
        gmem_dma::HeldBack::default(),
        "{never_private} and {flipped} hold no guest_memfd page"
    );
    // Plugged private, then shared, with the frees failing: held again, unverified.
    ram.plug(flipped, Some(Attribute::Private)).unwrap();
    b.inject_punch_failures(|side, _| side == View::Private);
    let unplug = ram.unplug(flipped).unwrap();
    assert_eq!(unplug.held.private_bytes, flipped.len());
    assert_eq!(unplug.held.unverified_bytes, flipped.len());
    assert_eq!(unplug.held.failed_bytes, flipped.len());
}

#[test]
fn an_unplugged_range_of_an_in_place_region_holds_no_guest_memfd_pages() {
    if !vm_rig::need(
        "an_unplugged_range_of_an_in_place_region_holds_no_guest_memfd_pages",
        &[Feature::Kvm, Feature::GuestMemfdMmap],
    ) {
        return;
    }
    let (_kvm, vm, support) = vm();
    let backing = RegionBacking::in_place(&vm, BASE, SIZE).unwrap();
    backing.bind(&vm, 0).unwrap();
    let (ram, region, iommu) = plug_rig(backing, attributes(vm, &support));
    let block = range(BASE, 0x10_0000);
    ram.convert(block, Attribute::Shared).unwrap();
    iommu
        .dma_write(block.start(), &vec![7u8; block.len() as usize])
        .unwrap();
    let b = region.backing();
    assert!(
        b.resident_pages(View::Shared, block)
            .unwrap()
            .iter()
            .all(|&p| p)
    );
    ram.unplug(block).unwrap();
    // mincore on the guest_memfd's own mapping: nothing left, and one free (one file).
    assert!(
        b.resident_pages(View::Shared, block)
            .unwrap()
            .iter()
            .all(|&p| !p)
    );
    assert_eq!(b.punch_stats().calls, 1);
    assert_eq!(region.held_back().total(), 0);
    let err = ram.convert(block, Attribute::Private).unwrap_err();
    assert!(
        matches!(err, gmem_dma::ConversionError::Unplugged { .. }),
        "{err}"
    );
    ram.plug(block, Some(Attribute::Shared)).unwrap();
    let mut buf = [0xffu8; 64];
    iommu.dma_read(block.start() + 0x4000, &mut buf).unwrap();
    assert_eq!(buf, [0; 64], "a re-plugged page reads zero");
}

#[test]
fn removing_a_region_deletes_its_memslot_and_frees_its_memory() {
    if !vm_rig::need(
        "removing_a_region_deletes_its_memslot_and_frees_its_memory",
        &[Feature::Kvm, Feature::GuestMemfdMmap],
    ) {
        return;
    }
    let (_kvm, vm, _support) = vm();
    let backing = RegionBacking::classic(&vm, BASE, SIZE).unwrap();
    backing.bind(&vm, 0).unwrap();
    let (ram, region, iommu) = plug_rig(backing, Arc::new(RecordingAttributes::new()));
    ram.convert(range(BASE, 16 * PAGE), Attribute::Shared)
        .unwrap();
    iommu.dma_write(BASE, &[1; 4096]).unwrap();
    let removal = ram.remove_region(region.range()).unwrap();
    assert_eq!(removal.devices, 1);
    assert_eq!(iommu.mapping_count(), 0);
    assert_eq!(region.backing().allocated_bytes(View::Shared).unwrap(), 0);
    // The slot is gone: a new region binds the same guest range.
    let next = RegionBacking::classic(&vm, BASE, SIZE).unwrap();
    next.bind(&vm, 1).unwrap();
}

/// A read-write file of `size` bytes in `dir`, already unlinked.
fn file_in(dir: &str, size: u64) -> std::fs::File {
    let path = format!("{dir}/gmem-dma-test-{}-{size}", std::process::id());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    file.set_len(size).unwrap();
    file
}

fn refusal(result: Result<RegionBacking, gmem_dma::BackingError>) -> String {
    match result {
        Err(gmem_dma::BackingError::SharedFile { reason, .. }) => reason.to_string(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_vmms_own_shared_file_backs_a_region_once_checked() {
    if !vm_rig::need(
        "the_vmms_own_shared_file_backs_a_region_once_checked",
        &[Feature::Kvm, Feature::GuestMemfdMmap],
    ) {
        return;
    }
    use std::os::fd::OwnedFd;
    use vm_memory::{FileOffset, MmapRegion};
    let (_kvm, vm, _support) = vm();
    let own = |f: std::fs::File| OwnedFd::from(f);
    // Refused, each with its reason.
    let small = own(file_in("/dev/shm", SIZE / 2));
    assert!(refusal(RegionBacking::classic_with_file(&vm, BASE, SIZE, small)).contains("smaller"));
    let on_disk = own(file_in(env!("CARGO_TARGET_TMPDIR"), SIZE));
    assert!(refusal(RegionBacking::classic_with_file(&vm, BASE, SIZE, on_disk)).contains("memfd"));
    let read_only = {
        let f = file_in("/dev/shm", SIZE);
        std::fs::File::open(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&f)
        ))
        .unwrap()
    };
    assert!(
        refusal(RegionBacking::classic_with_file(
            &vm,
            BASE,
            SIZE,
            own(read_only)
        ))
        .contains("reading and writing")
    );
    let anonymous = Arc::new(MmapRegion::<()>::new(SIZE as usize).unwrap());
    assert!(refusal(RegionBacking::classic_over(&vm, BASE, anonymous)).contains("anonymous"));
    // Accepted: the VMM's file is the shared side, freed and mapped by file like a memfd.
    let file = Arc::new(file_in("/dev/shm", SIZE));
    let mmap = Arc::new(
        MmapRegion::<()>::from_file(FileOffset::from_arc(file.clone(), 0), SIZE as usize).unwrap(),
    );
    let backing = RegionBacking::classic_over(&vm, BASE, mmap.clone()).unwrap();
    assert!(backing.mapping().is_none(), "the VMM holds the mapping");
    assert_eq!(
        backing.host_addr(BASE).unwrap(),
        mmap.as_ptr(),
        "one mapping, not two"
    );
    backing.bind(&vm, 0).unwrap();
    let (ram, region) = ram_with_region(
        backing,
        Arc::new(RecordingAttributes::new()),
        Attribute::Private,
        DiscardPolicy::Eager,
    );
    let iommu = Arc::new(EmulatedIommu::new());
    ram.attach_device("nic", iommu.clone(), DeviceConfig::shared_by(MapBy::File))
        .unwrap();
    let r = range(BASE, 4 * PAGE);
    ram.convert(r, Attribute::Shared).unwrap();
    iommu.dma_write(BASE, &[9; 16]).unwrap();
    let mut seen = [0u8; 16];
    std::os::unix::fs::FileExt::read_exact_at(&*file, &mut seen, 0).unwrap();
    assert_eq!(seen, [9; 16], "the device wrote the VMM's file");
    ram.convert(r, Attribute::Private).unwrap();
    assert_eq!(region.backing().allocated_bytes(View::Shared).unwrap(), 0);
    assert!(ram.is_private(BASE));
}

#[test]
fn a_bound_backing_deletes_its_memslot_when_it_drops() {
    if !vm_rig::need(
        "a_bound_backing_deletes_its_memslot_when_it_drops",
        &[Feature::Kvm, Feature::GuestMemfdMmap],
    ) {
        return;
    }
    let (_kvm, vm, _support) = vm();
    let first = RegionBacking::classic(&vm, BASE, SIZE).unwrap();
    first.bind(&vm, 0).unwrap();
    // One backing binds one slot.
    assert!(matches!(
        first.bind(&vm, 2),
        Err(gmem_dma::BackingError::AlreadyBound { bound: 0, .. })
    ));
    // Dropped without unbinding: on main slot 0 stayed, pointing the guest at host memory the
    // backing had unmapped (whatever the VMM mapped there next).
    drop(first);
    let second = RegionBacking::classic(&vm, BASE, SIZE).unwrap();
    // A new slot over the same guest range is accepted (KVM refuses overlapping slots)...
    second.bind(&vm, 1).unwrap();
    second.unbind(&vm, 1).unwrap();
    // ...and so is the old slot id with a new host address (KVM refuses to move a live slot).
    second.bind(&vm, 0).unwrap();
    // Unbinding a slot the backing does not hold is refused without touching KVM.
    assert!(second.unbind(&vm, 1).is_err());
}
