//! One guest RAM region: its state manager, backing, discard policy, and the IOMMU address
//! spaces that listen to it (one listener per address space, whatever its number of devices),
//! attached and detached here and nowhere else. A region that drops unmaps itself from every
//! address space first.
//!
//! The region's attached list is the one place that says which address space's listener
//! follows which view of the region; the state manager's registrations only deliver the notifications. They
//! change in step, under the region's conversion lock: in `attach` and `detach`, and when a
//! failed rollback makes the manager drop a listener, which comes back on the conversion's stack
//! (`TransactionError::RollbackFailed`) and is applied by `cut_off`. A listener that leaves while
//! its IOMMU still maps something (unmaps that failed) is kept as *departed*: its stale mappings
//! stay reported by [`Region::stale_mappings`], block conversions to private over them, and are
//! retried before every conversion until they are gone. How a conversion runs is in
//! [`crate::conversion`].

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use discard_manager::{
    Counts, DiscardManager, GpaRange, ListenerId, RegionConfig, Run, View, ViewListener,
};
use iommu::FileMapSupport;

use crate::backing::{FileKind, RegionBacking};
use crate::device::{AttachError, DeviceConfig, DeviceId, MapBy};
use crate::dma::{DmaListener, ListenerConfig, MappingUnit};
use crate::lock;
use crate::policy::{DiscardPolicy, Discarder, FlushReport, HeldBack};
use crate::range_set::RangeSet;
use crate::space::AddressSpace;

/// One address space's listener on one region (shared by every device in the address space).
pub(crate) struct Attached {
    pub(crate) space: Arc<AddressSpace>,
    pub(crate) view: View,
    pub(crate) id: ListenerId,
    pub(crate) listener: Arc<DmaListener>,
}

pub(crate) fn view_bit(view: View) -> u8 {
    match view {
        View::Shared => 1,
        View::Private => 2,
    }
}

/// A listener no longer registered (its device was detached, or a failed rollback cut it off)
/// whose IOMMU still maps granules of the region: kept, retried and reported until a retry
/// removed them. It holds the ledger and the backing, so the memory outlives the mappings.
struct Departed {
    name: String,
    listener: Arc<DmaListener>,
}

/// A region's device list, locked for a change; when dropped, updates which views have a
/// device with a mapping budget.
pub(crate) struct AttachedMut<'a> {
    list: MutexGuard<'a, Vec<Attached>>,
    budgeted: &'a AtomicU8,
}

impl Deref for AttachedMut<'_> {
    type Target = Vec<Attached>;

    fn deref(&self) -> &Vec<Attached> {
        &self.list
    }
}

impl DerefMut for AttachedMut<'_> {
    fn deref_mut(&mut self) -> &mut Vec<Attached> {
        &mut self.list
    }
}

impl Drop for AttachedMut<'_> {
    fn drop(&mut self) {
        let bits = self
            .list
            .iter()
            .filter(|a| a.space.budgeted())
            .fold(0, |bits, a| bits | view_bit(a.view));
        self.budgeted.store(bits, Ordering::Release);
    }
}

/// A region's state manager without its transactions: what a VMM may read and who else may
/// listen (see [`discard_manager::DiscardManager`] for each call). A conversion through the
/// manager itself would leave KVM and the backings behind, so it is not offered.
#[derive(Clone, Copy)]
pub struct RegionState<'a>(&'a DiscardManager);

impl std::fmt::Debug for RegionState<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RegionState")
            .field(&self.0.region())
            .finish()
    }
}

