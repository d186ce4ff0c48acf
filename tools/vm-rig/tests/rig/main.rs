//! The rig's own real-kernel tests: each proves that a guest configuration really gives what it
//! promises in `GMEM_DMA_REQUIRE`, by using it the way the project's tests will, not by looking
//! at the probe that decided the promise.
//!
//! - KVM private memory: a `KVM_X86_SW_PROTECTED_VM` accepts a guest_memfd-backed memslot and
//!   converts it to private and back, and the kernel refuses what it must refuse.
//! - edu: the device is bound to vfio-pci and answers on its BAR.
//! - VFIO type1 and IOMMUFD: the edu device's DMA reaches memory mapped through the emulated IOMMU
//!   and no longer reaches it once unmapped.
//! - no-IOMMU: the container offers the no-IOMMU model (which it refuses elsewhere) and the
//!   device's no-IOMMU group opens.
//!
//! Outside the rig's guests they skip (this machine's kernel has no VFIO), unless
//! `GMEM_DMA_REQUIRE` says otherwise.

mod raw;

use std::fs::{self, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use iommufd_ioctls::IommuFd;
use kvm_bindings::{
    KVM_MEM_GUEST_MEMFD, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_SW_PROTECTED_VM,
    kvm_create_guest_memfd, kvm_memory_attributes, kvm_userspace_memory_region2,
};
use kvm_ioctls::Kvm;
use vfio_bindings::bindings::vfio::{
    VFIO_NOIOMMU_IOMMU, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioIommufd};
use vm_rig::Feature;

const PAGE: usize = 4096;
const SLOT_SIZE: u64 = 2 << 20;
/// Below edu's default 28-bit DMA mask.
const IOVA: u64 = 0x10_0000;
/// Bytes per DMA: QEMU 7.2's edu aborts on a full 4096-byte transfer (off-by-one).
const DMA_LEN: usize = 2048;

/// Anonymous private memory, unmapped on drop.
struct Anon {
    ptr: NonNull<u8>,
    len: usize,
}

impl Anon {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks; nothing else is
        // affected, and the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Self {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned null"),
            len,
        }
    }

    /// Reads the memory afresh (a device may have written it behind the compiler's back).
    fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.len);
        // SAFETY: in bounds (checked above); volatile because DMA writes are invisible to Rust.
        (0..len)
            .map(|i| unsafe { self.ptr.as_ptr().add(offset + i).read_volatile() })
            .collect()
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len);
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: in bounds (checked above).
            unsafe { self.ptr.as_ptr().add(offset + i).write_volatile(*b) }
        }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no reference into it outlives self.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[test]
