//! The two callback traits: view listeners and the caller's transaction step.

use std::convert::Infallible;
use std::fmt;

use crate::change::Change;
use crate::range::{GpaRange, View};

/// Why a listener refused to populate a range, or could not drop all of a discarded one.
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
///   only for granules it **does** hold. It holds what it acknowledged with `Ok` from
///   `populate` and was not sent to `discard` since (whatever `discard` returned). A range may
///   be discarded in pieces other than the ones it was populated in (e.g. populated as one
///   run, discarded granule by granule, and vice versa).
/// * A listener must be all-or-nothing per `populate`: when it returns `Err`, the listener
///   holds nothing of that range (it undoes its own partial work before returning).
///
/// # When a discard fails
/// `discard` (and `discard_runs`) may fail: a kernel unmap can, and a device that keeps
/// reaching a page must not be reported as having let go of it. A failure changes two things,
/// and only these:
///
/// * **Holdings.** After `discard(view, r)` the listener no longer holds `r`, whatever it
///   returned: the manager never sends `discard` for `r` again. What the listener could not
///   drop is its own to keep track of (a DMA mapper keeps the still-mapped pieces as *stale*,
///   retries their unmap later and reports them), because the manager keeps per-granule state,
///   not per-listener leftovers. A later `populate` of granules the listener could not drop
///   is legal (they are not held) and the listener takes them back without acquiring them
///   twice (a DMA mapper re-adopts its stale mapping instead of mapping again).
/// * **The transaction.** A discard that fails while a transaction goes forward (before the
///   caller's step) makes the transaction fail: every discard of the change is still sent
///   (each listener drops what it can), then the step is skipped, the losing view is
///   re-populated exactly as after a failed step (the listener whose discard failed included),
///   and the manager returns [`crate::TransactionError::DiscardFailed`] naming every failed
///   discard. A discard that fails where nothing can be rolled back (during a rollback, a
///   replay undo, an unregistration, or the detachment of a double fault) does not stop the
///   manager; the listener keeps what it could not drop, as above.
///
/// # Calls during a rollback
/// If a discard or a populate fails (or the caller's step fails), the manager undoes the
/// transaction. During that rollback a listener can receive exactly these calls, and nothing
/// else:
///
/// 1. `discard(view, r)` for each `r` it acknowledged with `Ok` from `populate` earlier in
///    the **same** transaction, with the identical range, in reverse order. The listener
///    whose populate failed receives no discard for the range it refused.
/// 2. `populate(view, r)` for each `r` it was sent `discard` for earlier in the **same**
///    transaction (the view that was losing the pages; each run of a `discard_runs` call
///    counts as one), with the identical range, in the original order. If this populate
///    fails too (a double fault), the manager sends the listener `discard` for everything
///    else it still holds, unregisters it, and reports it in
///    [`crate::TransactionError::RollbackFailed`].
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

    /// `range` leaves `view`: drop every use of it (e.g. unmap it).
    ///
    /// # Errors
    /// Part of `range` could not be dropped; the listener keeps track of that part itself
    /// (see [When a discard fails](ViewListener#when-a-discard-fails)).
    fn discard(&self, view: View, range: GpaRange) -> Result<(), ListenerError>;

    /// Several runs leave `view` in one transaction: called instead of [`discard`] when a
    /// transaction takes two or more runs from this listener. `runs` are sorted, disjoint
    /// and never adjacent (what lies between them is outside `view` or outside the
    /// listener's range, so the listener holds nothing there from the manager); each is a
    /// range `discard` could have received.
    ///
    /// The default discards them one by one, every one even after a failure, and returns
    /// the first error. A listener that can drop several runs in one operation overrides
    /// it: a DMA mapper unmaps them with one IOMMU call spanning the gaps, when it has
    /// nothing else mapped in between.
    ///
    /// # Errors
    /// As [`discard`]: after the call the listener holds none of `runs` whatever it returns.
    ///
    /// [`discard`]: ViewListener::discard
    fn discard_runs(&self, view: View, runs: &[GpaRange]) -> Result<(), ListenerError> {
        let mut first = Ok(());
        for &range in runs {
            let result = self.discard(view, range);
            if first.is_ok() {
                first = result;
            }
        }
        first
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
