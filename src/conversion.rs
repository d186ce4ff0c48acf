//! The conversion procedure: the order of the steps of a conversion, what is undone when one
//! fails, and when backing memory is freed.
//!
//! # Order of a conversion of `range` to `to`
//! Under the region's conversion lock:
//!
//! 0. **Catch up.** Unmaps that failed earlier (stale mappings, see [`crate::dma`]) are retried.
//!    A conversion to private of a range that a device still maps this way is refused
//!    ([`ConversionError::StaleMapping`]): it would otherwise "succeed" with the page mapped.
//! 1. **Budget.** Every device listening to the gaining view must have room for one mapping per
//!    granule that joins it ([`iommu::Ledger::check_budget`]); type1 allows 65535 per container.
//!    A conversion that would not fit is refused here, before anything changed.
//! 2. **Transaction** ([`discard_manager::DiscardManager::convert_with`]), on exactly the
//!    granules whose attribute changes:
//!    1. *discard the losing view*: every device unmaps those granules (to private: the shared
//!       view's DMA mappings go first, as TDX requires and in-place conversion enforces);
//!    2. *the attribute step* ([`AttributeStep::apply`]): first check that every unmap of step
//!       2.1 really happened, else fail (the manager re-populates the losing view: nothing
//!       changed); then set the KVM attribute;
//!    3. *populate the gaining view*: devices map the granules (to shared: mapped after the
//!       attribute, so a device never maps a page the guest still treats as private).
//!
//!    A failure in 2.3 makes the manager discard what 2.3 mapped, call
//!    [`AttributeStep::undo`] (the KVM attribute goes back), and re-populate the losing view.
//! 3. **Free the vacated backing**, per the region's [`DiscardPolicy`]. Last on purpose:
//!    punching a hole destroys data and cannot be undone, so it runs only once every fallible,
//!    reversible step succeeded. A failed conversion therefore leaves the backings exactly as
//!    they were (invariant 4). A hole punch that fails *after* the conversion succeeded does not
//!    un-convert anything: the pages stay held back, are reported in [`HeldBack`], and the free
//!    is retried at the next flush.
//!
//! # Locking
//! One conversion lock per region (it also guards the held-back frees) serialises
//! conversions, device attach and detach on that region; regions convert in parallel. Order, outer
//! to inner: `GuestRam` device list → region conversion lock → state manager → region's
//! attached-device list → a listener's stale set → a device's ledger. Nothing takes an outer
//! lock while holding an inner one, and no listener calls back into the manager.
//!
//! QEMU's order (attribute, listeners, punch) neither undoes the attribute nor keeps the
//! backings intact when a listener fails, and it stops the VM. Here every failure returns a
//! [`ConversionError`] naming the step, the guest gets an error code and keeps running.

use std::sync::atomic::Ordering;

use discard_manager::{
    Attribute, Change, GpaRange, ListenerId, RangeError, TransactionError, TransactionStep, View,
};
use iommu::LedgerError;

use crate::attributes::{AttributeError, MemoryAttributes};
use crate::dma::{UnmapFailure, UnmapFailures};
use crate::host::BackingModel;
use crate::policy::{FlushReport, HeldBack};
use crate::range_set::span;
use crate::region::{Region, view_bit};

/// A conversion that was refused or failed, naming the step. Unless the variant says
/// otherwise, nothing changed: state manager, KVM attributes, IOMMU mappings and backings are
/// as they were.
#[derive(Debug, thiserror::Error)]
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
    /// After a failed populate, setting the KVM attribute back failed: **KVM disagrees with the
    /// state manager** for `range` (the manager and the devices are as before).
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
    /// After a failure, a device refused to re-map the losing view and was detached from the
    /// region (it lost DMA access to the region's view; attach it again).
    #[error("rollback failed; {} device(s) lost access to the region and were detached: {}", .detached.len(), .detached.join(", "))]
    RollbackFailed {
        /// The devices detached.
        detached: Vec<String>,
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
    /// The conversion queue shut down before running the request.
    #[error("the conversion queue shut down before running the request")]
    Shutdown,
    /// The state manager refused the call (re-entrant or poisoned).
    #[error("the state manager refused the conversion")]
    Manager(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ConversionError {
    /// The errno the guest is told (returned negated by the hypercall): `EINVAL` for a bad
    /// request, `ENOSPC` for an exhausted mapping budget, `EBUSY` when a device still holds a
    /// page, the kernel's errno for an attribute failure, `EIO` otherwise.
    pub fn guest_errno(&self) -> i32 {
        match self {
            ConversionError::Range(_) | ConversionError::NoRegion { .. } => libc::EINVAL,
            ConversionError::MappingBudget { .. } => libc::ENOSPC,
            ConversionError::Unmap { .. } | ConversionError::StaleMapping { .. } => libc::EBUSY,
            ConversionError::Attribute(e) => e.source.errno(),
            _ => libc::EIO,
        }
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
    failures: &'a UnmapFailures,
    undo_failure: Option<AttributeError>,
}

/// Why [`AttributeStep::apply`] failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StepError {
    /// A device unmap in the discard before the step failed.
    #[error("a device unmap failed")]
    Unmap(Vec<UnmapFailure>),
    /// KVM refused the attribute.
    #[error(transparent)]
    Attribute(AttributeError),
}

const ATTRIBUTE_UNDO_TRIES: usize = 3;

impl AttributeStep<'_> {
    fn set_back(&mut self, runs: &[GpaRange]) {
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
            }
        }
    }
}

