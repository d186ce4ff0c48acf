//! IOMMUFD: one I/O address space (IOAS) in `/dev/iommu`, with devices attached through their
//! vfio cdevs (`/dev/vfio/devices/vfioN`).
//!
//! Opening goes through vfio-ioctls (`VfioIommufd` allocates the IOAS; `VfioDevice::new` with
//! `attach_ioas = true` opens the cdev, binds it to the iommufd and attaches it to the IOAS).
//! Maps by address and by file go through iommufd-ioctls' `IommuFd` with our own flags, so
//! read-only mappings work. `IOMMU_IOAS_IOVA_RANGES` and the `IOMMU_IOAS_MAP_FILE` probe are
//! raw ioctls in [`sys`](super::sys).
//!
//! **Cutting.** Before the first device attaches, [`IommufdBackend::open`] asks the kernel for
//! type1 (v1) semantics on the IOAS: `IOMMU_VFIO_IOAS` (SET) makes it the iommufd's compat IOAS,
//! then `VFIO_SET_IOMMU(VFIO_TYPE1_IOMMU)` on the `/dev/iommu` fd disables large pages for it.
//! Unmaps then go through the compat `VFIO_IOMMU_UNMAP_DMA`, which cuts the areas at both ends
//! of the range first (`iommufd_vfio_unmap_dma()`), so one mapping can hold a whole shared run
//! and any aligned granule inside it can later be unmapped alone, with no window for its
//! neighbours (`drivers/iommu/iommufd/vfio_compat.c`; docs/DESIGN.md section 5). The cost: the IOAS
//! uses 4 KiB IOPTEs only. A kernel that refuses either step leaves the backend as before:
//! [`Capabilities::cuts_mappings`] is false and unmaps use the native `IOMMU_IOAS_UNMAP`.

use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use iommufd_bindings::iommufd::{
    iommu_ioas_map, iommu_ioas_map_file, iommu_ioas_unmap,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA as MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE as MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE as MAP_WRITEABLE,
};
use iommufd_ioctls::{IommuFd, IommufdError, IommufdIoas};
use vfio_bindings::bindings::vfio::VFIO_TYPE1_IOMMU;
use vfio_ioctls::{VfioDevice, VfioIommufd, VfioOps};
use vmm_sys_util::errno;

use super::sys::{self, OwnsFd};
use super::{AttachedDevices, HostPaths, OpenError, PciAddress, VfioMode, VfioPciDevice};
use crate::backend::{
    BackendKind, Capabilities, DmaBackend, DmaError, DmaProt, FileMapSupport, IovaRange,
    checked_unmapped,
};

const KIND: BackendKind = BackendKind::Iommufd;

/// An IOMMUFD IOAS with at least one device attached.
pub struct IommufdBackend {
    // Field order is drop order: devices detach before the IOAS and the iommufd close.
    devices: AttachedDevices,
    vfio: Arc<VfioIommufd>,
    map_file: FileMapSupport,
    /// `Ok` when the kernel accepted type1 (v1) semantics for the IOAS, so unmaps cut; else the
    /// errno of the step it refused.
    cutting: Result<(), CutSetupError>,
}

/// Why an IOAS does not cut mappings: the step of the type1 (v1) setup the kernel refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{step} was refused")]
pub struct CutSetupError {
    /// `IOMMU_VFIO_IOAS(SET)` or `VFIO_SET_IOMMU(VFIO_TYPE1_IOMMU)`.
    pub step: &'static str,
    /// The kernel's errno.
    #[source]
    pub source: errno::Error,
}

impl fmt::Debug for IommufdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IommufdBackend")
            .field("devices", &self.devices)
            .field("ioas", &self.vfio.ioas().id())
            .field("map_file", &self.map_file)
            .field("cutting", &self.cutting)
            .finish()
    }
}

/// Flags for `IOMMU_IOAS_MAP`/`MAP_FILE` at a fixed IOVA; `None` for no access at all.
fn map_flags(prot: DmaProt) -> Option<u32> {
    let mut flags = MAP_FIXED_IOVA;
    if prot.read {
        flags |= MAP_READABLE;
    }
    if prot.write {
        flags |= MAP_WRITEABLE;
    }
    (prot.read || prot.write).then_some(flags)
}

/// iommufd-ioctls' errors carry the errno inside a per-step variant; get it back out.
fn errno_of(e: IommufdError) -> errno::Error {
    match e {
        IommufdError::IommuIoasMap(s)
        | IommufdError::IommuIoasMapFile(s)
        | IommufdError::IommuIoasUnmap(s)
        | IommufdError::IommuIoasAlloc(s)
        | IommufdError::IommuDestroy(s) => s,
        _ => errno::Error::new(libc::EIO),
    }
}

