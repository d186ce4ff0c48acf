//! This crate's extents against a per-granule bitmap baseline, on the same traces.
//!
//! The baseline (`Bitmap`) is the workspace's model of QEMU's `RamBlockAttributes`
//! (`workloads::RamBlockAttributes`, shared with `dma-map` and the end-to-end bench): one bit
//! per 4 KiB granule (1 = shared), a mixed-range conversion walks and notifies granule by
//! granule, and a replay walks every granule of the section (QEMU 2026
//! `replay_by_populated_state`) or scans 64-bit words with `find_next_bit` (the pre-2026
//! replay), to show the gap is not only the naive walk. Here it is wrapped in a mutex and a
//! listener list; both sides lock a mutex per call and notify the same counting listener. The
//! traces come from `workloads` too (`bounce_in_flight`, and its `Rng` for the others).
//!
//! Measured:
//! * `bounce/*`: the firmware bounce pattern, 1-2 granules converted shared and, 64 buffers
//!   later, private again, at random places; 1 GiB and 1 TiB regions (and 1 TiB already
//!   holding 10,000 shared runs elsewhere); one listener. Throughput = conversions/s.
//! * `mixed-2MiB/*`: 2 MiB blocks (boot-time or driver-sized conversions) that already hold
//!   4 shared granules are converted shared as a whole, then private, then the 4 granules
//!   shared again. The bitmap notifies the mixed conversion page by page (508 calls), the
//!   extents once per changed run (5 calls). Throughput = blocks/s.
//! * `replay/*`: registering a listener on a 1 TiB region holding 10,000 shared runs.
//! * memory per run (printed): live heap bytes of the manager, measured with the counting
//!   global allocator below (bytes allocated minus bytes freed while the manager is created
//!   and filled), divided by its number of runs; next to the crate's own `memory_bytes()`
//!   (computed from the capacities of its allocations, plus the struct itself).
//!
//! Run: `cargo bench -p gmem-dma-discard-manager --bench conversions`

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group};
use gmem_dma_discard_manager::{
    Attribute, DiscardManager, GpaRange, ListenerError, RegionConfig, View, ViewListener,
};
use workloads::{BounceInFlight, ModelError, RamBlockAttributes, Rng, Target};

/// Counts live heap bytes and allocation calls, forwarding everything to `System`.
struct CountingAlloc;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is `System`'s; the counters are plain atomics and never touch memory
// handed out.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract (non-zero size), passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (through `alloc`/`realloc` above) with
        // `layout`, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `ptr`/`layout` came from this allocator (i.e. from
        // `System`) and that `new_size` is valid for `layout`'s alignment.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const G: u64 = 4096;
const BASE: u64 = 1 << 32;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// The listener both sides notify: counts calls and bytes. Both sides call it with their
/// own lock held, one call at a time, so it adds with a relaxed load and store instead of a
/// locked read-modify-write: the benchmark measures the state managers, and two locked
/// RMWs per call (~20 cycles each) would be most of a replay's time on either side.
#[derive(Default)]
struct Counter {
    calls: AtomicU64,
    bytes: AtomicU64,
}

fn add(counter: &AtomicU64, delta: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(delta),
        Ordering::Relaxed,
    );
}

impl ViewListener for Counter {
    fn populate(&self, _: View, range: GpaRange) -> Result<(), ListenerError> {
        add(&self.calls, 1);
        add(&self.bytes, range.len());
        Ok(())
    }

    fn discard(&self, _: View, range: GpaRange) -> Result<(), ListenerError> {
        add(&self.calls, 1);
        add(&self.bytes, range.len().wrapping_neg());
        Ok(())
    }
}

/// The baseline: QEMU's `RamBlockAttributes` (the workspace's model) behind a mutex, with
/// its listeners.
struct Bitmap {
    region: GpaRange,
    inner: Mutex<BitmapInner>,
}

struct BitmapInner {
    bits: RamBlockAttributes,
    listeners: Vec<(GpaRange, Arc<dyn ViewListener>)>,
}

impl Bitmap {
    fn new(size: u64) -> Self {
        Self {
            region: GpaRange::new(BASE, size).unwrap(),
            inner: Mutex::new(BitmapInner {
                bits: RamBlockAttributes::new(size, G).unwrap(),
                listeners: Vec::new(),
            }),
        }
    }

