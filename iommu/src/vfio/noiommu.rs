//! VFIO no-IOMMU mode (`/dev/vfio/noiommu-N`, kernel parameter
//! `vfio.enable_unsafe_noiommu_mode=1`): device access without any DMA translation.
//!
//! vfio-ioctls has no support for this mode, so the group, container and device are opened
//! here with raw ioctls ([`sys`](super::sys)). The kernel's no-IOMMU "IOMMU driver" answers only
//! `VFIO_CHECK_EXTENSION`: there is no MAP_DMA. The device sees physical addresses, so
//! "mapping" means: lock the memory with `mlock`, read the physical address of every page from
//! `/proc/self/pagemap`, and remember them; [`NoIommuBackend::physical_address`] and
//! [`NoIommuBackend::physical_pages`] give them out to program the device.
//!
//! **`mlock` is not a pin.** It keeps pages resident (never swapped out), but the kernel may
//! still migrate a locked page to another physical frame (compaction, NUMA balancing, memory
//! hot-remove), and then the device would DMA into whatever the old frame holds next. This is
//! a test and bring-up path, as unsafe as the kernel mode it uses; hugetlbfs memory (never
//! migrated by compaction) narrows the risk, a kernel-side pin (the proposed iommufd no-IOMMU
//! cdev) removes it. Also, `mlock` does not nest: unmapping one of two mappings of the same
//! host pages unlocks both.
//!
//! Privileges: opening a no-IOMMU group needs `CAP_SYS_RAWIO`; reading PFNs from pagemap needs
//! `CAP_SYS_ADMIN` (without it the kernel shows PFN 0, which is detected and refused).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{VFIO_GROUP_FLAGS_VIABLE, VFIO_NOIOMMU_IOMMU};
use vmm_sys_util::errno;

use super::sys;
use super::{DeviceRegionInfo, DeviceRegions, HostPaths, OpenError, PciAddress, VfioMode};
use crate::backend::{
    BackendKind, Capabilities, DmaBackend, DmaError, DmaProt, FileMapSupport, IovaRange,
    check_aligned,
};

const KIND: BackendKind = BackendKind::NoIommu;
/// The page size pagemap entries describe (x86-64 and the usual arm64 configuration).
pub const PAGE_SIZE: u64 = 4096;

/// One decoded `/proc/<pid>/pagemap` entry (Documentation/admin-guide/mm/pagemap.rst).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagemapEntry {
    /// Bit 63: the page is present in RAM.
    pub present: bool,
    /// Bit 62: the page is swapped out.
    pub swapped: bool,
    /// Bits 0-54: the page frame number when present; 0 when the reader lacks
    /// `CAP_SYS_ADMIN` (the kernel hides PFNs since Linux 4.2).
    pub pfn: u64,
}

impl PagemapEntry {
    /// Decodes a raw 64-bit entry.
    pub fn decode(raw: u64) -> PagemapEntry {
        let present = raw & (1 << 63) != 0;
        let swapped = raw & (1 << 62) != 0;
        PagemapEntry {
            present,
            swapped,
            // When swapped, bits 0-54 hold the swap type/offset, not a frame.
            pfn: if present && !swapped {
                raw & ((1 << 55) - 1)
            } else {
                0
            },
        }
    }
}

/// A device opened through a no-IOMMU group, with checked region access.
pub struct NoIommuDevice {
    address: PciAddress,
    regions: Vec<Option<DeviceRegionInfo>>,
    fd: OwnedFd,
}

impl NoIommuDevice {
    /// The device's PCI address.
    pub fn address(&self) -> PciAddress {
        self.address
    }
}

impl fmt::Debug for NoIommuDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoIommuDevice")
            .field("address", &self.address)
            .field("regions", &self.regions)
            .finish_non_exhaustive()
    }
}

impl DeviceRegions for NoIommuDevice {
    fn region(&self, index: u32) -> Option<DeviceRegionInfo> {
        self.regions.get(index as usize).copied().flatten()
    }

