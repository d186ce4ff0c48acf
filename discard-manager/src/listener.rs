//! The two callback traits: view listeners and the caller's transaction step.

use std::convert::Infallible;
use std::fmt;

use crate::change::Change;
use crate::range::{GpaRange, View};

/// Why a listener refused to populate a range.
pub type ListenerError = Box<dyn std::error::Error + Send + Sync>;

/// Identifies a registered listener; returned by [`crate::DiscardManager::register`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(pub(crate) u64);

impl ListenerId {
    /// The raw number (unique per manager, never reused).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ListenerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Something that must follow one view over one range: a DMA mapper (shared view), a
/// trusted-IO mapper (private view), migration.
///
/// # What a listener receives
/// Every range is non-empty, aligned to the region granularity, inside the range the
/// listener registered, and a maximal run of the change being notified (one call per run,
/// never one per granule). The manager guarantees the listener's holdings stay exact:
///
/// * `populate` is called only for granules the listener does **not** hold, and `discard`
///   only for granules it **does** hold (it holds what it acknowledged with `Ok` from
///   `populate` and was not discarded since). A range may be discarded in pieces other
///   than the ones it was populated in (e.g. populated as one run, discarded granule by
///   granule, and vice versa).
/// * A listener must be all-or-nothing per call: when `populate` returns `Err`, it holds
///   nothing of that range (it undoes its own partial work before returning).
///
/// # Calls during a rollback
/// If a populate fails (or the caller's step fails), the manager undoes the transaction.
/// During that rollback a listener can receive exactly these calls, and nothing else:
///
/// 1. `discard(view, r)` for each `r` it acknowledged with `Ok` from `populate` earlier in
///    the **same** transaction, with the identical range, in reverse order. The listener
///    whose populate failed receives no discard for the range it refused.
/// 2. `populate(view, r)` for each `r` it was sent `discard` for earlier in the **same**
///    transaction (the view that was losing the pages; each run of a `discard_runs` call
///    counts as one), with the identical range, in the original order. If this populate fails too (a double fault), the manager sends the
///    listener `discard` for everything else it still holds, unregisters it, and reports
///    it in [`crate::TransactionError::RollbackFailed`].
///
/// Replay on registration and discards on unregistration follow the same rules: a failed
/// replay populate is followed by `discard` of exactly the runs already replayed.
///
/// # Re-entrancy
/// Methods run with the manager's lock held, on the thread that called the manager.
/// Calling back into the **same** manager from a callback (same thread) returns
/// `Reentrant`; it never deadlocks. Calling into it from *another* thread and waiting for
/// that thread does deadlock: don't. Panicking poisons the manager (every later call
/// returns `Poisoned`), because the listeners' holdings can no longer be trusted.
pub trait ViewListener: Send + Sync {
    /// `range` joins `view`: make it usable (e.g. map it for DMA).
    ///
    /// # Errors
    /// Any error refuses the range; the listener must then hold nothing of it.
    fn populate(&self, view: View, range: GpaRange) -> Result<(), ListenerError>;

    /// `range` leaves `view`: drop every use of it (e.g. unmap it). Cannot fail.
    fn discard(&self, view: View, range: GpaRange);

    /// Several runs leave `view` in one transaction: called instead of [`discard`] when a
    /// transaction takes two or more runs from this listener. `runs` are sorted, disjoint
    /// and never adjacent (what lies between them is outside `view` or outside the
    /// listener's range, so the listener holds nothing there from the manager); each is a
    /// range `discard` could have received. Cannot fail.
    ///
    /// The default discards them one by one. A listener that can drop several runs in one
    /// operation overrides it: a DMA mapper unmaps them with one IOMMU call spanning the
    /// gaps, when it has nothing else mapped in between.
    ///
    /// [`discard`]: ViewListener::discard
    fn discard_runs(&self, view: View, runs: &[GpaRange]) {
        for &range in runs {
            self.discard(view, range);
        }
    }
}

/// The caller's own step inside a transaction (the VMM's KVM attribute change, or a
/// virtio-mem backing discard / preallocation).
///
/// `apply` runs after the losing view was discarded and before the gaining view is
/// populated. It is called only for a non-empty change, at most once per transaction,
/// with the manager's lock held (the re-entrancy rule of [`ViewListener`] applies).
pub trait TransactionStep {
    /// Why the step failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Performs the step for `change` (typically on `change.runs()`).
    ///
    /// # Errors
    /// An error aborts the transaction: the losing view is re-populated and the state is
    /// unchanged. `apply` must itself be all-or-nothing: `undo` is not called after it fails.
    fn apply(&mut self, change: &Change) -> Result<(), Self::Error>;

    /// Undoes a successful `apply` because a later populate failed; called after the
    /// gaining view's listeners were rolled back and before the losing view is re-populated.
    ///
    /// It returns nothing because the manager has no state to fall back to if it fails. A
    /// step whose undo can fail (e.g. `KVM_SET_MEMORY_ATTRIBUTES` returning `ENOMEM`) keeps
    /// the failure in itself (the caller still owns the step, passed as `&mut`) and the
    /// caller surfaces it after the transaction returns its error — never only in a log.
    fn undo(&mut self, change: &Change);
}

/// The step that does nothing; used by [`crate::DiscardManager::convert`] and friends.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoStep;

impl TransactionStep for NoStep {
    type Error = Infallible;

    fn apply(&mut self, _change: &Change) -> Result<(), Infallible> {
        Ok(())
    }

    fn undo(&mut self, _change: &Change) {}
}