    /// `ram_block_attributes_state_change` with its listeners notified: all-same ranges in one
    /// call, mixed ranges granule by granule.
    fn convert(&self, range: GpaRange, to: Attribute) -> Result<(), ModelError<ListenerError>> {
        let (shared, target) = match to {
            Attribute::Shared => (true, Target::Shared),
            Attribute::Private => (false, Target::Private),
        };
        let base = self.region.start();
        let inner = &mut *self.inner.lock().unwrap();
        let listeners = &inner.listeners;
        inner.bits.state_change(
            range.start().wrapping_sub(base),
            range.len(),
            target,
            |offset, len| {
                let changed = GpaRange::new(base + offset, len).ok_or("empty notification")?;
                for (section, l) in listeners {
                    if let Some(r) = section.intersect(&changed) {
                        if shared {
                            l.populate(View::Shared, r)?;
                        } else {
                            l.discard(View::Shared, r)?;
                        }
                    }
                }
                Ok(())
            },
        )
    }

    /// Registration with QEMU's replay (`ram_block_attributes_for_each_populated_section`):
    /// `find_next_bit` to a run's start, `find_next_zero_bit` to its end.
    fn register_word_scan(&self, section: GpaRange, l: Arc<dyn ViewListener>) {
        let mut inner = self.inner.lock().unwrap();
        let (offset, populate) = self.replay_to(section, &*l);
        inner
            .bits
            .for_each_shared_run(offset, section.len(), populate)
            .unwrap();
        inner.listeners.push((section, l));
    }

    /// Registration with a replay that tests every granule of the section.
    fn register_walk(&self, section: GpaRange, l: Arc<dyn ViewListener>) {
        let mut inner = self.inner.lock().unwrap();
        let (offset, populate) = self.replay_to(section, &*l);
        inner
            .bits
            .for_each_shared_run_by_granule(offset, section.len(), populate)
            .unwrap();
        inner.listeners.push((section, l));
    }

    /// A replay's start offset in the model, and what it calls per shared run: populate `l`.
    fn replay_to<'a>(
        &self,
        section: GpaRange,
        l: &'a dyn ViewListener,
    ) -> (u64, impl FnMut(u64, u64) -> Result<(), ListenerError> + 'a) {
        let base = self.region.start();
        let populate = move |offset, len| {
            let run = GpaRange::new(base + offset, len).ok_or("empty run")?;
            l.populate(View::Shared, run)
        };
        (section.start() - base, populate)
    }

    fn unregister_all(&self) {
        self.inner.lock().unwrap().listeners.clear();
    }

    fn heap_bytes(&self) -> usize {
        self.inner.lock().unwrap().bits.heap_bytes()
    }
}

fn extents(size: u64) -> DiscardManager {
    DiscardManager::new(RegionConfig {
        base: BASE,
        size,
        granularity: G,
        initial_attribute: Attribute::Private,
        initially_plugged: true,
    })
    .unwrap()
}

/// Firmware bounce buffers (`workloads::bounce_in_flight`): each of `buffers` buffers (1-2
/// granules at a random place in the first `size` bytes) is converted shared, and converted
/// back to private 64 buffers later; the trace ends with every granule private again, so it
/// can be replayed forever.
fn bounce_trace(size: u64, buffers: u64, seed: u64) -> Vec<(GpaRange, Attribute)> {
    let params = BounceInFlight {
        buffers,
        in_flight: 64,
    };
    let workload = workloads::bounce_in_flight(size, params, seed).unwrap();
    workload
        .requests
        .iter()
        .map(|r| {
            let to = match r.conversion().expect("bounce_in_flight only converts") {
                Target::Shared => Attribute::Shared,
                Target::Private => Attribute::Private,
            };
            (GpaRange::new(BASE + r.gpa, r.len).unwrap(), to)
        })
        .collect()
}