    fn device_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// One locked range: where it is in this process and the physical address of each page.
#[derive(Debug)]
struct Locked {
    host_addr: u64,
    len: u64,
    pages: Vec<u64>,
}

/// A no-IOMMU "address space": a table from caller-chosen IOVAs (lookup keys, nothing
/// translates them) to locked host memory and its physical pages.
pub struct NoIommuBackend {
    table: Mutex<BTreeMap<u64, Locked>>,
    pagemap: File,
    device: Arc<NoIommuDevice>,
    // Kept open: closing the group or container would end the no-IOMMU session.
    _group: File,
    _container: File,
}

impl fmt::Debug for NoIommuBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoIommuBackend")
            .field("device", &self.device.address)
            .field("mappings", &self.lock().len())
            .finish_non_exhaustive()
    }
}

fn open_rw(address: &PciAddress, path: &std::path::Path) -> Result<File, OpenError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EPERM) => OpenError::NeedsRawio {
                address: *address,
                step: "opening the no-IOMMU group",
            },
            _ => OpenError::OpenNode {
                address: *address,
                path: path.to_path_buf(),
                source,
            },
        })
}

impl NoIommuBackend {
    /// Opens `address` through its no-IOMMU group.
    ///
    /// # Errors
    /// [`OpenError::Device`] when sysfs shows the device cannot be used, or is behind an IOMMU;
    /// [`OpenError::NeedsRawio`] without `CAP_SYS_RAWIO`; otherwise the ioctl that failed.
    pub fn open(address: &PciAddress) -> Result<(NoIommuBackend, Arc<NoIommuDevice>), OpenError> {
        let paths = HostPaths::default();
        let usable = paths.check(address, VfioMode::NoIommu)?;
        let syscall = |step| {
            move |source| OpenError::Syscall {
                address: *address,
                step,
                source,
            }
        };
        let container = open_rw(address, &paths.dev.join("vfio/vfio"))?;
        let supported = sys::vfio_check_extension(container.as_fd(), VFIO_NOIOMMU_IOMMU)
            .map_err(syscall("VFIO_CHECK_EXTENSION(VFIO_NOIOMMU_IOMMU)"))?;
        if !supported {
            return Err(syscall(
                "VFIO_CHECK_EXTENSION(VFIO_NOIOMMU_IOMMU): no-IOMMU mode is off",
            )(errno::Error::new(libc::ENODEV)));
        }
        let group = open_rw(address, &usable.node)?;
        let flags =
            sys::vfio_group_get_status(group.as_fd()).map_err(syscall("VFIO_GROUP_GET_STATUS"))?;
        if flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(OpenError::GroupNotViable {
                address: *address,
                group: usable.group,
                flags,
            });
        }
        sys::vfio_group_set_container(group.as_fd(), container.as_fd())
            .map_err(syscall("VFIO_GROUP_SET_CONTAINER"))?;
        sys::vfio_set_iommu(container.as_fd(), VFIO_NOIOMMU_IOMMU).map_err(|e| {
            if e.errno() == libc::EPERM {
                OpenError::NeedsRawio {
                    address: *address,
                    step: "VFIO_SET_IOMMU(VFIO_NOIOMMU_IOMMU)",
                }
            } else {
                syscall("VFIO_SET_IOMMU(VFIO_NOIOMMU_IOMMU)")(e)
            }
        })?;
        let name = CString::new(address.to_string())
            .map_err(|_| syscall("VFIO_GROUP_GET_DEVICE_FD")(errno::Error::new(libc::EINVAL)))?;
        let fd = sys::vfio_group_get_device_fd(group.as_fd(), &name)
            .map_err(syscall("VFIO_GROUP_GET_DEVICE_FD"))?;
        let info =
            sys::vfio_device_get_info(fd.as_fd()).map_err(syscall("VFIO_DEVICE_GET_INFO"))?;
        // A region the device lacks (VGA on a non-VGA device answers EINVAL) is simply absent;
        // the index stays the region number.
        let regions = (0..info.num_regions)
            .map(|index| {
                sys::vfio_device_get_region_info(fd.as_fd(), index)
                    .ok()
                    .filter(|r| r.size != 0)
                    .map(|r| DeviceRegionInfo {
                        offset: r.offset,
                        size: r.size,
                        flags: r.flags,
                    })
            })
            .collect();
        let pagemap = File::open("/proc/self/pagemap").map_err(|source| OpenError::OpenNode {
            address: *address,
            path: "/proc/self/pagemap".into(),
            source,
        })?;
        let device = Arc::new(NoIommuDevice {
            address: *address,
            regions,
            fd,
        });
        let backend = NoIommuBackend {
            table: Mutex::new(BTreeMap::new()),
            pagemap,
            device: Arc::clone(&device),
            _group: group,
            _container: container,
        };
        Ok((backend, device))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Locked>> {
        // The table is updated only after each step succeeded, so a panic elsewhere while
        // holding the lock cannot leave it half-changed.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The physical address the device must use for `iova`, if a mapping covers it.
    pub fn physical_address(&self, iova: u64) -> Option<u64> {
        let table = self.lock();
        let (&start, locked) = table.range(..=iova).next_back()?;
        let off = iova - start;
        if off >= locked.len {
            return None;
        }
        let page = locked.pages.get(usize::try_from(off / PAGE_SIZE).ok()?)?;
        Some(page + off % PAGE_SIZE)
    }

    /// The physical address of every page of the mapping that starts at `iova`, in order.
    pub fn physical_pages(&self, iova: u64) -> Option<Vec<u64>> {
        self.lock().get(&iova).map(|l| l.pages.clone())
    }

    /// Reads the physical addresses of `[host_addr, host_addr + len)` from pagemap.
    fn resolve(&self, iova: u64, host_addr: u64, len: u64) -> Result<Vec<u64>, DmaError> {
        let pages = (len / PAGE_SIZE) as usize;
        let mut raw = vec![0u8; pages * 8];
        self.pagemap
            .read_exact_at(&mut raw, host_addr / PAGE_SIZE * 8)
            .map_err(|e| DmaError::MapVa {
                kind: KIND,
                iova,
                len,
                source: errno::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
            })?;
        raw.chunks_exact(8)
            .enumerate()
            .map(|(i, bytes)| {
                let mut word = [0u8; 8];
                word.copy_from_slice(bytes);
                let entry = PagemapEntry::decode(u64::from_ne_bytes(word));
                let page_va = host_addr + i as u64 * PAGE_SIZE;
                let fail = |reason| DmaError::PhysicalAddress {
                    kind: KIND,
                    iova: iova + i as u64 * PAGE_SIZE,
                    host_addr: page_va,
                    reason,
                };
                if !entry.present {
                    return Err(fail("the page is not present although mlock succeeded"));
                }
                if entry.pfn == 0 {
                    return Err(fail(
                        "/proc/self/pagemap shows PFN 0: reading physical addresses needs \
                         CAP_SYS_ADMIN",
                    ));
                }
                Ok(entry.pfn * PAGE_SIZE)
            })
            .collect()
    }
}

impl DmaBackend for NoIommuBackend {
    fn capabilities(&self) -> Result<Capabilities, DmaError> {
        Ok(Capabilities {
            kind: KIND,
            page_sizes: PAGE_SIZE,
            // IOVAs are only lookup keys here; the device is given physical addresses.
            iova_ranges: vec![IovaRange {
                start: 0,
                last: u64::MAX,
            }],
            mapping_budget: None,
            map_file: FileMapSupport::None,
            translates: false,
            // Each mapping is one mlock'd range resolved to physical pages; no cutting.
            cuts_mappings: false,
        })
    }

