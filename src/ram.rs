//! [`GuestRam`]: what a VMM holds. Regions, the devices that DMA into them, and the KVM
//! attribute table, wired so that every conversion goes through the engine.

use std::sync::{Arc, Mutex, RwLock, Weak};

use discard_manager::{Attribute, GpaRange, RegionConfig};
use iommu::{DmaBackend, LedgerStats, Mapping, UnmapReport};

use crate::attributes::{AttributeError, MemoryAttributes};
use crate::backing::RegionBacking;
use crate::conversion::{Conversion, ConversionError};
use crate::device::{AttachError, DetachError, Device, DeviceConfig, DeviceId};
use crate::policy::{DiscardPolicy, FlushReport, HeldBack};
use crate::region::Region;
use crate::space::AddressSpace;

/// How one region is managed (its size and backing come from the [`RegionBacking`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    /// Unit of conversion and of DMA mapping: a power of two, at least 4 KiB.
    pub granularity: u64,
    /// Attribute of every page at creation: `Private` for a confidential guest (the engine
    /// tells KVM), `Shared` otherwise.
    pub initial: Attribute,
    /// When vacated backing is freed.
    pub policy: DiscardPolicy,
    /// Whether every granule starts plugged (ordinary RAM) or unplugged (a virtio-mem
    /// device's memory, plugged later with [`GuestRam::plug`]).
    pub initially_plugged: bool,
}

/// Adding a region failed; nothing was added.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegionError {
    /// The backing's size and the spec do not make a valid region.
    #[error("invalid region geometry")]
    Config(#[source] discard_manager::ConfigError),
    /// The region overlaps one already added.
    #[error("region {range} overlaps region {existing}")]
    Overlap {
        /// The new region.
        range: GpaRange,
        /// The one it overlaps.
        existing: GpaRange,
    },
    /// Marking a confidential region private in KVM failed.
    #[error("marking the new region private failed")]
    InitialAttribute(#[source] AttributeError),
    /// An attached device could not map the new region's view; the region was not added.
    #[error("device {device} could not map the new region")]
    Device {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: Box<AttachError>,
    },
}

/// Guest RAM as a VMM holds it: regions (each with its state manager, backing and discard
/// policy), the devices that DMA into them, and the KVM attribute table.
///
/// Every conversion goes through [`GuestRam::convert`] (or the [`crate::ConversionQueue`]).
/// Teardown order does not matter: a region's memory stays alive as long as an IOMMU address
/// space maps any of it ([`crate::space`]), and a bound memslot is deleted when its backing
/// drops ([`RegionBacking::bind`]).
pub struct GuestRam {
    pub(crate) devices: Mutex<Vec<Device>>,
    /// Every address space created here, alive or not: a backend given again finds its
    /// address space (and ledger) while anything still holds it.
    spaces: Mutex<Vec<Weak<AddressSpace>>>,
    pub(crate) regions: RwLock<Vec<Arc<Region>>>,
    attributes: Arc<dyn MemoryAttributes>,
    next_device: Mutex<u64>,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("regions", &self.regions())
            .field("attributes", &self.attributes)
            .finish_non_exhaustive()
    }
}

use crate::lock;

impl GuestRam {
    /// Empty guest RAM whose attributes live in `attributes` ([`crate::KvmAttributes`] on a VM
    /// with private memory, [`crate::RecordingAttributes`] otherwise).
    pub fn new(attributes: Arc<dyn MemoryAttributes>) -> Self {
        Self {
            devices: Mutex::new(Vec::new()),
            spaces: Mutex::new(Vec::new()),
            regions: RwLock::new(Vec::new()),
            attributes,
            next_device: Mutex::new(0),
        }
    }

    /// The attribute table.
    pub fn attributes(&self) -> &Arc<dyn MemoryAttributes> {
        &self.attributes
    }