/// 10,000 shared runs of 1-16 granules, one at a random place in each of 10,000 equal
/// slots of granules `[first, first + granules)` (so they never touch).
fn scattered_runs(first: u64, granules: u64, runs: u64, seed: u64) -> Vec<GpaRange> {
    let mut rng = Rng::new(seed);
    let slot = granules / runs;
    (0..runs)
        .map(|i| {
            let len = 1 + rng.below(16);
            let offset = rng.below(slot - len);
            GpaRange::new(BASE + (first + i * slot + offset) * G, len * G).unwrap()
        })
        .collect()
}

/// The bounce regions: name, size, shared runs already held elsewhere.
const BOUNCE_CASES: [(&str, u64, u64); 3] = [
    ("1GiB", GIB, 0),
    ("1TiB", TIB, 0),
    ("1TiB-10k-runs", TIB, 10_000),
];

/// A manager and a bitmap over `size` bytes, all private but for `shared`.
fn both_sharing(size: u64, shared: impl IntoIterator<Item = GpaRange>) -> (DiscardManager, Bitmap) {
    let mgr = extents(size);
    let bitmap = Bitmap::new(size);
    for r in shared {
        mgr.convert(r, Attribute::Shared).unwrap();
        bitmap.convert(r, Attribute::Shared).unwrap();
    }
    (mgr, bitmap)
}

/// The manager and the bitmap in the same state, each with a listener, and the trace both
/// replay.
struct Traced {
    mgr: DiscardManager,
    bitmap: Bitmap,
    trace: Vec<(GpaRange, Attribute)>,
}

impl Traced {
    /// One bounce case: one listener on the whole region and the same background runs.
    fn bounce(size: u64, background: u64) -> Self {
        let granules = size / G;
        // Bounce buffers in the lower half, background runs in the upper half.
        let trace = bounce_trace(size / 2, 4096, 0x5eed ^ size);
        let (mgr, bitmap) = both_sharing(
            size,
            scattered_runs(granules / 2, granules / 2, background.max(1), 7)
                .into_iter()
                .take(background as usize),
        );
        let region = GpaRange::new(BASE, size).unwrap();
        mgr.register(View::Shared, region, Arc::new(Counter::default()))
            .unwrap();
        bitmap.register_word_scan(region, Arc::new(Counter::default()));
        Self { mgr, bitmap, trace }
    }

    fn run_extents(&self) {
        for &(r, to) in &self.trace {
            black_box(self.mgr.convert(r, to).unwrap());
        }
    }

    fn run_bitmap(&self) {
        for &(r, to) in &self.trace {
            self.bitmap.convert(r, to).unwrap();
        }
    }
}

fn bench_bounce(c: &mut Criterion) {
    let mut group = c.benchmark_group("bounce");
    for (name, size, background) in BOUNCE_CASES {
        let bounce = Traced::bounce(size, background);
        group.throughput(Throughput::Elements(bounce.trace.len() as u64));

        // No heap allocation per conversion on the hot path (after the first pass).
        bounce.run_extents();
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        bounce.run_extents();
        let allocs = ALLOCATIONS.load(Ordering::Relaxed) - before;
        println!(
            "bounce/{name}: {} conversions, {allocs} heap allocations in one pass (extents)",
            bounce.trace.len()
        );

        group.bench_function(format!("{name}/extents"), |b| {
            b.iter(|| bounce.run_extents())
        });
        group.bench_function(format!("{name}/bitmap"), |b| b.iter(|| bounce.run_bitmap()));
    }
    // What every conversion pays before touching any state: the lock both sides take and
    // the one listener call, here alone; and the extents' lookup alone (lock and search,
    // no change, no listener), on the same trace.
    let mgr = extents(GIB);
    let trace = bounce_trace(GIB, 4096, 0x5eed ^ GIB);
    for &(r, to) in trace.iter().take(trace.len() / 2) {
        mgr.convert(r, to).unwrap();
    }
    group.bench_function("extents-lookup-only", |b| {
        b.iter(|| {
            for &(r, _) in &trace {
                black_box(mgr.is_populated(View::Shared, r).unwrap());
            }
        })
    });
    let lock = Mutex::new(());
    let listener: Arc<dyn ViewListener> = Arc::new(Counter::default());
    group.throughput(Throughput::Elements(trace.len() as u64));
    group.bench_function("lock-and-listener-only", |b| {
        b.iter(|| {
            for &(r, to) in &trace {
                let _held = lock.lock().unwrap();
                match to {
                    Attribute::Shared => listener.populate(View::Shared, black_box(r)).unwrap(),
                    Attribute::Private => listener.discard(View::Shared, black_box(r)).unwrap(),
                }
            }
        })
    });
    group.finish();
}

