//! The conversion procedure: the order of the steps of a conversion, what is undone when one
//! fails, and when backing memory is freed.
//!
//! # Order of a conversion of `range` to `to`
//! Under the region's conversion lock:
//!
//! 0. **Refuse** a range holding unplugged granules ([`ConversionError::Unplugged`]: the guest
//!    has not been given that memory) or a region removed while the request waited for it
//!    ([`ConversionError::Removed`]); see [`crate::plug`].
//!
//!    **Catch up.** Unmaps that failed earlier (stale mappings: [`Region::stale_mappings`]) are retried,
//!    also those of devices detached since. A conversion to private of a range that a device
//!    still maps this way is refused ([`ConversionError::StaleMapping`]): it would otherwise
//!    "succeed" with the page mapped. KVM attributes that an earlier failed rollback could not
//!    set back are set to what the state manager says ([`ConversionError::AttributeRollback`]
//!    if KVM still refuses), so a request the manager sees as a no-op (the guest's fault on a
//!    page KVM got wrong) still repairs KVM and the guest does not fault forever.
//! 1. **Budget.** Every device listening to the gaining view must have room for the mappings
//!    the joining granules become ([`iommu::Ledger::check_budget`]): one per granule where its
//!    address space cannot cut a mapping (type1 allows 65535 per container), one per run where
//!    it can ([`crate::dma`]).
//!    A conversion that would not fit is refused here, before anything changed.
//! 2. **Transaction** ([`discard_manager::DiscardManager::convert_with`]), on exactly the
//!    granules whose attribute changes:
//!    1. *discard the losing view*: every device unmaps those granules (to private: the shared
//!       view's DMA mappings go first, as TDX requires and in-place conversion enforces). An
//!       unmap that fails fails its discard, and the manager then skips 2.2 and 2.3 and
//!       re-populates the losing view: nothing changed ([`ConversionError::Unmap`]);
//!    2. *the attribute step* (`AttributeStep`): set the KVM attribute;
//!    3. *populate the gaining view*: devices map the granules (to shared: mapped after the
//!       attribute, so a device never maps a page the guest still treats as private).
//!
//!    A failure in 2.3 makes the manager discard what 2.3 mapped, undo the attribute step (the
//!    KVM attribute goes back), and re-populate the losing view. A device that cannot
//!    re-populate it is cut off ([`ConversionError::RollbackFailed`]); what its IOMMU still maps
//!    stays tracked as stale.
//!    A failed conversion to shared of a classic backing then frees the shared-side pages of
//!    the range that are private again and not held back: pinning for DMA (type1, IOMMUFD,
//!    no-IOMMU's mlock) faulted them in for the maps the rollback removed. A free that fails is
//!    held back and reported.
//! 3. **Free the vacated backing**, per the region's [`crate::DiscardPolicy`]. Last on purpose:
//!    punching a hole destroys data and cannot be undone, so it runs only once every fallible,
//!    reversible step succeeded. A failed conversion therefore leaves the backings exactly as
//!    they were (invariant 4). A hole punch that fails *after* the conversion succeeded does not
//!    un-convert anything: the pages stay held back, are reported in [`HeldBack`], and the free
//!    is retried at the next flush.
//!
//! # Locking
//! One conversion lock per region (it also guards the held-back frees) serialises
//! conversions, plugs, unplugs, device attach and detach on that region (and its removal
//! waits for it); regions convert in parallel, except
//! that a conversion, plug or attach over an address space with a mapping budget (type1) also holds
//! that address space's budget lock from the budget check to the end of the transaction, so two
//! regions sharing the budget cannot both pass a check only one fits (the loser gets
//! [`ConversionError::MappingBudget`], before anything changed). Order, outer to inner:
//! `GuestRam` device list → region conversion lock → budget locks of the region's budgeted
//! address spaces (by ascending id) → state manager → region's attached list, then its departed
//! list, its unsynced-attribute set → a listener's stale set → an address space's ledger (its
//! member list and held backings are leaves). Nothing takes an outer lock while holding an inner one, and no
//! listener calls back into the manager. A device cut off by a failed rollback is detached from
//! the other regions by [`crate::GuestRam::convert`] after the region's locks are released.
//!
//! QEMU's order (attribute, listeners, punch) neither undoes the attribute nor keeps the
//! backings intact when a listener fails, and it stops the VM. Here every failure returns a
//! [`ConversionError`] naming the step, the guest gets an error code and keeps running.