/// `IOMMU_IOAS_MAP` of `[host_addr, host_addr + len)` at `iova` in IOAS `ioas_id`, with errors
/// named for `kind`: the one map by address both IOMMUFD backends (translated and no-IOMMU)
/// make.
///
/// # Safety
/// As [`DmaBackend::map_va`]: the memory stays mapped, and no Rust reference aliases it, while
/// the device may reach it.
pub(super) unsafe fn ioas_map_va(
    iommufd: &IommuFd,
    ioas_id: u32,
    kind: BackendKind,
    (iova, len): (u64, u64),
    host_addr: *mut u8,
    prot: DmaProt,
) -> Result<(), DmaError> {
    let Some(flags) = map_flags(prot) else {
        return Err(DmaError::Unsupported {
            kind,
            operation: "mappings with neither read nor write access",
        });
    };
    let map = iommu_ioas_map {
        size: size_of::<iommu_ioas_map>() as u32,
        flags,
        ioas_id,
        __reserved: 0,
        user_va: host_addr as u64,
        length: len,
        iova,
    };
    // The caller upholds `map_va`'s safety contract, which is what makes this (safe, in
    // iommufd-ioctls) call sound: the memory stays mapped and is not aliased by Rust
    // references while the device may reach it.
    iommufd.map_iommu_ioas(&map).map_err(|e| DmaError::MapVa {
        kind,
        iova,
        len,
        source: errno_of(e),
    })
}

/// Native `IOMMU_IOAS_UNMAP` of `[iova, iova + len)` in IOAS `ioas_id` (it never cuts), with
/// the byte count the kernel writes back checked.
pub(super) fn ioas_unmap(
    iommufd: &IommuFd,
    ioas_id: u32,
    kind: BackendKind,
    iova: u64,
    len: u64,
) -> Result<u64, DmaError> {
    let mut unmap = iommu_ioas_unmap {
        size: size_of::<iommu_ioas_unmap>() as u32,
        ioas_id,
        iova,
        length: len,
    };
    // `IommuFd::unmap_iommu_ioas` passes `&mut` to the kernel, which writes the unmapped
    // length back (unlike `IommufdIoas::unmap`, which drops it).
    iommufd
        .unmap_iommu_ioas(&mut unmap)
        .map_err(|e| DmaError::Unmap {
            kind,
            iova,
            len,
            source: errno_of(e),
        })?;
    checked_unmapped(kind, iova, len, unmap.length)
}

impl IommufdBackend {
    /// Opens `/dev/iommu`, allocates an IOAS, and binds and attaches `address`'s vfio cdev.
    ///
    /// # Errors
    /// [`OpenError::Device`] when sysfs shows the device cannot be used (naming the fix), or
    /// the step that failed.
    pub fn open(address: &PciAddress) -> Result<(IommufdBackend, Arc<VfioPciDevice>), OpenError> {
        let paths = HostPaths::default();
        paths.check(address, VfioMode::Iommufd)?;
        let iommufd = IommuFd::new().map_err(|source| OpenError::Iommufd {
            address: *address,
            step: "opening /dev/iommu",
            source,
        })?;
        let vfio =
            VfioIommufd::new(Arc::new(iommufd), None, None).map_err(|source| OpenError::Vfio {
                address: *address,
                step: "allocating an IOAS",
                source,
            })?;
        let map_file = match sys::iommu_ioas_map_file_known(vfio.iommufd().fd()) {
            // Mainline refuses guest_memfd in MAP_FILE (only shmem and hugetlbfs pin).
            Ok(true) => FileMapSupport::Memfd,
            Ok(false) => FileMapSupport::None,
            Err(source) => {
                return Err(OpenError::Syscall {
                    address: *address,
                    step: "probing IOMMU_IOAS_MAP_FILE",
                    source,
                });
            }
        };
        // Before any device attaches and before the first mapping: the kernel refuses the
        // switch once a domain is attached and areas exist.
        let cutting = choose_type1_semantics(vfio.iommufd().fd(), vfio.ioas().id());
        let backend = IommufdBackend {
            devices: AttachedDevices::default(),
            vfio: Arc::new(vfio),
            map_file,
            cutting,
        };
        let device = backend.attach_with(&paths, address)?;
        Ok((backend, device))
    }

    /// Binds and attaches another device to this IOAS.
    ///
    /// # Errors
    /// As [`IommufdBackend::open`]; the kernel refuses an attach that would make an existing
    /// mapping overlap a reserved range of the new device.
    pub fn attach(&self, address: &PciAddress) -> Result<Arc<VfioPciDevice>, OpenError> {
        self.attach_with(&HostPaths::default(), address)
    }

