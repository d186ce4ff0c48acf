//! IOMMUFD: one I/O address space (IOAS) in `/dev/iommu`, with devices attached through their
//! vfio cdevs (`/dev/vfio/devices/vfioN`).
//!
//! Opening goes through vfio-ioctls (`VfioIommufd` allocates the IOAS; `VfioDevice::new` with
//! `attach_ioas = true` opens the cdev, binds it to the iommufd and attaches it to the IOAS).
//! Maps by address and by file go through iommufd-ioctls' `IommuFd` with our own flags, so
//! read-only mappings work. `IOMMU_IOAS_IOVA_RANGES` and the `IOMMU_IOAS_MAP_FILE` probe are
//! raw ioctls in [`sys`](super::sys).

use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use iommufd_bindings::iommufd::{
    iommu_ioas_map, iommu_ioas_map_file, iommu_ioas_unmap,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA as MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE as MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE as MAP_WRITEABLE,
};
use iommufd_ioctls::{IommuFd, IommufdError};
use vfio_ioctls::{VfioDevice, VfioIommufd, VfioOps};
use vmm_sys_util::errno;

use super::sys::{self, OwnsFd};
use super::{AttachedDevices, HostPaths, OpenError, PciAddress, VfioMode, VfioPciDevice};
use crate::backend::{
    BackendKind, Capabilities, DmaBackend, DmaError, DmaProt, FileMapSupport, IovaRange,
};

const KIND: BackendKind = BackendKind::Iommufd;

/// An IOMMUFD IOAS with at least one device attached.
pub struct IommufdBackend {
    // Field order is drop order: devices detach before the IOAS and the iommufd close.
    devices: AttachedDevices,
    vfio: Arc<VfioIommufd>,
    map_file: FileMapSupport,
}

impl fmt::Debug for IommufdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IommufdBackend")
            .field("devices", &self.devices)
            .field("ioas", &self.vfio.ioas().id())
            .field("map_file", &self.map_file)
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
        let backend = IommufdBackend {
            devices: AttachedDevices::default(),
            vfio: Arc::new(vfio),
            map_file,
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
        })
    }

    unsafe fn map_va(
        &self,
        iova: u64,
        len: u64,
        host_addr: *mut u8,
        prot: DmaProt,
    ) -> Result<(), DmaError> {
        let Some(flags) = map_flags(prot) else {
            return Err(DmaError::Unsupported {
                kind: KIND,
                operation: "mappings with neither read nor write access",
            });
        };
        let map = iommu_ioas_map {
            size: size_of::<iommu_ioas_map>() as u32,
            flags,
            ioas_id: self.ioas_id(),
            __reserved: 0,
            user_va: host_addr as u64,
            length: len,
            iova,
        };
        // The caller upholds `map_va`'s safety contract, which is what makes this (safe, in
        // iommufd-ioctls) call sound: the memory stays mapped and is not aliased by Rust
        // references while the device may reach it.
        self.iommufd()
            .map_iommu_ioas(&map)
            .map_err(|e| DmaError::MapVa {
                kind: KIND,
                iova,
                len,
                source: errno_of(e),
            })
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

    /// `IOMMU_IOAS_UNMAP`, returning the length the kernel writes back: fewer bytes than `len`
    /// when the range has holes between mappings (the ledger compares with its record); more
    /// would be a kernel bug, reported as [`DmaError::PartialUnmap`].
    fn unmap(&self, iova: u64, len: u64) -> Result<u64, DmaError> {
        let mut unmap = iommu_ioas_unmap {
            size: size_of::<iommu_ioas_unmap>() as u32,
            ioas_id: self.ioas_id(),
            iova,
            length: len,
        };
        // `IommuFd::unmap_iommu_ioas` passes `&mut` to the kernel, which writes the unmapped
        // length back (unlike `IommufdIoas::unmap`, which drops it).
        self.iommufd()
            .unmap_iommu_ioas(&mut unmap)
            .map_err(|e| DmaError::Unmap {
                kind: KIND,
                iova,
                len,
                source: errno_of(e),
            })?;
        if unmap.length > len {
            return Err(DmaError::PartialUnmap {
                kind: KIND,
                iova,
                len,
                unmapped: unmap.length,
            });
        }
        Ok(unmap.length)
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
    fn errno_survives_the_iommufd_ioctls_error() {
        let e = IommufdError::IommuIoasUnmap(errno::Error::new(libc::ENOENT));
        assert_eq!(errno_of(e).errno(), libc::ENOENT);
    }
}