use std::sync::atomic::Ordering;

use discard_manager::{
    Attribute, Change, DiscardFailure, GpaRange, ListenerError, ListenerId, RangeError,
    TransactionError, TransactionStep, View,
};
use iommu::LedgerError;

use crate::attributes::{AttributeError, MemoryAttributes};
use crate::device::DeviceId;
use crate::dma::MappingUnit;
use crate::host::BackingModel;
use crate::policy::{FlushReport, HeldBack};
use crate::range_set::span;
use crate::region::{Region, view_bit};

/// One device unmap that failed while the losing view was discarded.
#[derive(Debug, thiserror::Error)]
#[error("device {device}: unmap of {view} view {range} failed")]
#[non_exhaustive]
pub struct UnmapFailure {
    /// The device's name (or the listener id, for listeners that are not devices).
    pub device: String,
    /// The view that was being discarded.
    pub view: View,
    /// The run being discarded (the first of the device's runs when it had several).
    pub range: GpaRange,
    /// The device's error (the IOMMU ledger's, for a device).
    #[source]
    pub source: ListenerError,
}

/// A conversion that was refused or failed, naming the step. Unless the variant says
/// otherwise, nothing changed: state manager, KVM attributes, IOMMU mappings and backings are
/// as they were.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConversionError {
    /// The range is not granule-aligned or not inside the region.
    #[error("conversion range is invalid")]
    Range(#[source] RangeError),
    /// No single region contains the range.
    #[error("no guest RAM region contains {range}")]
    NoRegion {
        /// The range asked for.
        range: GpaRange,
    },
    /// A device's mapping budget (type1's `dma_entry_limit`) cannot hold the mappings this
    /// conversion needs.
    #[error("device {device} has no room for the {needed} mappings converting {range} needs")]
    MappingBudget {
        /// The device.
        device: String,
        /// The range asked for.
        range: GpaRange,
        /// Mappings needed.
        needed: u64,
        /// The ledger's refusal, with what is left.
        #[source]
        source: LedgerError,
    },
    /// A device unmap failed while the losing view was discarded; rolled back.
    #[error("device {} failed to unmap {} view {} ({} failure(s) in all); rolled back", .first.device, .first.view, .first.range, .count)]
    Unmap {
        /// The first failure.
        #[source]
        first: Box<UnmapFailure>,
        /// How many unmaps failed.
        count: usize,
    },
    /// Setting the KVM attribute failed; rolled back.
    #[error("setting the KVM memory attribute failed; rolled back")]
    Attribute(#[source] AttributeError),
    /// A device refused to map the gaining view; rolled back.
    #[error("device {device} failed to map {view} view {range}; rolled back")]
    Map {
        /// The device (or listener id, for listeners that are not devices).
        device: String,
        /// The view.
        view: View,
        /// The range it refused.
        range: GpaRange,
        /// Its error.
        #[source]
        source: discard_manager::ListenerError,
    },
    /// After a failed populate, setting the KVM attribute back failed, or repairing such an
    /// earlier failure failed: **KVM disagrees with the state manager** for `range` (the
    /// manager and the devices are as before). The region keeps the range marked, and every
    /// later conversion of the region first sets KVM to what the manager says.
    #[error(
        "undoing the KVM attribute of {range} failed; KVM now disagrees with the state manager"
    )]
    AttributeRollback {
        /// The run whose attribute could not be restored.
        range: GpaRange,
        /// The last error.
        #[source]
        source: AttributeError,
    },
    /// After a failure, a device refused to re-map the losing view and was detached from guest
    /// RAM, every region (it lost DMA access to the region's view; attach it again). What its
    /// IOMMU could not unmap stays tracked ([`crate::Region::stale_mappings`]) until removed.
    /// If setting the KVM attribute back failed as well, KVM may also disagree with the state
    /// manager for the range, as after [`ConversionError::AttributeRollback`], until the next
    /// conversion of the region repairs it.
    #[error("rollback failed; {} device(s) lost access to the region and were detached: {}", .detached.len(), .detached.join(", "))]
    RollbackFailed {
        /// The names of the devices detached.
        detached: Vec<String>,
        /// Their ids (no longer attached).
        devices: Vec<DeviceId>,
        /// The manager's report.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A device still maps pages of the range that earlier failed unmaps left behind (retried
    /// just now, in vain); converting the range to private would leave them mapped.
    #[error("device {device} still maps {range} after earlier unmaps failed")]
    StaleMapping {
        /// The device.
        device: String,
        /// The range asked for.
        range: GpaRange,
    },
    /// Part of the range is unplugged (virtio-mem): the guest has not been given that memory,
    /// so it may not convert it.
    #[error("{range} holds unplugged memory ({unplugged} first)")]
    Unplugged {
        /// The range asked for.
        range: GpaRange,
        /// The first unplugged run in it.
        unplugged: GpaRange,
    },
    /// The region was removed from guest RAM while the request waited for it.
    #[error("the region holding {range} was removed")]
    Removed {
        /// The range asked for.
        range: GpaRange,
    },
    /// The state manager refused the call (re-entrant or poisoned).
    #[error("the state manager refused the conversion")]
    Manager(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ConversionError {
    /// True when the gaining view's maps ran before the failure (so pinning may have faulted
    /// pages in on that side).
    fn populated(&self) -> bool {
        matches!(
            self,
            ConversionError::Map { .. }
                | ConversionError::RollbackFailed { .. }
                | ConversionError::AttributeRollback { .. }
        )
    }
}

/// What a successful conversion did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversion {
    /// The attribute the range has now.
    pub to: Attribute,
    /// What the state manager changed (kept whole: a one-run change needs no heap, so a
    /// conversion allocates nothing to report it).
    change: Change,
    /// Frees made at the end of this conversion.
    pub flushed: FlushReport,
    /// Backing the region holds back after it.
    pub held: HeldBack,
}

impl Conversion {
    /// The runs whose attribute changed, in address order (empty when the range already had
    /// it).
    pub fn runs(&self) -> &[GpaRange] {
        self.change.runs()
    }

    /// The state manager's whole change: the runs, and the view runs discarded and populated.
    pub fn change(&self) -> &Change {
        &self.change
    }

    /// Bytes whose attribute changed.
    pub fn bytes(&self) -> u64 {
        self.runs().iter().map(GpaRange::len).sum()
    }
}

/// The KVM attribute change, as the transaction step of a conversion.
///
/// A change of several runs (a mixed range) is one `KVM_SET_MEMORY_ATTRIBUTES` over the span
/// from the first run to the last when `span_runs` is set, as QEMU does per request. The
/// granules in between already have the target attribute, and the kernel's call is sound over
/// them: it reserves every entry before it stores any, so it changes all or nothing; storing an
/// attribute a page already has changes nothing; and the mappings it zaps first are filtered to
/// the old attribute (`kvm_arch_pre_set_memory_attributes`), which the granules in between do
/// not have. An undo still sets back exactly the runs that changed, never the span.
///
/// `span_runs` is off for in-place backings: the in-place conversion (attributes on the
/// guest_memfd) refuses a range holding a page with unexpected references (`EAGAIN`), and the
/// granules in between may be pinned by devices that map them, so a span could fail where the
/// runs would not.
pub(crate) struct AttributeStep<'a> {
    attributes: &'a dyn MemoryAttributes,
    to: Attribute,
    span_runs: bool,
    /// The first error of setting an attribute back, and every run it could not set back.
    undo_failure: Option<AttributeError>,
    unsynced: Vec<GpaRange>,
}