fn kernel_rig_private_memory_converts_a_guest_memfd_slot() {
    if !vm_rig::need(
        "kernel_rig_private_memory_converts_a_guest_memfd_slot",
        &[Feature::Kvm, Feature::KvmPrivateMemory],
    ) {
        return;
    }
    let shared = Anon::new(SLOT_SIZE as usize);
    let kvm = Kvm::new().unwrap();
    let vm = kvm
        .create_vm_with_type(KVM_X86_SW_PROTECTED_VM.into())
        .unwrap();
    let gmem = vm
        .create_guest_memfd(kvm_create_guest_memfd {
            size: SLOT_SIZE,
            flags: 0,
            reserved: [0; 6],
        })
        .expect("guest_memfd with flags 0 on a SW_PROTECTED VM");
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    let gmem = unsafe { OwnedFd::from_raw_fd(gmem) };
    let region = kvm_userspace_memory_region2 {
        slot: 0,
        flags: KVM_MEM_GUEST_MEMFD,
        guest_phys_addr: 0,
        memory_size: SLOT_SIZE,
        userspace_addr: shared.ptr.as_ptr() as u64,
        guest_memfd_offset: 0,
        guest_memfd: gmem.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `shared` covers the whole slot and outlives `vm` (declared before it, dropped after);
    // the guest_memfd was created on this VM and is as large as the slot.
    unsafe { vm.set_user_memory_region2(region) }
        .expect("KVM_SET_USER_MEMORY_REGION2 with guest_memfd");

    let set = |address: u64, size: u64, attributes: u32| {
        vm.set_memory_attributes(kvm_memory_attributes {
            address,
            size,
            attributes: attributes.into(),
            flags: 0,
        })
    };
    set(0, SLOT_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE).expect("whole slot to private");
    set(0x1000, 0x1000, 0).expect("one page back to shared");
    set(0x1000, 0x1000, KVM_MEMORY_ATTRIBUTE_PRIVATE).expect("and private again");
    let unaligned = set(0x800, 0x1000, KVM_MEMORY_ATTRIBUTE_PRIVATE).expect_err("unaligned range");
    assert_eq!(unaligned.errno(), libc::EINVAL);
    let unknown = set(0, 0x1000, 1).expect_err("an attribute the VM does not support");
    assert_eq!(unknown.errno(), libc::EINVAL);

    // The VM type is what makes it work: a default VM has no private memory.
    let plain = kvm.create_vm().unwrap();
    let refused = plain.set_memory_attributes(kvm_memory_attributes {
        address: 0,
        size: 0x1000,
        attributes: KVM_MEMORY_ATTRIBUTE_PRIVATE.into(),
        flags: 0,
    });
    assert!(
        refused.is_err(),
        "a default VM accepted KVM_MEMORY_ATTRIBUTE_PRIVATE"
    );
}

#[test]
fn kernel_rig_edu_is_bound_to_vfio_pci_with_a_group() {
    if !vm_rig::need(
        "kernel_rig_edu_is_bound_to_vfio_pci_with_a_group",
        &[Feature::Edu],
    ) {
        return;
    }
    let address = vm_rig::edu_device().unwrap();
    let dir = vm_rig::sysfs_path(&address);
    let read = |file: &str| {
        fs::read_to_string(dir.join(file))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(
        (read("vendor").as_str(), read("device").as_str()),
        ("0x1234", "0x11e8"),
        "{address} is not edu"
    );
    let driver = fs::read_link(dir.join("driver")).expect("edu has no driver");
    assert_eq!(driver.file_name().unwrap(), "vfio-pci");
    let group = fs::read_link(dir.join("iommu_group")).expect("edu has no IOMMU group");
    let group = group.file_name().unwrap().to_string_lossy().into_owned();
    let nodes = [
        format!("/dev/vfio/{group}"),
        format!("/dev/vfio/noiommu-{group}"),
    ];
    assert!(
        nodes.iter().any(|n| Path::new(n).exists()),
        "neither of {nodes:?} exists"
    );
}

/// The edu device's registers, reached through its VFIO regions.
struct Edu<'a>(&'a VfioDevice);

impl Edu<'_> {
    fn read32(&self, offset: u64) -> u32 {
        let mut bytes = [0; 4];
        self.0
            .region_read(VFIO_PCI_BAR0_REGION_INDEX, &mut bytes, offset);
        u32::from_le_bytes(bytes)
    }

    fn write32(&self, offset: u64, value: u32) {
        self.0
            .region_write(VFIO_PCI_BAR0_REGION_INDEX, &value.to_le_bytes(), offset);
    }

    fn write64(&self, offset: u64, value: u64) {
        self.0
            .region_write(VFIO_PCI_BAR0_REGION_INDEX, &value.to_le_bytes(), offset);
    }

    /// Checks the identification and liveness registers, then lets the device master the bus.
    fn start(&self) {
        assert_eq!(
            self.read32(0x00) & 0xff,
            0xed,
            "edu identification register"
        );
        self.write32(0x04, 0x1234_5678);
        assert_eq!(
            self.read32(0x04),
            !0x1234_5678,
            "edu liveness register inverts what it is given"
        );
        let mut command = [0; 2];
        self.0
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut command, 0x04);
        let command = u16::from_le_bytes(command) | 0x4; // bus master
        self.0
            .region_write(VFIO_PCI_CONFIG_REGION_INDEX, &command.to_le_bytes(), 0x04);
    }

    /// One DMA between `iova` and the device's buffer (at 0x40000 in its address space).
    fn dma(&self, iova: u64, to_ram: bool) {
        const DEVICE_BUFFER: u64 = 0x4_0000;
        let (src, dst) = if to_ram {
            (DEVICE_BUFFER, iova)
        } else {
            (iova, DEVICE_BUFFER)
        };
        self.write64(0x80, src);
        self.write64(0x88, dst);
        self.write64(0x90, DMA_LEN as u64);
        self.write32(0x98, 1 | if to_ram { 2 } else { 0 });
        let started = Instant::now();
        while self.read32(0x98) & 1 != 0 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "edu DMA did not complete"
            );
            sleep(Duration::from_millis(5));
        }
    }
}

