//! The manager: one region's state, its listeners, transactions and queries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::change::{Change, ChangeKind};
use crate::config::{ConfigError, Geometry, RegionConfig};
use crate::error::{DiscardFailure, Error, Refusal, TransactionError};
use crate::extents::{Extents, Plan, State, Update, Within};
use crate::listener::{ListenerError, ListenerId, NoStep, TransactionStep, ViewListener};
use crate::range::{Attribute, GpaRange, View};

mod rollback;

use rollback::Sent;

/// One maximal run of combined state, as returned by [`DiscardManager::runs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Run {
    /// The run, clipped to the query.
    pub range: GpaRange,
    /// Its guest_memfd attribute.
    pub attribute: Attribute,
    /// Whether it is plugged.
    pub plugged: bool,
}

impl Run {
    /// The view the run belongs to, `None` when unplugged.
    pub fn view(&self) -> Option<View> {
        self.plugged.then(|| self.attribute.view())
    }
}

/// Byte totals of a region, from [`DiscardManager::counts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counts {
    /// Plugged and shared (the shared view).
    pub shared_bytes: u64,
    /// Plugged and private (the private view).
    pub private_bytes: u64,
    /// Unplugged, whatever the attribute.
    pub unplugged_bytes: u64,
    /// Number of maximal runs of combined state (extents).
    pub runs: usize,
}

/// A registered listener, as listed by [`DiscardManager::listeners`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerInfo {
    /// Its id.
    pub id: ListenerId,
    /// The view it follows.
    pub view: View,
    /// The range it follows.
    pub range: GpaRange,
}

struct Entry {
    info: ListenerInfo,
    /// Granule indices of `info.range`.
    granules: (u64, u64),
    listener: Arc<dyn ViewListener>,
}

/// A listener as the transaction's loops see it: a copy of its entry in the list of its view
/// (`Inner::by_view`), so that the loops neither test each listener's view nor reach into
/// its entry; rebuilt whenever the listeners change (`Inner::index_views`).
struct Follower {
    range: GpaRange,
    listener: Arc<dyn ViewListener>,
    id: ListenerId,
    /// Its position in `Inner::listeners` (the rollback's numbering).
    index: usize,
}

struct Inner {
    extents: Extents,
    /// In registration order.
    listeners: Vec<Entry>,
    /// The listeners of each view (`view_slot`), in registration order.
    by_view: [Vec<Follower>; 2],
    next_id: u64,
    /// Buffers reused by every transaction, so the hot path does not allocate (the `sent_*`
    /// ones are filled only by a rollback).
    plan: Plan,
    /// One listener's share of a transaction's discarded runs.
    batch: Vec<GpaRange>,
    sent_discards: Vec<Sent>,
    sent_populates: Vec<Sent>,
}

/// The state authority for one guest RAM region. See the crate documentation for the
/// locking and re-entrancy rules.
pub struct DiscardManager {
    config: RegionConfig,
    geometry: Geometry,
    /// Token of the thread holding `inner`, 0 when free: detects re-entrant calls.
    owner: AtomicU64,
    inner: Mutex<Inner>,
}

enum LockError {
    Reentrant,
    Poisoned,
}

impl From<LockError> for Error {
    fn from(e: LockError) -> Self {
        match e {
            LockError::Reentrant => Error::Reentrant,
            LockError::Poisoned => Error::Poisoned,
        }
    }
}

impl<E: std::error::Error + 'static> From<LockError> for TransactionError<E> {
    fn from(e: LockError) -> Self {
        match e {
            LockError::Reentrant => TransactionError::Reentrant,
            LockError::Poisoned => TransactionError::Poisoned,
        }
    }
}

/// The slot of `view` in `Inner::by_view`.
fn view_slot(view: View) -> usize {
    match view {
        View::Shared => 0,
        View::Private => 1,
    }
}

impl Inner {
    /// The listeners of `view`.
    fn followers(&self, view: View) -> &[Follower] {
        &self.by_view[view_slot(view)]
    }