const ATTRIBUTE_UNDO_TRIES: usize = 3;

impl<'a> AttributeStep<'a> {
    pub(crate) fn new(
        attributes: &'a dyn MemoryAttributes,
        to: Attribute,
        span_runs: bool,
    ) -> Self {
        Self {
            attributes,
            to,
            span_runs,
            undo_failure: None,
            unsynced: Vec::new(),
        }
    }

    /// Sets `runs` (maximal, in address order) to the step's attribute, all or nothing.
    pub(crate) fn set_runs(&mut self, runs: &[GpaRange]) -> Result<(), AttributeError> {
        if let Some(all) = (self.span_runs && runs.len() > 1)
            .then(|| span(runs))
            .flatten()
        {
            // All or nothing: on failure nothing changed, so nothing is set back.
            return self.attributes.set(all, self.to);
        }
        for (i, &run) in runs.iter().enumerate() {
            if let Err(e) = self.attributes.set(run, self.to) {
                self.set_back(&runs[..i]);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Sets `runs` back to the opposite of the step's attribute, retrying; what still fails is
    /// remembered (the region marks it unsynced).
    pub(crate) fn set_back(&mut self, runs: &[GpaRange]) {
        let from = opposite(self.to);
        for &run in runs.iter().rev() {
            let mut last = None;
            for _ in 0..ATTRIBUTE_UNDO_TRIES {
                match self.attributes.set(run, from) {
                    Ok(()) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            if let Some(e) = last {
                log::error!("KVM attribute of {run} could not be set back to {from:?}: {e}");
                self.undo_failure.get_or_insert(e);
                self.unsynced.push(run);
            }
        }
    }
}

impl TransactionStep for AttributeStep<'_> {
    type Error = AttributeError;

    fn apply(&mut self, change: &Change) -> Result<(), AttributeError> {
        self.set_runs(change.runs())
    }

    fn undo(&mut self, change: &Change) {
        self.set_back(change.runs());
    }
}

pub(crate) fn opposite(a: Attribute) -> Attribute {
    match a {
        Attribute::Shared => Attribute::Private,
        Attribute::Private => Attribute::Shared,
    }
}

impl Region {
    /// Isolation: a stale mapping is a private page still mapped for a device; converting its
    /// range to private must not report success while it exists.
    pub(crate) fn refuse_stale(&self, range: GpaRange) -> Result<(), ConversionError> {
        match self.stale_in(range) {
            Some(device) => Err(ConversionError::StaleMapping { device, range }),
            None => Ok(()),
        }
    }

    /// The budgeted address spaces the region's listeners map through, by ascending id (the
    /// order their budget locks are taken in); empty, without allocating, when there is none.
    pub(crate) fn budgeted_spaces(&self) -> Vec<std::sync::Arc<crate::space::AddressSpace>> {
        if self.budgeted.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let mut spaces: Vec<_> = self
            .attached()
            .iter()
            .filter(|a| a.space.budgeted())
            .map(|a| std::sync::Arc::clone(&a.space))
            .collect();
        spaces.sort_by_key(|s| s.id);
        spaces.dedup_by_key(|s| s.id);
        spaces
    }

    fn check_budget(&self, range: GpaRange, to: Attribute) -> Result<(), ConversionError> {
        // Counting the joining granules walks the manager and allocates: skip it when no
        // device listening to the gaining view has a budget (an invalid range is still
        // refused, by the transaction).
        if self.budgeted.load(Ordering::Acquire) & view_bit(to.view()) == 0 {
            return Ok(());
        }
        let losing = opposite(to).view();
        let joining = self.manager.view_runs(losing, range).map_err(|e| match e {
            discard_manager::Error::Range(r) => ConversionError::Range(r),
            other => ConversionError::Manager(Box::new(other)),
        })?;
        self.check_room(to.view(), range, &joining)
    }

    /// Every address space listening to `view` has room for the mappings `joining` (runs
    /// joining the view, for a change of `range`) will need there.
    pub(crate) fn check_room(
        &self,
        view: View,
        range: GpaRange,
        joining: &[GpaRange],
    ) -> Result<(), ConversionError> {
        if joining.is_empty() {
            return Ok(());
        }
        for a in self.attached().iter().filter(|a| a.view == view) {
            // What will really be mapped: one mapping per joining run where the address
            // space cuts, one per granule where it does not.
            let ledger = &a.space.ledger;
            let needed = MappingUnit::of(ledger.capabilities(), self.granularity()).count(joining);
            ledger
                .check_budget(needed)
                .map_err(|source| ConversionError::MappingBudget {
                    device: a.space.name(),
                    range,
                    needed,
                    source,
                })?;
        }
        Ok(())
    }

    /// Converts `range` to `to`; see the [module docs](self) for the order and the rollback.
    /// A device that a failed rollback cuts off is detached from this region only: the
    /// caller ([`crate::GuestRam::convert`]) detaches it from the others.
    ///
    /// # Errors
    /// [`ConversionError`] naming the step that failed.
    pub(crate) fn convert(
        &self,
        range: GpaRange,
        to: Attribute,
        attributes: &dyn MemoryAttributes,
    ) -> Result<Conversion, ConversionError> {
        let mut discarder = self.conversion_lock();
        self.refuse_unplugged_or_removed(range)?;
        // The budget of an address space is shared by every region it maps: its lock covers
        // the check below and every map the transaction (and its rollback) makes.
        let budgeted = self.budgeted_spaces();
        let _budgets: Vec<_> = budgeted.iter().map(|s| s.budget()).collect();
        let stale = self.retry_stale();
        if stale && to == Attribute::Private {
            self.refuse_stale(range)?;
        }
        self.resync(attributes, range)
            .map_err(|(range, source)| ConversionError::AttributeRollback { range, source })?;
        self.check_budget(range, to)?;
        let classic = self.backing().model() == BackingModel::Classic;
        let mut step = AttributeStep::new(attributes, to, classic);
        let result = self.manager.convert_with(range, to, &mut step);
        let change = match result {
            Ok(change) => change,
            Err(e) => {
                let err = self.transaction_failed(range, &mut step, e);
                if to == Attribute::Private {
                    discarder.failed_to_private(range);
                }
                if to == Attribute::Shared && classic && err.populated() {
                    // Pinning for DMA faulted in the shared side of pages that are private
                    // again: free it (invariant 5), or hold and report what cannot be freed.
                    if let Ok(private) = self.manager.view_runs(View::Private, range) {
                        discarder.release_faulted(self.backing(), &private);
                    }
                }
                return Err(err);
            }
        };
        let mut flushed = FlushReport::default();
        if classic && !change.is_empty() {
            // A stale mapping may pin the vacated side of a granule between the runs: then
            // free exactly the runs.
            flushed = discarder.converted(self.backing(), change.runs(), to, !stale);
        }
        let conversion = Conversion {
            to,
            change,
            flushed,
            held: discarder.held(),
        };
        log::debug!(
            "converted {range} to {to:?}: {} bytes changed in {} run(s), {} bytes freed, {} held back",
            conversion.bytes(),
            conversion.runs().len(),
            flushed.punched_bytes,
            conversion.held.total()
        );
        Ok(conversion)
    }

    /// The error of a failed transaction (conversion, plug or unplug) over `range`, after
    /// recording what it left: stale mappings, KVM attributes the undo could not set back.
    pub(crate) fn transaction_failed(
        &self,
        range: GpaRange,
        step: &mut AttributeStep<'_>,
        e: TransactionError<AttributeError>,
    ) -> ConversionError {
        // Every unmap that failed came back in `e` or left a stale mapping on the way.
        self.mark_maybe_stale();
        let err = self.transaction_error(e);
        for &run in &step.unsynced {
            self.mark_unsynced(run);
        }
        // Unmaps that failed during the rollback are stale now; try them once more.
        self.retry_stale();
        // A rollback that cut devices off is reported as such even when setting the
        // attribute back failed too: the caller must detach them (the unsynced range is
        // marked and repaired by the next conversion either way).
        match (err, step.undo_failure.take()) {
            (err @ ConversionError::RollbackFailed { .. }, _) => err,
            (_, Some(source)) => ConversionError::AttributeRollback { range, source },
            (err, None) => err,
        }
    }

    fn device_name(&self, id: ListenerId) -> String {
        self.attached()
            .iter()
            .find(|a| a.id == id)
            .map_or_else(|| format!("listener {id}"), |a| a.space.name())
    }

    fn unmap_failure(&self, f: DiscardFailure) -> UnmapFailure {
        UnmapFailure {
            device: self.device_name(f.listener),
            view: f.view,
            range: f.range,
            source: f.source,
        }
    }

    fn transaction_error(&self, e: TransactionError<AttributeError>) -> ConversionError {
        match e {
            TransactionError::Range(r) => ConversionError::Range(r),
            TransactionError::StepFailed { source } => ConversionError::Attribute(source),
            TransactionError::DiscardFailed { first, others } => ConversionError::Unmap {
                first: Box::new(self.unmap_failure(first)),
                count: 1 + others.len(),
            },
            TransactionError::Refused { refusal } => ConversionError::Map {
                device: self.device_name(refusal.listener),
                view: refusal.view,
                range: refusal.range,
                source: refusal.source,
            },
            TransactionError::RollbackFailed { cause, detached } => {
                let ids: Vec<ListenerId> = detached.iter().map(|d| d.listener).collect();
                // The manager unregistered them: the region forgets them too, keeping what
                // their IOMMUs still map tracked.
                let spaces = self.cut_off(&ids);
                // Listeners that are not devices (migration, say) are named by their id.
                let names = ids
                    .iter()
                    .map(|&id| match spaces.iter().find(|d| d.0 == id) {
                        Some((_, _, name)) => name.clone(),
                        None => format!("listener {id}"),
                    })
                    .collect();
                let source = format!("{cause}; {} detached", detached.len());
                ConversionError::RollbackFailed {
                    detached: names,
                    devices: spaces.into_iter().flat_map(|d| d.1).collect(),
                    source: source.into(),
                }
            }
            other => ConversionError::Manager(Box::new(other)),
        }
    }
}
