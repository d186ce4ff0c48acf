//! Behaviour tests of the manager against recording listeners.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, Weak};

use crate::*;

const G: u64 = 0x1000;
const BASE: u64 = 0x10_0000;

fn r(first: u64, granules: u64) -> GpaRange {
    GpaRange::new(BASE + first * G, granules * G).unwrap()
}

fn manager(granules: u64, attribute: Attribute, plugged: bool) -> DiscardManager {
    DiscardManager::new(RegionConfig {
        base: BASE,
        size: granules * G,
        granularity: G,
        initial_attribute: attribute,
        initially_plugged: plugged,
    })
    .unwrap()
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    Populate(&'static str, View, GpaRange),
    Discard(&'static str, View, GpaRange),
    /// One `discard_runs` call.
    DiscardRuns(&'static str, View, Vec<GpaRange>),
    Apply,
    Undo,
}

type Log = Arc<Mutex<Vec<Event>>>;
type FailRule = Box<dyn FnMut(GpaRange) -> bool + Send>;

/// Records calls into a shared log and checks the listener contract: never a populate of
/// something held, never a discard of something not held, always aligned and inside its range.
struct Recorder {
    name: &'static str,
    range: GpaRange,
    log: Log,
    held: Mutex<BTreeSet<u64>>,
    fail: Mutex<Option<FailRule>>,
    fail_discard: Mutex<Option<FailRule>>,
}

impl Recorder {
    fn new(name: &'static str, range: GpaRange, log: &Log) -> Arc<Self> {
        Arc::new(Self {
            name,
            range,
            log: log.clone(),
            held: Mutex::new(BTreeSet::new()),
            fail: Mutex::new(None),
            fail_discard: Mutex::new(None),
        })
    }

    /// Fails the discards of ranges `rule` picks (after dropping them, as the contract says).
    fn fail_discard_when(&self, rule: impl FnMut(GpaRange) -> bool + Send + 'static) {
        *self.fail_discard.lock().unwrap() = Some(Box::new(rule));
    }

    fn discard_result(&self, range: GpaRange) -> Result<(), ListenerError> {
        let fails = self
            .fail_discard
            .lock()
            .unwrap()
            .as_mut()
            .is_some_and(|rule| rule(range));
        if fails {
            return Err(format!("{} cannot drop {range}", self.name).into());
        }
        Ok(())
    }

    fn fail_when(&self, rule: impl FnMut(GpaRange) -> bool + Send + 'static) {
        *self.fail.lock().unwrap() = Some(Box::new(rule));
    }

    fn held_runs(&self) -> Vec<GpaRange> {
        runs_of(&self.held.lock().unwrap())
    }

    fn check(&self, range: GpaRange) {
        assert!(
            self.range.contains(&range),
            "{range} outside {}",
            self.range
        );
        assert_eq!(range.start() % G, 0);
        assert_eq!(range.len() % G, 0);
    }
}

fn runs_of(granules: &BTreeSet<u64>) -> Vec<GpaRange> {
    let mut out: Vec<GpaRange> = Vec::new();
    for &g in granules {
        match out.last_mut() {
            Some(last) if last.end() == g => {
                *last = GpaRange::new(last.start(), last.len() + G).unwrap()
            }
            _ => out.push(GpaRange::new(g, G).unwrap()),
        }
    }
    out
}

impl ViewListener for Recorder {
    fn populate(&self, view: View, range: GpaRange) -> Result<(), ListenerError> {
        self.check(range);
        if let Some(rule) = self.fail.lock().unwrap().as_mut() {
            if rule(range) {
                return Err(format!("{} refuses {range}", self.name).into());
            }
        }
        let mut held = self.held.lock().unwrap();
        for g in (range.start()..range.end()).step_by(G as usize) {
            assert!(held.insert(g), "{}: populate of held {g:#x}", self.name);
        }
        self.log
            .lock()
            .unwrap()
            .push(Event::Populate(self.name, view, range));
        Ok(())
    }

    fn discard(&self, view: View, range: GpaRange) -> Result<(), ListenerError> {
        self.drop_held(range);
        self.log
            .lock()
            .unwrap()
            .push(Event::Discard(self.name, view, range));
        self.discard_result(range)
    }

    fn discard_runs(&self, view: View, runs: &[GpaRange]) -> Result<(), ListenerError> {
        assert!(runs.len() >= 2, "{}: discard_runs of {runs:?}", self.name);
        for pair in runs.windows(2) {
            assert!(
                pair[0].end() < pair[1].start(),
                "{}: runs not sorted and apart: {runs:?}",
                self.name
            );
        }
        for &range in runs {
            self.drop_held(range);
        }
        self.log
            .lock()
            .unwrap()
            .push(Event::DiscardRuns(self.name, view, runs.to_vec()));
        runs.iter()
            .try_for_each(|&range| self.discard_result(range))
    }
}

impl Recorder {
    fn drop_held(&self, range: GpaRange) {
        self.check(range);
        let mut held = self.held.lock().unwrap();
        for g in (range.start()..range.end()).step_by(G as usize) {
            assert!(held.remove(&g), "{}: discard of unheld {g:#x}", self.name);
        }
    }
}

/// A step that records into the log and fails on request.
struct RecStep {
    log: Log,
    fail: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("KVM_SET_MEMORY_ATTRIBUTES refused")]
struct StepError;

impl TransactionStep for RecStep {
    type Error = StepError;
    fn apply(&mut self, _change: &Change) -> Result<(), StepError> {
        if self.fail {
            return Err(StepError);
        }
        self.log.lock().unwrap().push(Event::Apply);
        Ok(())
    }
    fn undo(&mut self, _change: &Change) {
        self.log.lock().unwrap().push(Event::Undo);
    }
}

fn take(log: &Log) -> Vec<Event> {
    std::mem::take(&mut *log.lock().unwrap())
}

use Event::{Apply, Discard, DiscardRuns, Populate, Undo};

/// vCPU threads share one manager: it must be `Send + Sync` (checked at compile time).
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<DiscardManager>();
};

#[test]
fn conversion_of_a_mixed_range_notifies_one_call_per_changed_run() {
    let mgr = manager(64, Attribute::Private, true);
    let log = Log::default();
    let sh = Recorder::new("sh", mgr.region(), &log);
    mgr.register(View::Shared, mgr.region(), sh.clone())
        .unwrap();
    mgr.convert(r(2, 1), Attribute::Shared).unwrap();
    mgr.convert(r(5, 2), Attribute::Shared).unwrap();
    take(&log);

    let change = mgr.convert(r(0, 10), Attribute::Shared).unwrap();
    assert_eq!(change.runs(), [r(0, 2), r(3, 2), r(7, 3)]);
    assert_eq!(
        take(&log),
        [
            Populate("sh", View::Shared, r(0, 2)),
            Populate("sh", View::Shared, r(3, 2)),
            Populate("sh", View::Shared, r(7, 3)),
        ]
    );
    assert_eq!(sh.held_runs(), [r(0, 10)]);
    assert_eq!(mgr.extent_count().unwrap(), 2);
    mgr.check_invariants();
}

#[test]
fn converting_to_private_discards_shared_before_populating_private() {
    let mgr = manager(16, Attribute::Shared, true);
    let log = Log::default();
    let sh = Recorder::new("sh", mgr.region(), &log);
    let pv = Recorder::new("pv", mgr.region(), &log);
    mgr.register(View::Private, mgr.region(), pv.clone())
        .unwrap();
    mgr.register(View::Shared, mgr.region(), sh.clone())
        .unwrap();
    take(&log);
    let mut step = RecStep {
        log: log.clone(),
        fail: false,
    };
    let change = mgr
        .convert_with(r(4, 4), Attribute::Private, &mut step)
        .unwrap();
    assert_eq!(
        change.kind(),
        ChangeKind::Convert {
            to: Attribute::Private
        }
    );
    assert_eq!(
        change.discarded(),
        [ViewRange {
            view: View::Shared,
            range: r(4, 4)
        }]
    );
    assert_eq!(
        change.populated(),
        [ViewRange {
            view: View::Private,
            range: r(4, 4)
        }]
    );
    assert_eq!(
        take(&log),
        [
            Discard("sh", View::Shared, r(4, 4)),
            Apply,
            Populate("pv", View::Private, r(4, 4)),
        ]
    );
    // Converting again changes nothing and notifies nobody, the step is not called.
    let again = mgr
        .convert_with(r(4, 4), Attribute::Private, &mut step)
        .unwrap();
    assert!(again.is_empty());
    assert_eq!(take(&log), []);
}

#[test]
fn unplugged_granules_change_attribute_silently_and_join_the_right_view_when_plugged() {
    let mgr = manager(16, Attribute::Private, false);
    let log = Log::default();
    let sh = Recorder::new("sh", mgr.region(), &log);
    let pv = Recorder::new("pv", mgr.region(), &log);
    mgr.register(View::Shared, mgr.region(), sh.clone())
        .unwrap();
    mgr.register(View::Private, mgr.region(), pv.clone())
        .unwrap();
    assert_eq!(take(&log), []);

    let change = mgr.convert(r(0, 4), Attribute::Shared).unwrap();
    assert_eq!(change.runs(), [r(0, 4)]);
    assert!(change.discarded().is_empty() && change.populated().is_empty());
    assert_eq!(take(&log), []);

    let plug = mgr.plug(r(2, 4)).unwrap();
    assert_eq!(plug.runs(), [r(2, 4)]);
    assert_eq!(
        take(&log),
        [
            Populate("sh", View::Shared, r(2, 2)),
            Populate("pv", View::Private, r(4, 2)),
        ]
    );
    let unplug = mgr.unplug(r(0, 16)).unwrap();
    assert_eq!(unplug.runs(), [r(2, 4)]);
    assert_eq!(
        take(&log),
        [
            Discard("sh", View::Shared, r(2, 2)),
            Discard("pv", View::Private, r(4, 2)),
        ]
    );
    assert_eq!(
        mgr.counts().unwrap(),
        Counts {
            shared_bytes: 0,
            private_bytes: 0,
            unplugged_bytes: 16 * G,
            runs: 2
        }
    );
}

#[test]
fn notifications_are_clipped_to_the_listener_range() {
    let mgr = manager(32, Attribute::Private, true);
    let log = Log::default();
    let part = Recorder::new("part", r(8, 8), &log);
    mgr.register(View::Shared, r(8, 8), part.clone()).unwrap();
    mgr.convert(r(0, 32), Attribute::Shared).unwrap();
    mgr.convert(r(0, 10), Attribute::Private).unwrap();
    mgr.convert(r(20, 4), Attribute::Private).unwrap();
    assert_eq!(
        take(&log),
        [
            Populate("part", View::Shared, r(8, 8)),
            Discard("part", View::Shared, r(8, 2)),
        ]
    );
}

#[test]
fn register_replays_populated_runs_and_unregister_discards_them() {
    let mgr = manager(32, Attribute::Private, true);
    mgr.convert(r(1, 2), Attribute::Shared).unwrap();
    mgr.convert(r(10, 20), Attribute::Shared).unwrap();
    mgr.unplug(r(12, 2)).unwrap();
    let log = Log::default();
    let sh = Recorder::new("sh", r(0, 16), &log);
    let id = mgr.register(View::Shared, r(0, 16), sh.clone()).unwrap();
    assert_eq!(
        take(&log),
        [
            Populate("sh", View::Shared, r(1, 2)),
            Populate("sh", View::Shared, r(10, 2)),
            Populate("sh", View::Shared, r(14, 2)),
        ]
    );
    assert_eq!(
        mgr.listeners().unwrap(),
        [ListenerInfo {
            id,
            view: View::Shared,
            range: r(0, 16)
        }]
    );
    mgr.unregister(id).unwrap();
    assert_eq!(sh.held_runs(), []);
    assert_eq!(take(&log).len(), 3);
    assert!(matches!(mgr.unregister(id), Err(Error::UnknownListener { id: i }) if i == id));
    assert_eq!(mgr.listeners().unwrap(), []);
}

#[test]
fn failed_replay_discards_what_was_replayed_and_does_not_register() {
    let mgr = manager(32, Attribute::Private, true);
    mgr.convert(r(1, 2), Attribute::Shared).unwrap();
    mgr.convert(r(5, 1), Attribute::Shared).unwrap();
    mgr.convert(r(9, 3), Attribute::Shared).unwrap();
    let log = Log::default();
    let sh = Recorder::new("sh", mgr.region(), &log);
    sh.fail_when(|range| range == r(9, 3));
    let err = mgr
        .register(View::Shared, mgr.region(), sh.clone())
        .unwrap_err();
    match &err {
        Error::ReplayRefused {
            view,
            range,
            replayed,
            ..
        } => {
            assert_eq!((*view, *range, *replayed), (View::Shared, r(9, 3), 2));
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("not registered"), "{err}");
    assert_eq!(sh.held_runs(), []);
    assert_eq!(
        take(&log),
        [
            Populate("sh", View::Shared, r(1, 2)),
            Populate("sh", View::Shared, r(5, 1)),
            Discard("sh", View::Shared, r(1, 2)),
            Discard("sh", View::Shared, r(5, 1)),
        ]
    );
    assert_eq!(mgr.listeners().unwrap(), []);
}

#[test]
fn refused_populate_rolls_back_every_listener_the_step_and_the_state() {
    let mgr = manager(16, Attribute::Shared, true);
    let log = Log::default();
    let sh = Recorder::new("sh", mgr.region(), &log);
    let pv1 = Recorder::new("pv1", mgr.region(), &log);
    let pv2 = Recorder::new("pv2", r(0, 8), &log);
    mgr.register(View::Shared, mgr.region(), sh.clone())
        .unwrap();
    mgr.register(View::Private, mgr.region(), pv1.clone())
        .unwrap();
    let id2 = mgr.register(View::Private, r(0, 8), pv2.clone()).unwrap();
    mgr.unplug(r(4, 1)).unwrap();
    take(&log);
    let before = mgr.runs(mgr.region()).unwrap();

    pv2.fail_when(|range| range == r(5, 3));
    let mut step = RecStep {
        log: log.clone(),
        fail: false,
    };
    let err = mgr
        .convert_with(r(2, 8), Attribute::Private, &mut step)
        .unwrap_err();
    let TransactionError::Refused { refusal } = &err else {
        panic!("unexpected {err}");
    };
    assert_eq!(
        (refusal.listener, refusal.view, refusal.range),
        (id2, View::Private, r(5, 3))
    );
    assert!(
        err.to_string()
            .contains("refused to populate private view range"),
        "{err}"
    );
    assert_eq!(
        take(&log),
        [
            // Both runs sh loses, in one call (r(4, 1) is unplugged: not in any view).
            DiscardRuns("sh", View::Shared, vec![r(2, 2), r(5, 5)]),
            Apply,
            Populate("pv1", View::Private, r(2, 2)),
            Populate("pv2", View::Private, r(2, 2)),
            Populate("pv1", View::Private, r(5, 5)),
            // pv2 refused r(5, 3): rollback in reverse, nothing for the refused range.
            Discard("pv1", View::Private, r(5, 5)),
            Discard("pv2", View::Private, r(2, 2)),
            Discard("pv1", View::Private, r(2, 2)),
            Undo,
            Populate("sh", View::Shared, r(2, 2)),
            Populate("sh", View::Shared, r(5, 5)),
        ]
    );
    assert_eq!(mgr.runs(mgr.region()).unwrap(), before);
    assert_eq!(sh.held_runs(), [r(0, 4), r(5, 11)]);
    assert_eq!(pv1.held_runs(), []);
    mgr.check_invariants();
}

#[test]
fn failed_discard_skips_the_step_and_repopulates_every_listener_that_lost_the_range() {
    let mgr = manager(16, Attribute::Shared, true);
    let log = Log::default();
    let sh1 = Recorder::new("sh1", mgr.region(), &log);
    let sh2 = Recorder::new("sh2", mgr.region(), &log);
    let pv = Recorder::new("pv", mgr.region(), &log);
    let id1 = mgr
        .register(View::Shared, mgr.region(), sh1.clone())
        .unwrap();
    mgr.register(View::Shared, mgr.region(), sh2.clone())
        .unwrap();
    mgr.register(View::Private, mgr.region(), pv.clone())
        .unwrap();
    take(&log);
    let before = mgr.runs(mgr.region()).unwrap();

    sh1.fail_discard_when(|range| range == r(2, 4));
    let mut step = RecStep {
        log: log.clone(),
        fail: false,
    };
    let err = mgr
        .convert_with(r(2, 4), Attribute::Private, &mut step)
        .unwrap_err();
    let TransactionError::DiscardFailed { first, others } = &err else {
        panic!("unexpected {err}");
    };
    assert_eq!(
        (first.listener, first.view, first.range, others.len()),
        (id1, View::Shared, r(2, 4), 0)
    );
    assert!(err.to_string().contains("could not discard"), "{err}");
    assert_eq!(
        take(&log),
        [
            // Every discard is still sent; then no step, no populate of the gaining view, and
            // the losing view comes back, the failed listener's range included.
            Discard("sh1", View::Shared, r(2, 4)),
            Discard("sh2", View::Shared, r(2, 4)),
            Populate("sh1", View::Shared, r(2, 4)),
            Populate("sh2", View::Shared, r(2, 4)),
        ]
    );
    assert_eq!(mgr.runs(mgr.region()).unwrap(), before);
    assert_eq!(sh1.held_runs(), [mgr.region()]);
    assert_eq!(sh2.held_runs(), [mgr.region()]);
    assert_eq!(pv.held_runs(), []);
    mgr.check_invariants();
}

#[test]
fn failed_step_repopulates_the_losing_view_and_changes_nothing() {
    let mgr = manager(16, Attribute::Shared, true);
    let log = Log::default();
    let sh = Recorder::new("sh", mgr.region(), &log);
    mgr.register(View::Shared, mgr.region(), sh.clone())
        .unwrap();
    take(&log);
    let mut step = RecStep {
        log: log.clone(),
        fail: true,
    };
    let err = mgr.unplug_with(r(0, 4), &mut step).unwrap_err();
    assert!(matches!(
        err,
        TransactionError::StepFailed { source: StepError }
    ));
    assert_eq!(
        take(&log),
        [
            Discard("sh", View::Shared, r(0, 4)),
            Populate("sh", View::Shared, r(0, 4))
        ]
    );
    assert_eq!(mgr.counts().unwrap().shared_bytes, 16 * G);
}

#[test]
fn double_fault_detaches_the_listener_that_cannot_be_restored() {
    let mgr = manager(16, Attribute::Shared, true);
    let log = Log::default();
    let sh = Recorder::new("sh", mgr.region(), &log);
    let keep = Recorder::new("keep", mgr.region(), &log);
    let pv = Recorder::new("pv", mgr.region(), &log);
    let sh_id = mgr
        .register(View::Shared, mgr.region(), sh.clone())
        .unwrap();
    mgr.register(View::Shared, mgr.region(), keep.clone())
        .unwrap();
    mgr.register(View::Private, mgr.region(), pv.clone())
        .unwrap();
    mgr.unplug(r(6, 1)).unwrap();
    take(&log);

    pv.fail_when(|_| true);
    // sh accepts nothing any more: its re-populate during the rollback fails.
    sh.fail_when(|_| true);
    let err = mgr.convert(r(4, 4), Attribute::Private).unwrap_err();
    let TransactionError::RollbackFailed { cause, detached } = &err else {
        panic!("unexpected {err}");
    };
    assert!(matches!(cause, RollbackCause::Refused(refusal) if refusal.range == r(4, 2)));
    assert_eq!(detached.len(), 1);
    assert_eq!((detached[0].listener, detached[0].range), (sh_id, r(4, 2)));
    // sh holds nothing and is gone; keep was restored; the state is unchanged.
    assert_eq!(sh.held_runs(), []);
    assert_eq!(keep.held_runs(), [r(0, 6), r(7, 9)]);
    assert_eq!(mgr.listeners().unwrap().len(), 2);
    assert_eq!(
        mgr.view_runs(View::Shared, mgr.region()).unwrap(),
        [r(0, 6), r(7, 9)]
    );
    let sh_calls: Vec<Event> = take(&log)
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                Populate("sh", ..) | Discard("sh", ..) | DiscardRuns("sh", ..)
            )
        })
        .collect();
    assert_eq!(
        sh_calls,
        [
            DiscardRuns("sh", View::Shared, vec![r(4, 2), r(7, 1)]),
            // Re-populate of r(4, 2) failed, so r(7, 1) was not retried; detach discards
            // the rest of what it held.
            Discard("sh", View::Shared, r(0, 4)),
            Discard("sh", View::Shared, r(8, 8)),
        ]
    );
}