    /// Rebuilds `by_view` from `listeners`, after any change to them.
    fn index_views(&mut self) {
        for list in &mut self.by_view {
            list.clear();
        }
        for (index, entry) in self.listeners.iter().enumerate() {
            self.by_view[view_slot(entry.info.view)].push(Follower {
                range: entry.info.range,
                listener: entry.listener.clone(),
                id: entry.info.id,
                index,
            });
        }
    }
}

/// Sends `range`, leaving `view`, to every listener of `view` (`followers`) it touches
/// (clipped to the listener's range), to every one even after a failure; the failures, if
/// any. The list is created by the first failure, so the common path neither builds nor
/// drops one. Inlined: out of line, its call and register saves were a fifth of a one-run
/// transaction's own work.
#[inline(always)]
fn discard_run(
    followers: &[Follower],
    view: View,
    range: GpaRange,
) -> Result<(), Vec<DiscardFailure>> {
    let mut failed = Ok(());
    for follower in followers {
        if let Some(clipped) = follower.range.intersect(&range) {
            if let Err(source) = follower.listener.discard(view, clipped) {
                add_failure(&mut failed, (follower.id, view), clipped, source);
            }
        }
    }
    failed
}

/// Records that listener `id` of `view` failed to discard `range`.
#[cold]
fn add_failure(
    failed: &mut Result<(), Vec<DiscardFailure>>,
    (id, view): (ListenerId, View),
    range: GpaRange,
    source: ListenerError,
) {
    let failure = DiscardFailure {
        listener: id,
        view,
        range,
        source,
    };
    match failed {
        Ok(()) => *failed = Err(vec![failure]),
        Err(list) => list.push(failure),
    }
}

/// Sends `range`, joining `view`, to every listener of `view` (`followers`) it touches
/// (clipped), stopping at the first refusal: (its index in `Inner::listeners`, the refusal).
/// Inlined like [`discard_run`]: with a real step (gmem-dma's attribute change) the compiler
/// kept it out of line.
#[inline(always)]
fn populate_run(
    followers: &[Follower],
    view: View,
    range: GpaRange,
) -> Result<(), (usize, Refusal)> {
    for follower in followers {
        let Some(clipped) = follower.range.intersect(&range) else {
            continue;
        };
        if let Err(source) = follower.listener.populate(view, clipped) {
            return Err((follower.index, refused(follower.id, view, clipped, source)));
        }
    }
    Ok(())
}

#[cold]
fn refused(listener: ListenerId, view: View, range: GpaRange, source: ListenerError) -> Refusal {
    Refusal {
        listener,
        view,
        range,
        source,
    }
}

/// The held lock; clears the owner before the mutex is released (fields drop after `drop`).
struct Locked<'a> {
    guard: MutexGuard<'a, Inner>,
    owner: &'a AtomicU64,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.owner.store(0, Ordering::Release);
    }
}

/// A number unique among the live threads (never 0): the address of a thread-local.
/// A `const`-initialised thread-local without a destructor is a plain TLS slot, so this is
/// one instruction, and it stays readable during thread teardown. (An address may be reused
/// by a later thread, but only after this one exited, and a thread never exits holding the
/// lock: `Locked` clears the owner when it is dropped, on unwinding too.)
fn thread_token() -> u64 {
    thread_local!(static MARK: u8 = const { 0 });
    MARK.with(|mark| std::ptr::from_ref(mark) as u64)
}