    fn attach_with(
        &self,
        paths: &HostPaths,
        address: &PciAddress,
    ) -> Result<Arc<VfioPciDevice>, OpenError> {
        let usable = paths.check(address, VfioMode::Iommufd)?;
        let ops: Arc<dyn VfioOps> = Arc::clone(&self.vfio) as Arc<dyn VfioOps>;
        let device =
            VfioDevice::new(&usable.sysfs_dir, ops, true).map_err(|source| OpenError::Vfio {
                address: *address,
                step: "opening the vfio cdev, binding it to the iommufd and attaching the IOAS",
                source,
            })?;
        Ok(self.devices.keep(VfioPciDevice::new(*address, device)))
    }

    /// Why unmaps on this IOAS do not cut, or `Ok` when they do (see the module docs).
    ///
    /// # Errors
    /// The type1 (v1) setup step the kernel refused, with its errno.
    pub fn cutting(&self) -> Result<(), CutSetupError> {
        self.cutting
    }

    /// The IOAS id.
    pub fn ioas_id(&self) -> u32 {
        self.vfio.ioas().id()
    }

    fn iommufd(&self) -> &IommuFd {
        self.vfio.iommufd()
    }

    /// Usable IOVA ranges and the IOVA alignment (`IOMMU_IOAS_IOVA_RANGES`).
    fn iova_ranges(&self) -> Result<(Vec<IovaRange>, u64), DmaError> {
        let (ranges, alignment) = sys::iommu_ioas_iova_ranges(self.iommufd().fd(), self.ioas_id())
            .map_err(|source| DmaError::Query {
                kind: KIND,
                operation: "IOMMU_IOAS_IOVA_RANGES",
                source,
            })?;
        let ranges = ranges
            .iter()
            .map(|r| IovaRange {
                start: r.start,
                last: r.last,
            })
            .collect();
        Ok((ranges, alignment))
    }
}

/// Makes `ioas_id` the compat IOAS of `iommufd` and selects type1 (v1) semantics for it, so
/// `VFIO_IOMMU_UNMAP_DMA` on `iommufd` cuts areas.
fn choose_type1_semantics(iommufd: BorrowedFd<'_>, ioas_id: u32) -> Result<(), CutSetupError> {
    sys::iommu_vfio_ioas_set(iommufd, ioas_id).map_err(|source| CutSetupError {
        step: "IOMMU_VFIO_IOAS(SET)",
        source,
    })?;
    sys::vfio_set_iommu(iommufd, VFIO_TYPE1_IOMMU).map_err(|source| CutSetupError {
        step: "VFIO_SET_IOMMU(VFIO_TYPE1_IOMMU)",
        source,
    })
}

impl HostPaths {
    /// Whether an IOAS on this host's `/dev/iommu` cuts mappings: opens it, allocates a
    /// scratch IOAS and asks for type1 (v1) semantics as [`IommufdBackend::open`] does, without
    /// any device (the IOAS is destroyed again). For the probe: a VMM learns it per address
    /// space from [`Capabilities::cuts_mappings`].
    ///
    /// # Errors
    /// The step that failed: opening `/dev/iommu`, `IOMMU_IOAS_ALLOC`, or the refused setup
    /// step, with the errno.
    pub fn probe_iommufd_cutting(&self) -> Result<(), CutSetupError> {
        let path = self.dev.join("iommu");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| CutSetupError {
                step: "opening /dev/iommu",
                source: errno::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
            })?;
        let iommufd = Arc::new(IommuFd::new_from_fd(file));
        // Dropped before `iommufd` closes: destroys the scratch IOAS.
        let ioas = IommufdIoas::new(Arc::clone(&iommufd)).map_err(|e| CutSetupError {
            step: "IOMMU_IOAS_ALLOC",
            source: errno_of(e),
        })?;
        choose_type1_semantics(iommufd.fd(), ioas.id())
    }
}

impl DmaBackend for IommufdBackend {
    fn capabilities(&self) -> Result<Capabilities, DmaError> {
        let (iova_ranges, alignment) = self.iova_ranges()?;
        if !alignment.is_power_of_two() {
            return Err(DmaError::Query {
                kind: KIND,
                operation: "IOMMU_IOAS_IOVA_RANGES (out_iova_alignment is not a power of two)",
                source: errno::Error::new(libc::EPROTO),
            });
        }
        Ok(Capabilities {
            kind: KIND,
            // IOMMUFD reports only the smallest page size every attached domain supports; that
            // is the alignment every map and unmap needs, which is all callers use it for.
            page_sizes: alignment,
            iova_ranges,
            mapping_budget: None,
            map_file: self.map_file,
            translates: true,
            cuts_mappings: self.cutting.is_ok(),
        })
    }