impl RegionState<'_> {
    /// Maximal runs of combined state in `range`, clipped to it, in address order.
    ///
    /// # Errors
    /// See [`DiscardManager::runs`].
    pub fn runs(&self, range: GpaRange) -> Result<Vec<Run>, discard_manager::Error> {
        self.0.runs(range)
    }

    /// Maximal runs of `view` in `range`, clipped to it, in address order.
    ///
    /// # Errors
    /// See [`DiscardManager::view_runs`].
    pub fn view_runs(
        &self,
        view: View,
        range: GpaRange,
    ) -> Result<Vec<GpaRange>, discard_manager::Error> {
        self.0.view_runs(view, range)
    }

    /// Whether every granule of `range` is in `view`.
    ///
    /// # Errors
    /// See [`DiscardManager::is_populated`].
    pub fn is_populated(
        &self,
        view: View,
        range: GpaRange,
    ) -> Result<bool, discard_manager::Error> {
        self.0.is_populated(view, range)
    }

    /// Byte totals and number of runs.
    ///
    /// # Errors
    /// See [`DiscardManager::counts`].
    pub fn counts(&self) -> Result<Counts, discard_manager::Error> {
        self.0.counts()
    }

    /// Registers a listener that is not a device (migration, say) and replays the view to it.
    ///
    /// # Errors
    /// See [`DiscardManager::register`].
    pub fn register(
        &self,
        view: View,
        range: GpaRange,
        listener: Arc<dyn ViewListener>,
    ) -> Result<ListenerId, discard_manager::Error> {
        self.0.register(view, range, listener)
    }

    /// Unregisters a listener registered with [`RegionState::register`].
    ///
    /// # Errors
    /// See [`DiscardManager::unregister`].
    pub fn unregister(&self, id: ListenerId) -> Result<(), discard_manager::Error> {
        self.0.unregister(id)
    }
}

/// One guest RAM region: its state manager, backing, discard policy and device listeners.
pub struct Region {
    // Drop order: the manager (holding the listeners, which hold the ledgers) before the
    // backing whose memory the ledgers map.
    pub(crate) manager: DiscardManager,
    attached: Mutex<Vec<Attached>>,
    /// Bit per view ([`view_bit`]): a device listening to it has a mapping budget. Kept by
    /// [`AttachedMut`] whenever the device list changes, so a conversion need not walk it.
    pub(crate) budgeted: AtomicU8,
    backing: Arc<RegionBacking>,
    granularity: u64,
    /// Serialises conversions, attach and detach on this region, and guards the held-back
    /// frees (the discard policy's state).
    conversion_lock: Mutex<Discarder>,
    departed: Mutex<Vec<Departed>>,
    /// Set whenever a listener of the region may have added to its stale set: by a failed
    /// conversion or a detach, which is where an unmap can fail (the failure comes back on
    /// their stack). Cleared by a retry that leaves nothing stale. Lets a conversion skip
    /// the walk over the listeners in the common case.
    maybe_stale: AtomicBool,
    /// Ranges whose KVM attribute may disagree with the state manager (setting it back after
    /// a failed conversion failed), repaired by the next conversion ([`Region::resync`]).
    unsynced: Mutex<RangeSet>,
    /// `unsynced` is not empty (read without its lock on every conversion).
    maybe_unsynced: AtomicBool,
    /// Set under the conversion lock when the region leaves guest RAM
    /// ([`crate::GuestRam::remove_region`]): a request that found the region before then and
    /// waited for the lock is refused.
    pub(crate) removed: AtomicBool,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("range", &self.manager.region())
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

impl Region {
    pub(crate) fn new(
        backing: RegionBacking,
        config: RegionConfig,
        policy: DiscardPolicy,
    ) -> Result<Self, discard_manager::ConfigError> {
        let manager = DiscardManager::new(config)?;
        let discarder = Discarder::new(policy, &backing);
        Ok(Self {
            manager,
            attached: Mutex::new(Vec::new()),
            budgeted: AtomicU8::new(0),
            backing: Arc::new(backing),
            granularity: config.granularity,
            conversion_lock: Mutex::new(discarder),
            departed: Mutex::new(Vec::new()),
            maybe_stale: AtomicBool::new(false),
            unsynced: Mutex::new(RangeSet::new()),
            maybe_unsynced: AtomicBool::new(false),
            removed: AtomicBool::new(false),
        })
    }

    /// The region's state, for queries and for listeners other than devices (migration);
    /// conversions go through [`crate::GuestRam::convert`], so that KVM and the backings follow.
    pub fn state(&self) -> RegionState<'_> {
        RegionState(&self.manager)
    }

    /// The backing.
    pub fn backing(&self) -> &Arc<RegionBacking> {
        &self.backing
    }

    /// The region's guest range.
    pub fn range(&self) -> GpaRange {
        self.manager.region()
    }

    /// The granularity of state, of conversions, and of every DMA mapping on a device that
    /// cannot cut mappings (one that can maps whole runs: [`crate::dma`]).
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// The discard policy.
    pub fn policy(&self) -> DiscardPolicy {
        self.conversion_lock().policy()
    }

    /// Backing held back right now.
    pub fn held_back(&self) -> HeldBack {
        self.conversion_lock().held()
    }

