//! [`GuestRam`]: what a VMM holds. Regions, the devices that DMA into them, and the KVM
//! attribute table, wired so that every conversion goes through the engine.

use std::sync::{Arc, Mutex, RwLock};

use discard_manager::{Attribute, GpaRange, RegionConfig, View};
use iommu::{
    BackendKind, DmaBackend, DmaProt, FileMapSupport, Ledger, LedgerError, LedgerStats, Mapping,
    UnmapReport,
};

use crate::attributes::{AttributeError, MemoryAttributes};
use crate::backing::{FileKind, RegionBacking};
use crate::dma::{DmaListener, ListenerConfig, MapBy};
use crate::engine::{Attached, Conversion, ConversionError, DeviceId, Region};
use crate::policy::{DiscardPolicy, FlushReport, HeldBack};

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
}

/// How a device sees guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The view the device maps: `Shared` for ordinary assigned devices, `Private` for
    /// trusted-IO devices (TDX Connect, SEV-TIO style).
    pub view: View,
    /// How mappings name the memory.
    pub map_by: MapBy,
    /// IOVA = GPA + `iova_offset`.
    pub iova_offset: u64,
    /// Device access.
    pub prot: DmaProt,
}

impl DeviceConfig {
    /// An ordinary assigned device: shared view, identity IOVA, mapped by host address.
    pub fn shared() -> Self {
        Self {
            view: View::Shared,
            map_by: MapBy::Address,
            iova_offset: 0,
            prot: DmaProt::READ_WRITE,
        }
    }

    /// A trusted-IO device: private view, identity IOVA, mapped by guest_memfd + offset.
    pub fn trusted_io() -> Self {
        Self {
            view: View::Private,
            map_by: MapBy::File,
            iova_offset: 0,
            prot: DmaProt::READ_WRITE,
        }
    }
}

/// Adding a region failed; nothing was added.
#[derive(Debug, thiserror::Error)]
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

/// A device could not be attached; nothing of it stays mapped.
#[derive(Debug, thiserror::Error)]
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

/// Detaching left mappings behind.
#[derive(Debug, thiserror::Error)]
#[error("detaching {device} left mappings in its IOMMU")]
pub struct DetachError {
    /// The device.
    pub device: String,
    /// The ledger's error.
    #[source]
    pub source: LedgerError,
}

struct Device {
    id: DeviceId,
    name: String,
    config: DeviceConfig,
    ledger: Arc<Ledger>,
}

/// A ledger whose teardown failed, kept with the memory it still maps until the `GuestRam`
/// drops (the ledger's own drop retries the unmaps first).
struct Orphan {
    _ledger: Arc<Ledger>,
    _backings: Vec<Arc<RegionBacking>>,
}