    unsafe fn map_va(
        &self,
        iova: u64,
        len: u64,
        host_addr: *mut u8,
        prot: DmaProt,
    ) -> Result<(), DmaError> {
        // SAFETY: the caller upholds `map_va`'s contract, which `ioas_map_va` requires.
        unsafe {
            ioas_map_va(
                self.iommufd(),
                self.ioas_id(),
                KIND,
                (iova, len),
                host_addr,
                prot,
            )
        }
    }

    fn map_file(
        &self,
        iova: u64,
        len: u64,
        file: BorrowedFd<'_>,
        offset: u64,
        prot: DmaProt,
    ) -> Result<(), DmaError> {
        let unsupported = DmaError::Unsupported {
            kind: KIND,
            operation: "IOMMU_IOAS_MAP_FILE (needs Linux 6.13+)",
        };
        if self.map_file == FileMapSupport::None {
            return Err(unsupported);
        }
        let Some(flags) = map_flags(prot) else {
            return Err(DmaError::Unsupported {
                kind: KIND,
                operation: "mappings with neither read nor write access",
            });
        };
        let map = iommu_ioas_map_file {
            size: size_of::<iommu_ioas_map_file>() as u32,
            flags,
            ioas_id: self.ioas_id(),
            fd: file.as_raw_fd(),
            start: offset,
            length: len,
            iova,
        };
        // The kernel takes its own reference on the file's pages (it pins the folios), so
        // nothing here depends on `file` outliving the mapping.
        match self.iommufd().map_iommu_ioas_file(&map).map_err(errno_of) {
            Ok(()) => Ok(()),
            Err(e) if e.errno() == libc::ENOTTY => Err(unsupported),
            Err(source) => Err(DmaError::MapFile {
                kind: KIND,
                iova,
                len,
                offset,
                source,
            }),
        }
    }

    /// Unmaps `[iova, iova + len)`, returning the length the kernel writes back: fewer bytes
    /// than `len` when the range has holes between mappings (the ledger compares with its
    /// record); more would be a kernel bug, reported as [`DmaError::PartialUnmap`].
    ///
    /// Where the IOAS cuts, this is the compat `VFIO_IOMMU_UNMAP_DMA` on the iommufd, which cuts
    /// the areas at both ends first; otherwise the native `IOMMU_IOAS_UNMAP`, which refuses a
    /// bisected area with `ENOENT`.
    fn unmap(&self, iova: u64, len: u64) -> Result<u64, DmaError> {
        if self.cutting.is_err() {
            return ioas_unmap(self.iommufd(), self.ioas_id(), KIND, iova, len);
        }
        let unmapped =
            sys::vfio_iommu_unmap_dma(self.iommufd().fd(), iova, len).map_err(|source| {
                DmaError::Unmap {
                    kind: KIND,
                    iova,
                    len,
                    source,
                }
            })?;
        checked_unmapped(KIND, iova, len, unmapped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_flags_follow_prot_and_always_fix_the_iova() {
        assert_eq!(
            map_flags(DmaProt::READ_WRITE),
            Some(MAP_FIXED_IOVA | MAP_READABLE | MAP_WRITEABLE)
        );
        assert_eq!(
            map_flags(DmaProt::READ_ONLY),
            Some(MAP_FIXED_IOVA | MAP_READABLE)
        );
        assert_eq!(
            map_flags(DmaProt {
                read: false,
                write: false
            }),
            None
        );
        // uAPI values (include/uapi/linux/iommufd.h).
        assert_eq!((MAP_FIXED_IOVA, MAP_WRITEABLE, MAP_READABLE), (1, 2, 4));
    }

    #[test]
    fn the_cutting_probe_names_the_step_that_failed() {
        let host = crate::vfio::host::tests::FakeHost::new("cutting-probe");
        let missing = host.paths.probe_iommufd_cutting().unwrap_err();
        assert_eq!(
            (missing.step, missing.source.errno()),
            ("opening /dev/iommu", libc::ENOENT)
        );
        // A node that is not an iommufd (a plain file here) refuses the first ioctl.
        host.node("iommu");
        let not_iommufd = host.paths.probe_iommufd_cutting().unwrap_err();
        assert_eq!(
            (not_iommufd.step, not_iommufd.source.errno()),
            ("IOMMU_IOAS_ALLOC", libc::ENOTTY)
        );
    }

    #[test]
    fn errno_survives_the_iommufd_ioctls_error() {
        let e = IommufdError::IommuIoasUnmap(errno::Error::new(libc::ENOENT));
        assert_eq!(errno_of(e).errno(), libc::ENOENT);
    }
}
