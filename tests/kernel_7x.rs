//! Real-kernel tests of the in-place model on a kernel whose guest_memfd can be mmap'ed shared
//! (`GUEST_MEMFD_FLAG_MMAP | INIT_SHARED`, Linux 6.18+; the rig's 7.3 guest), with edu doing
//! real DMA through type1 and IOMMUFD, and of what mainline's `IOMMU_IOAS_MAP_FILE` refuses.
//! On a kernel without the feature each test skips with the reason (6.12 in the rig).
//!
//! What the project documents for an in-place region (`src/backing.rs`, `src/engine.rs`): the
//! private view is the same file as the shared one, so a conversion frees nothing; and a
//! conversion to private unmaps the device first. A hole is only ever punched in memory no
//! device maps. The kernel itself does not enforce that on 7.3: `kvm_gmem_punch_hole()` truncates
//! pages a device has pinned without a word, and the device keeps writing the old page, which
//! the file no longer holds. The test shows both.

mod common;

use std::sync::Arc;

use common::{PAGE, ram_with_region, range};
use discard_manager::{Attribute, View};
use gmem_dma::{
    AttachError, BackingModel, DeviceConfig, DiscardPolicy, KvmSupport, MapBy, ModelChoice,
    RecordingAttributes, RegionBacking,
};
use iommu::{
    DmaBackend, DmaError, DmaProt, Edu, IommufdBackend, PciAddress, Type1Backend, VfioPciDevice,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_rig::Feature;

/// Inside edu's 28-bit DMA mask; IOVA = GPA.
const BASE: u64 = 0x100_0000;
const PAGES: u64 = 16;

fn edu_address() -> PciAddress {
    let text = vm_rig::edu_device().expect("vm_rig::need(Edu) passed, so edu is bound");
    text.parse().expect("GMEM_DMA_EDU is a PCI address")
}

/// A default (non-confidential) VM and an in-place region of `PAGES` pages bound to it.
fn in_place_region(kvm: &Kvm) -> (VmFd, RegionBacking) {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM (default type)");
    let support = KvmSupport::probe(kvm, &vm);
    assert_eq!(
        support.choose_model(ModelChoice::InPlace),
        Ok(BackingModel::InPlace),
        "{support:?}"
    );
    let backing = RegionBacking::in_place(&vm, BASE, PAGES * PAGE).expect("in-place backing");
    backing.bind(&vm, 0).expect("KVM_SET_USER_MEMORY_REGION2");
    (vm, backing)
}

fn in_place_region_is_reached_by_edu_and_punched_only_once_unmapped(
    backend: Arc<dyn DmaBackend>,
    device: Arc<VfioPciDevice>,
) {
    let edu = Edu::new(device).expect("edu answers with its id");
    let kvm = Kvm::new().unwrap();
    let (_vm, backing) = in_place_region(&kvm);
    // A default VM has no KVM memory attributes: the table is the recording one, and every
    // page starts shared (an ordinary guest).
    let (ram, region) = ram_with_region(
        backing,
        Arc::new(RecordingAttributes::new()),
        Attribute::Shared,
        DiscardPolicy::Eager,
    );
    // One mapping per shared granule, or one for the whole run where the address space cuts
    // (IOMMUFD).
    let expected = if backend.capabilities().unwrap().cuts_mappings {
        1
    } else {
        PAGES
    };
    let id = ram
        .attach_device("edu", backend, DeviceConfig::shared())
        .expect("attach edu to the in-place region");
    assert_eq!(
        ram.device_mappings(id).unwrap().len() as u64,
        expected,
        "one mapping per shared granule (per run where the address space cuts)"
    );
    let b = Arc::clone(region.backing());
    let page = |p: u64| BASE + p * PAGE;
    let host = |p: u64| b.host_addr(page(p)).unwrap();
    let write = |p: u64, data: &[u8]| {
        for (i, &v) in data.iter().enumerate() {
            // SAFETY: inside the live mmap of the guest_memfd; raw-pointer access only, since
            // the device may write the same memory.
            unsafe { host(p).add(i).write_volatile(v) };
        }
    };
    let read = |p: u64, len: usize| -> Vec<u8> {
        // SAFETY: as in `write`.
        (0..len)
            .map(|i| unsafe { host(p).add(i).read_volatile() })
            .collect()
    };
    let len = Edu::<Arc<VfioPciDevice>>::MAX_DMA as usize;
    let dma = |from: u64, to: u64, data: &[u8]| {
        write(from, data);
        edu.copy_to_device(page(from), len as u32).unwrap();
        let _ = edu.copy_from_device(page(to), len as u32);
    };
    // edu's DMA reaches the guest_memfd's pages: what it wrote is what the mmap shows.
    let first = pattern(0x21, len);
    write(2, &vec![0; len]);
    dma(1, 2, &first);
    assert_eq!(
        read(2, len),
        first,
        "DMA did not reach the guest_memfd page"
    );
    assert!(
        b.resident_pages(View::Shared, range(page(2), PAGE))
            .unwrap()
            .iter()
            .all(|&r| r),
        "the written page is guest_memfd memory"
    );
    // To private: unmapped first, nothing freed (both views are the same pages).
    ram.convert(range(page(2), PAGE), Attribute::Private)
        .unwrap();
    assert_eq!(
        b.punch_stats().calls,
        0,
        "in place, a conversion frees nothing"
    );
    assert_eq!(read(2, len), first, "the private page kept its data");
    let second = pattern(0x43, len);
    dma(1, 2, &second);
    assert_eq!(
        read(2, len),
        first,
        "isolation: the device reached a private page"
    );
    dma(1, 3, &second);
    assert_eq!(read(3, len), second, "no window: page 3 stayed shared");
    // Back to shared: the same memory, reachable again.
    ram.convert(range(page(2), PAGE), Attribute::Shared)
        .unwrap();
    assert_eq!(read(2, len), first, "nothing was freed in between");
    dma(1, 2, &second);
    assert_eq!(read(2, len), second);
    // Freeing memory the project's way: convert to private (the device's mapping goes first),
    // then punch. The device cannot reach the page, and the memory is gone.
    ram.convert(range(page(4), PAGE), Attribute::Private)
        .unwrap();
    b.punch_hole(View::Shared, range(page(4), PAGE))
        .expect("punch an unmapped page");
    assert!(
        !b.resident_pages(View::Shared, range(page(4), PAGE))
            .unwrap()[0],
        "the punched page still holds memory"
    );
    // What the kernel does when the order is broken: 7.3 accepts a punch of a page the IOMMU
    // has pinned, and the file's page and the device's page part ways. The device's write
    // lands in the old page, which nobody can read any more; the file reads zeros.
    b.punch_hole(View::Shared, range(page(5), PAGE))
        .expect("7.3's guest_memfd punches a pinned page without refusing");
    dma(1, 5, &second);
    assert_eq!(
        read(5, len),
        vec![0; len],
        "after a punch under a live mapping the device no longer reaches the file's page"
    );
    // Teardown: every mapping the ledger holds comes out, the stale one included.
    let report = ram.detach_device(id).expect("detach");
    assert_eq!(report.bytes, (PAGES - 1) * PAGE);
}

/// What an in-place region with edu behind `backend` needs (the backend's own feature).
fn need_in_place(test: &str, backend: Feature) -> bool {
    vm_rig::need(
        test,
        &[Feature::Kvm, Feature::GuestMemfdMmap, Feature::Edu, backend],
    )
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8) | 1).collect()
}

