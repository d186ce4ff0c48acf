//! Guest memory as a VMM manages it besides conversions: virtio-mem plug and unplug, and the
//! removal of a whole region (DIMM unplug).
//!
//! # Plug and unplug
//! Both run under the region's conversion lock, as transactions of the state manager
//! ([`discard_manager::DiscardManager::plug_with`], [`unplug_with`]), so they are all or nothing
//! like a conversion (see [`crate::conversion`]) and never interleave with one:
//!
//! - **Unplug** of a range: every device unmaps what it maps of it, in both views (the
//!   transaction's discards; an unmap that fails rolls the unplug back,
//!   [`ConversionError::Unmap`]); then both backings of the granules that were plugged are
//!   freed. Unplugged memory is gone: nothing of it is held back, whatever the discard policy
//!   (a free that fails is held and retried at the next flush, so the held-back figures stay
//!   exact). Nothing outside the range is unmapped or freed. A range a device still maps because
//!   an earlier unmap failed is refused ([`ConversionError::StaleMapping`]): its memory would be
//!   freed under the mapping.
//! - **Plug** of a range: its unplugged granules join the view of the attribute the VMM asks for,
//!   or the region's initial attribute (private on a confidential VM). Every device of that
//!   view must have room for the new mappings first ([`ConversionError::MappingBudget`]); KVM's
//!   attribute is set in the transaction's step, the devices map the granules, and a failure
//!   anywhere rolls all of it back. Plugged granules in the range are left as they are.
//!
//! A conversion of a range holding unplugged granules is refused
//! ([`ConversionError::Unplugged`]): the guest must not convert memory it has not been given.
//!
//! [`unplug_with`]: discard_manager::DiscardManager::unplug_with
//!
//! # Removing a region
//! [`GuestRam::remove_region`] takes the device list, then the region's conversion lock (so it
//! waits for a conversion running on the region; one that was waiting for the region is refused
//! with [`ConversionError::Removed`]), takes the region out of guest RAM, unmaps it from every
//! address space, deletes the memslot the backing is bound to ([`RegionBacking::bind`];
//! through the VM fd the backing keeps), and frees the backing. If unmaps fail, the mappings
//! left name the region's memory: each address space that still maps it keeps holding the
//! backing (see [`crate::space`]: released once its ledger maps nothing of it, leaked if its
//! last unmap fails), nothing is freed, and the error lists what stays mapped.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use discard_manager::{Attribute, Change, GpaRange, Run, TransactionStep, View};

use crate::attributes::{AttributeError, MemoryAttributes};
use crate::backing::{BackingError, RegionBacking};
use crate::conversion::{AttributeStep, ConversionError};
use crate::host::BackingModel;
use crate::lock;
use crate::policy::{FlushReport, HeldBack};
use crate::ram::GuestRam;
use crate::region::Region;

/// What a successful plug or unplug did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Plugging {
    change: Change,
    /// Frees made by an unplug (nothing for a plug).
    pub flushed: FlushReport,
    /// Backing the region holds back after it.
    pub held: HeldBack,
}

impl Plugging {
    /// The runs whose plug state changed, in address order (empty when the range already had
    /// it).
    pub fn runs(&self) -> &[GpaRange] {
        self.change.runs()
    }

    /// The state manager's whole change: the runs, and the view runs discarded and populated.
    pub fn change(&self) -> &Change {
        &self.change
    }

    /// Bytes whose plug state changed.
    pub fn bytes(&self) -> u64 {
        self.change.bytes()
    }
}

/// The step of a plug: the KVM attribute of the unplugged runs that had the other attribute
/// (their state-manager attribute was changed just before, without notifications).
struct PlugStep<'a> {
    attributes: AttributeStep<'a>,
    runs: Vec<GpaRange>,
}

impl TransactionStep for PlugStep<'_> {
    type Error = AttributeError;

    fn apply(&mut self, _change: &Change) -> Result<(), AttributeError> {
        self.attributes.set_runs(&self.runs)
    }

    fn undo(&mut self, _change: &Change) {
        self.attributes.set_back(&self.runs);
    }
}

fn manager_error(e: discard_manager::Error) -> ConversionError {
    match e {
        discard_manager::Error::Range(r) => ConversionError::Range(r),
        other => ConversionError::Manager(Box::new(other)),
    }
}

