//! A PCI device opened through vfio-ioctls, the list of devices an address space keeps
//! attached, and why opening one failed.

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;

use vmm_sys_util::errno;

use super::sys::OwnsFd;
use super::{DeviceError, DeviceRegionInfo, DeviceRegions, PciAddress};

/// Opening a device through one of the kernel backends failed, naming the step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The device cannot be used as it is (driver, group, nodes, permissions).
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A vfio-ioctls step failed.
    #[error("{address}: {step} failed")]
    Vfio {
        /// The device.
        address: PciAddress,
        /// What was being done.
        step: &'static str,
        /// vfio-ioctls' error.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// An iommufd-ioctls step failed.
    #[error("{address}: {step} failed")]
    Iommufd {
        /// The device.
        address: PciAddress,
        /// What was being done.
        step: &'static str,
        /// iommufd-ioctls' error.
        #[source]
        source: iommufd_ioctls::IommufdError,
    },
    /// A system call of our own failed.
    #[error("{address}: {step} failed")]
    Syscall {
        /// The device.
        address: PciAddress,
        /// The call (`VFIO_SET_IOMMU(VFIO_NOIOMMU_IOMMU)`, ...).
        step: &'static str,
        /// The errno.
        #[source]
        source: errno::Error,
    },
    /// Opening a file failed.
    #[error("{address}: cannot open {path}")]
    OpenNode {
        /// The device.
        address: PciAddress,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// no-IOMMU mode refused for lack of `CAP_SYS_RAWIO`.
    #[error("{address}: {step} needs CAP_SYS_RAWIO (VFIO no-IOMMU mode gives raw DMA access)")]
    NeedsRawio {
        /// The device.
        address: PciAddress,
        /// The step the kernel refused.
        step: &'static str,
    },
    /// The group is not viable although sysfs looked fine (a race with a driver bind).
    #[error(
        "{address}: VFIO says group {group} is not viable (flags {flags:#x}); is every device in it bound to vfio-pci?"
    )]
    GroupNotViable {
        /// The device.
        address: PciAddress,
        /// The group.
        group: u32,
        /// `VFIO_GROUP_GET_STATUS` flags.
        flags: u32,
    },
    /// The new backend could not report its capabilities.
    #[error("{address}: reading the capabilities of the new address space failed")]
    Capabilities {
        /// The device.
        address: PciAddress,
        /// The failure.
        #[source]
        source: crate::DmaError,
    },
}

/// A PCI device opened through vfio-ioctls (type1 group or IOMMUFD cdev).
///
/// The backend that opened it keeps it attached for the backend's whole life (a type1
/// container loses its IOMMU when its last group leaves), so it is handed out as an `Arc`.
pub struct VfioPciDevice {
    address: PciAddress,
    device: vfio_ioctls::VfioDevice,
}

impl VfioPciDevice {
    pub(crate) fn new(address: PciAddress, device: vfio_ioctls::VfioDevice) -> Self {
        VfioPciDevice { address, device }
    }

    /// The device's PCI address.
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// The vfio-ioctls device, for interrupts, reset and the rest of its API.
    pub fn vfio(&self) -> &vfio_ioctls::VfioDevice {
        &self.device
    }
}

impl fmt::Debug for VfioPciDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioPciDevice")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// The devices a type1 container or an IOAS keeps attached for its whole life.
#[derive(Default)]
pub(crate) struct AttachedDevices(std::sync::Mutex<Vec<std::sync::Arc<VfioPciDevice>>>);

impl AttachedDevices {
    /// Records `device` and hands it back.
    pub(crate) fn keep(&self, device: VfioPciDevice) -> std::sync::Arc<VfioPciDevice> {
        let device = std::sync::Arc::new(device);
        // The list is only pushed to; a panic while holding the lock cannot leave it torn.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(std::sync::Arc::clone(&device));
        device
    }
}

impl fmt::Debug for AttachedDevices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f.debug_list()
            .entries(list.iter().map(|d| d.address))
            .finish()
    }
}

impl DeviceRegions for VfioPciDevice {
    fn region(&self, index: u32) -> Option<DeviceRegionInfo> {
        // vfio-ioctls answers 0 for a region it does not have; a real region has a size.
        let size = self.device.get_region_size(index);
        (size != 0).then(|| DeviceRegionInfo {
            offset: self.device.get_region_offset(index),
            size,
            flags: self.device.get_region_flags(index),
        })
    }

    fn device_fd(&self) -> BorrowedFd<'_> {
        self.device.fd()
    }
}
