//! iommufd's own no-IOMMU mode (Linux 7.x, `CONFIG_IOMMUFD_NOIOMMU`): a device without an
//! IOMMU, opened through its no-IOMMU vfio cdev (`/dev/vfio/devices/noiommu-vfioN`), bound to
//! `/dev/iommu` and attached to an IOAS like a translated one.
//!
//! The IOAS is a software page table only (`drivers/iommu/iommufd/hwpt_noiommu.c`): the device
//! still sees physical addresses. What the mode adds over the legacy no-IOMMU group
//! ([`NoIommuBackend`](super::NoIommuBackend), `mlock` + `/proc/self/pagemap`) is a real pin: a
//! mapping pins its pages the way IOMMUFD does for a translated device (so they cannot migrate
//! while the device may use them), and `IOMMU_IOAS_NOIOMMU_GET_PA` tells the physical address
//! behind an IOVA ([`IommufdNoIommuBackend::physical_address`]). It needs `CAP_SYS_RAWIO`, like
//! the legacy mode, and `vfio.enable_unsafe_noiommu_mode=1`.
//!
//! Maps are `IOMMU_IOAS_MAP` at a fixed IOVA (the IOVA is only the handle the physical address
//! is asked by), unmaps the native `IOMMU_IOAS_UNMAP` (whole areas; nothing to cut).

use std::fmt;
use std::mem::size_of;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use iommufd_bindings::iommufd::IOMMUFD_TYPE;
use iommufd_ioctls::IommuFd;
use vfio_ioctls::{VfioDevice, VfioIommufd, VfioOps};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_io_nr;

use super::iommufd::{ioas_map_va, ioas_unmap};
use super::sys::OwnsFd;
use super::{AttachedDevices, HostPaths, OpenError, PciAddress, VfioMode, VfioPciDevice};
use crate::backend::{
    BackendKind, Capabilities, DmaBackend, DmaError, DmaProt, FileMapSupport, IovaRange,
};

/// The device sees physical addresses, as in the legacy no-IOMMU mode.
const KIND: BackendKind = BackendKind::NoIommu;
const PAGE_SIZE: u64 = 4096;

/// `IOMMUFD_CMD_IOAS_NOIOMMU_GET_PA` (include/uapi/linux/iommufd.h, Linux 7.x).
const IOMMUFD_CMD_IOAS_NOIOMMU_GET_PA: u32 = 0x95;
ioctl_io_nr!(
    IOMMU_IOAS_NOIOMMU_GET_PA,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_IOAS_NOIOMMU_GET_PA
);

/// `struct iommu_ioas_noiommu_get_pa` (include/uapi/linux/iommufd.h, Linux 7.3).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct IommuIoasNoiommuGetPa {
    size: u32,
    flags: u32,
    ioas_id: u32,
    reserved: u32,
    iova: u64,
    /// In: the most bytes to ask about (non-zero). Out: physically contiguous bytes from
    /// `out_phys`, at most the input.
    length: u64,
    out_phys: u64,
}

const _: () = {
    use std::mem::offset_of;
    assert!(size_of::<IommuIoasNoiommuGetPa>() == 40);
    assert!(offset_of!(IommuIoasNoiommuGetPa, iova) == 16);
    assert!(offset_of!(IommuIoasNoiommuGetPa, length) == 24);
    assert!(offset_of!(IommuIoasNoiommuGetPa, out_phys) == 32);
};

/// Physically contiguous memory behind an IOVA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysicalRun {
    /// The physical address the device must be given for the IOVA asked about.
    pub phys: u64,
    /// How many bytes from `phys` are physically contiguous (at most what was asked).
    pub len: u64,
}

/// An IOAS of iommufd's no-IOMMU mode with the no-IOMMU device attached.
pub struct IommufdNoIommuBackend {
    // Field order is drop order: the device detaches before the IOAS and the iommufd close.
    devices: AttachedDevices,
    vfio: Arc<VfioIommufd>,
}

impl fmt::Debug for IommufdNoIommuBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IommufdNoIommuBackend")
            .field("devices", &self.devices)
            .field("ioas", &self.vfio.ioas().id())
            .finish()
    }
}

impl IommufdNoIommuBackend {
    /// Opens `/dev/iommu`, allocates an IOAS, and binds and attaches `address`'s no-IOMMU
    /// vfio cdev.
    ///
    /// # Errors
    /// [`OpenError::Device`] when sysfs shows the device cannot be used or is behind an IOMMU,
    /// or has no cdev (the kernel lacks `CONFIG_IOMMUFD_NOIOMMU`); [`OpenError::NeedsRawio`]
    /// without `CAP_SYS_RAWIO`; otherwise the step that failed.
    pub fn open(
        address: &PciAddress,
    ) -> Result<(IommufdNoIommuBackend, Arc<VfioPciDevice>), OpenError> {
        let paths = HostPaths::default();
        // Driver, group viability and a no-IOMMU group: the legacy mode's checks.
        let usable = paths.check(address, VfioMode::NoIommu)?;
        if paths.inspect(address)?.vfio_cdev.is_none() {
            return Err(OpenError::Device(super::DeviceError::NoCdev {
                address: *address,
            }));
        }
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
        let backend = IommufdNoIommuBackend {
            devices: AttachedDevices::default(),
            vfio: Arc::new(vfio),
        };
        let ops: Arc<dyn VfioOps> = Arc::clone(&backend.vfio) as Arc<dyn VfioOps>;
        let device =
            VfioDevice::new(&usable.sysfs_dir, ops, true).map_err(|source| OpenError::Vfio {
                address: *address,
                step: "opening the no-IOMMU vfio cdev, binding it to the iommufd (needs \
                       CAP_SYS_RAWIO) and attaching the IOAS",
                source,
            })?;
        let device = backend.devices.keep(VfioPciDevice::new(*address, device));
        Ok((backend, device))
    }