impl DiscardManager {
    /// Creates the manager of one region, every granule in the configured initial state.
    ///
    /// # Errors
    /// [`ConfigError`] naming what is wrong with `config`.
    pub fn new(config: RegionConfig) -> Result<Self, ConfigError> {
        let geometry = Geometry::new(&config)?;
        let initial = State::new(config.initially_plugged, config.initial_attribute);
        Ok(Self {
            config,
            geometry,
            owner: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                extents: Extents::new(geometry.granules, initial),
                listeners: Vec::new(),
                by_view: [Vec::new(), Vec::new()],
                next_id: 1,
                plan: Plan::default(),
                batch: Vec::new(),
                sent_discards: Vec::new(),
                sent_populates: Vec::new(),
            }),
        })
    }

    /// The configuration the manager was created with.
    pub fn config(&self) -> &RegionConfig {
        &self.config
    }

    /// The whole region as a range.
    pub fn region(&self) -> GpaRange {
        self.geometry.region
    }

    fn lock(&self) -> Result<Locked<'_>, LockError> {
        let me = thread_token();
        if self.owner.load(Ordering::Acquire) == me {
            return Err(LockError::Reentrant);
        }
        let guard = self.inner.lock().map_err(|_| LockError::Poisoned)?;
        self.owner.store(me, Ordering::Release);
        Ok(Locked {
            guard,
            owner: &self.owner,
        })
    }

    /// Registers `listener` for `view` over `range` and replays to it, one `populate` per
    /// maximal run, every populated run of `view` in `range`.
    ///
    /// # Errors
    /// [`Error::Range`] for a bad range; [`Error::ReplayRefused`] if a replay populate
    /// failed (the runs already replayed were discarded again, the listener is not
    /// registered); [`Error::Reentrant`], [`Error::Poisoned`].
    pub fn register(
        &self,
        view: View,
        range: GpaRange,
        listener: Arc<dyn ViewListener>,
    ) -> Result<ListenerId, Error> {
        let granules = self.geometry.granules_of(range)?;
        let mut locked = self.lock()?;
        let inner = &mut *locked.guard;
        // The closure holds only copies (the geometry, the view, the listener's data and
        // vtable pointers), so the walk's call path reloads nothing through pointers; the
        // number of runs replayed is counted again by the undo walk.
        let (geometry, target): (Geometry, &dyn ViewListener) = (self.geometry, &*listener);
        let replay =
            inner
                .extents
                .try_for_each_view_run(granules.0, granules.1, view, move |s, e| {
                    target
                        .populate(view, geometry.range_of(s, e))
                        .map_err(|source| (s, e, source))
                });
        if let Err((refused_at, refused_end, source)) = replay {
            // Undo the replay: exactly the runs before the refused one.
            let mut replayed = 0;
            inner
                .extents
                .for_each_run(granules.0, refused_at, |done_start, done_end, done| {
                    if done.view() == Some(view) {
                        replayed += 1;
                        // A replay undo cannot be rolled back: the listener tracks leftovers.
                        let _ =
                            listener.discard(view, self.geometry.range_of(done_start, done_end));
                    }
                });
            return Err(Error::ReplayRefused {
                view,
                range: self.geometry.range_of(refused_at, refused_end),
                replayed,
                source,
            });
        }
        let id = ListenerId(inner.next_id);
        inner.next_id += 1;
        inner.listeners.push(Entry {
            info: ListenerInfo { id, view, range },
            granules,
            listener,
        });
        inner.index_views();
        Ok(id)
    }

    /// Unregisters a listener after sending it `discard` for every populated run of its
    /// view in its range.
    ///
    /// # Errors
    /// [`Error::UnknownListener`]; [`Error::Reentrant`], [`Error::Poisoned`].
    pub fn unregister(&self, id: ListenerId) -> Result<(), Error> {
        let mut locked = self.lock()?;
        let inner = &mut *locked.guard;
        let index = inner
            .listeners
            .iter()
            .position(|e| e.info.id == id)
            .ok_or(Error::UnknownListener { id })?;
        let entry = inner.listeners.remove(index);
        inner.index_views();
        self.discard_all(&inner.extents, &entry, &[]);
        Ok(())
    }

    /// Sends `entry` discard for every run of its view in its range, except `holes`
    /// (sorted, disjoint, each inside one run: ranges it no longer holds). The listener is
    /// leaving: a discard that fails cannot be rolled back, and the listener keeps track of
    /// what it could not drop (see the listener contract), so failures are not collected.
    fn discard_all(&self, extents: &Extents, entry: &Entry, holes: &[GpaRange]) {
        let view = entry.info.view;
        let mut holes = holes.iter().peekable();
        extents.for_each_run(entry.granules.0, entry.granules.1, |s, e, state| {
            if state.view() != Some(view) {
                return;
            }
            let run = self.geometry.range_of(s, e);
            let mut cursor = run.start();
            while let Some(hole) = holes.next_if(|h| h.start() <= run.last()) {
                if hole.start() > cursor {
                    let _ = entry
                        .listener
                        .discard(view, GpaRange::from_bounds(cursor, hole.start()));
                }
                cursor = cursor.max(hole.end());
            }
            if cursor < run.end() {
                let _ = entry
                    .listener
                    .discard(view, GpaRange::from_bounds(cursor, run.end()));
            }
        });
    }

    /// Converts `range` to attribute `to`.
    ///
    /// # Errors
    /// See [`DiscardManager::convert_with`].
    pub fn convert(
        &self,
        range: GpaRange,
        to: Attribute,
    ) -> Result<Change, TransactionError<std::convert::Infallible>> {
        self.transact(range, ChangeKind::Convert { to }, &mut NoStep)
    }

    /// Converts `range` to attribute `to`, running `step` between the discard of the losing
    /// view and the populate of the gaining view.
    ///
    /// Only granules whose attribute really changes are in the returned [`Change`] and are
    /// notified; unplugged granules change attribute without any notification.
    ///
    /// # Errors
    /// [`TransactionError`]: a bad range, the step failed, a listener refused (all rolled
    /// back), or a failed rollback (see [`TransactionError::RollbackFailed`]).
    pub fn convert_with<S: TransactionStep>(
        &self,
        range: GpaRange,
        to: Attribute,
        step: &mut S,
    ) -> Result<Change, TransactionError<S::Error>> {
        self.transact(range, ChangeKind::Convert { to }, step)
    }

    /// Plugs `range`: its granules join the view of their attribute.
    ///
    /// # Errors
    /// See [`DiscardManager::convert_with`].
    pub fn plug(
        &self,
        range: GpaRange,
    ) -> Result<Change, TransactionError<std::convert::Infallible>> {
        self.transact(range, ChangeKind::Plug, &mut NoStep)
    }

    /// Plugs `range`, running `step` (e.g. preallocation) before the populates.
    ///
    /// # Errors
    /// See [`DiscardManager::convert_with`].
    pub fn plug_with<S: TransactionStep>(
        &self,
        range: GpaRange,
        step: &mut S,
    ) -> Result<Change, TransactionError<S::Error>> {
        self.transact(range, ChangeKind::Plug, step)
    }

    /// Unplugs `range`: its granules leave their view.
    ///
    /// # Errors
    /// See [`DiscardManager::convert_with`].
    pub fn unplug(
        &self,
        range: GpaRange,
    ) -> Result<Change, TransactionError<std::convert::Infallible>> {
        self.transact(range, ChangeKind::Unplug, &mut NoStep)
    }

    /// Unplugs `range`, running `step` (e.g. the backing discard) after the discards.
    ///
    /// # Errors
    /// See [`DiscardManager::convert_with`].
    pub fn unplug_with<S: TransactionStep>(
        &self,
        range: GpaRange,
        step: &mut S,
    ) -> Result<Change, TransactionError<S::Error>> {
        self.transact(range, ChangeKind::Unplug, step)
    }

    /// The transaction of `kind`; inlined into the public methods, where the kind is known,
    /// so that its [`Update`] is computed there.
    #[inline(always)]
    fn transact<S: TransactionStep>(
        &self,
        range: GpaRange,
        kind: ChangeKind,
        step: &mut S,
    ) -> Result<Change, TransactionError<S::Error>> {
        self.transact_as(range, kind, Update::of(kind), step)
    }

    /// The transaction: plan, discard the losing view, step, populate the gaining view,
    /// commit; or roll back. The rollbacks live in cold functions of their own (module
    /// `rollback`), so that the common path stays small. `update` is `Update::of(kind)`.
    fn transact_as<S: TransactionStep>(
        &self,
        range: GpaRange,
        kind: ChangeKind,
        update: Update,
        step: &mut S,
    ) -> Result<Change, TransactionError<S::Error>> {
        let (a, b) = self.geometry.granules_of(range)?;
        let mut locked = self.lock()?;
        let inner = &mut *locked.guard;
        let update = move |s: State| s.after(update);
        // Fast path: the range lies inside one run (one- or two-granule conversions).
        if let Some(w) = inner.extents.within_one_run(a, b) {
            let new = update(w.state);
            if new == w.state {
                return Ok(Change::new(kind));
            }
            return self.transact_within(inner, (range, a, b), kind, w, new, step);
        }
        inner.extents.plan(a, b, update, &mut inner.plan);
        let change = self.describe(&inner.plan, kind);
        if change.is_empty() {
            return Ok(change);
        }
        // What was sent is not recorded here: every discard is sent whatever earlier ones
        // returned, and both loops run in a fixed order, so a rollback recomputes the
        // notifications it must undo (`sent`).
        let discarded = match change.discarded() {
            [] => Ok(()),
            [vr] => discard_run(inner.followers(vr.view), vr.view, vr.range),
            _ => Self::discard_batched(inner, &change),
        };
        if let Err(failed) = discarded {
            return Err(self.discards_failed(inner, &change, failed));
        }

        if let Err(source) = step.apply(&change) {
            return Err(self.step_failed(inner, &change, source));
        }

        for (position, vr) in change.populated().iter().enumerate() {
            if let Err((index, refusal)) = populate_run(inner.followers(vr.view), vr.view, vr.range)
            {
                return Err(self.populate_refused(
                    inner,
                    &change,
                    step,
                    (position, index),
                    refusal,
                ));
            }
        }
        inner.extents.commit(&inner.plan);
        Ok(change)
    }

    /// The transaction of a range inside one run `w` whose state changes to `new`: at most
    /// one discarded and one populated run, each sent straight from the two states without
    /// going through the [`Change`]'s lists. `(range, a, b)`: the range and its granules `[a, b)`.
    ///
    /// As `new != w.state`, the two views differ unless both are `None` (an attribute change
    /// of unplugged granules): the view left, if any, is the old state's, the view joined the
    /// new state's, with no comparison of the two.
    fn transact_within<S: TransactionStep>(
        &self,
        inner: &mut Inner,
        (range, a, b): (GpaRange, u64, u64),
        kind: ChangeKind,
        w: Within,
        new: State,
        step: &mut S,
    ) -> Result<Change, TransactionError<S::Error>> {
        debug_assert_ne!(w.state, new);
        let (old_view, new_view) = (w.state.view(), new.view());
        let change = Change::single(kind, range, old_view, new_view);
        if let Some(view) = old_view {
            if let Err(failed) = discard_run(inner.followers(view), view, range) {
                return Err(self.discards_failed(inner, &change, failed));
            }
        }
        if let Err(source) = step.apply(&change) {
            return Err(self.step_failed(inner, &change, source));
        }
        if let Some(view) = new_view {
            if let Err((index, refusal)) = populate_run(inner.followers(view), view, range) {
                return Err(self.populate_refused(inner, &change, step, (0, index), refusal));
            }
        }
        inner.extents.set_within(w, a, b, new);
        Ok(change)
    }

    /// The discards of a change with several discarded runs: each listener gets its share
    /// in one call, so that it can drop them together (one IOMMU unmap across the gaps).
    fn discard_batched(inner: &mut Inner, change: &Change) -> Result<(), Vec<DiscardFailure>> {
        let mut failed = Ok(());
        for entry in &inner.listeners {
            let batch = &mut inner.batch;
            batch.clear();
            batch.extend(
                change
                    .discarded()
                    .iter()
                    .filter(|vr| vr.view == entry.info.view)
                    .filter_map(|vr| entry.info.range.intersect(&vr.range)),
            );
            let result = match batch.as_slice() {
                [] => Ok(()),
                [range] => entry.listener.discard(entry.info.view, *range),
                runs => entry.listener.discard_runs(entry.info.view, runs),
            };
            if let Err(source) = result {
                add_failure(
                    &mut failed,
                    (entry.info.id, entry.info.view),
                    batch[0],
                    source,
                );
            }
        }
        failed
    }

    /// Builds the [`Change`] of a plan: source runs and view runs that change.
    fn describe(&self, plan: &Plan, kind: ChangeKind) -> Change {
        let mut change = Change::new(kind);
        for p in plan.pieces.iter().filter(|p| p.old != p.new) {
            let range = self.geometry.range_of(p.start, p.end);
            change.push_run(range);
            let (old, new) = (p.old.view(), p.new.view());
            if old != new {
                if let Some(view) = old {
                    change.push_discarded(view, range);
                }
                if let Some(view) = new {
                    change.push_populated(view, range);
                }
            }
        }
        change
    }

    ///
    /// # Errors
    /// [`Error::Range`], [`Error::Reentrant`], [`Error::Poisoned`].
    pub fn runs(&self, range: GpaRange) -> Result<Vec<Run>, Error> {
        let (a, b) = self.geometry.granules_of(range)?;
        let locked = self.lock()?;
        let mut runs = Vec::new();
        locked.guard.extents.for_each_run(a, b, |s, e, state| {
            runs.push(Run {
                range: self.geometry.range_of(s, e),
                attribute: state.attribute(),
                plugged: state.plugged(),
            })
        });
        Ok(runs)
    }

    /// Maximal runs of `view` in `range`, clipped to it, in address order.
    ///
    /// # Errors
    /// [`Error::Range`], [`Error::Reentrant`], [`Error::Poisoned`].
    pub fn view_runs(&self, view: View, range: GpaRange) -> Result<Vec<GpaRange>, Error> {
        let (a, b) = self.geometry.granules_of(range)?;
        let locked = self.lock()?;
        let mut runs = Vec::new();
        locked.guard.extents.for_each_run(a, b, |s, e, state| {
            if state.view() == Some(view) {
                runs.push(self.geometry.range_of(s, e));
            }
        });
        Ok(runs)
    }

    /// Whether every granule of `range` is in `view`.
    ///
    /// # Errors
    /// [`Error::Range`], [`Error::Reentrant`], [`Error::Poisoned`].
    pub fn is_populated(&self, view: View, range: GpaRange) -> Result<bool, Error> {
        let (a, b) = self.geometry.granules_of(range)?;
        let locked = self.lock()?;
        let outside = locked.guard.extents.try_for_each_run(a, b, |_, _, state| {
            if state.view() == Some(view) {
                Ok(())
            } else {
                Err(())
            }
        });
        Ok(outside.is_ok())
    }

    /// Byte totals of the region and its number of runs, in O(1).
    ///
    /// # Errors
    /// [`Error::Reentrant`], [`Error::Poisoned`].
    pub fn counts(&self) -> Result<Counts, Error> {
        let locked = self.lock()?;
        let e = &locked.guard.extents;
        let shift = self.geometry.shift;
        Ok(Counts {
            shared_bytes: e.total(true, Attribute::Shared) << shift,
            private_bytes: e.total(true, Attribute::Private) << shift,
            unplugged_bytes: (e.total(false, Attribute::Shared)
                + e.total(false, Attribute::Private))
                << shift,
            runs: e.len(),
        })
    }

    /// Number of extents (maximal runs of combined state) the region is stored as.
    ///
    /// # Errors
    /// [`Error::Reentrant`], [`Error::Poisoned`].
    pub fn extent_count(&self) -> Result<usize, Error> {
        Ok(self.lock()?.guard.extents.len())
    }

    /// Bytes the manager occupies, from the capacities of its allocations: the struct
    /// itself, the extents (chunk table, first-key table, chunk buffers), the listener table
    /// and the reusable transaction buffers. (Allocator bookkeeping is not included.)
    ///
    /// # Errors
    /// [`Error::Reentrant`], [`Error::Poisoned`].
    pub fn memory_bytes(&self) -> Result<usize, Error> {
        let locked = self.lock()?;
        let inner = &*locked.guard;
        Ok(size_of::<Self>()
            + inner.extents.heap_bytes()
            + inner.listeners.capacity() * size_of::<Entry>()
            + inner.by_view.iter().map(Vec::capacity).sum::<usize>() * size_of::<Follower>()
            + inner.plan.heap_bytes()
            + inner.batch.capacity() * size_of::<GpaRange>()
            + (inner.sent_discards.capacity() + inner.sent_populates.capacity())
                * size_of::<Sent>())
    }

    /// The registered listeners, in registration order.
    ///
    /// # Errors
    /// [`Error::Reentrant`], [`Error::Poisoned`].
    pub fn listeners(&self) -> Result<Vec<ListenerInfo>, Error> {
        Ok(self
            .lock()?
            .guard
            .listeners
            .iter()
            .map(|e| e.info)
            .collect())
    }

    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        if let Ok(locked) = self.lock() {
            locked.guard.extents.check_invariants();
        }
    }
}