#[test]
fn bad_ranges_get_typed_errors_and_change_nothing() {
    let mgr = manager(16, Attribute::Private, true);
    let log = Log::default();
    let sh = Recorder::new("sh", mgr.region(), &log);
    mgr.register(View::Shared, mgr.region(), sh).unwrap();
    let unaligned = GpaRange::new(BASE + 0x800, G).unwrap();
    assert!(matches!(
        mgr.convert(unaligned, Attribute::Shared),
        Err(TransactionError::Range(RangeError::Unaligned {
            granularity: G,
            ..
        }))
    ));
    let short = GpaRange::new(BASE, G / 2).unwrap();
    assert!(matches!(
        mgr.plug(short),
        Err(TransactionError::Range(RangeError::Unaligned { .. }))
    ));
    let outside = r(15, 2);
    let err = mgr.unplug(outside).unwrap_err();
    assert!(matches!(
        err,
        TransactionError::Range(RangeError::OutsideRegion { .. })
    ));
    assert!(err.to_string().contains("not inside the region"), "{err}");
    assert!(matches!(
        mgr.view_runs(View::Shared, outside),
        Err(Error::Range(RangeError::OutsideRegion { .. }))
    ));
    let other = Recorder::new("x", outside, &log);
    assert!(matches!(
        mgr.register(View::Shared, outside, other),
        Err(Error::Range(RangeError::OutsideRegion { .. }))
    ));
    assert_eq!(take(&log), []);
    assert_eq!(mgr.extent_count().unwrap(), 1);
    assert_eq!(mgr.listeners().unwrap().len(), 1);
}

