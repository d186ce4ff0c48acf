//! Devices as guest RAM knows them: their identity, how each sees guest memory, and why attaching
//! or detaching one fails.
//!
//! A [`DeviceConfig`] names a view and how mappings of it are made. Only the shared view can be
//! mapped by host address: private memory has none, so a trusted-IO (private view) device is
//! always mapped by guest_memfd + offset, and the type has no way to say otherwise.

use std::sync::Arc;

use discard_manager::{GpaRange, View};
use iommu::{BackendKind, DmaProt, LedgerError};

use crate::space::AddressSpace;

/// How a device's mappings name the memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MapBy {
    /// By host virtual address of the region's shared mapping (`VFIO_IOMMU_MAP_DMA`,
    /// `IOMMU_IOAS_MAP`).
    Address,
    /// By file descriptor + offset (`IOMMU_IOAS_MAP_FILE`) of the shared file.
    File,
}

/// Identifies a device attached to a [`crate::GuestRam`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub(crate) u64);

/// How a device sees guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceConfig {
    /// An ordinary assigned device: it maps the shared view.
    Shared {
        /// How mappings name the shared memory.
        map_by: MapBy,
        /// IOVA = GPA + `iova_offset`.
        iova_offset: u64,
        /// Device access.
        prot: DmaProt,
    },
    /// A trusted-IO device (TDX Connect, SEV-TIO style): it maps the private view, by
    /// guest_memfd + offset (private memory has no host address).
    TrustedIo {
        /// IOVA = GPA + `iova_offset`.
        iova_offset: u64,
        /// Device access.
        prot: DmaProt,
    },
}

impl DeviceConfig {
    /// An ordinary assigned device: shared view, identity IOVA, mapped by host address.
    pub fn shared() -> Self {
        Self::Shared {
            map_by: MapBy::Address,
            iova_offset: 0,
            prot: DmaProt::READ_WRITE,
        }
    }

    /// An ordinary assigned device whose mappings name the shared memory `map_by`.
    pub fn shared_by(map_by: MapBy) -> Self {
        Self::Shared {
            map_by,
            iova_offset: 0,
            prot: DmaProt::READ_WRITE,
        }
    }

    /// A trusted-IO device: private view, identity IOVA, mapped by guest_memfd + offset.
    pub fn trusted_io() -> Self {
        Self::TrustedIo {
            iova_offset: 0,
            prot: DmaProt::READ_WRITE,
        }
    }

    /// The same device with IOVA = GPA + `offset`.
    #[must_use]
    pub fn with_iova_offset(mut self, offset: u64) -> Self {
        match &mut self {
            Self::Shared { iova_offset, .. } | Self::TrustedIo { iova_offset, .. } => {
                *iova_offset = offset;
            }
        }
        self
    }

    /// The same device with access `access`.
    #[must_use]
    pub fn with_prot(mut self, access: DmaProt) -> Self {
        match &mut self {
            Self::Shared { prot, .. } | Self::TrustedIo { prot, .. } => *prot = access,
        }
        self
    }

    /// The view the device maps.
    pub fn view(&self) -> View {
        match self {
            Self::Shared { .. } => View::Shared,
            Self::TrustedIo { .. } => View::Private,
        }
    }

    /// How mappings name the memory (always by file for a trusted-IO device).
    pub fn map_by(&self) -> MapBy {
        match self {
            Self::Shared { map_by, .. } => *map_by,
            Self::TrustedIo { .. } => MapBy::File,
        }
    }

    /// IOVA = GPA + this.
    pub fn iova_offset(&self) -> u64 {
        match self {
            Self::Shared { iova_offset, .. } | Self::TrustedIo { iova_offset, .. } => *iova_offset,
        }
    }

    /// Device access.
    pub fn prot(&self) -> DmaProt {
        match self {
            Self::Shared { prot, .. } | Self::TrustedIo { prot, .. } => *prot,
        }
    }
}

/// One device as guest RAM holds it: its name, configuration and address space (whose
/// listeners every region it is attached to holds).
pub(crate) struct Device {
    pub(crate) id: DeviceId,
    pub(crate) name: String,
    pub(crate) config: DeviceConfig,
    pub(crate) space: Arc<AddressSpace>,
}

