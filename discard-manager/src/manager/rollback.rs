//! The rollbacks of a transaction: what was sent, and how it is undone. Cold paths, kept
//! apart from the transaction itself (`manager.rs`) so that its common path stays small.

use crate::change::{Change, ViewRange};
use crate::error::{Detached, DiscardFailure, Refusal, RollbackCause, TransactionError};
use crate::listener::TransactionStep;
use crate::range::GpaRange;

use super::{DiscardManager, Entry, Inner};

/// One notification already delivered in the running transaction, for the rollback.
#[derive(Clone, Copy)]
pub(super) struct Sent {
    index: usize,
    range: GpaRange,
}

/// Fills `out` with the notifications a transaction sent for `runs`, in the order it sends
/// them (run by run, listener by listener, each clipped to the listener's range), stopping
/// before `until` = (position in `runs`, listener index) when given.
fn sent(
    listeners: &[Entry],
    runs: &[ViewRange],
    until: Option<(usize, usize)>,
    out: &mut Vec<Sent>,
) {
    out.clear();
    for (position, vr) in runs.iter().enumerate() {
        for (index, entry) in listeners.iter().enumerate() {
            if until.is_some_and(|stop| (position, index) >= stop) {
                return;
            }
            if entry.info.view != vr.view {
                continue;
            }
            if let Some(range) = entry.info.range.intersect(&vr.range) {
                out.push(Sent { index, range });
            }
        }
    }
}

impl DiscardManager {
    /// The step failed after the discards: re-populate the losing view.
    #[cold]
    pub(super) fn step_failed<E: std::error::Error + 'static>(
        &self,
        inner: &mut Inner,
        change: &Change,
        source: E,
    ) -> TransactionError<E> {
        self.rolled_back(inner, change, RollbackCause::Step(source))
    }

    /// Discards failed before the step: re-populate the losing view (the failed listeners'
    /// ranges included: they no longer hold them, see the listener contract).
    #[cold]
    pub(super) fn discards_failed<E: std::error::Error + 'static>(
        &self,
        inner: &mut Inner,
        change: &Change,
        mut failed: Vec<DiscardFailure>,
    ) -> TransactionError<E> {
        let first = failed.remove(0);
        self.rolled_back(
            inner,
            change,
            RollbackCause::DiscardFailed {
                first,
                others: failed,
            },
        )
    }

    /// A populate was refused at `until` = (position in the populated runs, listener
    /// index): discard what was populated, undo the step, re-populate the losing view.
    #[cold]
    pub(super) fn populate_refused<S: TransactionStep>(
        &self,
        inner: &mut Inner,
        change: &Change,
        step: &mut S,
        until: (usize, usize),
        refusal: Refusal,
    ) -> TransactionError<S::Error> {
        sent(
            &inner.listeners,
            change.populated(),
            Some(until),
            &mut inner.sent_populates,
        );
        for sent in inner.sent_populates.iter().rev() {
            let entry = &inner.listeners[sent.index];
            // Nothing left to roll back to: what the listener cannot drop it tracks itself.
            let _ = entry.listener.discard(entry.info.view, sent.range);
        }
        step.undo(change);
        self.rolled_back(inner, change, RollbackCause::Refused(refusal))
    }

    /// The last step of both rollbacks: re-populates the losing view, and names the
    /// failure, or the listeners a double fault detached.
    fn rolled_back<E: std::error::Error + 'static>(
        &self,
        inner: &mut Inner,
        change: &Change,
        cause: RollbackCause<E>,
    ) -> TransactionError<E> {
        sent(
            &inner.listeners,
            change.discarded(),
            None,
            &mut inner.sent_discards,
        );
        let detached = self.restore_losing_view(inner);
        match cause {
            _ if !detached.is_empty() => TransactionError::RollbackFailed { cause, detached },
            RollbackCause::Step(source) => TransactionError::StepFailed { source },
            RollbackCause::Refused(refusal) => TransactionError::Refused { refusal },
            RollbackCause::DiscardFailed { first, others } => {
                TransactionError::DiscardFailed { first, others }
            }
        }
    }

    /// Rollback of the losing view: re-populates every discard sent in this transaction
    /// (the state was not committed, so it still says these ranges are populated). A
    /// listener that refuses is sent discard for the rest of what it holds and removed.
    fn restore_losing_view(&self, inner: &mut Inner) -> Vec<Detached> {
        // (listener index, position in sent_discards of its first failed re-populate)
        let mut failed: Vec<(usize, usize)> = Vec::new();
        let mut detached = Vec::new();
        for (pos, sent) in inner.sent_discards.iter().enumerate() {
            if failed.iter().any(|&(index, _)| index == sent.index) {
                continue;
            }
            let entry = &inner.listeners[sent.index];
            if let Err(source) = entry.listener.populate(entry.info.view, sent.range) {
                failed.push((sent.index, pos));
                detached.push(Detached {
                    listener: entry.info.id,
                    view: entry.info.view,
                    range: sent.range,
                    source,
                });
            }
        }
        if failed.is_empty() {
            return detached;
        }
        for &(index, pos) in &failed {
            let holes: Vec<GpaRange> = inner.sent_discards[pos..]
                .iter()
                .filter(|s| s.index == index)
                .map(|s| s.range)
                .collect();
            self.discard_all(&inner.extents, &inner.listeners[index], &holes);
        }
        let mut index = 0;
        inner.listeners.retain(|_| {
            let keep = !failed.iter().any(|&(i, _)| i == index);
            index += 1;
            keep
        });
        inner.index_views();
        detached
    }
}
