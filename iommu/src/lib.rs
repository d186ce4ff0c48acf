//! DMA backends behind one trait, and the mapping ledger.
//!
//! This crate is the one place where DMA mappings are made and removed. [`DmaBackend`] is a thin
//! trait over one IOMMU address space (VFIO type1 container, IOMMUFD IOAS, VFIO no-IOMMU, or the
//! emulated IOMMU). The [`Ledger`] wraps a backend, records every live mapping, and refuses before
//! the kernel sees it any unmap that would bisect a mapping or any map beyond the mapping budget.
//!
//! Modules by layer: the backend trait and vocabulary (re-exported here), [`ledger`] on top of
//! it, the [`emulated`] IOMMU for tests and benchmarks, and [`vfio`], the kernel backends with
//! the device plumbing they need. The items of `vfio` are re-exported here as well.
mod backend;
pub mod emulated;
pub mod ledger;
pub mod vfio;

pub use backend::{
    BackendKind, Capabilities, DmaBackend, DmaError, DmaProt, FdAccess, FileMapSupport, IovaRange,
    WithoutCutting,
};
pub use emulated::EmulatedIommu;
pub use ledger::{Ledger, LedgerError, LedgerStats, Mapping, MappingSource, UnmapReport};

pub use vfio::{
    CutSetupError, DeviceError, DeviceRegionError, DeviceRegionInfo, DeviceRegions, EDU_ID, Edu,
    EduError, GroupMember, HostPaths, HostReport, IommufdBackend, MemlockLimit, NoIommuBackend,
    NoIommuDevice, NodeState, OpenError, PAGE_SIZE, PagemapEntry, PciAddress, PciAddressError,
    PciDeviceInfo, Type1Backend, Type1Info, UsableDevice, VfioContainerReport, VfioMode,
    VfioPciDevice,
};
pub use vfio::{IommufdNoIommuBackend, PhysicalRun};

/// The README's example runs as a doctest, so it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