/// A device could not be attached; nothing of it stays mapped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    /// The backend cannot report its capabilities.
    #[error("reading the capabilities of {device}'s IOMMU failed")]
    Ledger {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: LedgerError,
    },
    /// The device wants what its backend cannot map.
    #[error("device {device}: {kind} cannot {what}")]
    Unsupported {
        /// The device.
        device: String,
        /// The backend.
        kind: BackendKind,
        /// What it cannot do.
        what: &'static str,
    },
    /// The region's granularity is finer than the IOMMU page size.
    #[error(
        "device {device}: region granularity {granularity:#x} is not a multiple of the IOMMU page size {page_size:#x}"
    )]
    Granularity {
        /// The device.
        device: String,
        /// Region granularity.
        granularity: u64,
        /// IOMMU page size.
        page_size: u64,
    },
    /// GPA + offset leaves the IOMMU's usable IOVA ranges.
    #[error(
        "device {device}: region {range} + iova offset {iova_offset:#x} is outside the usable IOVA ranges"
    )]
    IovaRange {
        /// The device.
        device: String,
        /// The region.
        range: GpaRange,
        /// The offset.
        iova_offset: u64,
    },
    /// The view already holds more granules than the mapping budget allows.
    #[error("device {device}: mapping region {range}'s view needs {needed} mappings")]
    Budget {
        /// The device.
        device: String,
        /// The region.
        range: GpaRange,
        /// Mappings needed.
        needed: u64,
        /// The ledger's refusal.
        #[source]
        source: LedgerError,
    },
    /// The device's backend is an address space that serves the other view: one IOVA space
    /// cannot translate a granule to its shared page for one device and to its private page
    /// for another (see [`crate::GuestRam::attach_device`]).
    #[error(
        "device {device} ({view} view) cannot join the address space of {address_space}, which serves the {serves} view"
    )]
    MixedViews {
        /// The device.
        device: String,
        /// The view it asked for.
        view: View,
        /// The devices of the address space.
        address_space: String,
        /// The view the address space serves.
        serves: View,
    },
    /// The device's backend is an address space whose mappings were made for another
    /// configuration (IOVA offset, access, or how they name memory): its mappings are the
    /// address space's, shared by all its devices.
    #[error(
        "device {device} ({config:?}) cannot join the address space of {address_space}, configured {serves:?}"
    )]
    AddressSpaceConfig {
        /// The device.
        device: String,
        /// The configuration it asked for.
        config: DeviceConfig,
        /// The devices of the address space.
        address_space: String,
        /// The address space's configuration.
        serves: DeviceConfig,
    },
    /// The backend's address space was just cut off a region by a failed rollback; its devices
    /// are being detached. Attach again once they are.
    #[error(
        "device {device}: the address space of {address_space} was cut off by a failed rollback"
    )]
    CutOff {
        /// The device.
        device: String,
        /// The devices of the address space.
        address_space: String,
    },
    /// The backend's address space still holds mappings that earlier failed unmaps left (its
    /// devices are gone); retried just now, in vain.
    #[error("device {device}: its address space still holds {mappings} stale mapping(s)")]
    StaleMappings {
        /// The device.
        device: String,
        /// Mappings left.
        mappings: u64,
    },
    /// Mapping the view (the replay) failed.
    #[error("device {device}: mapping the {view} view of region {range} failed")]
    Replay {
        /// The device.
        device: String,
        /// The view.
        view: View,
        /// The region.
        range: GpaRange,
        /// The manager's report.
        #[source]
        source: discard_manager::Error,
    },
}

/// Detaching a device failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DetachError {
    /// No attached device has this id (never attached, or detached already).
    #[error("no attached device has id {id:?}")]
    UnknownDevice {
        /// The id asked for.
        id: DeviceId,
    },
    /// The device was the last of its address space, and unmapping the address space left
    /// mappings behind. The device is gone; the mappings stay tracked (with the memory they
    /// map) until a retry removes them.
    #[error("detaching {device} left mappings in its IOMMU")]
    Unmap {
        /// The device.
        device: String,
        /// The ledger's error.
        #[source]
        source: LedgerError,
    },
}
