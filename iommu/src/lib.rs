//! DMA backends behind one trait, and the mapping ledger.
//!
//! This crate is the one place where DMA mappings are made and removed. [`DmaBackend`] is a thin
//! trait over one IOMMU address space (VFIO type1 container, IOMMUFD IOAS, VFIO no-IOMMU, or the
//! emulated IOMMU). The [`Ledger`] wraps a backend, records every live mapping, and refuses before
//! the kernel sees it any unmap that would bisect a mapping or any map beyond the mapping budget.
#![deny(
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks
)]

mod backend;
pub mod emulated;
pub mod ledger;

// Kernel backends and device access (VFIO type1, IOMMUFD, no-IOMMU, sysfs, edu).
mod device;
mod edu;
mod iommufd;
mod noiommu;
mod sys;
mod type1;

pub use backend::{
    BackendKind, Capabilities, DmaBackend, DmaError, DmaProt, FileMapSupport, IovaRange,
};
pub use emulated::EmulatedIommu;
pub use ledger::{Ledger, LedgerError, LedgerStats, Mapping, MappingSource, UnmapReport};

pub use device::{
    DeviceError, DeviceRegions, GroupMember, HostPaths, HostReport, MemlockLimit, NodeState,
    OpenError, PciAddress, PciAddressError, PciDeviceInfo, RegionError, RegionInfo, UsableDevice,
    VfioContainerReport, VfioMode, VfioPciDevice,
};
pub use edu::{EDU_ID, Edu, EduError};
pub use iommufd::IommufdBackend;
pub use noiommu::{NoIommuBackend, NoIommuDevice, PAGE_SIZE, PagemapEntry};
pub use type1::{Type1Backend, Type1Info};
