//! Property test: the manager against a deliberately simple per-granule model.
//!
//! Long random sequences of convert / plug / unplug / register / unregister run against
//! listeners that refuse populates and fail discards at random (also during rollbacks,
//! producing double faults) and a step that fails at random. After every operation:
//! * the manager's runs equal the model (a `Vec` with one state per granule),
//! * every registered listener's own record equals the manager's view over its range
//!   (and the model's), and detached or unregistered listeners hold nothing,
//! * a successful transaction notified each listener exactly the maximal runs that left
//!   or joined its view inside its range, discards first, and returned exactly the maximal
//!   runs whose source state changed.
//!
//! Each listener asserts, on every call, that it never gets a populate for something it
//! holds or a discard for something it does not hold, and that ranges are aligned and
//! inside its range. A listener whose discard fails keeps the range as *stale* (it no longer
//! holds it, as the contract says, but could not drop it); a later populate takes it back.

use std::sync::{Arc, Mutex};

use gmem_dma_discard_manager::{
    Attribute, Change, ChangeKind, DiscardManager, Error, GpaRange, ListenerError, ListenerId,
    RangeError, RegionConfig, TransactionError, TransactionStep, View, ViewListener,
};
use proptest::prelude::*;

const G: u64 = 0x1000;
const BASE: u64 = 0x4000_0000;
const GRANULES: u64 = 256;
const SLOTS: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    plugged: bool,
    attribute: Attribute,
}

impl State {
    fn view(self) -> Option<View> {
        self.plugged.then_some(match self.attribute {
            Attribute::Shared => View::Shared,
            Attribute::Private => View::Private,
        })
    }
}

fn gpa(a: u64, b: u64) -> GpaRange {
    GpaRange::new(BASE + a * G, (b - a) * G).unwrap()
}

/// Maximal runs of granule indices in `[a, b)` where `pred` holds.
fn runs_where(a: u64, b: u64, pred: impl Fn(u64) -> bool) -> Vec<GpaRange> {
    let mut out = Vec::new();
    let mut start = None;
    for g in a..=b {
        let inside = g < b && pred(g);
        match (start, inside) {
            (None, true) => start = Some(g),
            (Some(s), false) => {
                out.push(gpa(s, g));
                start = None;
            }
            _ => {}
        }
    }
    out
}

#[derive(Default)]
struct ProbeState {
    held: Vec<bool>,
    calls: Vec<(bool, GpaRange)>,
    /// Granules a failed discard could not drop (not held).
    stale: Vec<bool>,
    populate_calls: u32,
    fail_at: Vec<u32>,
    failed: u32,
    discard_calls: u32,
    discard_fail_at: Vec<u32>,
    discard_failed: u32,
}

/// A listener that records what it holds and refuses the populate calls it is told to.
struct Probe {
    view: View,
    a: u64,
    b: u64,
    state: Mutex<ProbeState>,
}

impl Probe {
    fn range(&self) -> GpaRange {
        gpa(self.a, self.b)
    }

    fn granules(&self, view: View, range: GpaRange) -> std::ops::Range<u64> {
        assert_eq!(view, self.view, "notified for the wrong view");
        assert!(
            self.range().contains(&range),
            "{range} outside {}",
            self.range()
        );
        assert_eq!(range.start() % G, 0, "unaligned {range}");
        assert_eq!(range.len() % G, 0, "unaligned {range}");
        (range.start() - BASE) / G..(range.end() - BASE) / G
    }

    fn held_runs(&self) -> Vec<GpaRange> {
        let s = self.state.lock().unwrap();
        runs_where(0, GRANULES, |g| s.held[g as usize])
    }

    fn start_op(&self, fail_at: Vec<u32>, discard_fail_at: Vec<u32>) {
        let mut s = self.state.lock().unwrap();
        s.calls.clear();
        s.populate_calls = 0;
        s.fail_at = fail_at;
        s.failed = 0;
        s.discard_calls = 0;
        s.discard_fail_at = discard_fail_at;
        s.discard_failed = 0;
    }