impl Region {
    /// Refuses a request on a removed region, or a conversion over unplugged granules.
    pub(crate) fn refuse_unplugged_or_removed(
        &self,
        range: GpaRange,
    ) -> Result<(), ConversionError> {
        if self.removed.load(Ordering::Acquire) {
            return Err(ConversionError::Removed { range });
        }
        // O(1), so that a region without unplugged memory pays no walk.
        let counts = self.manager.counts().map_err(manager_error)?;
        if counts.unplugged_bytes == 0 {
            return Ok(());
        }
        match self
            .manager
            .runs(range)
            .map_err(manager_error)?
            .iter()
            .find(|r| !r.plugged)
        {
            Some(r) => Err(ConversionError::Unplugged {
                range,
                unplugged: r.range,
            }),
            None => Ok(()),
        }
    }

    /// Plugs the unplugged granules of `range` with attribute `to`; see the [module
    /// docs](self).
    pub(crate) fn plug(
        &self,
        range: GpaRange,
        to: Attribute,
        attributes: &dyn MemoryAttributes,
    ) -> Result<Plugging, ConversionError> {
        let mut discarder = self.conversion_lock();
        if self.removed.load(Ordering::Acquire) {
            return Err(ConversionError::Removed { range });
        }
        self.retry_stale();
        self.resync(attributes, range)
            .map_err(|(range, source)| ConversionError::AttributeRollback { range, source })?;
        let unplugged: Vec<Run> = self
            .manager
            .runs(range)
            .map_err(manager_error)?
            .into_iter()
            .filter(|r| !r.plugged)
            .collect();
        // As for a conversion: the budget locks cover the check and every map the plug makes.
        let budgeted = self.budgeted_spaces();
        let _budgets: Vec<_> = budgeted.iter().map(|s| s.budget()).collect();
        let joining: Vec<GpaRange> = unplugged.iter().map(|r| r.range).collect();
        self.check_room(to.view(), range, &joining)?;
        // Unplugged granules change attribute without notifications; KVM follows in the step.
        let flip: Vec<GpaRange> = unplugged
            .iter()
            .filter(|r| r.attribute != to)
            .map(|r| r.range)
            .collect();
        let from = crate::conversion::opposite(to);
        for (i, &r) in flip.iter().enumerate() {
            if let Err(e) = self.manager.convert(r, to) {
                self.set_unplugged_attribute(&flip[..i], from);
                return Err(ConversionError::Manager(Box::new(e)));
            }
        }
        // Run by run, never over their span: plugged granules between them may have the
        // other attribute.
        let mut step = PlugStep {
            attributes: AttributeStep::new(attributes, to, false),
            runs: flip,
        };
        let change = match self.manager.plug_with(range, &mut step) {
            Ok(change) => change,
            Err(e) => {
                self.set_unplugged_attribute(&step.runs, from);
                if to == Attribute::Private {
                    for &r in &joining {
                        discarder.failed_to_private(r);
                    }
                }
                return Err(self.transaction_failed(range, &mut step.attributes, e));
            }
        };
        discarder.plugged(change.runs(), to);
        Ok(Plugging {
            change,
            flushed: FlushReport::default(),
            held: discarder.held(),
        })
    }

    /// Sets the state manager's attribute of unplugged `runs` back (no listener hears of it).
    fn set_unplugged_attribute(&self, runs: &[GpaRange], to: Attribute) {
        for &r in runs {
            if let Err(e) = self.manager.convert(r, to) {
                log::error!("setting unplugged {r} back to {to:?} failed: {e}");
            }
        }
    }