#[test]
fn queries_report_runs_views_and_counts() {
    let mgr = manager(16, Attribute::Private, true);
    mgr.convert(r(2, 4), Attribute::Shared).unwrap();
    mgr.unplug(r(4, 4)).unwrap();
    assert_eq!(
        mgr.runs(r(0, 10)).unwrap(),
        [
            Run {
                range: r(0, 2),
                attribute: Attribute::Private,
                plugged: true
            },
            Run {
                range: r(2, 2),
                attribute: Attribute::Shared,
                plugged: true
            },
            Run {
                range: r(4, 2),
                attribute: Attribute::Shared,
                plugged: false
            },
            Run {
                range: r(6, 2),
                attribute: Attribute::Private,
                plugged: false
            },
            Run {
                range: r(8, 2),
                attribute: Attribute::Private,
                plugged: true
            },
        ]
    );
    assert_eq!(
        mgr.view_runs(View::Private, mgr.region()).unwrap(),
        [r(0, 2), r(8, 8)]
    );
    assert!(mgr.is_populated(View::Shared, r(2, 2)).unwrap());
    assert!(!mgr.is_populated(View::Shared, r(2, 3)).unwrap());
    assert_eq!(
        mgr.counts().unwrap(),
        Counts {
            shared_bytes: 2 * G,
            private_bytes: 10 * G,
            unplugged_bytes: 4 * G,
            runs: 5
        }
    );
    assert!(mgr.memory_bytes().unwrap() >= size_of::<DiscardManager>());
}