    /// True when all of `range` of `side` is held back (may be backed on both sides).
    pub fn holds(&self, side: View, range: GpaRange) -> bool {
        self.conversion_lock()
            .holds(side, range.start(), range.end())
    }

    /// Frees everything held back now.
    pub fn flush(&self) -> FlushReport {
        self.conversion_lock().flush(&self.backing)
    }

    /// The conversion lock, and the held-back frees it guards.
    pub(crate) fn conversion_lock(&self) -> MutexGuard<'_, Discarder> {
        lock(&self.conversion_lock)
    }

    pub(crate) fn attached(&self) -> MutexGuard<'_, Vec<Attached>> {
        lock(&self.attached)
    }

    /// The device list, to change it.
    pub(crate) fn attached_mut(&self) -> AttachedMut<'_> {
        AttachedMut {
            list: lock(&self.attached),
            budgeted: &self.budgeted,
        }
    }

    /// GPA ranges that device `name`'s IOMMU still maps although the state
    /// manager discarded them (unmaps that failed and will be retried), attached devices
    /// first, then devices detached since (named `"<name> (detached)"`).
    pub fn stale_mappings(&self) -> Vec<(String, Vec<GpaRange>)> {
        // Every device of an address space reaches what its one listener left mapped.
        let attached = self
            .attached()
            .iter()
            .flat_map(|a| {
                let stale = a.listener.stale_ranges();
                let members = a.space.members();
                let names = if members.is_empty() {
                    vec![a.space.name()]
                } else {
                    members.into_iter().map(|(_, n)| n).collect()
                };
                names.into_iter().map(move |n| (n, stale.clone()))
            })
            .collect::<Vec<_>>();
        let departed = lock(&self.departed)
            .iter()
            .map(|d| (format!("{} (detached)", d.name), d.listener.stale_ranges()))
            .collect::<Vec<_>>();
        attached
            .into_iter()
            .chain(departed)
            .filter(|(_, stale)| !stale.is_empty())
            .collect()
    }

    /// A listener of the region may have added to its stale set.
    pub(crate) fn mark_maybe_stale(&self) {
        self.maybe_stale.store(true, Ordering::Release);
    }

    /// Retries the unmap of every stale granule, of attached and departed listeners (a
    /// departed one with nothing left is dropped). Returns true when some are still stale.
    #[inline]
    pub(crate) fn retry_stale(&self) -> bool {
        // The common case: nothing failed since the last retry left every set empty.
        self.maybe_stale.swap(false, Ordering::AcqRel) && self.retry_stale_listeners()
    }

    #[cold]
    fn retry_stale_listeners(&self) -> bool {
        let mut stale = false;
        for a in self.attached().iter() {
            stale |= a.listener.retry_stale() > 0;
        }
        let mut departed = lock(&self.departed);
        departed.retain(|d| d.listener.retry_stale() > 0);
        stale |= !departed.is_empty();
        if stale {
            self.mark_maybe_stale();
        }
        stale
    }

    /// The first device (attached or departed) whose stale mappings overlap `range`.
    pub(crate) fn stale_in(&self, range: GpaRange) -> Option<String> {
        let attached = self
            .attached()
            .iter()
            .find(|a| a.listener.stale_overlaps(range))
            .map(|a| a.space.name());
        attached.or_else(|| {
            lock(&self.departed)
                .iter()
                .find(|d| d.listener.stale_overlaps(range))
                .map(|d| d.name.clone())
        })
    }

    /// Forgets the departed listeners of `space`, which maps nothing any more: their stale sets
    /// name nothing, and a retry through the shared ledger must never unmap what a listener of
    /// the same address space attached since maps.
    pub(crate) fn forget_departed(&self, space: &Arc<AddressSpace>) {
        lock(&self.departed).retain(|d| !Arc::ptr_eq(d.listener.space(), space));
    }

    /// Records that KVM's attribute of `range` may disagree with the state manager.
    pub(crate) fn mark_unsynced(&self, range: GpaRange) {
        lock(&self.unsynced).insert(range.start(), range.end());
        self.maybe_unsynced.store(true, Ordering::Release);
    }

    /// Sets KVM's attribute of every range marked unsynced back to what the state manager
    /// says, so that a request the manager sees as a no-op (the guest's fault on a page KVM
    /// got wrong) still makes KVM agree. Returns the first range overlapping `request` that it
    /// could not repair (it stays marked; one elsewhere does not hold up this request).
    pub(crate) fn resync(
        &self,
        attributes: &dyn crate::MemoryAttributes,
        request: GpaRange,
    ) -> Result<(), (GpaRange, crate::AttributeError)> {
        if !self.maybe_unsynced.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut unsynced = lock(&self.unsynced);
        let extents: Vec<(u64, u64)> = unsynced.iter().collect();
        let mut first_failure = None;
        for (start, end) in extents {
            let Some(extent) = GpaRange::new(start, end - start) else {
                continue;
            };
            let Ok(runs) = self.manager.runs(extent) else {
                continue;
            };
            for run in runs {
                match attributes.set(run.range, run.attribute) {
                    Ok(()) => unsynced.remove(run.range.start(), run.range.end()),
                    Err(e) if run.range.intersect(&request).is_some() => {
                        first_failure.get_or_insert((run.range, e));
                    }
                    Err(e) => log::warn!("KVM attribute of {} still disagrees: {e}", run.range),
                }
            }
        }
        self.maybe_unsynced
            .store(!unsynced.is_empty(), Ordering::Release);
        first_failure.map_or(Ok(()), Err)
    }

    /// Forgets the listeners a failed rollback unregistered (the state manager did already):
    /// those whose IOMMU still maps something are kept as departed. Returns the address spaces
    /// among them: listener, the devices in it, its name.
    pub(crate) fn cut_off(
        &self,
        listeners: &[ListenerId],
    ) -> Vec<(ListenerId, Vec<DeviceId>, String)> {
        let gone: Vec<Attached> = {
            let mut attached = self.attached_mut();
            let (gone, rest) = attached.drain(..).partition(|a| listeners.contains(&a.id));
            *attached = rest;
            gone
        };
        self.mark_maybe_stale();
        gone.into_iter()
            .map(|a| {
                let name = a.space.name();
                self.depart(&name, &a.listener);
                let devices = a.space.cut().into_iter().map(|(id, _)| id).collect();
                (a.id, devices, name)
            })
            .collect()
    }

    /// Keeps a listener that left while its IOMMU still maps something of the region;
    /// returns true if it does.
    fn depart(&self, name: &str, listener: &Arc<DmaListener>) -> bool {
        let stale = listener.stale_bytes() > 0;
        if stale {
            lock(&self.departed).push(Departed {
                name: name.to_string(),
                listener: Arc::clone(listener),
            });
        }
        stale
    }

    /// Checks that `space`'s backend can map what its configuration asks for in this region
    /// (device `device` asks): a kernel that cannot is refused at attach, never in the middle
    /// of a conversion.
    pub(crate) fn check_space(
        &self,
        space: &AddressSpace,
        device: &str,
    ) -> Result<(), AttachError> {
        let caps = space.ledger.capabilities();
        let name = || device.to_string();
        let unsupported = |what| AttachError::Unsupported {
            device: name(),
            kind: caps.kind,
            what,
        };
        match space.config {
            DeviceConfig::TrustedIo { .. } if caps.map_file != FileMapSupport::AnyFile => {
                return Err(unsupported(
                    "map guest_memfd by file for a trusted-IO (private view) device",
                ));
            }
            DeviceConfig::Shared {
                map_by: MapBy::File,
                ..
            } if caps.map_file == FileMapSupport::None => {
                return Err(unsupported("map by file descriptor"));
            }
            DeviceConfig::Shared {
                map_by: MapBy::File,
                ..
            } if self.backing.shared_kind() == FileKind::GuestMemfd
                && caps.map_file != FileMapSupport::AnyFile =>
            {
                return Err(unsupported(
                    "map a guest_memfd by file (mainline accepts memfd and hugetlbfs only)",
                ));
            }
            _ => {}
        }
        let page_size = space.ledger.page_size();
        if self.granularity % page_size != 0 {
            return Err(AttachError::Granularity {
                device: name(),
                granularity: self.granularity,
                page_size,
            });
        }
        let range = self.range();
        let offset = space.config.iova_offset();
        // No list (type1 without the IOVA-range capability) means unrestricted, as the ledger
        // treats it; the GPA + offset must still not wrap.
        let inside = range
            .start()
            .checked_add(offset)
            .and_then(|iova| iova.checked_add(range.len() - 1).map(|_| iova))
            .is_some_and(|iova| {
                caps.iova_ranges.is_empty()
                    || caps
                        .iova_ranges
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

    /// Attaches address space `space` (device `device` asks): checks it, then registers its
    /// listener for its view, which maps what the view holds now (the replay). The space holds
    /// the region's backing from now on, until it maps nothing of it.
    ///
    /// # Errors
    /// [`AttachError`]; nothing of the address space stays registered here, and nothing stays
    /// mapped unless an unmap undoing the replay failed (then it is tracked as stale).
    pub(crate) fn attach(
        &self,
        space: &Arc<AddressSpace>,
        device: &str,
    ) -> Result<(), AttachError> {
        self.check_space(space, device)?;
        // The conversion lock: a conversion's budget check and its transaction see either all
        // of this address space or none of it. The budget lock: no other region's conversion
        // spends the budget between the check and the replay's maps.
        let _conversions = self.conversion_lock();
        let _budget = space.budgeted().then(|| space.budget());
        let range = self.range();
        let view = space.config.view();
        let replay_failed = |source| AttachError::Replay {
            device: device.to_string(),
            view,
            range,
            source,
        };
        let populated = self.manager.view_runs(view, range).map_err(replay_failed)?;
        let needed =
            MappingUnit::of(space.ledger.capabilities(), self.granularity).count(&populated);
        space
            .ledger
            .check_budget(needed)
            .map_err(|source| AttachError::Budget {
                device: device.to_string(),
                range,
                needed,
                source,
            })?;
        space.hold(&self.backing);
        let listener = Arc::new(DmaListener::new(
            ListenerConfig {
                device: space.name(),
                view,
                map_by: space.config.map_by(),
                iova_offset: space.config.iova_offset(),
                granularity: self.granularity,
                prot: space.config.prot(),
            },
            Arc::clone(space),
            Arc::clone(&self.backing),
        ));
        let id = self
            .manager
            .register(view, range, listener.clone())
            .map_err(|source| {
                // A replay whose undo failed leaves mappings: tracked until removed.
                if self.depart(device, &listener) {
                    self.mark_maybe_stale();
                }
                space.release_unmapped();
                replay_failed(source)
            })?;
        self.attached_mut().push(Attached {
            space: Arc::clone(space),
            view,
            id,
            listener,
        });
        Ok(())
    }

    /// Detaches address space `space`: unregisters its listener (which unmaps its view) and
    /// forgets it. Returns the bytes it still maps because unmaps failed: those stay tracked
    /// here (see [`Region::stale_mappings`]) until a retry removes them.
    pub(crate) fn detach(&self, space: &Arc<AddressSpace>) -> u64 {
        let _conversions = self.conversion_lock();
        self.detach_locked(|a| Arc::ptr_eq(&a.space, space))
    }

    /// [`Region::detach`] of every address space `which` picks, the conversion lock held.
    pub(crate) fn detach_locked(&self, which: impl Fn(&Attached) -> bool) -> u64 {
        let mine: Vec<Attached> = {
            let mut attached = self.attached_mut();
            let (mine, rest) = attached.drain(..).partition(|a| which(a));
            *attached = rest;
            mine
        };
        let mut stale = 0;
        for a in mine {
            let left = self.unregister(&a);
            if left > 0 {
                stale += left;
                self.mark_maybe_stale();
            }
            self.depart(&a.space.name(), &a.listener);
            a.space.release_unmapped();
        }
        stale
    }

    /// Unregisters `a`'s listener (which unmaps its view), then retries once what failed to
    /// unmap; returns the bytes still mapped.
    fn unregister(&self, a: &Attached) -> u64 {
        if let Err(e) = self.manager.unregister(a.id) {
            log::warn!(
                "{}: unregistering from {} failed: {e}",
                a.space.name(),
                self.range()
            );
        }
        a.listener.retry_stale()
    }
}

impl Drop for Region {
    /// Unmaps the region from every address space before its backing can go: what an address
    /// space cannot unmap keeps the backing alive through the address space (see
    /// [`crate::space`]), so dropping regions in any order never leaves a device reaching
    /// freed memory.
    fn drop(&mut self) {
        let attached: Vec<Attached> = self.attached_mut().drain(..).collect();
        for a in attached {
            self.unregister(&a);
            let space = Arc::clone(&a.space);
            drop(a);
            space.release_unmapped();
        }
    }
}