/// The `mixed-2MiB` trace over a 1 GiB region: per 2 MiB block, the whole block to shared
/// (mixed: 4 granules already are), the whole block to private, the 4 granules to shared.
fn mixed_trace() -> (Vec<GpaRange>, Vec<(GpaRange, Attribute)>) {
    const BLOCK: u64 = 2 << 20;
    let mut rng = Rng::new(0xb10c);
    let mut seeds = Vec::new();
    let mut trace = Vec::new();
    for block in 0..GIB / BLOCK {
        let start = BASE + block * BLOCK;
        let granules: Vec<GpaRange> = (0..4)
            .map(|i| {
                let g = i * (BLOCK / G / 4) + rng.below(BLOCK / G / 4);
                GpaRange::new(start + g * G, G).unwrap()
            })
            .collect();
        let whole = GpaRange::new(start, BLOCK).unwrap();
        trace.push((whole, Attribute::Shared));
        trace.push((whole, Attribute::Private));
        trace.extend(granules.iter().map(|&g| (g, Attribute::Shared)));
        seeds.extend(granules);
    }
    (seeds, trace)
}

/// The `mixed-2MiB` case: the manager and the bitmap holding the seeds, one listener each.
struct Mixed {
    traced: Traced,
    listeners: (Arc<Counter>, Arc<Counter>),
}

impl Mixed {
    fn new() -> Self {
        let (seeds, trace) = mixed_trace();
        let region = GpaRange::new(BASE, GIB).unwrap();
        let (mgr, bitmap) = both_sharing(GIB, seeds);
        let listeners = (Arc::new(Counter::default()), Arc::new(Counter::default()));
        mgr.register(View::Shared, region, listeners.0.clone())
            .unwrap();
        bitmap.register_word_scan(region, listeners.1.clone());
        Self {
            traced: Traced { mgr, bitmap, trace },
            listeners,
        }
    }

    fn blocks(&self) -> u64 {
        (self.traced.trace.len() / 6) as u64
    }
}

fn bench_mixed(c: &mut Criterion) {
    let mixed = Mixed::new();
    let (a, b) = &mixed.listeners;
    let (a0, b0) = (
        a.calls.load(Ordering::Relaxed),
        b.calls.load(Ordering::Relaxed),
    );
    mixed.traced.run_extents();
    mixed.traced.run_bitmap();
    let blocks = mixed.blocks();
    println!(
        "mixed-2MiB: listener calls per block: extents {}, bitmap {}",
        (a.calls.load(Ordering::Relaxed) - a0) / blocks,
        (b.calls.load(Ordering::Relaxed) - b0) / blocks
    );
    let mut group = c.benchmark_group("mixed-2MiB");
    group.throughput(Throughput::Elements(blocks));
    group.bench_function("extents", |bch| bch.iter(|| mixed.traced.run_extents()));
    group.bench_function("bitmap", |bch| bch.iter(|| mixed.traced.run_bitmap()));
    group.finish();
}

/// The replay case: a 1 TiB region holding 10,000 shared runs, in the manager and the
/// bitmap (no listener registered), and the same runs as a list.
struct Replay {
    mgr: DiscardManager,
    bitmap: Bitmap,
    region: GpaRange,
    shared: Vec<GpaRange>,
}

impl Replay {
    fn new() -> Self {
        let granules = TIB / G;
        let runs = scattered_runs(0, granules, 10_000, 42);
        let region = GpaRange::new(BASE, TIB).unwrap();
        let (mgr, bitmap) = both_sharing(TIB, runs);
        let shared = mgr.view_runs(View::Shared, region).unwrap();
        Self {
            mgr,
            bitmap,
            region,
            shared,
        }
    }

