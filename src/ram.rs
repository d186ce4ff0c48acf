//! [`GuestRam`]: what a VMM holds. Regions, the devices that DMA into them, and the KVM
//! attribute table, wired so that every conversion goes through the engine.

use std::sync::{Arc, Mutex, RwLock};

use discard_manager::{Attribute, GpaRange, RegionConfig};
use iommu::{DmaBackend, Ledger, LedgerStats, Mapping, UnmapReport};

use crate::attributes::{AttributeError, MemoryAttributes};
use crate::backing::RegionBacking;
use crate::conversion::{Conversion, ConversionError};
use crate::device::{AttachError, DetachError, Device, DeviceConfig, DeviceId};
use crate::policy::{DiscardPolicy, FlushReport, HeldBack};
use crate::region::Region;

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

/// A ledger whose teardown failed, kept with the memory it still maps until the `GuestRam`
/// drops (the ledger's own drop retries the unmaps first).
pub(crate) struct Orphan {
    pub(crate) _ledger: Option<Arc<Ledger>>,
    pub(crate) _backings: Vec<Arc<RegionBacking>>,
}

/// Guest RAM as a VMM holds it: regions (each with its state manager, backing and discard
/// policy), the devices that DMA into them, and the KVM attribute table.
///
/// Every conversion goes through [`GuestRam::convert`] (or the [`crate::ConversionQueue`]);
/// the VMM deletes its KVM memslots before dropping the `GuestRam`.
pub struct GuestRam {
    // Drop order: devices and orphans (ledgers) before regions (backings).
    pub(crate) devices: Mutex<Vec<Device>>,
    pub(crate) orphans: Mutex<Vec<Orphan>>,
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
            orphans: Mutex::new(Vec::new()),
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
        for (i, d) in devices.iter().enumerate() {
            if let Err(source) = region.attach(d) {
                // The region is not published yet, so only this thread sees it.
                for done in &devices[..i] {
                    if region.detach(done.id) > 0 {
                        // What could not be unmapped still points into this region's memory:
                        // keep the memory alive as long as the mapping may be.
                        self.keep_alive(done, [&region].into_iter());
                    }
                }
                if spec.initial == Attribute::Private {
                    // Best effort: KVM forgets attributes of GPAs with no memslot anyway.
                    let _ = self.attributes.set(range, Attribute::Shared);
                }
                return Err(RegionError::Device {
                    device: d.name.clone(),
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

    /// Attaches a device whose IOMMU is `backend`: checks up front that the backend can map
    /// what `config` asks for in every region (a kernel that cannot is refused here, never in
    /// the middle of a conversion), then maps every region's view into it.
    ///
    /// # Errors
    /// [`AttachError`]; nothing stays mapped.
    pub fn attach_device(
        &self,
        name: &str,
        backend: Arc<dyn DmaBackend>,
        config: DeviceConfig,
    ) -> Result<DeviceId, AttachError> {
        let mut devices = lock(&self.devices);
        let ledger = Ledger::new(backend).map_err(|source| AttachError::Ledger {
            device: name.to_string(),
            source,
        })?;
        let id = {
            let mut next = lock(&self.next_device);
            *next += 1;
            DeviceId(*next)
        };
        let device = Device {
            id,
            name: name.to_string(),
            config,
            ledger: Arc::new(ledger),
        };
        let regions = self.regions();
        for r in &regions {
            r.check_device(&device)?;
        }
        for (i, r) in regions.iter().enumerate() {
            if let Err(e) = r.attach(&device) {
                for done in &regions[..i] {
                    done.detach(id);
                }
                return Err(e);
            }
        }
        log::info!(
            "attached {name} ({} view, {:?}, iova offset {:#x}) to {} region(s)",
            config.view(),
            config.map_by(),
            config.iova_offset(),
            regions.len()
        );
        devices.push(device);
        Ok(id)
    }

    /// Detaches a device: unmaps everything it maps and forgets it.
    ///
    /// # Errors
    /// [`DetachError`] when unmaps failed; the mappings left are kept (with the memory they
    /// map) until the `GuestRam` drops. The device is gone either way.
    pub fn detach_device(&self, id: DeviceId) -> Result<UnmapReport, DetachError> {
        let mut devices = lock(&self.devices);
        let Some(pos) = devices.iter().position(|d| d.id == id) else {
            return Ok(UnmapReport::default());
        };
        let device = devices.remove(pos);
        let before = device.ledger.stats();
        let regions = self.regions();
        for r in &regions {
            r.detach(id);
        }
        let result = device.ledger.unmap_all();
        let after = device.ledger.stats();
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
                    device.ledger.mapping_count()
                );
                self.keep_alive(&device, regions.iter());
                DetachError {
                    device: device.name.clone(),
                    source,
                }
            })
    }

    /// Keeps `device`'s ledger and the backings of `regions` alive until the `GuestRam` drops:
    /// the ledger still maps memory of them after unmaps failed.
    pub(crate) fn keep_alive<'a>(
        &self,
        device: &Device,
        regions: impl Iterator<Item = &'a Arc<Region>>,
    ) {
        lock(&self.orphans).push(Orphan {
            _ledger: Some(Arc::clone(&device.ledger)),
            _backings: regions.map(|r| Arc::clone(r.backing())).collect(),
        });
    }

    /// The live mappings of a device's IOMMU, as its ledger records them.
    pub fn device_mappings(&self, id: DeviceId) -> Option<Vec<Mapping>> {
        lock(&self.devices)
            .iter()
            .find(|d| d.id == id)
            .map(|d| d.ledger.mappings())
    }

    /// What a device's ledger counted: IOMMU map and unmap calls, bytes, peak mappings.
    pub fn device_stats(&self, id: DeviceId) -> Option<LedgerStats> {
        lock(&self.devices)
            .iter()
            .find(|d| d.id == id)
            .map(|d| d.ledger.stats())
    }

    /// Mappings left in a device's budget (`None`: no limit, or no such device).
    pub fn device_budget(&self, id: DeviceId) -> Option<u64> {
        lock(&self.devices)
            .iter()
            .find(|d| d.id == id)
            .and_then(|d| d.ledger.remaining_budget())
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
        self.regions().iter().fold(HeldBack::default(), |acc, r| {
            let h = r.held_back();
            HeldBack {
                shared_bytes: acc.shared_bytes + h.shared_bytes,
                private_bytes: acc.private_bytes + h.private_bytes,
                failed_bytes: acc.failed_bytes + h.failed_bytes,
            }
        })
    }
}