/// A listener that calls back into its own manager from inside a notification.
struct Reenter {
    mgr: Mutex<Weak<DiscardManager>>,
    seen: Mutex<Vec<String>>,
}

impl ViewListener for Reenter {
    fn populate(&self, _view: View, range: GpaRange) -> Result<(), ListenerError> {
        let mgr = self.mgr.lock().unwrap().upgrade().ok_or("manager gone")?;
        let mut seen = self.seen.lock().unwrap();
        seen.push(format!(
            "{:?}",
            mgr.convert(range, Attribute::Private).map(|_| ())
        ));
        seen.push(format!("{:?}", mgr.counts().map(|_| ())));
        seen.push(format!("{:?}", mgr.unregister(ListenerId(1))));
        Ok(())
    }

    fn discard(&self, _view: View, _range: GpaRange) -> Result<(), ListenerError> {
        Ok(())
    }
}

#[test]
fn reentrant_calls_from_a_listener_or_step_get_an_error_not_a_deadlock() {
    let mgr = Arc::new(manager(16, Attribute::Private, true));
    let listener = Arc::new(Reenter {
        mgr: Mutex::new(Arc::downgrade(&mgr)),
        seen: Mutex::default(),
    });
    mgr.register(View::Shared, mgr.region(), listener.clone())
        .unwrap();
    mgr.convert(r(0, 1), Attribute::Shared).unwrap();
    assert_eq!(*listener.seen.lock().unwrap(), ["Err(Reentrant)"; 3]);
    // The lock was released: normal calls work afterwards, from this and other threads.
    assert_eq!(mgr.counts().unwrap().shared_bytes, G);
    let m2 = mgr.clone();
    std::thread::spawn(move || m2.convert(r(0, 1), Attribute::Private).map(|_| ()))
        .join()
        .unwrap()
        .unwrap();

    struct ReenterStep(Arc<DiscardManager>, Option<String>);
    impl TransactionStep for ReenterStep {
        type Error = std::convert::Infallible;
        fn apply(&mut self, _: &Change) -> Result<(), Self::Error> {
            self.1 = Some(format!("{:?}", self.0.runs(r(0, 1)).map(|_| ())));
            Ok(())
        }
        fn undo(&mut self, _: &Change) {}
    }
    let mut step = ReenterStep(mgr.clone(), None);
    mgr.convert_with(r(4, 1), Attribute::Private, &mut step)
        .unwrap();
    assert_eq!(step.1, None, "no-op change must not run the step");
    mgr.convert_with(r(4, 1), Attribute::Shared, &mut step)
        .unwrap();
    assert_eq!(step.1.as_deref(), Some("Err(Reentrant)"));
}