    /// Locks the memory, resolves its physical pages and records them under `iova`.
    ///
    /// Nothing restricts the device in this mode: it can reach all of memory whatever is
    /// "mapped", so only read+write is accepted (a read-only promise could not be kept).
    unsafe fn map_va(
        &self,
        iova: u64,
        len: u64,
        host_addr: *mut u8,
        prot: DmaProt,
    ) -> Result<(), DmaError> {
        if prot != DmaProt::READ_WRITE {
            return Err(DmaError::Unsupported {
                kind: KIND,
                operation: "restricted access (there is no IOMMU to enforce it)",
            });
        }
        check_aligned(iova, len, host_addr as u64, PAGE_SIZE)?;
        let map_err = |errno| DmaError::MapVa {
            kind: KIND,
            iova,
            len,
            source: errno::Error::new(errno),
        };
        let last = len
            .checked_sub(1)
            .and_then(|l| iova.checked_add(l))
            .ok_or_else(|| map_err(libc::EINVAL))?;
        let size = usize::try_from(len).map_err(|_| map_err(libc::EOVERFLOW))?;
        let mut table = self.lock();
        // Same answer as type1 for an overlap: EEXIST, nothing changed.
        let overlaps = table
            .range(..=last)
            .next_back()
            .is_some_and(|(&s, l)| s + (l.len - 1) >= iova);
        if overlaps {
            return Err(map_err(libc::EEXIST));
        }
        sys::mlock(host_addr, size).map_err(|source| DmaError::MapVa {
            kind: KIND,
            iova,
            len,
            source,
        })?;
        let pages = match self.resolve(iova, host_addr as u64, len) {
            Ok(pages) => pages,
            Err(e) => {
                // Undo the lock; the range was locked by us a moment ago, so munlock cannot
                // fail for a reason that would leave it locked.
                let _ = sys::munlock(host_addr, size);
                return Err(e);
            }
        };
        table.insert(
            iova,
            Locked {
                host_addr: host_addr as u64,
                len,
                pages,
            },
        );
        Ok(())
    }

