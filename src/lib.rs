//! The integration layer a VMM embeds to give assigned devices DMA access to guest memory backed
//! by KVM guest_memfd, keeping every IOMMU in step while the guest converts memory between shared
//! and private.
//!
//! - [`GuestRam`]: regions, devices and the KVM attribute table; what the VMM holds.
//! - [`RegionBacking`]: the files behind a region, classic (memfd + guest_memfd) or in-place
//!   (mmap-able guest_memfd), chosen from what the kernel offers ([`KvmSupport`]).
//! - [`Region`]: one region's state manager, backing, policy and devices (attach, detach).
//! - [`conversion`]: the order of every conversion and its rollback; [`policy`]: when vacated
//!   backing is freed; [`plug`]: virtio-mem plug and unplug, and removing a region.
//! - [`DeviceConfig`]: how a device sees guest memory (shared view, or trusted-IO private view).
//! - [`space`]: IOMMU address spaces (a VFIO container, an IOAS, an emulated IOMMU). Devices
//!   attached with the same backend `Arc` share one: one ledger, one mapping per granule, one
//!   budget, and the memory of every region it maps kept alive until it is unmapped.
//! - The DMA listeners (`dma`) map a view of a region into an address space; one per region
//!   and address space, created when its first device attaches and removed when its last one
//!   leaves, never built by hand.
//! - [`ConversionQueue`]: conversions from vCPU threads, merged and answered one by one.
//! - [`exits`]: vCPU exits to conversion requests, results to what the guest reads.
//!
//! # Example
//! A VMM with one 2 MiB confidential region bound to a KVM memslot and one assigned device (here
//! the emulated IOMMU; a VFIO type1 or IOMMUFD backend from the `iommu` crate plugs in the same
//! way). This host's default VM has no KVM memory attributes, so the recording table stands in.
//! ```
//! use std::sync::Arc;
//! use discard_manager::{Attribute, GpaRange};
//! use gmem_dma::*;
//!
//! let (kvm, vm) = { let kvm = kvm_ioctls::Kvm::new()?; let vm = kvm.create_vm()?; (kvm, vm) };
//! let model = KvmSupport::probe(&kvm, &vm).choose_model(ModelChoice::Classic)?;
//! let backing = RegionBacking::classic(&vm, 0x1_0000_0000, 2 << 20)?; // memfd + guest_memfd
//! backing.bind(&vm, 0)?; // KVM_SET_USER_MEMORY_REGION2
//! let ram = GuestRam::new(Arc::new(RecordingAttributes::new())); // KvmAttributes on a CoCo VM
//! let policy = DiscardPolicy::Lazy { budget_bytes: 1 << 20 };
//! ram.add_region(backing, RegionSpec { granularity: 4096, initial: Attribute::Private, policy, initially_plugged: true })?;
//! let iommu = Arc::new(iommu::EmulatedIommu::new());
//! let nic = ram.attach_device("nic", iommu.clone(), DeviceConfig::shared())?;
//!
//! // The guest shares a 16 KiB bounce buffer (a KVM_HC_MAP_GPA_RANGE exit), then takes it back.
//! let bounce = GpaRange::new(0x1_0000_4000, 0x4000).unwrap();
//! ram.convert(bounce, Attribute::Shared)?;
//! assert_eq!(iommu.mapping_count(), 4); // one mapping per 4 KiB granule
//! ram.convert(bounce, Attribute::Private)?;
//! assert_eq!(ram.device_mappings(nic).unwrap().len(), 0);
//! # assert_eq!(model, BackingModel::Classic);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
pub mod answer;
pub mod attributes;
pub mod backing;
pub mod conversion;
mod device;
mod dma;
pub mod exit_handler;
pub mod exits;
pub mod host;
#[cfg(feature = "testing")]
pub mod instrument;
pub mod plug;
pub mod policy;
mod queue;
mod ram;
mod range_set;
mod region;
pub mod space;
mod sys;

/// Locks `m`, ignoring poison. Every critical section in this crate leaves its data consistent
/// before anything that can panic (single map/set/vec updates, counters), so a panic elsewhere
/// must not make guest RAM unusable or its teardown impossible.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The state authority and the IOMMU crates, whose types appear in this crate's signatures.
pub use discard_manager;
pub use iommu;

pub use answer::{
    AnswerStyle, ExitCapError, FailureKind, GuestError, MemoryFaultAction, VmPlatform,
    enable_map_gpa_range_exits,
};
pub use attributes::{AttributeError, KvmAttributes, MemoryAttributes, RecordingAttributes};
pub use backing::{BackingError, FileKind, RegionBacking};
pub use conversion::{Conversion, ConversionError, UnmapFailure};
pub use device::{AttachError, DetachError, DeviceConfig, DeviceId, MapBy};
pub use exit_handler::{ExitHandler, HandlerConfig, MemoryFaultOutcome, PendingHypercall};
pub use exits::{
    ConversionRequest, ExitError, RequestError, handle_map_gpa_range, handle_memory_fault,
    hypercall_return,
};
pub use host::{BackingModel, KvmSupport, ModelChoice, ModelError};
pub use plug::{Plugging, Removal, RemovalError};
pub use policy::{DiscardPolicy, FlushReport, HeldBack};
pub use queue::{
    Answer, Completed, ConversionQueue, QueueConfig, QueueError, QueueStartError, QueueStats,
    Ticket,
};
pub use ram::{GuestRam, RegionError, RegionSpec};
pub use region::{Region, RegionState};
pub use sys::KVM_HC_MAP_GPA_RANGE;