    /// Drops `runs` (held, as the contract promises); one failure decision for the call: a
    /// failed call leaves every granule of it stale.
    fn drop_runs(&self, view: View, runs: &[GpaRange]) -> Result<(), ListenerError> {
        let mut s = self.state.lock().unwrap();
        let call = s.discard_calls;
        s.discard_calls += 1;
        let fails = s.discard_fail_at.contains(&call);
        for &range in runs {
            for g in self.granules(view, range) {
                assert!(
                    s.held[g as usize],
                    "discard of unheld granule {g} in {range}"
                );
                s.held[g as usize] = false;
                s.stale[g as usize] = fails;
            }
            s.calls.push((false, range));
        }
        if fails {
            s.discard_failed += 1;
            return Err(format!("failing discard call {call}").into());
        }
        Ok(())
    }
}

impl ViewListener for Probe {
    fn populate(&self, view: View, range: GpaRange) -> Result<(), ListenerError> {
        let granules = self.granules(view, range);
        let mut s = self.state.lock().unwrap();
        let call = s.populate_calls;
        s.populate_calls += 1;
        if s.fail_at.contains(&call) {
            s.failed += 1;
            return Err(format!("refusing populate call {call}").into());
        }
        for g in granules {
            assert!(
                !s.held[g as usize],
                "populate of held granule {g} in {range}"
            );
            s.held[g as usize] = true;
            s.stale[g as usize] = false;
        }
        s.calls.push((true, range));
        Ok(())
    }

    fn discard(&self, view: View, range: GpaRange) -> Result<(), ListenerError> {
        self.drop_runs(view, &[range])
    }

    fn discard_runs(&self, view: View, runs: &[GpaRange]) -> Result<(), ListenerError> {
        assert!(runs.len() >= 2, "discard_runs of {runs:?}");
        assert!(
            runs.windows(2).all(|w| w[0].end() < w[1].start()),
            "discard_runs: not sorted and apart: {runs:?}"
        );
        self.drop_runs(view, runs)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("step refused")]
struct StepRefused;

struct Step {
    fail: bool,
    applied: u32,
    undone: u32,
}

impl TransactionStep for Step {
    type Error = StepRefused;
    fn apply(&mut self, change: &Change) -> Result<(), StepRefused> {
        assert!(!change.is_empty(), "step called for an empty change");
        assert_eq!(self.applied, 0, "apply called twice");
        if self.fail {
            return Err(StepRefused);
        }
        self.applied += 1;
        Ok(())
    }
    fn undo(&mut self, _: &Change) {
        assert_eq!((self.applied, self.undone), (1, 0), "undo without apply");
        self.undone += 1;
    }
}

/// (listener slot, 0-based call of the operation that fails).
type Failure = (usize, u32);

#[derive(Clone, Copy, Debug)]
enum Kind {
    Convert(Attribute),
    Plug,
    Unplug,
}

#[derive(Clone, Debug)]
enum Op {
    Transaction {
        kind: Kind,
        a: u64,
        len: u64,
        misalign: bool,
        fails: Vec<(usize, u32)>,
        discard_fails: Vec<(usize, u32)>,
        step_fails: bool,
    },
    Register {
        slot: usize,
        view: View,
        a: u64,
        len: u64,
        fail_at: Option<u32>,
    },
    Unregister {
        slot: usize,
    },
}

fn attribute() -> impl Strategy<Value = Attribute> {
    prop_oneof![Just(Attribute::Shared), Just(Attribute::Private)]
}

/// Mostly one or two granules (fragments the region into many runs), sometimes up to 16.
fn span() -> impl Strategy<Value = (u64, u64)> {
    (0..GRANULES).prop_flat_map(|a| {
        let max = (GRANULES - a).min(16);
        (Just(a), prop_oneof![3 => 1..=max.min(2), 1 => 1..=max])
    })
}

fn op() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![
        4 => attribute().prop_map(Kind::Convert),
        1 => Just(Kind::Plug),
        1 => Just(Kind::Unplug),
    ];
    let fails = prop_oneof![
        1 => Just(Vec::new()),
        1 => proptest::collection::vec((0..SLOTS, 0u32..3), 1..=3),
    ];
    let discard_fails = prop_oneof![
        3 => Just(Vec::new()),
        1 => proptest::collection::vec((0..SLOTS, 0u32..3), 1..=2),
    ];
    prop_oneof![
        12 => (kind, span(), proptest::bool::weighted(0.03), fails, discard_fails,
               proptest::bool::weighted(0.08))
            .prop_map(|(kind, (a, len), misalign, fails, discard_fails, step_fails)| {
                Op::Transaction { kind, a, len, misalign, fails, discard_fails, step_fails }
            }),
        2 => (0..SLOTS, prop_oneof![Just(View::Shared), Just(View::Private)], 0..GRANULES,
              proptest::option::weighted(0.2, 0u32..3))
            .prop_flat_map(|(slot, view, a, fail_at)| {
                (Just(slot), Just(view), Just(a), 1..=GRANULES - a, Just(fail_at))
            })
            .prop_map(|(slot, view, a, len, fail_at)| Op::Register { slot, view, a, len, fail_at }),
        1 => (0..SLOTS).prop_map(|slot| Op::Unregister { slot }),
    ]
}

