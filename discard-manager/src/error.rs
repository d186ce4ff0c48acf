//! Errors of the manager's operations.

use std::fmt;

use crate::listener::{ListenerError, ListenerId};
use crate::range::{GpaRange, RangeError, View};

/// Error of registration, unregistration and queries.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The range was rejected; nothing changed.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// Called from inside a listener or step of the same manager, on the same thread.
    #[error("re-entrant call from a listener or step of the same discard manager")]
    Reentrant,
    /// A listener or step panicked during an earlier call; holdings are unknown.
    #[error("discard manager poisoned: a listener or step panicked during an earlier call")]
    Poisoned,
    /// No listener with this id is registered (never was, already unregistered or detached).
    #[error("listener {id} is not registered")]
    UnknownListener {
        /// The id given.
        id: ListenerId,
    },
    /// The replay on registration failed. The runs already replayed were discarded again and
    /// the listener is not registered.
    #[error(
        "listener refused replay of {view} view range {range} ({replayed} earlier run(s) were \
         discarded again); it was not registered"
    )]
    ReplayRefused {
        /// The view it registered for.
        view: View,
        /// The run it refused.
        range: GpaRange,
        /// How many runs it had accepted before (and were discarded again).
        replayed: usize,
        /// The listener's error.
        #[source]
        source: ListenerError,
    },
}

/// A listener that refused to populate `range` during a transaction.
#[derive(Debug)]
pub struct Refusal {
    /// Which listener.
    pub listener: ListenerId,
    /// The view it listens to.
    pub view: View,
    /// The range it refused.
    pub range: GpaRange,
    /// Its error.
    pub source: ListenerError,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "listener {} refused to populate {} view range {}",
            self.listener, self.view, self.range
        )
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// A listener whose `discard` failed while a transaction went forward: it could not drop all
/// of `range` (see [`crate::ViewListener`], "When a discard fails").
#[derive(Debug)]
pub struct DiscardFailure {
    /// Which listener.
    pub listener: ListenerId,
    /// The view it listens to.
    pub view: View,
    /// The range it was told to discard (one run, or the first of a `discard_runs` call).
    pub range: GpaRange,
    /// Its error.
    pub source: ListenerError,
}

impl fmt::Display for DiscardFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "listener {} could not discard {} view range {}",
            self.listener, self.view, self.range
        )
    }
}

impl std::error::Error for DiscardFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// What started a rollback that then failed.
#[derive(Debug, thiserror::Error)]
pub enum RollbackCause<E: std::error::Error + 'static> {
    /// The caller's step failed.
    #[error("the transaction step failed")]
    Step(#[source] E),
    /// A listener refused a populate.
    #[error(transparent)]
    Refused(Refusal),
    /// Listeners failed to discard before the step.
    #[error("{first} ({} more)", others.len())]
    DiscardFailed {
        /// The first failure.
        #[source]
        first: DiscardFailure,
        /// The others, in the order sent.
        others: Vec<DiscardFailure>,
    },
}

/// A transaction failed. Except for [`TransactionError::RollbackFailed`], the state and every
/// listener's holdings are exactly as before the call.
#[derive(Debug, thiserror::Error)]
pub enum TransactionError<E: std::error::Error + 'static> {
    /// The range was rejected; nothing was notified or changed.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// Called from inside a listener or step of the same manager, on the same thread.
    #[error("re-entrant call from a listener or step of the same discard manager")]
    Reentrant,
    /// A listener or step panicked during an earlier call; holdings are unknown.
    #[error("discard manager poisoned: a listener or step panicked during an earlier call")]
    Poisoned,
    /// The caller's step failed. The losing view was re-populated; nothing changed.
    #[error("the transaction step failed; listeners were restored and the state is unchanged")]
    StepFailed {
        /// The step's error.
        #[source]
        source: E,
    },
    /// Discards failed while the losing view was discarded (every discard was still sent).
    /// The step was not run, the losing view was re-populated, and the state is unchanged;
    /// what the failed listeners could not drop they track themselves.
    #[error("{first} ({} more); the transaction was rolled back", others.len())]
    DiscardFailed {
        /// The first discard that failed.
        #[source]
        first: DiscardFailure,
        /// The other discards that failed, in the order sent.
        others: Vec<DiscardFailure>,
    },
    /// A listener refused a populate. Every listener already told was rolled back, the step
    /// was undone, and the state is unchanged.
    #[error("{refusal}; the transaction was rolled back")]
    Refused {
        /// Who refused what.
        #[source]
        refusal: Refusal,
    },
    /// Double fault: after `cause`, re-populating the losing view during the rollback failed
    /// for the listeners in `detached`.
    ///
    /// The state is unchanged (as before the call) and every listener still registered holds
    /// exactly its view. Each detached listener was sent `discard` for everything else it
    /// held and is **no longer registered**: it holds nothing from this manager, so the
    /// consumer behind it (a device) has lost access to its whole view, not only to
    /// `range`. This is the only outcome in which the manager's view and what a consumer
    /// can reach disagree. The caller should either register the consumer again (a full
    /// replay; if that succeeds everything agrees again) or take the consumer offline.
    #[error("rollback failed: {} listener(s) refused to re-populate and were detached", detached.len())]
    RollbackFailed {
        /// What started the rollback.
        #[source]
        cause: RollbackCause<E>,
        /// The listeners that refused to re-populate, now unregistered.
        detached: Vec<Detached>,
    },
}

/// A listener removed by a failed rollback (see [`TransactionError::RollbackFailed`]).
#[derive(Debug)]
pub struct Detached {
    /// The listener, no longer registered.
    pub listener: ListenerId,
    /// Its view.
    pub view: View,
    /// The range it refused to re-populate.
    pub range: GpaRange,
    /// Its error.
    pub source: ListenerError,
}

impl fmt::Display for Detached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "listener {} refused to re-populate {} view range {}: {}",
            self.listener, self.view, self.range, self.source
        )
    }
}