impl TransactionStep for AttributeStep<'_> {
    type Error = StepError;

    fn apply(&mut self, change: &Change) -> Result<(), StepError> {
        if self.failures.any() {
            let failed = self.failures.drain();
            if !failed.is_empty() {
                return Err(StepError::Unmap(failed));
            }
        }
        let runs = change.runs();
        if let Some(all) = (self.span_runs && runs.len() > 1)
            .then(|| span(runs))
            .flatten()
        {
            // All or nothing: on failure nothing changed, so nothing is set back.
            return self
                .attributes
                .set(all, self.to)
                .map_err(StepError::Attribute);
        }
        for (i, &run) in runs.iter().enumerate() {
            if let Err(e) = self.attributes.set(run, self.to) {
                self.set_back(&runs[..i]);
                return Err(StepError::Attribute(e));
            }
        }
        Ok(())
    }

    fn undo(&mut self, change: &Change) {
        self.set_back(change.runs());
    }
}

fn opposite(a: Attribute) -> Attribute {
    match a {
        Attribute::Shared => Attribute::Private,
        Attribute::Private => Attribute::Shared,
    }
}

impl Region {
    /// Returns true when some device still maps granules it should not (stale).
    #[inline]
    fn retry_stale(&self) -> bool {
        // The common case: no listener added to its stale set since the last retry left
        // them all empty.
        let stale = self.failures.take_stale_hint() && self.retry_stale_devices();
        // Failures of earlier rollbacks or retries are now in the stale sets; the next step
        // must only see this conversion's own.
        if self.failures.any() {
            self.failures.drain();
        }
        stale
    }

    #[cold]
    fn retry_stale_devices(&self) -> bool {
        let mut stale = false;
        for a in self.attached().iter() {
            stale |= a.listener.retry_stale() > 0;
        }
        if stale {
            self.failures.mark_stale();
        }
        stale
    }

    /// Isolation: a stale mapping is a private page still mapped for a device; converting its
    /// range to private must not report success while it exists.
    fn refuse_stale(&self, range: GpaRange) -> Result<(), ConversionError> {
        for a in self.attached().iter() {
            if a.listener.stale_overlaps(range) {
                return Err(ConversionError::StaleMapping {
                    device: a.name.clone(),
                    range,
                });
            }
        }
        Ok(())
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
        let needed: u64 = joining.iter().map(|r| r.len() / self.granularity()).sum();
        if needed == 0 {
            return Ok(());
        }
        for a in self.attached().iter().filter(|a| a.view == to.view()) {
            a.ledger
                .check_budget(needed)
                .map_err(|source| ConversionError::MappingBudget {
                    device: a.name.clone(),
                    range,
                    needed,
                    source,
                })?;
        }
        Ok(())
    }

    /// Converts `range` to `to`; see the [module docs](self) for the order and the rollback.
    ///
    /// # Errors
    /// [`ConversionError`] naming the step that failed.
    pub fn convert(
        &self,
        range: GpaRange,
        to: Attribute,
        attributes: &dyn MemoryAttributes,
    ) -> Result<Conversion, ConversionError> {
        let mut discarder = self.conversion_lock();
        let stale = self.retry_stale();
        if stale && to == Attribute::Private {
            self.refuse_stale(range)?;
        }
        self.check_budget(range, to)?;
        let classic = self.backing().model() == BackingModel::Classic;
        let mut step = AttributeStep {
            attributes,
            to,
            span_runs: classic,
            failures: &self.failures,
            undo_failure: None,
        };
        let result = self.manager.convert_with(range, to, &mut step);
        let undo_failure = step.undo_failure.take();
        let change = match result {
            Ok(change) => change,
            Err(e) => {
                let err = self.transaction_error(e);
                // Unmaps that failed during the rollback are stale now; try them once more.
                self.retry_stale();
                return Err(match undo_failure {
                    Some(source) => ConversionError::AttributeRollback { range, source },
                    None => err,
                });
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

    fn device_name(&self, id: ListenerId) -> String {
        self.attached()
            .iter()
            .find(|a| a.id == id)
            .map_or_else(|| format!("listener {id}"), |a| a.name.clone())
    }

    fn transaction_error(&self, e: TransactionError<StepError>) -> ConversionError {
        match e {
            TransactionError::Range(r) => ConversionError::Range(r),
            TransactionError::StepFailed {
                source: StepError::Attribute(a),
            } => ConversionError::Attribute(a),
            TransactionError::StepFailed {
                source: StepError::Unmap(mut failures),
            } => {
                let count = failures.len();
                ConversionError::Unmap {
                    first: Box::new(failures.swap_remove(0)),
                    count,
                }
            }
            TransactionError::Refused { refusal } => ConversionError::Map {
                device: self.device_name(refusal.listener),
                view: refusal.view,
                range: refusal.range,
                source: refusal.source,
            },
            TransactionError::RollbackFailed { cause, detached } => {
                let ids: Vec<ListenerId> = detached.iter().map(|d| d.listener).collect();
                let names = ids.iter().map(|&id| self.device_name(id)).collect();
                // The manager unregistered them; forget them here too.
                self.attached_mut().retain(|a| !ids.contains(&a.id));
                let source = format!("{cause}; {} detached", detached.len());
                ConversionError::RollbackFailed {
                    detached: names,
                    source: source.into(),
                }
            }
            other => ConversionError::Manager(Box::new(other)),
        }
    }
}