#[test]
fn kernel_7x_in_place_region_through_type1_is_reached_and_punched_only_once_unmapped() {
    let name = "kernel_7x_in_place_region_through_type1_is_reached_and_punched_only_once_unmapped";
    if !need_in_place(name, Feature::VfioType1) {
        return;
    }
    let (backend, device) = Type1Backend::open(&edu_address()).expect("open edu through type1");
    in_place_region_is_reached_by_edu_and_punched_only_once_unmapped(Arc::new(backend), device);
}

#[test]
fn kernel_7x_in_place_region_through_iommufd_is_reached_and_punched_only_once_unmapped() {
    let name =
        "kernel_7x_in_place_region_through_iommufd_is_reached_and_punched_only_once_unmapped";
    if !need_in_place(name, Feature::Iommufd) {
        return;
    }
    let (backend, device) = IommufdBackend::open(&edu_address()).expect("open edu via IOMMUFD");
    in_place_region_is_reached_by_edu_and_punched_only_once_unmapped(Arc::new(backend), device);
}

#[test]
fn kernel_7x_map_file_refuses_guest_memfd_and_the_trusted_io_path_says_so() {
    let name = "kernel_7x_map_file_refuses_guest_memfd_and_the_trusted_io_path_says_so";
    if !vm_rig::need(
        name,
        &[
            Feature::Kvm,
            Feature::GuestMemfdMmap,
            Feature::Edu,
            Feature::Iommufd,
            Feature::IommufdMapFile,
        ],
    ) {
        return;
    }
    let (backend, _device) = IommufdBackend::open(&edu_address()).expect("open edu via IOMMUFD");
    let backend: Arc<dyn DmaBackend> = Arc::new(backend);
    let kvm = Kvm::new().unwrap();
    let (_vm, backing) = in_place_region(&kvm);
    // The kernel: memfd_pin_folios() pins shmem and hugetlbfs only; a guest_memfd is EINVAL.
    let refused = backend.map_file(
        BASE,
        PAGE,
        std::os::fd::AsFd::as_fd(&**backing.shared_file()),
        0,
        DmaProt::READ_WRITE,
    );
    match refused {
        Err(DmaError::MapFile { source, .. }) => assert_eq!(source.errno(), libc::EINVAL),
        other => panic!("MAP_FILE of a guest_memfd answered {other:?}"),
    }
    assert_eq!(backend.unmap(BASE, PAGE).unwrap(), 0, "nothing was mapped");
    // The library refuses before the kernel is asked, naming why.
    let (ram, _region) = ram_with_region(
        backing,
        Arc::new(RecordingAttributes::new()),
        Attribute::Shared,
        DiscardPolicy::Eager,
    );
    let by_file = DeviceConfig::shared_by(MapBy::File);
    for (config, says) in [
        (DeviceConfig::trusted_io(), "trusted-IO"),
        (by_file, "guest_memfd by file"),
    ] {
        let err = ram
            .attach_device("edu", Arc::clone(&backend), config)
            .unwrap_err();
        assert!(matches!(err, AttachError::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains(says), "{err}");
        eprintln!("refused at attach: {err}");
    }
}
