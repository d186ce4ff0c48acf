//! Real-kernel tests, run by the VM rig inside a QEMU guest whose kernel has KVM private memory
//! (`KVM_X86_SW_PROTECTED_VM`), VFIO type1, IOMMUFD and the edu device.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{PAGE, Rig, ram_with_region, range};
use discard_manager::{Attribute, View};
use gmem_dma::{
    AttachError, BackingModel, DeviceConfig, DiscardPolicy, KvmAttributes, KvmSupport, MapBy,
    ModelChoice, RegionBacking,
};
use iommu::{
    DmaBackend, Edu, EmulatedIommu, FileMapSupport, IommufdBackend, PciAddress, Type1Backend,
    VfioPciDevice,
};
use kvm_ioctls::Kvm;
use vm_rig::Feature;

const KVM_X86_SW_PROTECTED_VM: u64 = kvm_bindings::KVM_X86_SW_PROTECTED_VM as u64;

#[test]
fn kernel_sw_protected_vm_converts_both_ways_with_real_memory_attributes() {
    let name = "kernel_sw_protected_vm_converts_both_ways_with_real_memory_attributes";
    if !vm_rig::need(name, &[Feature::Kvm, Feature::KvmPrivateMemory]) {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm_with_type(KVM_X86_SW_PROTECTED_VM).unwrap();
    let support = KvmSupport::probe(&kvm, &vm);
    assert!(support.has_private_attribute(), "{support:?}");
    // guest_memfd on a VM with private memory offers no INIT_SHARED: in-place is refused with
    // the reason, classic is what such a VM gets.
    assert!(support.choose_model(ModelChoice::InPlace).is_err());
    assert_eq!(
        support.choose_model(ModelChoice::Auto),
        Ok(BackingModel::Classic)
    );
    let base = 0x1_0000_0000;
    let size = 1 << 20;
    let backing = RegionBacking::classic(&vm, base, size).unwrap();
    backing.bind(&vm, 0).unwrap();
    let (ram, region) = ram_with_region(
        backing,
        Arc::new(KvmAttributes::new(Arc::new(vm))),
        Attribute::Private,
        DiscardPolicy::Eager,
    );
    let nic = Arc::new(EmulatedIommu::new());
    let tio = Arc::new(EmulatedIommu::new());
    ram.attach_device("nic", nic.clone(), DeviceConfig::shared())
        .unwrap();
    ram.attach_device("tdisp", tio.clone(), DeviceConfig::trusted_io())
        .unwrap();
    assert_eq!(tio.mapping_count() as u64, size / PAGE);
    let r = range(base + 16 * PAGE, 8 * PAGE);
    ram.convert(r, Attribute::Shared).unwrap();
    assert_eq!(
        (nic.mapping_count(), tio.mapping_count() as u64),
        (8, size / PAGE - 8)
    );
    nic.dma_write(r.start(), &[0x11; 8 * PAGE as usize])
        .unwrap();
    let b = region.backing();
    assert_eq!(b.allocated_bytes(View::Shared).unwrap(), 8 * PAGE);
    // A failed map rolls the real KVM attribute back (an undo failure would be reported).
    nic.inject_failures(|k, _, _| (*k == iommu::emulated::CallKind::MapVa).then_some(libc::ENOMEM));
    let err = ram
        .convert(range(base, PAGE), Attribute::Shared)
        .unwrap_err();
    assert!(
        matches!(err, gmem_dma::ConversionError::Map { .. }),
        "{err:?}"
    );
    nic.clear_failures();
    // Back to private: unmapped from the shared device, the memfd freed, the trusted device
    // maps the pages again.
    ram.convert(r, Attribute::Private).unwrap();
    assert_eq!(
        (nic.mapping_count(), tio.mapping_count() as u64),
        (0, size / PAGE)
    );
    assert_eq!(b.allocated_bytes(View::Shared).unwrap(), 0);
}

/// Real `KVM_SET_MEMORY_ATTRIBUTES`, with each call written down.
#[derive(Debug)]
struct LoggedKvm {
    kvm: KvmAttributes,
    calls: std::sync::Mutex<Vec<(discard_manager::GpaRange, Attribute)>>,
}

impl gmem_dma::MemoryAttributes for LoggedKvm {
    fn set(
        &self,
        range: discard_manager::GpaRange,
        attribute: Attribute,
    ) -> Result<(), gmem_dma::attributes::AttributeError> {
        self.kvm.set(range, attribute)?;
        self.calls.lock().unwrap().push((range, attribute));
        Ok(())
    }
}

#[test]
fn kernel_sw_protected_vm_sets_a_mixed_range_with_one_attribute_call() {
    let name = "kernel_sw_protected_vm_sets_a_mixed_range_with_one_attribute_call";
    if !vm_rig::need(name, &[Feature::Kvm, Feature::KvmPrivateMemory]) {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm_with_type(KVM_X86_SW_PROTECTED_VM).unwrap();
    let base = 0x1_0000_0000;
    let backing = RegionBacking::classic(&vm, base, 64 * PAGE).unwrap();
    backing.bind(&vm, 0).unwrap();
    let attributes = Arc::new(LoggedKvm {
        kvm: KvmAttributes::new(Arc::new(vm)),
        calls: Default::default(),
    });
    let (ram, _region) = ram_with_region(
        backing,
        attributes.clone(),
        Attribute::Private,
        DiscardPolicy::Eager,
    );
    let nic = Arc::new(EmulatedIommu::new());
    ram.attach_device("nic", nic.clone(), DeviceConfig::shared())
        .unwrap();
    // Pages 0-3 and 8-11 shared, 4-7 private between them.
    ram.convert(range(base, 4 * PAGE), Attribute::Shared)
        .unwrap();
    ram.convert(range(base + 8 * PAGE, 4 * PAGE), Attribute::Shared)
        .unwrap();
    attributes.calls.lock().unwrap().clear();
    // The whole of 0-11 to private: KVM takes one call over the span (pages 4-7 already
    // private), and the device loses exactly the eight shared pages.
    let conversion = ram
        .convert(range(base, 12 * PAGE), Attribute::Private)
        .unwrap();
    assert_eq!(conversion.runs().len(), 2, "two runs changed");
    assert_eq!(
        *attributes.calls.lock().unwrap(),
        [(range(base, 12 * PAGE), Attribute::Private)]
    );
    assert_eq!(nic.mapping_count(), 0);
    // And back: one call again, and the device maps all twelve pages.
    attributes.calls.lock().unwrap().clear();
    ram.convert(range(base + 4 * PAGE, 4 * PAGE), Attribute::Shared)
        .unwrap();
    ram.convert(range(base, 12 * PAGE), Attribute::Shared)
        .unwrap();
    assert_eq!(
        *attributes.calls.lock().unwrap(),
        [
            (range(base + 4 * PAGE, 4 * PAGE), Attribute::Shared),
            (range(base, 12 * PAGE), Attribute::Shared)
        ]
    );
    assert_eq!(nic.mapping_count(), 12);
}

fn edu_address() -> PciAddress {
    let text = vm_rig::edu_device().expect("vm_rig::need(Edu) passed, so edu is bound");
    text.parse().expect("GMEM_DMA_EDU is a PCI address")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
}

/// Writes `data` at `host`, as the guest would.
///
/// # Safety
/// `[host, host + data.len())` lies in a live shared mapping of guest RAM, which is only ever
/// reached through raw pointers (a device may write it at any time).
unsafe fn write_host(host: *mut u8, data: &[u8]) {
    for (i, &b) in data.iter().enumerate() {
        // SAFETY: the caller's promise.
        unsafe { host.add(i).write_volatile(b) };
    }
}

/// Reads `len` bytes at `host`, as the guest would.
///
/// # Safety
/// As [`write_host`].
unsafe fn read_host(host: *mut u8, len: usize) -> Vec<u8> {
    // SAFETY: the caller's promise.
    (0..len)
        .map(|i| unsafe { host.add(i).read_volatile() })
        .collect()
}

/// The edu device really DMAs through the IOMMU the engine keeps in step with conversions:
/// shared pages are reachable, a page converted to private is not (isolation), and a neighbour
/// that stayed shared still is (no window).
fn edu_dma_follows_conversions(
    backend: Arc<dyn DmaBackend>,
    device: Arc<VfioPciDevice>,
    map_by: MapBy,
) {
    let edu = Edu::new(device).expect("edu answers with its id");
    // Inside edu's 28-bit DMA mask, identity IOVA.
    let base = 0x100_0000;
    let rig = Rig::new(base, 64, DiscardPolicy::Eager);
    rig.touch(View::Private, rig.region.range());
    let config = DeviceConfig::shared_by(map_by);
    rig.ram.attach_device("edu", backend, config).unwrap();
    let page = |p: u64| base + p * PAGE;
    rig.convert(range(page(0), 4 * PAGE), Attribute::Shared)
        .unwrap();
    let write = |p: u64, data: &[u8]| rig.write_shared(page(p), data);
    let read = |p: u64, len: usize| rig.read_shared(page(p), len);
    let len = Edu::<Arc<VfioPciDevice>>::MAX_DMA as usize;
    let first = pattern(0x21, len);
    write(1, &first);
    edu.copy_to_device(page(1), len as u32).unwrap();
    edu.copy_from_device(page(2), len as u32).unwrap();
    assert_eq!(read(2, len), first, "DMA reaches shared pages");
    // Page 2 becomes private: unmapped before the conversion returns.
    rig.convert(range(page(2), PAGE), Attribute::Private)
        .unwrap();
    write(2, &[0x5a; 64]);
    let second = pattern(0x33, len);
    write(1, &second);
    edu.copy_to_device(page(1), len as u32).unwrap();
    let outcome = edu.copy_from_device(page(2), len as u32);
    eprintln!("DMA to the page converted to private returned {outcome:?}");
    assert_eq!(
        read(2, 64),
        [0x5a; 64],
        "isolation: the device reached a private page"
    );
    // Page 3 stayed shared all along: still reachable.
    edu.copy_from_device(page(3), len as u32).unwrap();
    assert_eq!(
        read(3, len),
        second,
        "no window: a page that stayed shared is reachable"
    );
    // The 0x5a canary backed the shared side of a private page on purpose; free it again so
    // the backing check sees what the engine left.
    rig.region
        .backing()
        .punch_hole(View::Shared, range(page(2), PAGE))
        .unwrap();
    rig.check(&[], &[], None);
}

/// Invariant 2 on a real IOMMU: while the device DMAs to and from a page that stays shared, its
/// neighbours on both sides are converted back and forth the whole time; not one DMA faults and
/// not one byte of the shared page is wrong.
fn edu_dma_to_a_page_that_stays_shared_survives_neighbour_flips(
    backend: Arc<dyn DmaBackend>,
    device: Arc<VfioPciDevice>,
) {
    const ROUNDS: u32 = 8;
    let edu = Edu::new(device).expect("edu answers with its id");
    let base = 0x100_0000; // inside edu's 28-bit DMA mask, identity IOVA
    let rig = Rig::new(base, 16, DiscardPolicy::Eager);
    // Back every private page, so the final check can tell a page the engine freed by mistake.
    rig.touch(View::Private, rig.region.range());
    rig.ram
        .attach_device("edu", backend, DeviceConfig::shared())
        .unwrap();
    let page = |p: u64| base + p * PAGE;
    rig.convert(range(page(0), 3 * PAGE), Attribute::Shared)
        .unwrap();
    // Page 1 stays shared; its host address is fixed while the region lives.
    let stable = rig.region.backing().host_addr(page(1)).unwrap() as usize;
    let len = Edu::<Arc<VfioPciDevice>>::MAX_DMA as usize;
    // A fault the kernel's rate limit swallowed would hide a broken window: start a fresh one.
    vm_rig::wait_for_dmar_fault_log_window();
    let mut log = vm_rig::KernelLog::from_now().ok();
    let done = AtomicBool::new(false);
    let flips = std::thread::scope(|s| {
        let dma = s.spawn(|| {
            let (edu, done) = (&edu, &done);
            let result = (0..ROUNDS).try_for_each(|round| {
                let data = pattern(round as u8, len);
                let host = stable as *mut u8;
                for (i, &b) in data.iter().enumerate() {
                    // SAFETY: page 1 is shared and mapped for the whole test; only raw-pointer
                    // access reaches it while the device may also write it.
                    unsafe { host.add(i).write_volatile(b) };
                }
                edu.copy_to_device(page(1), len as u32)?;
                for (i, &b) in data.iter().enumerate() {
                    // SAFETY: as above.
                    unsafe { host.add(i).write_volatile(!b) };
                }
                edu.copy_from_device(page(1), len as u32)?;
                // SAFETY: as above.
                let back: Vec<u8> = (0..len)
                    .map(|i| unsafe { host.add(i).read_volatile() })
                    .collect();
                assert_eq!(
                    back, data,
                    "round {round}: wrong bytes on the page that stayed shared"
                );
                Ok::<(), iommu::EduError>(())
            });
            done.store(true, Ordering::Release);
            result
        });
        let mut flips = 0u32;
        while !done.load(Ordering::Acquire) {
            for to in [Attribute::Private, Attribute::Shared] {
                rig.convert(range(page(0), PAGE), to).unwrap();
                rig.convert(range(page(2), PAGE), to).unwrap();
            }
            flips += 1;
        }
        dma.join()
            .expect("the DMA thread panicked")
            .expect("edu DMA");
        flips
    });
    eprintln!("{ROUNDS} DMA rounds to the stable page while its neighbours flipped {flips} times");
    assert!(
        flips >= ROUNDS,
        "the neighbours must flip while the device works"
    );
    match log.as_mut() {
        Some(log) => {
            let faults = log.wait_for(vm_rig::is_dmar_fault, std::time::Duration::from_secs(1));
            assert_eq!(
                faults.unwrap(),
                Vec::<String>::new(),
                "DMA faults during the flips"
            );
        }
        None => eprintln!("/dev/kmsg is not readable here; the byte checks stand alone"),
    }
    rig.check(&[], &[], None);
}

#[test]
fn kernel_type1_dma_to_a_shared_page_survives_neighbour_flips() {
    let name = "kernel_type1_dma_to_a_shared_page_survives_neighbour_flips";
    if !vm_rig::need(name, &[Feature::Edu, Feature::VfioType1]) {
        return;
    }
    let (backend, device) = Type1Backend::open(&edu_address()).expect("open edu through type1");
    edu_dma_to_a_page_that_stays_shared_survives_neighbour_flips(Arc::new(backend), device);
}

#[test]
fn kernel_iommufd_dma_to_a_shared_page_survives_neighbour_flips() {
    let name = "kernel_iommufd_dma_to_a_shared_page_survives_neighbour_flips";
    if !vm_rig::need(name, &[Feature::Edu, Feature::Iommufd]) {
        return;
    }
    let (backend, device) = IommufdBackend::open(&edu_address()).expect("open edu through IOMMUFD");
    edu_dma_to_a_page_that_stays_shared_survives_neighbour_flips(Arc::new(backend), device);
}

#[test]
fn kernel_type1_edu_dma_follows_conversions() {
    let name = "kernel_type1_edu_dma_follows_conversions";
    if !vm_rig::need(name, &[Feature::Edu, Feature::VfioType1]) {
        return;
    }
    let (backend, device) = Type1Backend::open(&edu_address()).expect("open edu through type1");
    edu_dma_follows_conversions(Arc::new(backend), device, MapBy::Address);
}

#[test]
fn kernel_iommufd_edu_dma_follows_conversions_by_address() {
    let name = "kernel_iommufd_edu_dma_follows_conversions_by_address";
    if !vm_rig::need(name, &[Feature::Edu, Feature::Iommufd]) {
        return;
    }
    let (backend, device) = IommufdBackend::open(&edu_address()).expect("open edu through IOMMUFD");
    edu_dma_follows_conversions(Arc::new(backend), device, MapBy::Address);
}

#[test]
fn kernel_iommufd_edu_dma_follows_conversions_by_memfd() {
    let name = "kernel_iommufd_edu_dma_follows_conversions_by_memfd";
    if !vm_rig::need(name, &[Feature::Edu, Feature::Iommufd]) {
        return;
    }
    let (backend, device) = IommufdBackend::open(&edu_address()).expect("open edu through IOMMUFD");
    let backend: Arc<dyn DmaBackend> = Arc::new(backend);
    if backend.capabilities().unwrap().map_file == FileMapSupport::None {
        // IOMMU_IOAS_MAP_FILE needs Linux 6.13: the device is refused at attach, with the
        // reason, before any conversion could depend on it.
        let rig = Rig::new(0x100_0000, 4, DiscardPolicy::Eager);
        let config = DeviceConfig::shared_by(MapBy::File);
        let err = rig.ram.attach_device("edu", backend, config).unwrap_err();
        assert!(matches!(err, AttachError::Unsupported { .. }), "{err:?}");
        eprintln!("{name}: this kernel has no IOMMU_IOAS_MAP_FILE; refused at attach: {err}");
        return;
    }
    edu_dma_follows_conversions(backend, device, MapBy::File);
}

/// Sets type1's `dma_entry_limit` (read by containers opened afterwards) and restores it on drop.
struct EntryLimit(String);

const ENTRY_LIMIT: &str = "/sys/module/vfio_iommu_type1/parameters/dma_entry_limit";

impl EntryLimit {
    fn set(limit: u64) -> Self {
        let old = std::fs::read_to_string(ENTRY_LIMIT).expect("vfio_iommu_type1 is loaded");
        std::fs::write(ENTRY_LIMIT, limit.to_string()).expect("dma_entry_limit is writable (root)");
        Self(old.trim().to_string())
    }
}

impl Drop for EntryLimit {
    fn drop(&mut self) {
        // Test teardown: if restoring fails, later containers get the small limit, which the
        // next test's own budget assertions would show.
        let _ = std::fs::write(ENTRY_LIMIT, &self.0);
    }
}

#[test]
fn kernel_type1_budget_refuses_a_conversion_up_front() {
    let name = "kernel_type1_budget_refuses_a_conversion_up_front";
    if !vm_rig::need(name, &[Feature::Edu, Feature::VfioType1]) {
        return;
    }
    let (backend, _device) = {
        let _limit = EntryLimit::set(8);
        Type1Backend::open(&edu_address()).expect("open edu through type1")
    };
    let backend: Arc<dyn DmaBackend> = Arc::new(backend);
    assert_eq!(backend.capabilities().unwrap().mapping_budget, Some(8));
    let base = 0x100_0000;
    let rig = Rig::new(base, 64, DiscardPolicy::Eager);
    let dev = rig
        .ram
        .attach_device("edu", backend, DeviceConfig::shared())
        .unwrap();
    // Nine pages need nine mappings: refused before any map, by the ledger's count of what the
    // kernel has left, with nothing changed.
    let err = rig
        .ram
        .convert(range(base, 9 * PAGE), Attribute::Shared)
        .unwrap_err();
    assert!(
        matches!(
            err,
            gmem_dma::ConversionError::MappingBudget { needed: 9, .. }
        ),
        "{err:?}"
    );
    assert_eq!(rig.ram.device_mappings(dev).unwrap().len(), 0);
    rig.ram
        .convert(range(base, 8 * PAGE), Attribute::Shared)
        .unwrap();
    assert_eq!(rig.ram.device_budget(dev), Some(0));
    assert_eq!(rig.ram.device_mappings(dev).unwrap().len(), 8);
}

/// The second edu bound to vfio-pci (every rig configuration boots two; tests use the first).
fn second_edu() -> Option<PciAddress> {
    vm_rig::second_edu_device().map(|a| a.parse().expect("a PCI address"))
}

/// Two edu devices in one address space (one type1 container or one IOAS), attached to two
/// regions: one mapping per granule for both, both reach shared pages of both regions, a
/// conversion to private cuts both off, and one leaving leaves the other's DMA working.
fn two_edus_in_one_address_space(
    backend: Arc<dyn DmaBackend>,
    first: Arc<VfioPciDevice>,
    second: Arc<VfioPciDevice>,
) {
    let edus = [
        Edu::new(first).expect("first edu answers"),
        Edu::new(second).expect("second edu answers"),
    ];
    // Inside edu's 28-bit DMA mask, identity IOVA.
    let bases = [0x100_0000u64, 0x200_0000];
    let ram = gmem_dma::GuestRam::new(Arc::new(gmem_dma::RecordingAttributes::new()));
    let regions: Vec<_> = bases
        .iter()
        .map(|&base| {
            let spec = gmem_dma::RegionSpec {
                granularity: PAGE,
                initial: Attribute::Private,
                policy: DiscardPolicy::Eager,
                initially_plugged: true,
            };
            ram.add_region(RegionBacking::software(base, 16 * PAGE).unwrap(), spec)
                .unwrap()
        })
        .collect();
    let ids = ["edu-a", "edu-b"].map(|name| {
        ram.attach_device(name, Arc::clone(&backend), DeviceConfig::shared())
            .unwrap()
    });
    for &base in &bases {
        ram.convert(range(base, 4 * PAGE), Attribute::Shared)
            .unwrap();
    }
    // One mapping per granule per address space, whatever the number of devices; one per
    // run where the address space cuts (IOMMUFD): 4 granules in each of the two regions.
    let cuts = backend.capabilities().unwrap().cuts_mappings;
    let mappings = |per_granule: usize, per_run: usize| if cuts { per_run } else { per_granule };
    assert_eq!(ram.device_mappings(ids[0]).unwrap().len(), mappings(8, 2));
    assert_eq!(ram.device_mappings(ids[0]), ram.device_mappings(ids[1]));
    let host = |gpa: u64| {
        let r = regions
            .iter()
            .find(|r| r.range().contains(&range(gpa, 1)))
            .unwrap();
        r.backing().host_addr(gpa).unwrap()
    };
    // SAFETY: inside a live shared mapping; only raw-pointer access to guest RAM.
    let write = |gpa: u64, data: &[u8]| unsafe { write_host(host(gpa), data) };
    // SAFETY: as in `write`.
    let read = |gpa: u64, len: usize| unsafe { read_host(host(gpa), len) };
    let len = Edu::<Arc<VfioPciDevice>>::MAX_DMA as usize;
    // Each device copies a page of one region into a page of the other.
    let copy = |edu: &Edu<Arc<VfioPciDevice>>, from: u64, to: u64, seed: u8| {
        let data = pattern(seed, len);
        write(from, &data);
        edu.copy_to_device(from, len as u32).unwrap();
        edu.copy_from_device(to, len as u32).unwrap();
        assert_eq!(read(to, len), data, "DMA {from:#x} -> {to:#x}");
    };
    copy(&edus[0], bases[0] + PAGE, bases[1] + 2 * PAGE, 0x11);
    copy(&edus[1], bases[1] + PAGE, bases[0] + 2 * PAGE, 0x22);
    // A page converted to private is cut off for both devices.
    let private = bases[0] + 3 * PAGE;
    ram.convert(range(private, PAGE), Attribute::Private)
        .unwrap();
    // Per run, the page is cut out of its region's run: pages 0-2 stay one mapping.
    assert_eq!(ram.device_mappings(ids[1]).unwrap().len(), mappings(7, 2));
    write(private, &[0x5a; 64]);
    for (i, edu) in edus.iter().enumerate() {
        write(bases[0] + PAGE, &pattern(0x40 + i as u8, len));
        edu.copy_to_device(bases[0] + PAGE, len as u32).unwrap();
        let outcome = edu.copy_from_device(private, len as u32);
        eprintln!("edu {i}: DMA to the page converted to private returned {outcome:?}");
        assert_eq!(
            read(private, 64),
            [0x5a; 64],
            "isolation: edu {i} reached a private page"
        );
    }
    regions[0]
        .backing()
        .punch_hole(View::Shared, range(private, PAGE))
        .unwrap();
    // One leaves: nothing is unmapped, and the other keeps reaching shared pages.
    let report = ram.detach_device(ids[0]).unwrap();
    assert_eq!(report.mappings, 0);
    assert_eq!(ram.device_mappings(ids[1]).unwrap().len(), mappings(7, 2));
    copy(&edus[1], bases[0], bases[1] + 3 * PAGE, 0x33);
    // The last one leaves: everything is unmapped.
    let report = ram.detach_device(ids[1]).unwrap();
    assert_eq!(report.mappings, mappings(7, 2) as u64);
}

#[test]
fn kernel_type1_two_edus_in_one_container_share_two_regions() {
    let name = "kernel_type1_two_edus_in_one_container_share_two_regions";
    if !vm_rig::need(name, &[Feature::Edu, Feature::VfioType1]) {
        return;
    }
    let second = second_edu().expect("every rig configuration boots two edu devices");
    let (backend, first) = Type1Backend::open(&edu_address()).expect("open edu through type1");
    let other = backend.attach(&second).expect("attach the second edu");
    two_edus_in_one_address_space(Arc::new(backend), first, other);
}

#[test]
fn kernel_iommufd_two_edus_in_one_ioas_share_two_regions() {
    let name = "kernel_iommufd_two_edus_in_one_ioas_share_two_regions";
    if !vm_rig::need(name, &[Feature::Edu, Feature::Iommufd]) {
        return;
    }
    let second = second_edu().expect("every rig configuration boots two edu devices");
    let (backend, first) = IommufdBackend::open(&edu_address()).expect("open edu through IOMMUFD");
    let other = backend.attach(&second).expect("attach the second edu");
    two_edus_in_one_address_space(Arc::new(backend), first, other);
}

/// virtio-mem on a real IOMMU: edu's DMA to a block that is unplugged does not land; after the
/// block is plugged again and converted to shared it does; removing the region unmaps every
/// byte the kernel had mapped for it.
fn edu_dma_follows_plug_and_unplug(backend: Arc<dyn DmaBackend>, device: Arc<VfioPciDevice>) {
    let edu = Edu::new(device).expect("edu answers with its id");
    let base = 0x100_0000; // inside edu's 28-bit DMA mask, identity IOVA
    let rig = Rig::new(base, 64, DiscardPolicy::Eager);
    rig.touch(View::Private, rig.region.range());
    let id = rig
        .ram
        .attach_device("edu", backend, DeviceConfig::shared())
        .unwrap();
    let page = |p: u64| base + p * PAGE;
    let write = |p: u64, data: &[u8]| rig.write_shared(page(p), data);
    let read = |p: u64, len: usize| rig.read_shared(page(p), len);
    let len = Edu::<Arc<VfioPciDevice>>::MAX_DMA as usize;
    rig.convert(range(page(0), 8 * PAGE), Attribute::Shared)
        .unwrap();
    // Pages 4..8 are the block the guest gives back.
    rig.ram.unplug(range(page(4), 4 * PAGE)).unwrap();
    write(4, &[0x5a; 64]);
    let data = pattern(0x42, len);
    write(0, &data);
    edu.copy_to_device(page(0), len as u32).unwrap();
    let outcome = edu.copy_from_device(page(4), len as u32);
    eprintln!("DMA to the unplugged block returned {outcome:?}");
    assert_eq!(read(4, 64), [0x5a; 64], "DMA landed in an unplugged block");
    // The canary backed the unplugged block on purpose; free it again.
    rig.region
        .backing()
        .punch_hole(View::Shared, range(page(4), PAGE))
        .unwrap();
    // Plugged again (private, as the region's attribute says), then shared: DMA lands.
    rig.ram.plug(range(page(4), 4 * PAGE), None).unwrap();
    rig.convert(range(page(4), 4 * PAGE), Attribute::Shared)
        .unwrap();
    edu.copy_from_device(page(4), len as u32).unwrap();
    assert_eq!(
        read(4, len),
        data,
        "DMA reaches the re-plugged shared block"
    );
    rig.check(&[], &[], None);
    // Removal: every byte mapped is unmapped, counted by the kernel's unmap replies.
    let before = rig.ram.device_stats(id).unwrap();
    let mapped = before.bytes_mapped - before.bytes_unmapped;
    assert_eq!(mapped, 8 * PAGE);
    rig.ram.remove_region(rig.region.range()).unwrap();
    let after = rig.ram.device_stats(id).unwrap();
    assert_eq!(after.bytes_unmapped - before.bytes_unmapped, mapped);
    assert_eq!(rig.ram.device_mappings(id).unwrap().len(), 0);
    // The region's memory is still held here (the test's handle), but no longer DMA-able.
    write(0, &[0x5a; 64]);
    let outcome = edu.copy_from_device(page(0), len as u32);
    eprintln!("DMA to the removed region returned {outcome:?}");
    assert_eq!(read(0, 64), [0x5a; 64], "DMA landed in a removed region");
}

#[test]
fn kernel_type1_edu_dma_follows_plug_and_unplug() {
    let name = "kernel_type1_edu_dma_follows_plug_and_unplug";
    if !vm_rig::need(name, &[Feature::Edu, Feature::VfioType1]) {
        return;
    }
    let (backend, device) = Type1Backend::open(&edu_address()).expect("open edu through type1");
    edu_dma_follows_plug_and_unplug(Arc::new(backend), device);
}

#[test]
fn kernel_iommufd_edu_dma_follows_plug_and_unplug() {
    let name = "kernel_iommufd_edu_dma_follows_plug_and_unplug";
    if !vm_rig::need(name, &[Feature::Edu, Feature::Iommufd]) {
        return;
    }
    let (backend, device) = IommufdBackend::open(&edu_address()).expect("open edu through IOMMUFD");
    edu_dma_follows_plug_and_unplug(Arc::new(backend), device);
}