    /// Registers a fresh listener (timing only the registration), then unregisters it.
    fn extents(&self) -> Duration {
        let l = Arc::new(Counter::default());
        let t = Instant::now();
        let id = self.mgr.register(View::Shared, self.region, l).unwrap();
        let elapsed = t.elapsed();
        self.mgr.unregister(id).unwrap();
        elapsed
    }

    /// What no replay can go below: the 10,000 listener calls alone, from a list.
    fn listener_calls_only(&self) -> Duration {
        let l: Arc<dyn ViewListener> = Arc::new(Counter::default());
        let t = Instant::now();
        for &r in &self.shared {
            l.populate(View::Shared, black_box(r)).unwrap();
        }
        t.elapsed()
    }

    /// Registers a fresh listener on the bitmap with `register` (timed), then clears it.
    fn bitmap(&self, register: fn(&Bitmap, GpaRange, Arc<dyn ViewListener>)) -> Duration {
        let l: Arc<dyn ViewListener> = Arc::new(Counter::default());
        let t = Instant::now();
        register(&self.bitmap, self.region, l);
        let elapsed = t.elapsed();
        self.bitmap.unregister_all();
        elapsed
    }

    fn bitmap_word_scan(&self) -> Duration {
        self.bitmap(Bitmap::register_word_scan)
    }

    fn bitmap_per_granule(&self) -> Duration {
        self.bitmap(Bitmap::register_walk)
    }
}

/// One timed replay of [`Replay`].
type ReplayCase = fn(&Replay) -> Duration;

fn bench_replay(c: &mut Criterion) {
    let replay = Replay::new();
    // The three replays hand the same runs to the listener.
    let (a, b, c2) = (
        Arc::new(Counter::default()),
        Arc::new(Counter::default()),
        Arc::new(Counter::default()),
    );
    let id = replay
        .mgr
        .register(View::Shared, replay.region, a.clone())
        .unwrap();
    replay.bitmap.register_walk(replay.region, b.clone());
    replay.bitmap.register_word_scan(replay.region, c2.clone());
    for counter in [&a, &b, &c2] {
        assert_eq!(counter.calls.load(Ordering::Relaxed), 10_000);
        assert_eq!(
            counter.bytes.load(Ordering::Relaxed),
            a.bytes.load(Ordering::Relaxed)
        );
    }
    replay.mgr.unregister(id).unwrap();
    replay.bitmap.unregister_all();

    let mut group = c.benchmark_group("replay-1TiB-10k-runs");
    let cases: [(&str, ReplayCase); 4] = [
        ("extents", Replay::extents),
        ("listener-calls-only", Replay::listener_calls_only),
        ("bitmap-word-scan", Replay::bitmap_word_scan),
        ("bitmap-per-granule", Replay::bitmap_per_granule),
    ];
    for (name, case) in cases {
        group.bench_function(name, |bch| {
            bch.iter_custom(|iters| (0..iters).map(|_| case(&replay)).sum())
        });
    }
    group.finish();
}

/// Prints live heap bytes per run, measured with the counting allocator.
fn report_memory(_c: &mut Criterion) {
    // A 1 TiB region holding one shared run (three extents): bytes, not a bitmap's megabytes.
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let mgr = extents(TIB);
    mgr.convert(GpaRange::new(BASE + TIB / 2, G).unwrap(), Attribute::Shared)
        .unwrap();
    let live = LIVE_BYTES.load(Ordering::Relaxed) - before;
    println!(
        "memory/1TiB-1-shared-run: extents {} runs, {live} heap bytes measured \
         (memory_bytes(): {} B)",
        mgr.extent_count().unwrap(),
        mgr.memory_bytes().unwrap()
    );
    drop(mgr);
    for count in [1_000u64, 10_000, 100_000] {
        let granules = TIB / G;
        let runs = scattered_runs(0, granules, count, count);
        let before = LIVE_BYTES.load(Ordering::Relaxed);
        let mgr = extents(TIB);
        for &r in &runs {
            mgr.convert(r, Attribute::Shared).unwrap();
        }
        let live = LIVE_BYTES.load(Ordering::Relaxed) - before;
        let extents = mgr.extent_count().unwrap();
        let estimate = mgr.memory_bytes().unwrap();
        drop(mgr);
        let bitmap = Bitmap::new(TIB);
        println!(
            "memory/1TiB-{count}-shared-runs: extents {extents} runs, {live} heap bytes measured \
             = {:.1} B/run (memory_bytes(): {estimate} B = {:.1} B/run); \
             bitmap {} bytes = {:.0} B/run",
            live as f64 / extents as f64,
            estimate as f64 / extents as f64,
            bitmap.heap_bytes(),
            bitmap.heap_bytes() as f64 / extents as f64,
        );
    }
}