    /// The IOAS id.
    pub fn ioas_id(&self) -> u32 {
        self.vfio.ioas().id()
    }

    fn iommufd(&self) -> &IommuFd {
        self.vfio.iommufd()
    }

    /// The physical address behind `iova` and how many of the following bytes (at most `len`)
    /// are physically contiguous (`IOMMU_IOAS_NOIOMMU_GET_PA`).
    ///
    /// # Errors
    /// [`DmaError::Query`] with the kernel's errno: `ENOENT` when no mapping covers `iova`,
    /// `EPERM` without `CAP_SYS_RAWIO`, `EINVAL` for a zero `len`.
    pub fn physical_address(&self, iova: u64, len: u64) -> Result<PhysicalRun, DmaError> {
        let mut cmd = IommuIoasNoiommuGetPa {
            size: size_of::<IommuIoasNoiommuGetPa>() as u32,
            ioas_id: self.ioas_id(),
            iova,
            length: len,
            ..Default::default()
        };
        let fd = self.iommufd().fd();
        // SAFETY: the iommufd is open; `cmd` is exclusively borrowed, `size` bytes long, of the
        // uAPI layout (checked above), and the kernel writes back only `length` and `out_phys`.
        let ret = unsafe { ioctl_with_mut_ref(&fd, IOMMU_IOAS_NOIOMMU_GET_PA(), &mut cmd) };
        if ret != 0 {
            return Err(DmaError::Query {
                kind: KIND,
                operation: "IOMMU_IOAS_NOIOMMU_GET_PA",
                source: errno::Error::last(),
            });
        }
        Ok(PhysicalRun {
            phys: cmd.out_phys,
            len: cmd.length,
        })
    }
}

/// Whether the kernel behind `iommufd` has iommufd's no-IOMMU mode, without asking about any
/// address: `IOMMU_IOAS_NOIOMMU_GET_PA` on IOAS 0 (never allocated) answers `ENOENT` where the
/// mode is built (`CONFIG_IOMMUFD_NOIOMMU`), `EOPNOTSUPP` where the command exists without it,
/// and `ENOTTY` on a kernel older than the command.
///
/// # Errors
/// Any other errno (`EPERM` without `CAP_SYS_RAWIO`).
pub fn noiommu_mode_built(iommufd: BorrowedFd<'_>) -> Result<bool, errno::Error> {
    let mut cmd = IommuIoasNoiommuGetPa {
        size: size_of::<IommuIoasNoiommuGetPa>() as u32,
        ioas_id: 0,
        length: PAGE_SIZE,
        ..Default::default()
    };
    // SAFETY: `iommufd` is open; `cmd` is exclusively borrowed, `size` bytes long, of the uAPI
    // layout; the kernel writes back at most `length` and `out_phys`.
    let ret = unsafe { ioctl_with_mut_ref(&iommufd, IOMMU_IOAS_NOIOMMU_GET_PA(), &mut cmd) };
    if ret == 0 {
        return Ok(true);
    }
    match errno::Error::last().errno() {
        libc::ENOENT => Ok(true),
        libc::ENOTTY | libc::EOPNOTSUPP => Ok(false),
        other => Err(errno::Error::new(other)),
    }
}

/// Whether the kernel behind `iommufd` knows `IOMMU_IOAS_MAP_FILE` (Linux 6.13+): sent with
/// `size = 0`, a kernel that knows the command refuses the too-small struct with `EINVAL`; one
/// that does not answers `ENOTTY`. (The backends' own probe, for tools that open no device.)
///
/// # Errors
/// Any errno but `EINVAL` and `ENOTTY`.
pub fn map_file_known(iommufd: BorrowedFd<'_>) -> Result<bool, errno::Error> {
    super::sys::iommu_ioas_map_file_known(iommufd)
}

impl DmaBackend for IommufdNoIommuBackend {
    fn capabilities(&self) -> Result<Capabilities, DmaError> {
        Ok(Capabilities {
            kind: KIND,
            page_sizes: PAGE_SIZE,
            // The software page table takes any IOVA (64-bit address space); the IOVA is a
            // handle, the device gets the physical address.
            iova_ranges: vec![IovaRange {
                start: 0,
                last: u64::MAX,
            }],
            mapping_budget: None,
            map_file: FileMapSupport::None,
            translates: false,
            cuts_mappings: false,
        })
    }

    unsafe fn map_va(
        &self,
        iova: u64,
        len: u64,
        host_addr: *mut u8,
        prot: DmaProt,
    ) -> Result<(), DmaError> {
        // SAFETY: the caller upholds `map_va`'s contract, which `ioas_map_va` requires; the
        // kernel pins the pages.
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
        _iova: u64,
        _len: u64,
        _file: BorrowedFd<'_>,
        _offset: u64,
        _prot: DmaProt,
    ) -> Result<(), DmaError> {
        Err(DmaError::Unsupported {
            kind: KIND,
            operation: "maps by file on iommufd's no-IOMMU mode",
        })
    }

    fn unmap(&self, iova: u64, len: u64) -> Result<u64, DmaError> {
        ioas_unmap(self.iommufd(), self.ioas_id(), KIND, iova, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_pa_is_iommufd_command_0x95() {
        // _IO(';', 0x95): type 0x3b in bits 8-15, number in bits 0-7, no size or direction.
        assert_eq!(IOMMU_IOAS_NOIOMMU_GET_PA(), 0x3b95);
    }
}