    /// Unplugs `range`: unmaps it from every device and frees both backings of it; see the
    /// [module docs](self).
    pub(crate) fn unplug(
        &self,
        range: GpaRange,
        attributes: &dyn MemoryAttributes,
    ) -> Result<Plugging, ConversionError> {
        let mut discarder = self.conversion_lock();
        if self.removed.load(Ordering::Acquire) {
            return Err(ConversionError::Removed { range });
        }
        if self.retry_stale() {
            self.refuse_stale(range)?;
        }
        // The attribute does not change: the step sets nothing.
        let mut step = PlugStep {
            attributes: AttributeStep::new(attributes, Attribute::Shared, false),
            runs: Vec::new(),
        };
        let change = match self.manager.unplug_with(range, &mut step) {
            Ok(change) => change,
            Err(e) => return Err(self.transaction_failed(range, &mut step.attributes, e)),
        };
        let one_file = self.backing().model() == BackingModel::InPlace;
        let private: Vec<GpaRange> = change
            .discarded()
            .iter()
            .filter(|vr| vr.view == View::Private)
            .map(|vr| vr.range)
            .collect();
        let flushed = discarder.unplugged(self.backing(), change.runs(), &private, one_file);
        Ok(Plugging {
            change,
            flushed,
            held: discarder.held(),
        })
    }
}

/// What removing a region did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Removal {
    /// Devices whose mappings of the region were removed.
    pub devices: usize,
    /// Bytes of backing freed (both sides of the whole region).
    pub freed_bytes: u64,
}

/// Removing a region failed or was incomplete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemovalError {
    /// No region of guest RAM is exactly `range`.
    #[error("no guest RAM region is {range}")]
    NoRegion {
        /// The range asked for.
        range: GpaRange,
    },
    /// Devices still map the region after their unmaps failed. The region left guest RAM
    /// and its memslot was deleted, but its backing is kept by the address spaces that still
    /// map it (until their ledgers map nothing of it), and nothing was freed.
    #[error("the region {range} left guest RAM but devices still map it: {}", .stale.iter().map(|(d, _)| d.as_str()).collect::<Vec<_>>().join(", "))]
    StillMapped {
        /// The region.
        range: GpaRange,
        /// Device name and the ranges it still maps.
        stale: Vec<(String, Vec<GpaRange>)>,
    },
    /// Deleting the memslot failed: KVM may still use the memory, so nothing was freed; the
    /// backing tries again when it drops, and leaks its mapping if that fails too. The region
    /// left guest RAM and no device maps it.
    #[error("deleting the memslot of region {range} failed")]
    Memslot {
        /// The region.
        range: GpaRange,
        /// Why.
        #[source]
        source: BackingError,
    },
}

impl GuestRam {
    /// Plugs the unplugged granules of `range` (inside one region), virtio-mem style: they
    /// become usable with `attribute`, or with the region's initial attribute when `None`
    /// (private on a confidential VM). See [`crate::plug`] for the order.
    ///
    /// # Errors
    /// [`ConversionError`] naming the step; unless it says otherwise nothing changed.
    pub fn plug(
        &self,
        range: GpaRange,
        attribute: Option<Attribute>,
    ) -> Result<Plugging, ConversionError> {
        let region = self
            .region_of(range)
            .ok_or(ConversionError::NoRegion { range })?;
        let to = attribute.unwrap_or(region.manager.config().initial_attribute);
        self.detach_cut_off(region.plug(range, to, &**self.attributes()))
    }

    /// Unplugs `range` (inside one region): every device unmaps it, both backings of it are
    /// freed. See [`crate::plug`] for the order.
    ///
    /// # Errors
    /// [`ConversionError`] naming the step; unless it says otherwise nothing changed.
    pub fn unplug(&self, range: GpaRange) -> Result<Plugging, ConversionError> {
        let region = self
            .region_of(range)
            .ok_or(ConversionError::NoRegion { range })?;
        self.detach_cut_off(region.unplug(range, &**self.attributes()))
    }

    /// The state of the granule holding `gpa` (its attribute and whether it is plugged), or
    /// `None` outside guest RAM: the cheap check a VMM makes before touching guest memory
    /// through its own objects (a private or unplugged page is not the VMM's to touch).
    pub fn page_state(&self, gpa: u64) -> Option<Run> {
        let region = self.region_of(GpaRange::new(gpa, 1)?)?;
        let granule = gpa & !(region.granularity() - 1);
        let range = GpaRange::new(granule, region.granularity())?;
        region.manager.runs(range).ok()?.first().copied()
    }

    /// True when `gpa` is guest RAM whose granule is private.
    pub fn is_private(&self, gpa: u64) -> bool {
        self.page_state(gpa)
            .is_some_and(|r| r.attribute == Attribute::Private)
    }