/// Guest RAM as a VMM holds it: regions (each with its state manager, backing and discard
/// policy), the devices that DMA into them, and the KVM attribute table.
///
/// Every conversion goes through [`GuestRam::convert`] (or the [`crate::ConversionQueue`]);
/// the VMM deletes its KVM memslots before dropping the `GuestRam`.
pub struct GuestRam {
    // Drop order: devices and orphans (ledgers) before regions (backings).
    devices: Mutex<Vec<Device>>,
    orphans: Mutex<Vec<Orphan>>,
    regions: RwLock<Vec<Arc<Region>>>,
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
            initially_plugged: true,
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
        for d in devices.iter() {
            if let Err(source) = attach_to_region(d, &region) {
                // The region is not published yet, so only this thread sees it; still, take the
                // list out before calling the manager (lock order: manager before the list).
                let attached: Vec<Attached> = region.attached_mut().drain(..).collect();
                for a in attached {
                    let _ = region.manager().unregister(a.id);
                    // What could not be unmapped still points into this region's memory: keep
                    // the memory alive as long as the mapping may be.
                    if a.listener.retry_stale() > 0 {
                        lock(&self.orphans).push(Orphan {
                            _ledger: Arc::clone(&a.ledger),
                            _backings: vec![Arc::clone(region.backing())],
                        });
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
            check_device(&device, r)?;
        }
        for (i, r) in regions.iter().enumerate() {
            if let Err(e) = attach_to_region(&device, r) {
                for done in &regions[..i] {
                    detach_from_region(id, done);
                }
                return Err(e);
            }
        }
        log::info!(
            "attached {name} ({} view, {:?}, iova offset {:#x}) to {} region(s)",
            config.view,
            config.map_by,
            config.iova_offset,
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
            detach_from_region(id, r);
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
                lock(&self.orphans).push(Orphan {
                    _ledger: Arc::clone(&device.ledger),
                    _backings: regions.iter().map(|r| Arc::clone(r.backing())).collect(),
                });
                DetachError {
                    device: device.name.clone(),
                    source,
                }
            })
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

    /// Converts `range` (inside one region) to `to`. See [`crate::engine`] for the order.
    ///
    /// # Errors
    /// [`ConversionError`] naming the step; unless it says otherwise nothing changed.
    pub fn convert(&self, range: GpaRange, to: Attribute) -> Result<Conversion, ConversionError> {
        let region = self
            .region_of(range)
            .ok_or(ConversionError::NoRegion { range })?;
        region.convert(range, to, &*self.attributes)
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

fn check_device(device: &Device, region: &Region) -> Result<(), AttachError> {
    let caps = device.ledger.capabilities();
    let name = || device.name.clone();
    let unsupported = |what| AttachError::Unsupported {
        device: name(),
        kind: caps.kind,
        what,
    };
    let backing = region.backing();
    match (device.config.view, device.config.map_by) {
        (View::Private, _) if caps.map_file != FileMapSupport::AnyFile => {
            return Err(unsupported(
                "map guest_memfd by file for a trusted-IO (private view) device",
            ));
        }
        (View::Private, MapBy::Address) => {
            return Err(unsupported("map private memory by address (it has none)"));
        }
        (View::Shared, MapBy::File) if caps.map_file == FileMapSupport::None => {
            return Err(unsupported("map by file descriptor"));
        }
        (View::Shared, MapBy::File)
            if backing.shared_kind() == FileKind::GuestMemfd
                && caps.map_file != FileMapSupport::AnyFile =>
        {
            return Err(unsupported(
                "map a guest_memfd by file (mainline accepts memfd and hugetlbfs only)",
            ));
        }
        _ => {}
    }
    let page_size = device.ledger.page_size();
    if region.granularity() % page_size != 0 {
        return Err(AttachError::Granularity {
            device: name(),
            granularity: region.granularity(),
            page_size,
        });
    }
    let range = region.range();
    let offset = device.config.iova_offset;
    let inside = range.start().checked_add(offset).is_some_and(|iova| {
        caps.iova_ranges
            .iter()
            .any(|r| r.contains(iova, range.len()))
    });
    if !inside {
        return Err(AttachError::IovaRange {
            device: name(),
            range,
            iova_offset: offset,
        });
    }
    Ok(())
}

fn attach_to_region(device: &Device, region: &Arc<Region>) -> Result<(), AttachError> {
    check_device(device, region)?;
    // The conversion lock: a conversion's budget check and its transaction see either all of
    // this device or none of it.
    let _conversions = region.conversion_lock();
    let range = region.range();
    let view = device.config.view;
    let replay_failed = |source| AttachError::Replay {
        device: device.name.clone(),
        view,
        range,
        source,
    };
    let populated = region
        .manager()
        .view_runs(view, range)
        .map_err(replay_failed)?;
    let needed: u64 = populated
        .iter()
        .map(|r| r.len() / region.granularity())
        .sum();
    device
        .ledger
        .check_budget(needed)
        .map_err(|source| AttachError::Budget {
            device: device.name.clone(),
            range,
            needed,
            source,
        })?;
    let listener = Arc::new(DmaListener::new(
        ListenerConfig {
            device: device.name.clone(),
            view,
            map_by: device.config.map_by,
            iova_offset: device.config.iova_offset,
            granularity: region.granularity(),
            prot: device.config.prot,
        },
        Arc::clone(&device.ledger),
        Arc::clone(region.backing()),
        Arc::clone(region.failures()),
    ));
    let id = region
        .manager()
        .register(view, range, listener.clone())
        .map_err(replay_failed)?;
    region.attached_mut().push(Attached {
        device: device.id,
        name: device.name.clone(),
        view,
        id,
        listener,
        ledger: Arc::clone(&device.ledger),
    });
    Ok(())
}

fn detach_from_region(device: DeviceId, region: &Region) {
    let _conversions = region.conversion_lock();
    let mine: Vec<Attached> = {
        let mut attached = region.attached_mut();
        let (mine, rest) = attached.drain(..).partition(|a| a.device == device);
        *attached = rest;
        mine
    };
    for a in mine {
        if let Err(e) = region.manager().unregister(a.id) {
            log::warn!(
                "{}: unregistering from {} failed: {e}",
                a.name,
                region.range()
            );
        }
        // Discards that failed during unregistration left stale mappings; the caller's
        // `unmap_all` removes whatever is left.
        a.listener.retry_stale();
    }
    region.failures().drain();
}
