//! Shared pieces of the real-kernel tests: memfd-backed DMA buffers, data patterns, the edu
//! device's address, and the kernel log.
#![allow(dead_code)] // each test binary uses its own subset

use std::fs::OpenOptions;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use gmem_dma_iommu::PciAddress;

pub const PAGE: u64 = 4096;

/// The edu device's address (the rig exports it; `vm_rig::need(.., Edu)` checked it is there).
pub fn edu_address() -> PciAddress {
    let text = vm_rig::edu_device().expect("vm_rig::need(Edu) passed, so edu is bound");
    text.parse().expect("GMEM_DMA_EDU is a PCI address")
}

/// A shared memfd mapping: what a VMM's shared guest RAM looks like. Only raw-pointer access
/// (no Rust references into it), since a device may write it.
pub struct MemfdBuf {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

impl MemfdBuf {
    pub fn new(len: usize) -> MemfdBuf {
        // SAFETY: the name is a valid NUL-terminated string; the result is checked.
        let raw = unsafe { libc::memfd_create(c"kernel-test-dma".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(
            raw >= 0,
            "memfd_create: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a new fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `fd` is an open memfd; the result is checked.
        let ret = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
        assert_eq!(ret, 0, "ftruncate: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh shared mapping of the whole file at an address the kernel picks; the
        // result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        MemfdBuf {
            fd,
            ptr: ptr.cast(),
            len,
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// The address to map (at `offset`).
    pub fn addr(&self, offset: usize) -> *mut u8 {
        assert!(offset < self.len);
        // SAFETY: `offset` is inside the mapping.
        unsafe { self.ptr.add(offset) }
    }

    /// Writes `data` at `offset`; call only while no DMA is in flight.
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len);
        for (i, b) in data.iter().enumerate() {
            // SAFETY: inside the mapping; volatile because a device may also access it.
            unsafe { self.ptr.add(offset + i).write_volatile(*b) };
        }
    }

    pub fn fill(&self, byte: u8) {
        self.write(0, &vec![byte; self.len]);
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.len);
        // SAFETY: inside the mapping; volatile because a device may have written it.
        (0..len)
            .map(|i| unsafe { self.ptr.add(offset + i).read_volatile() })
            .collect()
    }
}

impl Drop for MemfdBuf {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; tests unmap it from the IOMMU (or
        // drop the backend, which removes every mapping) before dropping the buffer.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A recognisable, seed-dependent byte pattern with no zero bytes.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Kernel log records written since `skip` records were seen, or `None` when /dev/kmsg cannot
/// be read here.
pub fn kmsg_records() -> Option<Vec<String>> {
    let mut kmsg = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    let mut records = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match kmsg.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => records.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            // EPIPE: a record was overwritten while reading; keep going.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break, // EAGAIN: no more records
        }
    }
    Some(records)
}

/// Which IOMMU drivers the guest has (`dmar0`, `virtio-iommu...`), from /sys/class/iommu.
pub fn iommu_classes() -> Vec<String> {
    std::fs::read_dir("/sys/class/iommu")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Where the tests put their buffers: below edu's 28-bit DMA mask.
pub const SRC_IOVA: u64 = 0x10_0000;
pub const DST_IOVA: u64 = 0x20_0000;
/// Bytes per edu DMA in these tests.
pub const DMA_LEN: usize = 2048;

/// Asserts the backend lets `[iova, iova + len)` be mapped.
pub fn assert_usable_iova(backend: &dyn gmem_dma_iommu::DmaBackend, iova: u64, len: u64) {
    let caps = backend.capabilities().expect("capabilities");
    assert!(
        caps.iova_ranges.iter().any(|r| r.contains(iova, len)),
        "{iova:#x}+{len:#x} is outside the usable IOVA ranges {:?}",
        caps.iova_ranges
    );
    assert_eq!(caps.min_page_size(), PAGE, "x86 IOMMUs map 4 KiB pages");
}

/// One body for every translating backend: edu reads a mapped buffer (mapped with `src_prot`)
/// and writes another, and the data arrives intact; then both are unmapped.
pub fn dma_reaches_mapped_memory_both_ways<R: gmem_dma_iommu::DeviceRegions>(
    backend: &dyn gmem_dma_iommu::DmaBackend,
    edu: &gmem_dma_iommu::Edu<R>,
    src_prot: gmem_dma_iommu::DmaProt,
) {
    assert_usable_iova(backend, SRC_IOVA, PAGE);
    assert_usable_iova(backend, DST_IOVA, PAGE);
    let src = MemfdBuf::new(PAGE as usize);
    let dst = MemfdBuf::new(PAGE as usize);
    let data = pattern(0x11, DMA_LEN);
    src.write(0, &data);
    dst.fill(0);
    // SAFETY: both buffers outlive their mappings (unmapped below before they drop) and are
    // touched only through raw pointers while mapped.
    unsafe {
        backend
            .map_va(SRC_IOVA, PAGE, src.addr(0), src_prot)
            .expect("map src");
        backend
            .map_va(
                DST_IOVA,
                PAGE,
                dst.addr(0),
                gmem_dma_iommu::DmaProt::READ_WRITE,
            )
            .expect("map dst");
    }
    edu.copy_to_device(SRC_IOVA, DMA_LEN as u32)
        .expect("DMA memory -> edu");
    edu.copy_from_device(DST_IOVA, DMA_LEN as u32)
        .expect("DMA edu -> memory");
    assert_eq!(
        dst.read(0, DMA_LEN),
        data,
        "the device's write did not arrive"
    );
    assert!(
        dst.read(DMA_LEN, PAGE as usize - DMA_LEN)
            .iter()
            .all(|&b| b == 0),
        "the device wrote past the count"
    );
    assert_eq!(backend.unmap(SRC_IOVA, PAGE).expect("unmap src"), PAGE);
    assert_eq!(backend.unmap(DST_IOVA, PAGE).expect("unmap dst"), PAGE);
}

/// One body for every translating backend: once a buffer is unmapped, the same DMA leaves it
/// untouched (and an Intel IOMMU logs a DMAR write fault).
pub fn dma_does_not_reach_unmapped_memory<R: gmem_dma_iommu::DeviceRegions>(
    backend: &dyn gmem_dma_iommu::DmaBackend,
    edu: &gmem_dma_iommu::Edu<R>,
) {
    let src = MemfdBuf::new(PAGE as usize);
    let dst = MemfdBuf::new(PAGE as usize);
    // SAFETY: as in `dma_reaches_mapped_memory_both_ways`.
    unsafe {
        backend
            .map_va(
                SRC_IOVA,
                PAGE,
                src.addr(0),
                gmem_dma_iommu::DmaProt::READ_WRITE,
            )
            .expect("map src");
        backend
            .map_va(
                DST_IOVA,
                PAGE,
                dst.addr(0),
                gmem_dma_iommu::DmaProt::READ_WRITE,
            )
            .expect("map dst");
    }
    // First prove the path works while mapped, so the second half is not vacuous.
    let first = pattern(0x21, DMA_LEN);
    src.write(0, &first);
    edu.copy_to_device(SRC_IOVA, DMA_LEN as u32).unwrap();
    edu.copy_from_device(DST_IOVA, DMA_LEN as u32).unwrap();
    assert_eq!(dst.read(0, DMA_LEN), first);

    assert_eq!(backend.unmap(DST_IOVA, PAGE).expect("unmap dst"), PAGE);
    dst.fill(0x5a);
    let second = pattern(0x33, DMA_LEN);
    src.write(0, &second);
    edu.copy_to_device(SRC_IOVA, DMA_LEN as u32).unwrap();
    let intel = iommu_classes().iter().any(|c| c.starts_with("dmar"));
    if intel {
        vm_rig::wait_for_dmar_fault_log_window();
    }
    let log_before = kmsg_records().map(|r| r.len());
    // The IOMMU blocks the write; edu itself does not notice, so the DMA "completes".
    let outcome = edu.copy_from_device(DST_IOVA, DMA_LEN as u32);
    eprintln!("DMA to the unmapped IOVA returned {outcome:?}");
    assert!(
        dst.read(0, PAGE as usize).iter().all(|&b| b == 0x5a),
        "the device wrote memory that is no longer mapped"
    );
    assert_eq!(backend.unmap(SRC_IOVA, PAGE).expect("unmap src"), PAGE);

    // The fault report is asynchronous; give it a moment.
    let Some(before) = log_before else {
        eprintln!("/dev/kmsg is not readable here; not checking the fault report");
        return;
    };
    let mut faults = Vec::new();
    for _ in 0..20 {
        let records = kmsg_records().unwrap_or_default();
        faults = records
            .iter()
            .skip(before)
            .filter(|r| r.contains("DMAR") || r.to_lowercase().contains("fault"))
            .cloned()
            .collect();
        if !faults.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!(
        "kernel log after the blocked DMA: {} fault records, first: {:?}",
        faults.len(),
        faults.first()
    );
    if intel {
        assert!(
            faults.iter().any(|r| r.contains("DMA Write")),
            "Intel IOMMU: expected a DMAR write fault in the kernel log, got {faults:?}"
        );
    }
}

/// Whether edu's write of `data` (already in its buffer) to `iova`, which maps page `page` of
/// `dst`, lands there. The page is refilled with 0x5a first: a blocked DMA still "completes" for
/// edu, the memory tells.
pub fn dma_write_lands<R: gmem_dma_iommu::DeviceRegions>(
    edu: &gmem_dma_iommu::Edu<R>,
    dst: &MemfdBuf,
    page: u64,
    iova: u64,
    data: &[u8],
) -> bool {
    let at = (page * PAGE) as usize;
    dst.write(at, &vec![0x5a; PAGE as usize]);
    let _ = edu.copy_from_device(iova, data.len() as u32);
    dst.read(at, data.len()) == data
}

/// Another edu device bound to vfio-pci besides [`edu_address`], if the machine has one (the
/// rig boots one; a second `-device edu` makes the attach tests run).
pub fn second_edu() -> Option<PciAddress> {
    vm_rig::second_edu_device().map(|a| a.parse().expect("a PCI address"))
}

/// Both devices of one address space reach the same mappings: edu `a` reads a buffer mapped
/// before `b` joined, `b` writes it to another, and the data arrives.
pub fn both_devices_share_the_mappings<
    R: gmem_dma_iommu::DeviceRegions,
    S: gmem_dma_iommu::DeviceRegions,
>(
    backend: &dyn gmem_dma_iommu::DmaBackend,
    a: &gmem_dma_iommu::Edu<R>,
    b: &gmem_dma_iommu::Edu<S>,
) {
    let src = MemfdBuf::new(PAGE as usize);
    let dst = MemfdBuf::new(PAGE as usize);
    let data = pattern(0x77, DMA_LEN);
    src.write(0, &data);
    dst.fill(0);
    // SAFETY: both buffers outlive their mappings (unmapped below).
    unsafe {
        backend
            .map_va(
                SRC_IOVA,
                PAGE,
                src.addr(0),
                gmem_dma_iommu::DmaProt::READ_WRITE,
            )
            .unwrap();
        backend
            .map_va(
                DST_IOVA,
                PAGE,
                dst.addr(0),
                gmem_dma_iommu::DmaProt::READ_WRITE,
            )
            .unwrap();
    }
    b.copy_to_device(SRC_IOVA, DMA_LEN as u32).unwrap();
    b.copy_from_device(DST_IOVA, DMA_LEN as u32).unwrap();
    assert_eq!(
        dst.read(0, DMA_LEN),
        data,
        "the second device did not reach the mapping"
    );
    dst.fill(0);
    a.copy_to_device(SRC_IOVA, DMA_LEN as u32).unwrap();
    a.copy_from_device(DST_IOVA, DMA_LEN as u32).unwrap();
    assert_eq!(
        dst.read(0, DMA_LEN),
        data,
        "the first device lost the mapping"
    );
    assert_eq!(backend.unmap(SRC_IOVA, PAGE).unwrap(), PAGE);
    assert_eq!(backend.unmap(DST_IOVA, PAGE).unwrap(), PAGE);
}

/// One body for every translating backend: the ledger unmaps several ranges in one kernel call
/// spanning the gaps between them when nothing is mapped there (the kernel accepts a range with
/// holes and reports exactly the bytes it held), and splits the call around a mapping that lies
/// in a gap instead of sweeping it away. edu's DMA shows what the kernel still maps.
pub fn one_unmap_spans_empty_gaps_but_never_a_mapping<R: gmem_dma_iommu::DeviceRegions>(
    backend: std::sync::Arc<dyn gmem_dma_iommu::DmaBackend>,
    edu: &gmem_dma_iommu::Edu<R>,
) {
    const PAGES: u64 = 6;
    assert_usable_iova(&*backend, SRC_IOVA, PAGE);
    assert_usable_iova(&*backend, DST_IOVA, PAGES * PAGE);
    let ledger = gmem_dma_iommu::Ledger::new(backend).expect("ledger");
    let src = MemfdBuf::new(PAGE as usize);
    let dst = MemfdBuf::new((PAGES * PAGE) as usize);
    let iova = |page: u64| DST_IOVA + page * PAGE;
    let map = |page: u64| {
        // SAFETY: `dst` outlives every mapping (all are unmapped below before it drops) and
        // is touched only through raw pointers while mapped.
        unsafe {
            ledger
                .map_va(
                    iova(page),
                    PAGE,
                    dst.addr((page * PAGE) as usize),
                    gmem_dma_iommu::DmaProt::READ_WRITE,
                )
                .expect("map a dst page");
        }
    };
    // SAFETY: as for `dst`.
    unsafe {
        ledger
            .map_va(
                SRC_IOVA,
                PAGE,
                src.addr(0),
                gmem_dma_iommu::DmaProt::READ_WRITE,
            )
            .expect("map src");
    }
    let data = pattern(0x47, DMA_LEN);
    src.write(0, &data);
    edu.copy_to_device(SRC_IOVA, DMA_LEN as u32)
        .expect("DMA memory -> edu");
    // Whether edu's write to `page` lands (the page is refilled first).
    let reached = |page: u64| dma_write_lands(edu, &dst, page, iova(page), &data);

    // Pages 0, 2 and 4 mapped as three mappings, 1 and 3 hold nothing, 5 stays mapped.
    for page in [0, 2, 4, 5] {
        map(page);
    }
    for page in [0, 2, 4, 5] {
        assert!(reached(page), "page {page} is mapped but DMA did not land");
    }
    let report = ledger
        .unmap_ranges(&[(iova(0), PAGE), (iova(2), PAGE), (iova(4), PAGE)])
        .expect("unmap three ranges");
    assert_eq!(
        (report.calls, report.bytes, report.mappings),
        (1, 3 * PAGE, 3),
        "one kernel call over the gaps, reporting exactly the three pages"
    );
    for page in [0, 2, 4] {
        assert!(!reached(page), "page {page} was unmapped but DMA landed");
    }
    assert!(
        reached(5),
        "page 5 was never unmapped but DMA no longer lands"
    );

    // Page 1 mapped in the gap between 0 and 2: two calls, and page 1 stays reachable.
    for page in [0, 1, 2] {
        map(page);
    }
    let report = ledger
        .unmap_ranges(&[(iova(0), PAGE), (iova(2), PAGE)])
        .expect("unmap around page 1");
    assert_eq!((report.calls, report.bytes), (2, 2 * PAGE));
    assert!(reached(1), "the mapping in the gap was swept away");
    assert!(
        !reached(0) && !reached(2),
        "an unmapped page is still reached"
    );

    let rest = ledger.unmap_all().expect("unmap the rest");
    assert_eq!(rest.mappings, 3, "src, page 1 and page 5 were left");
}
