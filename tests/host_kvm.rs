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
    let (_kvm, vm, support) = vm();
    let backing = RegionBacking::classic(&vm, BASE, SIZE).unwrap();
    backing.bind(&vm, 0).unwrap();
    let (ram, region) = ram_with_region(
        backing,
        attributes(vm, &support),
        Attribute::Private,
        DiscardPolicy::Eager,
    );
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