/// Runs `op` once: the one function callgrind collects in (`--toggle-collect`).
#[inline(never)]
fn measured_run(op: &mut dyn FnMut()) {
    op();
}

/// One case for callgrind: `prepare` (not measured) runs before each measured `op`.
struct Only {
    prepare: Box<dyn FnMut()>,
    op: Box<dyn FnMut()>,
    /// Operations per `op`: conversions, or listener calls of a replay.
    ops: usize,
}

impl Only {
    fn each(op: impl FnMut() + 'static, ops: usize) -> Self {
        Self {
            prepare: Box::new(|| {}),
            op: Box::new(op),
            ops,
        }
    }
}

/// `CONVERSIONS_ONLY=<group>/<case>/<side>` (e.g. `bounce/1GiB/extents`, `mixed-2MiB/bitmap`,
/// `replay/listener-calls-only`): that case alone, `CONVERSIONS_RUNS` times (default 1) inside
/// `measured_run`, after one warm-up run, for callgrind. Prints the operations per run
/// (conversions, or replayed runs) to divide the instruction count by.
fn only(spec: &str) {
    let runs: u64 = std::env::var("CONVERSIONS_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut only = match spec.split('/').collect::<Vec<_>>()[..] {
        ["bounce", case, side] => {
            let (_, size, background) = BOUNCE_CASES
                .into_iter()
                .find(|(name, ..)| *name == case)
                .expect("bounce case: 1GiB, 1TiB or 1TiB-10k-runs");
            let bounce = Traced::bounce(size, background);
            let n = bounce.trace.len();
            match side {
                "extents" => Only::each(move || bounce.run_extents(), n),
                "bitmap" => Only::each(move || bounce.run_bitmap(), n),
                _ => panic!("bounce side: extents or bitmap"),
            }
        }
        ["mixed-2MiB", side] => {
            let mixed = Mixed::new().traced;
            let n = mixed.trace.len();
            match side {
                "extents" => Only::each(move || mixed.run_extents(), n),
                "bitmap" => Only::each(move || mixed.run_bitmap(), n),
                _ => panic!("mixed side: extents or bitmap"),
            }
        }
        ["replay", "extents"] => {
            // Registration alone is measured; the unregistration before it is not.
            let replay = Rc::new(Replay::new());
            let n = replay.shared.len();
            let id = Rc::new(Cell::new(None));
            let (r, i) = (replay.clone(), id.clone());
            Only {
                prepare: Box::new(move || {
                    if let Some(old) = i.take() {
                        r.mgr.unregister(old).unwrap();
                    }
                }),
                op: Box::new(move || {
                    let l = Arc::new(Counter::default());
                    id.set(Some(
                        replay.mgr.register(View::Shared, replay.region, l).unwrap(),
                    ));
                }),
                ops: n,
            }
        }
        ["replay", "listener-calls-only"] => {
            let replay = Replay::new();
            let n = replay.shared.len();
            Only::each(
                move || {
                    black_box(replay.listener_calls_only());
                },
                n,
            )
        }
        _ => panic!(
            "CONVERSIONS_ONLY=bounce/<case>/<extents|bitmap>, mixed-2MiB/<extents|bitmap>, \
             replay/<extents|listener-calls-only>"
        ),
    };
    (only.prepare)();
    (only.op)();
    for _ in 0..runs {
        (only.prepare)();
        measured_run(&mut *only.op);
    }
    println!(
        "{spec}: {} operations per run, {runs} runs in measured_run",
        only.ops
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10);
    targets = report_memory, bench_bounce, bench_mixed, bench_replay
}

fn main() {
    if let Ok(spec) = std::env::var("CONVERSIONS_ONLY") {
        only(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