    fn map_file(
        &self,
        _iova: u64,
        _len: u64,
        _file: BorrowedFd<'_>,
        _offset: u64,
        _prot: DmaProt,
    ) -> Result<(), DmaError> {
        Err(DmaError::Unsupported {
            kind: KIND,
            operation: "mapping by file descriptor",
        })
    }

    /// Forgets and unlocks every mapping inside `[iova, iova + len)`; like type1v2, a range
    /// that bisects a mapping is refused (`EINVAL`) before anything changes.
    fn unmap(&self, iova: u64, len: u64) -> Result<u64, DmaError> {
        let einval = DmaError::Unmap {
            kind: KIND,
            iova,
            len,
            source: errno::Error::new(libc::EINVAL),
        };
        let Some(last) = len.checked_sub(1).and_then(|l| iova.checked_add(l)) else {
            return Err(einval);
        };
        let mut table = self.lock();
        let bisects_start = table
            .range(..iova)
            .next_back()
            .is_some_and(|(&s, l)| s + (l.len - 1) >= iova);
        let bisects_end = table
            .range(iova..=last)
            .next_back()
            .is_some_and(|(&s, l)| s + (l.len - 1) > last);
        if bisects_start || bisects_end {
            return Err(einval);
        }
        let starts: Vec<u64> = table.range(iova..=last).map(|(&s, _)| s).collect();
        let mut unmapped = 0;
        for start in starts {
            if let Some(locked) = table.remove(&start) {
                // munlock fails only if the caller already unmapped the memory (breaking
                // map_va's contract); then nothing is locked any more either, so the
                // mapping is gone as asked.
                let _ = sys::munlock(locked.host_addr as *const u8, locked.len as usize);
                unmapped += locked.len;
            }
        }
        Ok(unmapped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl NoIommuBackend {
        /// A backend with no device behind it (fds on /dev/null): exercises the table, mlock
        /// and pagemap on any machine.
        fn detached() -> NoIommuBackend {
            Self::detached_with(File::open("/proc/self/pagemap").unwrap())
        }

        /// As `detached`, reading page frames from `pagemap` instead of the kernel's.
        fn detached_with(pagemap: File) -> NoIommuBackend {
            let null = || File::open("/dev/null").unwrap();
            NoIommuBackend {
                table: Mutex::new(BTreeMap::new()),
                pagemap,
                device: Arc::new(NoIommuDevice {
                    address: "0000:00:00.0".parse().unwrap(),
                    regions: Vec::new(),
                    fd: null().into(),
                }),
                _group: null(),
                _container: null(),
            }
        }
    }

    /// Page-aligned heap memory that outlives the backend in each test.
    struct Pages(Vec<u8>, usize);

    impl Pages {
        fn new(pages: usize) -> Pages {
            let v = vec![0xa5u8; (pages + 1) * PAGE_SIZE as usize];
            let skip = (PAGE_SIZE as usize - v.as_ptr() as usize % PAGE_SIZE as usize)
                % PAGE_SIZE as usize;
            Pages(v, skip)
        }
        fn at(&mut self, page: usize) -> *mut u8 {
            self.0[self.1 + page * PAGE_SIZE as usize..].as_mut_ptr()
        }
    }

    #[test]
    fn map_resolves_pages_or_names_the_missing_privilege() {
        let mut mem = Pages::new(4);
        let backend = NoIommuBackend::detached();
        // SAFETY: `mem` outlives `backend`'s mappings (unmapped below, before `mem` drops),
        // and no DMA happens: there is no device.
        let result =
            unsafe { backend.map_va(0x10_0000, 2 * PAGE_SIZE, mem.at(0), DmaProt::READ_WRITE) };
        match result {
            Err(DmaError::PhysicalAddress { reason, .. }) => {
                assert!(reason.contains("CAP_SYS_ADMIN"), "{reason}");
                assert!(backend.physical_address(0x10_0000).is_none());
                return;
            }
            Err(DmaError::MapVa { source, .. })
                if source.errno() == libc::ENOMEM || source.errno() == libc::EPERM =>
            {
                eprintln!("mlock refused here (RLIMIT_MEMLOCK): {source}");
                return;
            }
            other => other.unwrap(),
        }
        let pages = backend.physical_pages(0x10_0000).unwrap();
        assert_eq!(pages.len(), 2);
        assert!(pages.iter().all(|&p| p != 0 && p % PAGE_SIZE == 0));
        assert_eq!(backend.physical_address(0x10_0010), Some(pages[0] + 0x10));
        assert_eq!(backend.physical_address(0x10_1fff), Some(pages[1] + 0xfff));
        assert_eq!(backend.physical_address(0x10_2000), None);
        // Overlap: EEXIST, nothing changed.
        // SAFETY: as above.
        let overlap =
            unsafe { backend.map_va(0x10_1000, PAGE_SIZE, mem.at(3), DmaProt::READ_WRITE) };
        assert!(
            matches!(overlap, Err(DmaError::MapVa { source, .. }) if source.errno() == libc::EEXIST)
        );
        // Bisecting unmap: EINVAL, still mapped.
        assert!(matches!(
            backend.unmap(0x10_1000, PAGE_SIZE),
            Err(DmaError::Unmap { .. })
        ));
        assert!(backend.physical_address(0x10_1000).is_some());
        // Whole unmap over a larger range returns exactly the mapped bytes.
        assert_eq!(backend.unmap(0x10_0000, 0x10_0000).unwrap(), 2 * PAGE_SIZE);
        assert_eq!(backend.physical_address(0x10_0000), None);
    }

    /// A sparse stand-in for /proc/self/pagemap holding `entries` for the pages at `va`.
    fn fake_pagemap(name: &str, va: u64, entries: &[u64]) -> (File, std::path::PathBuf) {
        let path =
            std::env::temp_dir().join(format!("iommu-pagemap-{name}-{}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_ne_bytes()).collect();
        file.write_all_at(&bytes, va / PAGE_SIZE * 8).unwrap();
        (file, path)
    }

    #[test]
    fn hidden_pfns_are_refused_naming_cap_sys_admin_and_nothing_is_recorded() {
        let mut mem = Pages::new(2);
        let va = mem.at(0) as u64;
        // What an unprivileged reader sees: present pages, PFN 0.
        let (pagemap, path) = fake_pagemap("hidden", va, &[1 << 63, 1 << 63]);
        let backend = NoIommuBackend::detached_with(pagemap);
        // SAFETY: refused after mlock (and undone); no device exists.
        let result =
            unsafe { backend.map_va(0x4000, 2 * PAGE_SIZE, mem.at(0), DmaProt::READ_WRITE) };
        let _ = std::fs::remove_file(path);
        match result {
            Err(DmaError::PhysicalAddress {
                reason,
                iova,
                host_addr,
                ..
            }) => {
                assert!(reason.contains("CAP_SYS_ADMIN"), "{reason}");
                assert_eq!((iova, host_addr), (0x4000, va));
            }
            other => panic!("hidden PFNs answered {other:?}"),
        }
        assert_eq!(backend.physical_address(0x4000), None);
        assert!(backend.physical_pages(0x4000).is_none());
    }

    #[test]
    fn a_page_missing_after_mlock_is_refused_by_its_own_address() {
        let mut mem = Pages::new(2);
        let va = mem.at(0) as u64;
        // Second page not present.
        let (pagemap, path) = fake_pagemap("absent", va, &[(1 << 63) | 0x1234, 0]);
        let backend = NoIommuBackend::detached_with(pagemap);
        // SAFETY: as above.
        let result = unsafe { backend.map_va(0, 2 * PAGE_SIZE, mem.at(0), DmaProt::READ_WRITE) };
        let _ = std::fs::remove_file(path);
        match result {
            Err(DmaError::PhysicalAddress {
                reason,
                iova,
                host_addr,
                ..
            }) => {
                assert!(reason.contains("not present"), "{reason}");
                assert_eq!((iova, host_addr), (PAGE_SIZE, va + PAGE_SIZE));
            }
            other => panic!("a missing page answered {other:?}"),
        }
        assert_eq!(backend.physical_address(0), None);
    }

    #[test]
    fn map_refuses_restricted_access_and_misalignment() {
        let mut mem = Pages::new(1);
        let backend = NoIommuBackend::detached();
        // SAFETY: both calls are refused before touching the memory.
        unsafe {
            assert!(matches!(
                backend.map_va(0, PAGE_SIZE, mem.at(0), DmaProt::READ_ONLY),
                Err(DmaError::Unsupported { .. })
            ));
            assert!(matches!(
                backend.map_va(0x800, PAGE_SIZE, mem.at(0), DmaProt::READ_WRITE),
                Err(DmaError::Misaligned { .. })
            ));
        }
        assert!(!backend.capabilities().unwrap().translates);
    }

    #[test]
    fn pagemap_entries_decode_present_swapped_and_hidden_pfns() {
        let present = 1u64 << 63;
        assert_eq!(
            PagemapEntry::decode(present | 0x12345),
            PagemapEntry {
                present: true,
                swapped: false,
                pfn: 0x12345
            }
        );
        // Soft-dirty (55), exclusive (56) and file (61) bits are not part of the PFN.
        let flags = (1 << 55) | (1 << 56) | (1 << 61);
        assert_eq!(PagemapEntry::decode(present | flags | 0x7).pfn, 0x7);
        // Unprivileged readers see present pages with PFN 0.
        assert_eq!(PagemapEntry::decode(present).pfn, 0);
        // Swapped: the low bits are a swap entry, not a frame.
        let swapped = PagemapEntry::decode((1 << 62) | 0x99);
        assert!(swapped.swapped && !swapped.present);
        assert_eq!(swapped.pfn, 0);
        assert!(!PagemapEntry::decode(0).present);
    }
}