    /// Removes the region that is exactly `range` (a DIMM unplug): unmaps it from every
    /// address space, deletes the KVM memslot its backing is bound to (if
    /// [`RegionBacking::bind`] bound one), and frees its backing, even while the VMM still
    /// holds the backing. Waits for
    /// a conversion running on the region; requests still waiting for it are refused with
    /// [`ConversionError::Removed`]. See [`crate::plug`].
    ///
    /// # Errors
    /// [`RemovalError`]; except for `NoRegion`, the region has left guest RAM, and what the
    /// error names is kept alive so that no mapping outlives the memory it names.
    pub fn remove_region(&self, range: GpaRange) -> Result<Removal, RemovalError> {
        let _devices = lock(&self.devices);
        let region = self
            .regions()
            .into_iter()
            .find(|r| r.range() == range)
            .ok_or(RemovalError::NoRegion { range })?;
        let mut discarder = region.conversion_lock();
        region.removed.store(true, Ordering::Release);
        self.regions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|r| !Arc::ptr_eq(r, &region));
        region.retry_stale();
        let attached = region.attached().len();
        region.detach_locked(|_| true);
        let stale = region.stale_mappings();
        let memslot_result = region.backing().delete_memslot();
        // KVM keeps attributes of GPAs without a memslot: leave the range as a new region
        // expects to find it.
        if let Err(e) = self.attributes().set(range, Attribute::Shared) {
            log::warn!("removed region {range}: resetting its KVM attribute failed: {e}");
        }
        if !stale.is_empty() {
            // The address spaces that still map the region hold its backing (they took it
            // when they attached, and let it go only once their ledger maps none of it).
            return Err(RemovalError::StillMapped { range, stale });
        }
        if let Err(source) = memslot_result {
            return Err(RemovalError::Memslot { range, source });
        }
        discarder.forget();
        let freed_bytes = free_whole(region.backing(), range);
        log::info!(
            "removed region {range}: {attached} device listener(s), {freed_bytes} bytes freed"
        );
        Ok(Removal {
            devices: attached,
            freed_bytes,
        })
    }
}

/// Frees both sides of a removed region now, whoever still holds the backing (the VMM's own
/// memory objects, say): it is no longer guest RAM. Returns the bytes freed.
fn free_whole(backing: &RegionBacking, range: GpaRange) -> u64 {
    let sides: &[View] = match backing.model() {
        BackingModel::InPlace => &[View::Shared],
        BackingModel::Classic => &[View::Shared, View::Private],
    };
    let mut freed = 0;
    for &side in sides {
        match backing.punch_hole(side, range) {
            Ok(()) => freed += range.len(),
            Err(e) => log::warn!("removed region {range}: {e}; freed when the backing drops"),
        }
    }
    freed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiscardPolicy, RecordingAttributes, RegionSpec};

    #[test]
    fn a_request_that_found_the_region_before_its_removal_is_refused() {
        let attrs = Arc::new(RecordingAttributes::new());
        let ram = GuestRam::new(attrs.clone());
        let spec = RegionSpec {
            granularity: 4096,
            initial: Attribute::Private,
            policy: DiscardPolicy::Eager,
            initially_plugged: true,
        };
        let backing = RegionBacking::software(0x10_0000, 0x10000).unwrap();
        let region = ram.add_region(backing, spec).unwrap();
        // A vCPU found the region (GuestRam::convert's lookup), then the removal ran first.
        let found = ram.region_of(region.range()).unwrap();
        ram.remove_region(region.range()).unwrap();
        let r = GpaRange::new(0x10_0000, 0x1000).unwrap();
        let err = found.convert(r, Attribute::Shared, &*attrs).unwrap_err();
        assert!(matches!(err, ConversionError::Removed { .. }), "{err:?}");
        let err = found.plug(r, Attribute::Shared, &*attrs).unwrap_err();
        assert!(matches!(err, ConversionError::Removed { .. }), "{err:?}");
        let err = found.unplug(r, &*attrs).unwrap_err();
        assert!(matches!(err, ConversionError::Removed { .. }), "{err:?}");
        assert!(matches!(
            ram.remove_region(region.range()),
            Err(RemovalError::NoRegion { .. })
        ));
    }
}