struct Harness {
    mgr: DiscardManager,
    model: Vec<State>,
    slots: Vec<Option<(ListenerId, Arc<Probe>)>>,
    /// Listeners no longer registered (unregistered, detached, refused replay).
    gone: Vec<Arc<Probe>>,
    outcomes: Outcomes,
}

impl Harness {
    fn new(initial: State) -> Self {
        let mgr = DiscardManager::new(RegionConfig {
            base: BASE,
            size: GRANULES * G,
            granularity: G,
            initial_attribute: initial.attribute,
            initially_plugged: initial.plugged,
        })
        .unwrap();
        Self {
            mgr,
            model: vec![initial; GRANULES as usize],
            slots: vec![None; SLOTS],
            gone: Vec::new(),
            outcomes: Outcomes::default(),
        }
    }

    fn probes(&self) -> impl Iterator<Item = &Arc<Probe>> {
        self.slots.iter().flatten().map(|(_, p)| p)
    }

    fn model_view_runs(&self, model: &[State], view: View, a: u64, b: u64) -> Vec<GpaRange> {
        runs_where(a, b, |g| model[g as usize].view() == Some(view))
    }

    fn run(&mut self, op: &Op) {
        match op {
            Op::Transaction {
                kind,
                a,
                len,
                misalign,
                fails,
                discard_fails,
                step_fails,
            } => self.transaction(
                *kind,
                *a,
                *len,
                *misalign,
                (fails, discard_fails),
                *step_fails,
            ),
            Op::Register {
                slot,
                view,
                a,
                len,
                fail_at,
            } => self.register(*slot, *view, *a, *len, *fail_at),
            Op::Unregister { slot } => {
                if let Some((id, probe)) = self.slots[*slot].take() {
                    self.mgr.unregister(id).unwrap();
                    assert_eq!(probe.held_runs(), [], "unregister left holdings");
                    self.gone.push(probe);
                }
            }
        }
    }