    /// Every region, in the order added.
    pub fn regions(&self) -> Vec<Arc<Region>> {
        self.regions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The region containing all of `range`.
    pub fn region_of(&self, range: GpaRange) -> Option<Arc<Region>> {
        // Searched under the read lock: cloning the list would cost every conversion.
        self.regions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|r| r.range().contains(&range))
            .map(Arc::clone)
    }

    /// Adds a region over `backing` (bind it to a KVM memslot first, if there is a VM), marks it
    /// private in KVM if `spec.initial` says so, and maps it into every attached device.
    ///
    /// # Errors
    /// [`RegionError`]; nothing was added.
    pub fn add_region(
        &self,
        backing: RegionBacking,
        spec: RegionSpec,
    ) -> Result<Arc<Region>, RegionError> {
        let devices = lock(&self.devices);
        let size = backing.range().map_or(0, |r| r.len());
        let base = backing.range().map_or(0, |r| r.start());
        let config = RegionConfig {
            base,
            size,
            granularity: spec.granularity,
            initial_attribute: spec.initial,
            initially_plugged: spec.initially_plugged,
        };
        let region =
            Arc::new(Region::new(backing, config, spec.policy).map_err(RegionError::Config)?);
        let range = region.range();
        if let Some(existing) = self
            .regions()
            .iter()
            .map(|r| r.range())
            .find(|r| r.intersect(&range).is_some())
        {
            return Err(RegionError::Overlap { range, existing });
        }
        if spec.initial == Attribute::Private {
            self.attributes
                .set(range, Attribute::Private)
                .map_err(RegionError::InitialAttribute)?;
        }
        let spaces = distinct_spaces(&devices);
        for (i, (space, name)) in spaces.iter().enumerate() {
            if let Err(source) = region.attach(space, name) {
                // The region is not published yet, so only this thread sees it. What could
                // not be unmapped keeps the region's memory alive through its address space.
                for (done, _) in &spaces[..i] {
                    region.detach(done);
                }
                if spec.initial == Attribute::Private {
                    // Best effort: KVM forgets attributes of GPAs with no memslot anyway.
                    let _ = self.attributes.set(range, Attribute::Shared);
                }
                return Err(RegionError::Device {
                    device: name.clone(),
                    source: Box::new(source),
                });
            }
        }
        self.regions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&region));
        Ok(region)
    }

    /// Attaches a device whose IOMMU address space is `backend`: checks up front that the
    /// backend can map what `config` asks for in every region (a kernel that cannot is refused
    /// here, never in the middle of a conversion), then maps every region's view into it.
    ///
    /// **Address spaces.** Several devices in one VFIO container or IOAS are attached with the
    /// same `Arc` (clones of it): the second and later devices *join* the address space that
    /// the first opened, which already maps everything, so nothing is mapped again, and the
    /// address space has one ledger and one mapping per granule whatever the number of devices.
    /// The devices of an address space must share one configuration, and in particular one
    /// view ([`crate::space`] says why). A backend is known by the identity of its `Arc`: two
    /// separately built objects over one kernel container would not be recognised, so build
    /// one per container and clone the `Arc`.
    ///
    /// # Errors
    /// [`AttachError`] ([`AttachError::MixedViews`], [`AttachError::AddressSpaceConfig`] when
    /// joining); nothing stays mapped, except what an unmap undoing the work failed to remove,
    /// which stays tracked as stale ([`Region::stale_mappings`]).
    pub fn attach_device(
        &self,
        name: &str,
        backend: Arc<dyn DmaBackend>,
        config: DeviceConfig,
    ) -> Result<DeviceId, AttachError> {
        let mut devices = lock(&self.devices);
        let id = {
            let mut next = lock(&self.next_device);
            *next += 1;
            DeviceId(*next)
        };
        let known = self.space_of(&backend);
        let cut_off = |space: &AddressSpace| AttachError::CutOff {
            device: name.to_string(),
            address_space: space.name(),
        };
        if let Some(space) = known.as_ref().filter(|s| !s.members().is_empty()) {
            space.check_joins(name, config)?;
            if !space.join(id, name) {
                return Err(cut_off(space));
            }
            log::info!("{name} joined the address space of {}", space.name());
            devices.push(Device {
                id,
                name: name.to_string(),
                config,
                space: Arc::clone(space),
            });
            return Ok(id);
        }
        // An address space whose devices all left while unmaps failed: the same ledger, once
        // it maps nothing, if the configuration is the same (else a new one: the old one maps
        // nothing, so no two ledgers disagree about the backend).
        let revived = match known {
            Some(space) => {
                for r in self.regions() {
                    r.retry_stale();
                }
                let mappings = space.ledger.mapping_count();
                if mappings > 0 {
                    return Err(AttachError::StaleMappings {
                        device: name.to_string(),
                        mappings,
                    });
                }
                for r in self.regions() {
                    r.forget_departed(&space);
                }
                (space.config == config).then_some(space)
            }
            None => None,
        };
        let space = match revived {
            Some(space) => {
                space.mend();
                space
            }
            None => {
                let space = AddressSpace::new(id.0, backend, name, config).map_err(|source| {
                    AttachError::Ledger {
                        device: name.to_string(),
                        source,
                    }
                })?;
                let space = Arc::new(space);
                let mut spaces = lock(&self.spaces);
                spaces.retain(|w| w.strong_count() > 0);
                spaces.push(Arc::downgrade(&space));
                space
            }
        };
        let regions = self.regions();
        for r in &regions {
            r.check_space(&space, name)?;
        }
        for (i, r) in regions.iter().enumerate() {
            if let Err(e) = r.attach(&space, name) {
                for done in &regions[..i] {
                    done.detach(&space);
                }
                return Err(e);
            }
        }
        if !space.join(id, name) {
            // A conversion's failed rollback cut it off a region while it was being attached
            // (with no device to detach yet): undo the attach.
            for r in &regions {
                r.detach(&space);
            }
            if let Err(e) = space.ledger.unmap_all() {
                log::warn!("{name}: undoing the attach left mappings: {e}");
            }
            space.release_unmapped();
            return Err(cut_off(&space));
        }
        log::info!(
            "attached {name} ({} view, {:?}, iova offset {:#x}) to {} region(s)",
            config.view(),
            config.map_by(),
            config.iova_offset(),
            regions.len()
        );
        devices.push(Device {
            id,
            name: name.to_string(),
            config,
            space,
        });
        Ok(id)
    }

    /// The address space of `backend`, if one was created here and is still alive (one with
    /// devices first: an older one may linger, mapping nothing, until its departed listeners go).
    fn space_of(&self, backend: &Arc<dyn DmaBackend>) -> Option<Arc<AddressSpace>> {
        lock(&self.spaces)
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|s| s.is_of(backend))
            .max_by_key(|s| !s.members().is_empty())
    }

    /// Detaches a device. If other devices share its address space, nothing is unmapped (the
    /// mappings are theirs too); if it was the last, everything the address space maps is
    /// unmapped.
    ///
    /// # Errors
    /// [`DetachError::UnknownDevice`]; [`DetachError::Unmap`] when unmaps failed: the mappings
    /// left stay tracked as stale ([`Region::stale_mappings`]), with the memory they map, until
    /// a retry removes them. The device is gone either way.
    pub fn detach_device(&self, id: DeviceId) -> Result<UnmapReport, DetachError> {
        let mut devices = lock(&self.devices);
        let Some(pos) = devices.iter().position(|d| d.id == id) else {
            return Err(DetachError::UnknownDevice { id });
        };
        let device = devices.remove(pos);
        let space = &device.space;
        if space.leave(id) != Some(true) {
            log::info!("detached {} (its address space stays mapped)", device.name);
            return Ok(UnmapReport::default());
        }
        let before = space.ledger.stats();
        let regions = self.regions();
        for r in &regions {
            r.detach(space);
        }
        let result = space.ledger.unmap_all();
        space.release_unmapped();
        let after = space.ledger.stats();
        log::info!("detached {}", device.name);
        result
            .map(|_| UnmapReport {
                calls: after.unmap_calls - before.unmap_calls,
                bytes: after.bytes_unmapped - before.bytes_unmapped,
                mappings: before.mappings - after.mappings,
            })
            .map_err(|source| {
                log::warn!(
                    "detaching {} left {} mappings",
                    device.name,
                    space.ledger.mapping_count()
                );
                DetachError::Unmap {
                    device: device.name.clone(),
                    source,
                }
            })
    }

    /// The live mappings of a device's IOMMU address space, as its ledger records them (the
    /// same for every device of the address space).
    pub fn device_mappings(&self, id: DeviceId) -> Option<Vec<Mapping>> {
        lock(&self.devices)
            .iter()
            .find(|d| d.id == id)
            .map(|d| d.space.ledger.mappings())
    }

    /// What a device's ledger counted: IOMMU map and unmap calls, bytes, peak mappings.
    pub fn device_stats(&self, id: DeviceId) -> Option<LedgerStats> {
        lock(&self.devices)
            .iter()
            .find(|d| d.id == id)
            .map(|d| d.space.ledger.stats())
    }

    /// Mappings left in a device's budget (`None`: no limit, or no such device).
    pub fn device_budget(&self, id: DeviceId) -> Option<u64> {
        lock(&self.devices)
            .iter()
            .find(|d| d.id == id)
            .and_then(|d| d.space.ledger.remaining_budget())
    }

    /// The attached devices: id, name and configuration.
    pub fn devices(&self) -> Vec<(DeviceId, String, DeviceConfig)> {
        lock(&self.devices)
            .iter()
            .map(|d| (d.id, d.name.clone(), d.config))
            .collect()
    }

    /// Converts `range` (inside one region) to `to`. See [`crate::conversion`] for the order.
    ///
    /// # Errors
    /// [`ConversionError`] naming the step; unless it says otherwise nothing changed.
    pub fn convert(&self, range: GpaRange, to: Attribute) -> Result<Conversion, ConversionError> {
        let region = self
            .region_of(range)
            .ok_or(ConversionError::NoRegion { range })?;
        let result = region.convert(range, to, &*self.attributes);
        self.detach_cut_off(result)
    }

    /// Devices a failed rollback cut off from one region leave guest RAM, so that what the
    /// error says and the device list agree.
    pub(crate) fn detach_cut_off<T>(
        &self,
        result: Result<T, ConversionError>,
    ) -> Result<T, ConversionError> {
        if let Err(ConversionError::RollbackFailed { devices, .. }) = &result {
            for &id in devices {
                if let Err(e) = self.detach_device(id) {
                    log::warn!("{e}");
                }
            }
        }
        result
    }

    /// Frees everything every region holds back.
    pub fn flush_discards(&self) -> FlushReport {
        self.regions()
            .iter()
            .fold(FlushReport::default(), |acc, r| {
                let f = r.flush();
                FlushReport {
                    punched_ranges: acc.punched_ranges + f.punched_ranges,
                    punched_bytes: acc.punched_bytes + f.punched_bytes,
                    failed_ranges: acc.failed_ranges + f.failed_ranges,
                }
            })
    }

    /// Backing held back, summed over regions.
    pub fn held_back(&self) -> HeldBack {
        self.regions()
            .iter()
            .fold(HeldBack::default(), |acc, r| acc + r.held_back())
    }
}

/// The address spaces of `devices`, each once, with the name of its first device.
fn distinct_spaces(devices: &[Device]) -> Vec<(Arc<AddressSpace>, String)> {
    let mut out: Vec<(Arc<AddressSpace>, String)> = Vec::new();
    for d in devices {
        if !out.iter().any(|(s, _)| Arc::ptr_eq(s, &d.space)) {
            out.push((Arc::clone(&d.space), d.name.clone()));
        }
    }
    out
}