/// Copies a pattern from one mapped page to the next through the device, then unmaps and shows
/// the device no longer reaches the memory. `map`/`unmap` act on `[IOVA, IOVA + 2 pages)`.
fn dma_reaches_only_mapped_memory(device: &VfioDevice, map: impl Fn(&Anon), unmap: impl Fn()) {
    let edu = Edu(device);
    edu.start();
    let memory = Anon::new(2 * PAGE);
    let pattern: Vec<u8> = (0..DMA_LEN).map(|i| (i * 7 + 3) as u8).collect();
    memory.write(0, &pattern);
    map(&memory);
    edu.dma(IOVA, false);
    edu.dma(IOVA + PAGE as u64, true);
    assert_eq!(
        memory.read(PAGE, DMA_LEN),
        pattern,
        "the device's DMA did not arrive in mapped memory"
    );

    unmap();
    memory.write(PAGE, &vec![0; DMA_LEN]);
    edu.dma(IOVA + PAGE as u64, true);
    assert!(
        memory.read(PAGE, DMA_LEN).iter().all(|&b| b == 0),
        "the device wrote memory that is no longer mapped"
    );
}

#[test]
fn kernel_rig_edu_dma_through_type1_reaches_only_mapped_memory() {
    if !vm_rig::need(
        "kernel_rig_edu_dma_through_type1_reaches_only_mapped_memory",
        &[Feature::Edu, Feature::VfioType1],
    ) {
        return;
    }
    let address = vm_rig::edu_device().unwrap();
    let container = Arc::new(VfioContainer::new(None).expect("open /dev/vfio/vfio"));
    let device = VfioDevice::new(&vm_rig::sysfs_path(&address), container.clone(), false)
        .expect("open edu via its group");
    dma_reaches_only_mapped_memory(
        &device,
        |memory| {
            // SAFETY: the memory stays mapped until after `unmap` runs, and Rust only touches
            // it through volatile accesses while the device may write it.
            unsafe { container.vfio_dma_map(IOVA, 2 * PAGE, memory.ptr.as_ptr()) }
                .expect("VFIO_IOMMU_MAP_DMA")
        },
        || {
            container
                .vfio_dma_unmap(IOVA, 2 * PAGE)
                .expect("VFIO_IOMMU_UNMAP_DMA")
        },
    );
}

#[test]
fn kernel_rig_edu_dma_through_iommufd_reaches_only_mapped_memory() {
    if !vm_rig::need(
        "kernel_rig_edu_dma_through_iommufd_reaches_only_mapped_memory",
        &[Feature::Edu, Feature::Iommufd],
    ) {
        return;
    }
    let address = vm_rig::edu_device().unwrap();
    let iommufd = Arc::new(IommuFd::new().expect("open /dev/iommu"));
    let ops = Arc::new(VfioIommufd::new(iommufd, None, None).expect("IOMMU_IOAS_ALLOC"));
    let device = VfioDevice::new(&vm_rig::sysfs_path(&address), ops.clone(), true)
        .expect("bind and attach edu's cdev");
    dma_reaches_only_mapped_memory(
        &device,
        |memory| {
            // SAFETY: as in the type1 test: mapped until `unmap`, touched only through volatile
            // accesses meanwhile.
            unsafe { ops.vfio_dma_map(IOVA, 2 * PAGE, memory.ptr.as_ptr()) }
                .expect("IOMMU_IOAS_MAP")
        },
        || {
            ops.vfio_dma_unmap(IOVA, 2 * PAGE)
                .expect("IOMMU_IOAS_UNMAP")
        },
    );
}

#[test]
fn kernel_rig_noiommu_container_offers_the_noiommu_model() {
    if !vm_rig::need(
        "kernel_rig_noiommu_container_offers_the_noiommu_model",
        &[Feature::Edu, Feature::NoIommu],
    ) {
        return;
    }
    let address = vm_rig::edu_device().unwrap();
    let open = |path: &str| OpenOptions::new().read(true).write(true).open(path);
    let container = open("/dev/vfio/vfio").expect("open /dev/vfio/vfio");
    assert_eq!(raw::api_version(&container), 0, "VFIO_API_VERSION");
    // 1 only while vfio.enable_unsafe_noiommu_mode is set: elsewhere the same call answers 0.
    assert_eq!(
        raw::check_extension(&container, VFIO_NOIOMMU_IOMMU),
        1,
        "VFIO_NOIOMMU_IOMMU"
    );
    let group = fs::read_link(vm_rig::sysfs_path(&address).join("iommu_group")).unwrap();
    let group = group.file_name().unwrap().to_string_lossy().into_owned();
    open(&format!("/dev/vfio/noiommu-{group}")).expect("open the no-IOMMU group");
}