struct Panicker;
impl ViewListener for Panicker {
    fn populate(&self, _: View, _: GpaRange) -> Result<(), ListenerError> {
        panic!("listener bug");
    }
    fn discard(&self, _: View, _: GpaRange) -> Result<(), ListenerError> {
        Ok(())
    }
}

#[test]
fn a_panicking_listener_poisons_the_manager() {
    let mgr = manager(16, Attribute::Private, true);
    mgr.register(View::Shared, mgr.region(), Arc::new(Panicker))
        .unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = mgr.convert(r(0, 1), Attribute::Shared);
    }));
    assert!(caught.is_err());
    assert!(matches!(
        mgr.convert(r(0, 1), Attribute::Shared),
        Err(TransactionError::Poisoned)
    ));
    assert!(matches!(mgr.counts(), Err(Error::Poisoned)));
}

#[test]
fn concurrent_conversions_lose_no_update_and_listeners_match_the_view() {
    const GRANULES: u64 = 256;
    const THREADS: u64 = 4;
    let mgr = Arc::new(manager(GRANULES, Attribute::Private, true));
    let log = Log::default();
    let sh = Recorder::new("sh", mgr.region(), &log);
    let pv = Recorder::new("pv", r(64, 128), &log);
    mgr.register(View::Shared, mgr.region(), sh.clone())
        .unwrap();
    mgr.register(View::Private, r(64, 128), pv.clone()).unwrap();

    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let mgr = mgr.clone();
            std::thread::spawn(move || {
                let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ (t + 1);
                for i in 0..2000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Odd iterations: a granule of the upper half only this thread
                    // touches (disjoint); even ones: any range of the lower half
                    // (overlapping with the other threads).
                    let half = GRANULES / 2;
                    let (first, len) = if i % 2 == 1 {
                        (half + (x % (half / THREADS)) * THREADS + t, 1)
                    } else {
                        let first = x % half;
                        (first, 1 + (x >> 32) % (half - first).min(8))
                    };
                    let to = if x >> 63 == 0 {
                        Attribute::Shared
                    } else {
                        Attribute::Private
                    };
                    let op = x >> 60 & 3;
                    let change = match op {
                        0 => mgr.unplug(r(first, len)),
                        1 => mgr.plug(r(first, len)),
                        _ => mgr.convert(r(first, len), to),
                    }
                    .unwrap();
                    assert!(change.runs().len() <= len as usize);
                    // A disjoint granule is ours alone: its state is what we just set.
                    if i % 2 == 1 {
                        let run = mgr.runs(r(first, 1)).unwrap()[0];
                        match op {
                            0 => assert!(!run.plugged, "lost unplug at {first}"),
                            1 => assert!(run.plugged, "lost plug at {first}"),
                            _ => assert_eq!(run.attribute, to, "lost conversion at {first}"),
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(
        sh.held_runs(),
        mgr.view_runs(View::Shared, mgr.region()).unwrap()
    );
    assert_eq!(
        pv.held_runs(),
        mgr.view_runs(View::Private, r(64, 128)).unwrap()
    );
    let c = mgr.counts().unwrap();
    assert_eq!(
        c.shared_bytes + c.private_bytes + c.unplugged_bytes,
        GRANULES * G
    );
    mgr.check_invariants();
}