    fn transaction(
        &mut self,
        kind: Kind,
        a: u64,
        len: u64,
        misalign: bool,
        (fails, discard_fails): (&[Failure], &[Failure]),
        step_fails: bool,
    ) {
        let of =
            |list: &[Failure], slot| list.iter().filter(|f| f.0 == slot).map(|f| f.1).collect();
        for (slot, entry) in self.slots.iter().enumerate() {
            if let Some((_, p)) = entry {
                p.start_op(of(fails, slot), of(discard_fails, slot));
            }
        }
        let b = a + len;
        let range = if misalign {
            GpaRange::new(BASE + a * G + G / 2, len * G).unwrap()
        } else {
            gpa(a, b)
        };
        let mut step = Step {
            fail: step_fails,
            applied: 0,
            undone: 0,
        };
        let result = match kind {
            Kind::Convert(to) => self.mgr.convert_with(range, to, &mut step),
            Kind::Plug => self.mgr.plug_with(range, &mut step),
            Kind::Unplug => self.mgr.unplug_with(range, &mut step),
        };
        let mut new = self.model.clone();
        for s in &mut new[a as usize..b as usize] {
            match kind {
                Kind::Convert(to) => s.attribute = to,
                Kind::Plug => s.plugged = true,
                Kind::Unplug => s.plugged = false,
            }
        }
        let failures: u32 = self.probes().map(|p| p.state.lock().unwrap().failed).sum();
        let discard_failures: u32 = self
            .probes()
            .map(|p| p.state.lock().unwrap().discard_failed)
            .sum();
        match result {
            Ok(change) => {
                assert!(!misalign, "misaligned range accepted");
                assert_eq!(failures, 0, "a refusal was ignored");
                assert_eq!(discard_failures, 0, "a failed discard was ignored");
                self.check_change(kind, &change, &new, a, b);
                assert_eq!(step.applied, u32::from(!change.is_empty()));
                assert_eq!(step.undone, 0);
                self.model = new;
                self.outcomes.ok += 1;
            }
            Err(TransactionError::Range(RangeError::Unaligned { .. })) => {
                assert!(misalign);
                self.outcomes.bad_range += 1;
                assert!(
                    self.probes()
                        .all(|p| p.state.lock().unwrap().calls.is_empty())
                );
            }
            Err(TransactionError::StepFailed { .. }) => {
                assert!(step_fails);
                self.outcomes.step_failed += 1;
            }
            Err(TransactionError::DiscardFailed { first, others }) => {
                assert!(
                    discard_failures as usize > others.len(),
                    "{first} without an injected discard failure"
                );
                assert_eq!(step.applied, 0, "the step ran after a failed discard");
                self.outcomes.discard_failed += 1;
            }
            Err(TransactionError::Refused { refusal }) => {
                assert!(
                    failures >= 1,
                    "refusal {refusal} without an injected failure"
                );
                assert_eq!(step.undone, step.applied);
                self.outcomes.refused += 1;
            }
            Err(TransactionError::RollbackFailed { detached, .. }) => {
                assert!(!detached.is_empty());
                self.outcomes.rollback_failed += 1;
                for d in &detached {
                    let slot = self
                        .slots
                        .iter()
                        .position(|s| matches!(s, Some((id, _)) if *id == d.listener))
                        .expect("detached listener unknown to the test");
                    let (_, probe) = self.slots[slot].take().unwrap();
                    assert_eq!(probe.held_runs(), [], "detached listener still holds");
                    self.gone.push(probe);
                }
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }

    /// A successful change: the returned runs and every listener's calls are exact.
    fn check_change(&self, kind: Kind, change: &Change, new: &[State], a: u64, b: u64) {
        let old = &self.model;
        let expected_runs = runs_where(a, b, |g| old[g as usize] != new[g as usize]);
        assert_eq!(change.runs(), expected_runs, "source runs");
        let expected_kind = match kind {
            Kind::Convert(to) => ChangeKind::Convert { to },
            Kind::Plug => ChangeKind::Plug,
            Kind::Unplug => ChangeKind::Unplug,
        };
        assert_eq!(change.kind(), expected_kind);
        for p in self.probes() {
            let in_view = |m: &[State], g: u64| m[g as usize].view() == Some(p.view);
            let mut expected: Vec<(bool, GpaRange)> =
                runs_where(p.a, p.b, |g| in_view(old, g) && !in_view(new, g))
                    .into_iter()
                    .map(|r| (false, r))
                    .collect();
            expected.extend(
                runs_where(p.a, p.b, |g| !in_view(old, g) && in_view(new, g))
                    .into_iter()
                    .map(|r| (true, r)),
            );
            assert_eq!(
                p.state.lock().unwrap().calls,
                expected,
                "calls of a {:?} listener",
                p.view
            );
        }
    }

    fn register(&mut self, slot: usize, view: View, a: u64, len: u64, fail_at: Option<u32>) {
        if let Some((id, probe)) = self.slots[slot].take() {
            self.mgr.unregister(id).unwrap();
            self.gone.push(probe);
        }
        let probe = Arc::new(Probe {
            view,
            a,
            b: a + len,
            state: Mutex::new(ProbeState {
                held: vec![false; GRANULES as usize],
                stale: vec![false; GRANULES as usize],
                ..ProbeState::default()
            }),
        });
        probe.start_op(fail_at.into_iter().collect(), Vec::new());
        match self.mgr.register(view, probe.range(), probe.clone()) {
            Ok(id) => {
                assert_eq!(probe.state.lock().unwrap().failed, 0);
                self.slots[slot] = Some((id, probe));
            }
            Err(Error::ReplayRefused { .. }) => {
                assert_eq!(probe.state.lock().unwrap().failed, 1);
                assert_eq!(probe.held_runs(), [], "refused replay left holdings");
                self.outcomes.replay_refused += 1;
                self.gone.push(probe);
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }

    fn check(&mut self) {
        let region = self.mgr.region();
        let flat: Vec<State> = self
            .mgr
            .runs(region)
            .unwrap()
            .iter()
            .flat_map(|r| {
                let s = State {
                    plugged: r.plugged,
                    attribute: r.attribute,
                };
                (0..r.range.len() / G).map(move |_| s)
            })
            .collect();
        assert_eq!(flat, self.model, "manager differs from the model");
        for (id, p) in self.slots.iter().flatten() {
            let view = self.mgr.view_runs(p.view, p.range()).unwrap();
            assert_eq!(
                p.held_runs(),
                view,
                "listener {id} differs from the manager"
            );
            assert_eq!(view, self.model_view_runs(&self.model, p.view, p.a, p.b));
        }
        for p in &self.gone {
            assert_eq!(
                p.held_runs(),
                [],
                "a listener that left still holds something"
            );
        }
        let listed: Vec<ListenerId> = self.mgr.listeners().unwrap().iter().map(|l| l.id).collect();
        let mut ours: Vec<ListenerId> = self.slots.iter().flatten().map(|(id, _)| *id).collect();
        ours.sort();
        let mut listed_sorted = listed.clone();
        listed_sorted.sort();
        assert_eq!(listed_sorted, ours, "registered listeners");
        let c = self.mgr.counts().unwrap();
        let count =
            |f: &dyn Fn(&State) -> bool| self.model.iter().filter(|s| f(s)).count() as u64 * G;
        assert_eq!(c.shared_bytes, count(&|s| s.view() == Some(View::Shared)));
        assert_eq!(c.private_bytes, count(&|s| s.view() == Some(View::Private)));
        assert_eq!(c.unplugged_bytes, count(&|s| !s.plugged));
        let boundaries = self.model.windows(2).filter(|w| w[0] != w[1]).count() + 1;
        assert_eq!(c.runs, boundaries, "runs are not maximal");
        self.outcomes.max_runs = self.outcomes.max_runs.max(c.runs);
    }
}

/// How often each outcome occurred over the whole run, to prove the random sequences reach
/// every path (refusals, step failures, double faults, refused replays, bad ranges).
#[derive(Default, Debug)]
struct Outcomes {
    ok: u64,
    bad_range: u64,
    step_failed: u64,
    refused: u64,
    discard_failed: u64,
    rollback_failed: u64,
    replay_refused: u64,
    /// Most runs the manager held at once (the storage splits chunks above 64).
    max_runs: usize,
}

impl Outcomes {
    fn add(&mut self, o: &Outcomes) {
        self.ok += o.ok;
        self.bad_range += o.bad_range;
        self.step_failed += o.step_failed;
        self.refused += o.refused;
        self.discard_failed += o.discard_failed;
        self.rollback_failed += o.rollback_failed;
        self.replay_refused += o.replay_refused;
        self.max_runs = self.max_runs.max(o.max_runs);
    }
}

/// 200 cases x 500 operations = 100,000 random operations.
#[test]
fn manager_and_listeners_follow_a_per_granule_model() {
    let outcomes = Mutex::new(Outcomes::default());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 200,
        ..ProptestConfig::default()
    });
    let strategy = (
        attribute(),
        proptest::bool::weighted(0.7),
        proptest::collection::vec(op(), 500),
    );
    runner
        .run(&strategy, |(attribute, plugged, ops)| {
            let mut h = Harness::new(State { plugged, attribute });
            for op in &ops {
                h.run(op);
                h.check();
            }
            outcomes.lock().unwrap().add(&h.outcomes);
            Ok(())
        })
        .unwrap();
    let o = outcomes.into_inner().unwrap();
    println!("{o:?}");
    assert!(o.ok > 10_000, "{o:?}");
    assert!(
        o.max_runs > 64,
        "never enough runs to split storage chunks: {o:?}"
    );
    for (name, n) in [
        ("bad range", o.bad_range),
        ("step failed", o.step_failed),
        ("refused", o.refused),
        ("discard failed", o.discard_failed),
        ("rollback failed", o.rollback_failed),
        ("replay refused", o.replay_refused),
    ] {
        assert!(n >= 20, "outcome '{name}' reached only {n} times: {o:?}");
    }
}
