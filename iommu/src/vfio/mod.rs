//! The VFIO host plumbing: finding and checking PCI devices, the kernel backends that open them
//! (VFIO type1, IOMMUFD, VFIO no-IOMMU), device-region access, and the edu test-device driver.
//!
//! Device regions (BARs, config space) are reached through the small [`DeviceRegions`] trait,
//! implemented by [`VfioPciDevice`] (type1 and IOMMUFD) and [`NoIommuDevice`], with checked
//! positioned reads and writes on the device fd. Every raw system call lives in one private
//! module, `sys`.

mod device;
mod edu;
mod host;
mod iommufd;
mod iommufd_noiommu;
mod noiommu;
mod pci;
mod probe;
mod regions;
mod sys;
mod type1;

pub(crate) use device::AttachedDevices;
pub use device::{OpenError, VfioPciDevice};
pub use edu::{EDU_ID, Edu, EduError};
pub use host::{DeviceError, GroupMember, HostPaths, PciDeviceInfo, UsableDevice, VfioMode};
pub use iommufd::{CutSetupError, IommufdBackend};
pub use iommufd_noiommu::{IommufdNoIommuBackend, PhysicalRun, map_file_known, noiommu_mode_built};
pub use noiommu::{NoIommuBackend, NoIommuDevice, PAGE_SIZE, PagemapEntry};
pub use pci::{PciAddress, PciAddressError};
pub use probe::{HostReport, MemlockLimit, NodeState, VfioContainerReport};
pub use regions::{DeviceRegionError, DeviceRegionInfo, DeviceRegions};
pub use type1::{Type1Backend, Type1Info};
