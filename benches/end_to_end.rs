//! End-to-end conversion cost: the bare kernel-call floor, the project under each discard
//! policy, and QEMU's strategy reproduced here, on the same workloads and the same backings.
//!
//! Strategies (every one runs on its own classic region: memfd for shared pages, the host's
//! real guest_memfd for private ones when /dev/kvm has it, else a second memfd):
//! - `floor`: the minimum kernel calls the eager per-run project makes, precomputed from the
//!   workload and issued directly in a tight loop: per request that changes anything, one
//!   attribute change over the span of its changed runs (the granules between already have the
//!   target attribute), one IOMMU map per run joining the shared view (emulated IOMMU in the
//!   cutting style, called directly), one unmap over the span of the runs leaving the shared
//!   view (nothing is mapped between them; the IOMMU cuts the mappings straddling its ends),
//!   one `fallocate(PUNCH_HOLE|KEEP_SIZE)` over the span of the vacated runs (the side they
//!   vacate is already free between them).
//! - `per-run`: `gmem_dma::GuestRam`, eager, one device on the emulated IOMMU in the cutting
//!   style (IOMMUFD with type1 (v1) semantics): each run that becomes shared is one mapping, and
//!   unmaps cut them.
//! - `eager`, `lazy-16M`, `batched-64`: `gmem_dma::GuestRam` with that discard policy and one
//!   device on the emulated IOMMU in the type1 style: one mapping per shared granule, as on a
//!   type1 container.
//! - `no-discard`: the project with a lazy budget of `u64::MAX` (never punches): the bound the
//!   lazy policy is measured against.
//! - `qemu`: QEMU's `kvm_convert_memory` + `RamBlockAttributes` + VFIO listener: the attribute
//!   set over the whole request, a 4 KiB bitmap, one map per granule, one unmap per uniform
//!   range but one notification (one map or unmap) per granule on a mixed range, and an eager
//!   punch of the whole request on the vacated side.
//!
//! This host has no `KVM_CAP_MEMORY_ATTRIBUTES`: every strategy sends attribute changes to the
//! same in-memory stand-in that only counts them ([`KvmStandIn`]).
//!
//! Workloads: `tools/workloads`' generators (the ones `dma-map --workload` runs), seed 1, on the
//! 256 MiB region; one that leaves pages shared gets a last request turning the whole region
//! private, so an iteration can repeat:
//! - `firmware-bounce`: OVMF-style, 1-2 pages of an 8-slot bounce area flipped shared
//!   (and written, as the firmware fills the buffer) and straight back to private
//!   (`dma-map --workload firmware-bounce --bounce-slots 8 --count 2000`).
//! - `linux-boot`: the SWIOTLB pool (64 MiB, the minimum) converted shared in 2 MiB requests,
//!   16 of its pages taken back one by one (`dma_free_coherent`), then the region back to
//!   private in one request: a large range made shared piece by piece, now mixed
//!   (`--workload linux-boot --freed-pages 16`).
//! - `random-mixed`: 2,000 requests of random direction, place and length (60 % one page, 30 %
//!   2-16 pages, 10 % 16 pages to 2 MiB), as `dma-map --workload random-mixed`.
//! - `trace`: `benches/sample.trace`, read by `dma-map`'s trace parser.
//!
//! `cargo bench --bench end_to_end` first prints a summary table (time per conversion, kernel
//! calls per conversion, peak memory held back, ratios to the floor and to QEMU: the strategies
//! of a workload run in interleaved rounds, and a ratio is the median of its per-round ratios),
//! then runs the
//! criterion groups `e2e/<workload>/<strategy>`. `E2E_ONLY=<workload>/<strategy> E2E_RUNS=n`
//! runs just that, `n` times inside `measured_runs` (for `valgrind --tool=callgrind
//! --toggle-collect='*measured_runs*'`), and prints the conversion count. The workloads
//! `manager-bounce/extents` and `manager-bounce/bitmap` measure the state manager alone against
//! a per-granule bitmap with one counting listener.

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use discard_manager::{
    Attribute, DiscardManager, GpaRange, ListenerError, RegionConfig, View, ViewListener,
};
use gmem_dma::attributes::AttributeError;
use gmem_dma::instrument::CountingBackend;
use gmem_dma::{
    DeviceConfig, DiscardPolicy, GuestRam, MemoryAttributes, RegionBacking, RegionSpec,
};
use iommu::emulated::UnmapStyle;
use iommu::{DmaBackend, DmaProt, EmulatedIommu};
use workloads::{
    BounceArea, BounceInFlight, FirmwareBounce, LinuxBoot, RamBlockAttributes, Target,
};

const G: u64 = 4096;
const BASE: u64 = 0x1_0000_0000;
const REGION: u64 = 256 << 20;
/// Seed of every generated workload (`dma-map`'s default).
const SEED: u64 = 1;

// ---------------------------------------------------------------------------------------------
// Workloads

#[derive(Clone, Copy, Debug)]
struct Req {
    range: GpaRange,
    to: Attribute,
}

struct Workload {
    name: &'static str,
    reqs: Vec<Req>,
}

fn req(offset: u64, len: u64, to: Attribute) -> Req {
    Req {
        range: GpaRange::new(BASE + offset, len).expect("workload ranges are valid"),
        to,
    }
}

/// A workload of `tools/workloads` (the same `dma-map` runs) as bench requests, made to end all
/// private so an iteration can repeat: a workload that leaves pages shared gets one last request
/// turning the whole region private.
fn bench_workload(name: &'static str, w: workloads::Workload) -> Workload {
    let mut reqs: Vec<Req> = w
        .requests
        .iter()
        .map(|r| {
            let to = r.conversion().expect("the benched workloads only convert");
            req(r.gpa, r.len, attribute(to))
        })
        .collect();
    if !workloads::final_shared(&w).is_empty() {
        reqs.push(req(0, w.region_size, Attribute::Private));
    }
    Workload { name, reqs }
}

fn attribute(to: Target) -> Attribute {
    match to {
        Target::Shared => Attribute::Shared,
        Target::Private => Attribute::Private,
    }
}

fn workloads() -> Vec<Workload> {
    let bounce = FirmwareBounce {
        transactions: 2_000,
        area: BounceArea::Slots(8),
    };
    let boot = LinuxBoot {
        chunk: 2 << 20,
        freed_pages: 16,
    };
    let generated = "the bench's workload parameters fit its region";
    vec![
        bench_workload(
            "firmware-bounce",
            workloads::firmware_bounce(REGION, bounce, SEED).expect(generated),
        ),
        bench_workload(
            "linux-boot",
            workloads::linux_boot(REGION, boot, SEED).expect(generated),
        ),
        bench_workload(
            "random-mixed",
            workloads::random_mixed(REGION, 2_000, SEED).expect(generated),
        ),
        bench_workload(
            "trace",
            workloads::trace::parse(include_str!("sample.trace"), REGION, "benches/sample.trace")
                .expect("benches/sample.trace is a valid trace"),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Kernel stand-ins that count

/// Counts of kernel calls (or of calls to the in-memory stand-ins of kernel calls).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Calls {
    attribute: u64,
    map: u64,
    unmap: u64,
    punch: u64,
}

impl Calls {
    /// What a strategy's attribute stand-in and IOMMU counted, with its punches.
    fn of(attributes: &KvmStandIn, iommu: &CountingBackend, punch: u64) -> Calls {
        let iommu = iommu.counts();
        Calls {
            attribute: attributes.calls.load(Ordering::Relaxed),
            map: iommu.maps,
            unmap: iommu.unmaps,
            punch,
        }
    }

    fn total(&self) -> u64 {
        self.attribute + self.map + self.unmap + self.punch
    }

    fn minus(self, o: Calls) -> Calls {
        Calls {
            attribute: self.attribute - o.attribute,
            map: self.map - o.map,
            unmap: self.unmap - o.unmap,
            punch: self.punch - o.punch,
        }
    }
}

/// KVM_SET_MEMORY_ATTRIBUTES stand-in: this host has none, so every strategy only counts.
#[derive(Debug, Default)]
struct KvmStandIn {
    calls: AtomicU64,
}

impl MemoryAttributes for KvmStandIn {
    fn set(&self, _: GpaRange, _: Attribute) -> Result<(), AttributeError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The emulated IOMMU in `style` (no call log), counting the calls it receives.
fn counting_iommu(style: UnmapStyle) -> CountingBackend {
    CountingBackend::new(Arc::new(
        EmulatedIommu::builder()
            .unmap_style(style)
            .record_calls(false)
            .build(),
    ))
}

fn backing(vm: Option<&kvm_ioctls::VmFd>) -> RegionBacking {
    match vm {
        Some(vm) => RegionBacking::classic(vm, BASE, REGION).expect("classic region"),
        None => RegionBacking::software(BASE, REGION).expect("software region"),
    }
}

/// The firmware fills a buffer it just shared: one byte per page, refaulting a freed page.
fn fill(backing: &RegionBacking, range: GpaRange) {
    let mut gpa = range.start();
    while gpa < range.end() {
        let p = backing.host_addr(gpa).expect("inside the region");
        // SAFETY: inside the region's live shared mapping; raw-pointer access only.
        unsafe { p.write_volatile(1) };
        gpa += G;
    }
}

fn punch(backing: &RegionBacking, side: View, range: GpaRange) {
    backing.punch_hole(side, range).expect("punch hole");
}

// ---------------------------------------------------------------------------------------------
// Strategies

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Floor,
    /// The project, eager, on an IOMMU that cuts mappings: one mapping per run.
    PerRun,
    /// The project with a discard policy, on a type1-style IOMMU: one mapping per granule.
    Project(&'static str, DiscardPolicy),
    Qemu,
}

impl Strategy {
    fn name(&self) -> &'static str {
        match self {
            Strategy::Floor => "floor",
            Strategy::PerRun => "per-run",
            Strategy::Project(name, _) => name,
            Strategy::Qemu => "qemu",
        }
    }
}

const STRATEGIES: [Strategy; 7] = [
    Strategy::Floor,
    Strategy::PerRun,
    Strategy::Project("eager", DiscardPolicy::Eager),
    Strategy::Project(
        "lazy-16M",
        DiscardPolicy::Lazy {
            budget_bytes: 16 << 20,
        },
    ),
    Strategy::Project(
        "batched-64",
        DiscardPolicy::Batched {
            max_ranges: 64,
            max_bytes: 16 << 20,
        },
    ),
    Strategy::Project(
        "no-discard",
        DiscardPolicy::Lazy {
            budget_bytes: u64::MAX,
        },
    ),
    Strategy::Qemu,
];

trait Runner {
    /// Runs every request of the workload once.
    fn run(&mut self);
    fn calls(&self) -> Calls;
    /// Peak bytes held back (backed on both sides) since creation.
    fn peak_held(&self) -> u64;
}

/// One precomputed kernel call of the floor.
#[derive(Clone, Copy, Debug)]
enum Op {
    Attribute(GpaRange, Attribute),
    Map(GpaRange),
    Unmap(GpaRange),
    Punch(View, GpaRange),
    Fill(GpaRange),
}

/// Runs of `[a, b)` whose bit differs from `to_shared`, as granule index pairs.
fn changed_runs(bits: &[bool], a: usize, b: usize, to_shared: bool) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut g = a;
    while g < b {
        if bits[g] == to_shared {
            g += 1;
            continue;
        }
        let s = g;
        while g < b && bits[g] != to_shared {
            g += 1;
        }
        runs.push((s, g));
    }
    runs
}

fn granule_range(s: usize, e: usize) -> GpaRange {
    GpaRange::new(BASE + s as u64 * G, (e - s) as u64 * G).expect("granule range")
}

struct Floor {
    // Field order: the IOMMU, which holds host addresses of the backing, drops first.
    iommu: CountingBackend,
    backing: RegionBacking,
    attributes: KvmStandIn,
    ops: Vec<Op>,
    punches: u64,
}

impl Floor {
    fn new(w: &Workload, vm: Option<&kvm_ioctls::VmFd>) -> Self {
        let mut bits = vec![false; (REGION / G) as usize];
        let mut ops = Vec::new();
        for r in &w.reqs {
            let a = ((r.range.start() - BASE) / G) as usize;
            let b = ((r.range.end() - BASE) / G) as usize;
            let shared = r.to == Attribute::Shared;
            let runs = changed_runs(&bits, a, b, shared);
            let (Some(&(first, _)), Some(&(_, last))) = (runs.first(), runs.last()) else {
                if shared {
                    ops.push(Op::Fill(r.range));
                }
                continue;
            };
            let span = granule_range(first, last);
            if shared {
                ops.push(Op::Attribute(span, r.to));
                ops.extend(runs.iter().map(|&(s, e)| Op::Map(granule_range(s, e))));
            } else {
                ops.push(Op::Unmap(span));
                ops.push(Op::Attribute(span, r.to));
            }
            for &(s, e) in &runs {
                bits[s..e].fill(shared);
            }
            let vacated = if shared { View::Private } else { View::Shared };
            ops.push(Op::Punch(vacated, span));
            if shared {
                ops.push(Op::Fill(r.range));
            }
        }
        Self {
            iommu: counting_iommu(UnmapStyle::Cutting),
            backing: backing(vm),
            attributes: KvmStandIn::default(),
            ops,
            punches: 0,
        }
    }
}

impl Runner for Floor {
    fn run(&mut self) {
        for &op in &self.ops {
            match op {
                Op::Attribute(range, to) => {
                    let _ = self.attributes.set(range, to);
                }
                Op::Map(run) => {
                    let host = self
                        .backing
                        .host_addr(run.start())
                        .expect("inside the region");
                    // SAFETY: a run of the region's shared mapping, which outlives the IOMMU
                    // (it drops first: field order); only raw-pointer access.
                    unsafe {
                        self.iommu
                            .map_va(run.start(), run.len(), host, DmaProt::READ_WRITE)
                    }
                    .expect("map");
                }
                Op::Unmap(range) => {
                    self.iommu.unmap(range.start(), range.len()).expect("unmap");
                }
                Op::Punch(side, range) => {
                    punch(&self.backing, side, range);
                    self.punches += 1;
                }
                Op::Fill(range) => fill(&self.backing, range),
            }
        }
    }

    fn calls(&self) -> Calls {
        Calls::of(&self.attributes, &self.iommu, self.punches)
    }

    fn peak_held(&self) -> u64 {
        0
    }
}

struct Project {
    ram: GuestRam,
    region: Arc<gmem_dma::Region>,
    iommu: Arc<CountingBackend>,
    attributes: Arc<KvmStandIn>,
    reqs: Vec<Req>,
    peak_held: u64,
}

impl Project {
    fn new(
        w: &Workload,
        policy: DiscardPolicy,
        style: UnmapStyle,
        vm: Option<&kvm_ioctls::VmFd>,
    ) -> Self {
        let attributes = Arc::new(KvmStandIn::default());
        let ram = GuestRam::new(attributes.clone());
        let spec = RegionSpec {
            granularity: G,
            initial: Attribute::Private,
            policy,
            initially_plugged: true,
        };
        let region = ram.add_region(backing(vm), spec).expect("add region");
        let iommu = Arc::new(counting_iommu(style));
        ram.attach_device("nic", iommu.clone(), DeviceConfig::shared())
            .expect("attach");
        Self {
            ram,
            region,
            iommu,
            attributes,
            reqs: w.reqs.clone(),
            peak_held: 0,
        }
    }
}

impl Runner for Project {
    fn run(&mut self) {
        for r in &self.reqs {
            let c = self.ram.convert(r.range, r.to).expect("convert");
            self.peak_held = self.peak_held.max(c.held.total());
            if r.to == Attribute::Shared {
                fill(self.region.backing(), r.range);
            }
        }
    }

    fn calls(&self) -> Calls {
        Calls::of(
            &self.attributes,
            &self.iommu,
            self.region.backing().punch_stats().calls,
        )
    }

    fn peak_held(&self) -> u64 {
        self.peak_held
    }
}

/// QEMU's `RamBlockAttributes` bitmap (`tools/workloads`' model) behind QEMU's mutex, in
/// guest-physical addresses from `BASE`.
struct QemuBitmap(Mutex<RamBlockAttributes>);

impl QemuBitmap {
    fn new(size: u64) -> Self {
        let bits = RamBlockAttributes::new(size, G).expect("a whole number of granules");
        Self(Mutex::new(bits))
    }

    /// `ram_block_attributes_state_change`: `notify` gets each range QEMU notifies its
    /// listeners of, under the lock.
    #[inline]
    fn state_change(&self, range: GpaRange, to: Attribute, mut notify: impl FnMut(GpaRange)) {
        let to = match to {
            Attribute::Shared => Target::Shared,
            Attribute::Private => Target::Private,
        };
        let mut bits = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let notified = bits.state_change(range.start() - BASE, range.len(), to, |offset, len| {
            // The whole request, or one granule of it.
            let notified = if len == range.len() {
                range
            } else {
                GpaRange::new(BASE + offset, len).expect("inside the region")
            };
            notify(notified);
            Ok::<_, Infallible>(())
        });
        notified.expect("workload ranges are inside the region");
    }
}

/// QEMU's path, reproduced: `kvm_convert_memory` (attribute over the whole request), then
/// `ram_block_attributes_state_change` (4 KiB bitmap; uniform ranges notified whole, mixed
/// ranges per granule), the VFIO listener (one map per granule on populate, one unmap per
/// notified discard), then the eager discard of the whole request on the vacated side.
struct Qemu {
    // Field order: the IOMMU, which holds host addresses of the backing, drops first.
    iommu: CountingBackend,
    backing: RegionBacking,
    attributes: KvmStandIn,
    bits: QemuBitmap,
    reqs: Vec<Req>,
    punches: u64,
}

impl Qemu {
    fn new(w: &Workload, vm: Option<&kvm_ioctls::VmFd>) -> Self {
        Self {
            iommu: counting_iommu(UnmapStyle::Type1v2),
            backing: backing(vm),
            attributes: KvmStandIn::default(),
            bits: QemuBitmap::new(REGION),
            reqs: w.reqs.clone(),
            punches: 0,
        }
    }

    fn populate(&self, range: GpaRange) {
        // vfio_ram_discard_notify_populate: one map per granule.
        let mut at = range.start();
        while at < range.end() {
            let host = self.backing.host_addr(at).expect("inside the region");
            // SAFETY: a page of the region's shared mapping, which outlives the IOMMU; raw
            // pointer access only.
            unsafe { self.iommu.map_va(at, G, host, DmaProt::READ_WRITE) }.expect("map");
            at += G;
        }
    }

    fn discard(&self, range: GpaRange) {
        // vfio_ram_discard_notify_discard: one unmap over the notified range.
        self.iommu.unmap(range.start(), range.len()).expect("unmap");
    }

    fn convert(&mut self, range: GpaRange, to: Attribute) {
        let _ = self.attributes.set(range, to);
        let shared = to == Attribute::Shared;
        self.bits.state_change(range, to, |r| {
            if shared {
                self.populate(r);
            } else {
                self.discard(r);
            }
        });
        let vacated = if shared { View::Private } else { View::Shared };
        punch(&self.backing, vacated, range);
        self.punches += 1;
    }
}

impl Runner for Qemu {
    fn run(&mut self) {
        let reqs = std::mem::take(&mut self.reqs);
        for r in &reqs {
            self.convert(r.range, r.to);
            if r.to == Attribute::Shared {
                fill(&self.backing, r.range);
            }
        }
        self.reqs = reqs;
    }

    fn calls(&self) -> Calls {
        Calls::of(&self.attributes, &self.iommu, self.punches)
    }

    fn peak_held(&self) -> u64 {
        0
    }
}

fn runner(s: Strategy, w: &Workload, vm: Option<&kvm_ioctls::VmFd>) -> Box<dyn Runner> {
    match s {
        Strategy::Floor => Box::new(Floor::new(w, vm)),
        Strategy::PerRun => Box::new(Project::new(
            w,
            DiscardPolicy::Eager,
            UnmapStyle::Cutting,
            vm,
        )),
        Strategy::Project(_, policy) => Box::new(Project::new(w, policy, UnmapStyle::Type1v2, vm)),
        Strategy::Qemu => Box::new(Qemu::new(w, vm)),
    }
}

// ---------------------------------------------------------------------------------------------
// The state manager alone against a per-granule bitmap

#[derive(Default)]
struct CountingListener {
    calls: AtomicU64,
}

impl ViewListener for CountingListener {
    fn populate(&self, _: View, _: GpaRange) -> Result<(), ListenerError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn discard(&self, _: View, _: GpaRange) -> Result<(), ListenerError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Bytes of the region the state manager alone is measured on.
const MANAGER_REGION: u64 = 1 << 30;

/// Bounce buffers of 1-2 granules at random places in 1 GiB, each converted back to private
/// 64 buffers later (as `discard-manager/benches/conversions.rs`'s `bounce/1GiB`).
fn manager_trace() -> Vec<Req> {
    let params = BounceInFlight {
        buffers: 4096,
        in_flight: 64,
    };
    let w = workloads::bounce_in_flight(MANAGER_REGION, params, SEED).expect("fits 1 GiB");
    bench_workload("manager-bounce", w).reqs
}

struct ManagerOnly {
    manager: DiscardManager,
    reqs: Vec<Req>,
}

impl ManagerOnly {
    fn new() -> Self {
        let manager = DiscardManager::new(RegionConfig {
            base: BASE,
            size: MANAGER_REGION,
            granularity: G,
            initial_attribute: Attribute::Private,
            initially_plugged: true,
        })
        .expect("manager");
        manager
            .register(
                View::Shared,
                manager.region(),
                Arc::new(CountingListener::default()),
            )
            .expect("register");
        Self {
            manager,
            reqs: manager_trace(),
        }
    }
}

impl Runner for ManagerOnly {
    fn run(&mut self) {
        for r in &self.reqs {
            black_box(self.manager.convert(r.range, r.to).expect("convert"));
        }
    }

    fn calls(&self) -> Calls {
        Calls::default()
    }

    fn peak_held(&self) -> u64 {
        0
    }
}

/// QEMU `RamBlockAttributes`: one bit per granule, a mutex, the listener notified per uniform
/// range or per granule of a mixed range.
struct BitmapOnly {
    bits: QemuBitmap,
    listener: Arc<dyn ViewListener>,
    reqs: Vec<Req>,
}

impl BitmapOnly {
    fn new() -> Self {
        Self {
            bits: QemuBitmap::new(MANAGER_REGION),
            listener: Arc::new(CountingListener::default()),
            reqs: manager_trace(),
        }
    }

    fn convert(&self, range: GpaRange, to: Attribute) {
        self.bits.state_change(range, to, |r| match to {
            Attribute::Shared => {
                let _ = self.listener.populate(View::Shared, r);
            }
            Attribute::Private => {
                let _ = self.listener.discard(View::Shared, r);
            }
        });
    }
}

impl Runner for BitmapOnly {
    fn run(&mut self) {
        for r in &self.reqs {
            self.convert(r.range, r.to);
        }
    }

    fn calls(&self) -> Calls {
        Calls::default()
    }

    fn peak_held(&self) -> u64 {
        0
    }
}

// ---------------------------------------------------------------------------------------------
// Driver

fn kvm_vm() -> (Option<kvm_ioctls::Kvm>, Option<kvm_ioctls::VmFd>) {
    let kvm = kvm_ioctls::Kvm::new().ok();
    let vm = kvm.as_ref().and_then(|k| k.create_vm().ok());
    (kvm, vm)
}

#[inline(never)]
fn measured_runs(r: &mut dyn Runner, runs: u64) {
    for _ in 0..runs {
        r.run();
    }
}

/// `E2E_ONLY=<workload>/<strategy>`: one strategy on one workload, for callgrind.
fn only(spec: &str, vm: Option<&kvm_ioctls::VmFd>) {
    let runs: u64 = std::env::var("E2E_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let (mut r, conversions): (Box<dyn Runner>, usize) = match spec {
        "manager-bounce/extents" => {
            let r = ManagerOnly::new();
            let n = r.reqs.len();
            (Box::new(r), n)
        }
        "manager-bounce/bitmap" => {
            let r = BitmapOnly::new();
            let n = r.reqs.len();
            (Box::new(r), n)
        }
        _ => {
            let (wname, sname) = spec
                .split_once('/')
                .expect("E2E_ONLY=<workload>/<strategy>");
            let w = workloads()
                .into_iter()
                .find(|w| w.name == wname)
                .expect("unknown workload");
            let s = STRATEGIES
                .into_iter()
                .find(|s| s.name() == sname)
                .expect("unknown strategy");
            let n = w.reqs.len();
            (runner(s, &w, vm), n)
        }
    };
    r.run(); // warm up outside the measured function
    let before = r.calls();
    measured_runs(&mut *r, runs);
    let calls = r.calls().minus(before);
    println!(
        "{spec}: {} conversions in measured_runs ({runs} runs of {conversions}); calls {calls:?}",
        runs * conversions as u64
    );
}

struct Row {
    strategy: &'static str,
    ns_per_conversion: f64,
    /// Median over rounds of this strategy's time divided by the floor's (and QEMU's) in the
    /// same round.
    x_floor: f64,
    x_qemu: f64,
    calls: Calls,
    conversions: u64,
    peak_held: u64,
}

/// CPU time of the calling thread (user + system), so that time spent waiting for a core on a
/// loaded machine is not counted.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant; checked below.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(ret, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Times every strategy of one workload in rounds: each round runs the whole workload once per
/// strategy, one after another, so the times of a round are taken close together and a change
/// of the machine's load between rounds cancels out of the ratios. One warm-up run each; at
/// least 9 rounds, more while under a second (at most 200). Calls are counted over the timed
/// runs. Returns, per strategy, the run times in seconds (one per round).
fn measure_rounds(runners: &mut [Box<dyn Runner>]) -> (Vec<Vec<f64>>, Vec<Calls>) {
    for r in runners.iter_mut() {
        r.run();
    }
    let before: Vec<Calls> = runners.iter().map(|r| r.calls()).collect();
    let mut times = vec![Vec::new(); runners.len()];
    let started = Instant::now();
    while times[0].len() < 9 || (started.elapsed() < Duration::from_secs(1) && times[0].len() < 200)
    {
        for (r, t) in runners.iter_mut().zip(&mut times) {
            let start = thread_cpu_time();
            r.run();
            t.push((thread_cpu_time() - start).as_secs_f64());
        }
    }
    let calls = runners
        .iter()
        .zip(before)
        .map(|(r, b)| r.calls().minus(b))
        .collect();
    (times, calls)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn summary(vm: Option<&kvm_ioctls::VmFd>) {
    let backing = if vm.is_some() {
        "memfd + real guest_memfd (classic)"
    } else {
        "memfd + memfd (no KVM)"
    };
    println!(
        "\nend-to-end summary; region 256 MiB, {backing}, emulated IOMMU; median thread CPU time of whole-workload runs; x floor / x qemu: median of the ratios within a round"
    );
    println!(
        "{:<16} {:<11} {:>10} {:>7} {:>7} {:>7} {:>7} {:>7} {:>10} {:>8} {:>8}",
        "workload",
        "strategy",
        "ns/conv",
        "attr",
        "map",
        "unmap",
        "punch",
        "calls",
        "peak held",
        "x floor",
        "x qemu"
    );
    let index = |name: &str| {
        STRATEGIES
            .iter()
            .position(|s| s.name() == name)
            .expect("the floor and qemu are strategies")
    };
    let (floor, qemu) = (index("floor"), index("qemu"));
    for w in workloads() {
        let mut runners: Vec<Box<dyn Runner>> =
            STRATEGIES.iter().map(|&s| runner(s, &w, vm)).collect();
        let (times, calls) = measure_rounds(&mut runners);
        let rounds = times[0].len();
        let ratio =
            |i: usize, to: usize| median((0..rounds).map(|k| times[i][k] / times[to][k]).collect());
        let rows: Vec<Row> = STRATEGIES
            .iter()
            .enumerate()
            .map(|(i, s)| Row {
                strategy: s.name(),
                ns_per_conversion: median(times[i].clone()) * 1e9 / w.reqs.len() as f64,
                x_floor: ratio(i, floor),
                x_qemu: ratio(i, qemu),
                calls: calls[i],
                conversions: (rounds * w.reqs.len()) as u64,
                peak_held: runners[i].peak_held(),
            })
            .collect();
        let per_run = |name: &str| {
            rows.iter().find(|r| r.strategy == name).map(|r| {
                let runs = r.conversions / w.reqs.len() as u64;
                (
                    r.calls.attribute / runs,
                    r.calls.map / runs,
                    r.calls.unmap / runs,
                    r.calls.punch / runs,
                )
            })
        };
        let same = per_run("per-run") == per_run("floor");
        for r in &rows {
            let per = |n: u64| n as f64 / r.conversions as f64;
            println!(
                "{:<16} {:<11} {:>10.0} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>9}K {:>8.2} {:>8.2}",
                w.name,
                r.strategy,
                r.ns_per_conversion,
                per(r.calls.attribute),
                per(r.calls.map),
                per(r.calls.unmap),
                per(r.calls.punch),
                per(r.calls.total()),
                r.peak_held >> 10,
                r.x_floor,
                r.x_qemu,
            );
        }
        println!(
            "{:<16} per-run makes {} kernel calls as the floor",
            w.name,
            if same { "the same" } else { "DIFFERENT" }
        );
    }
    println!();
}

fn criterion_benches(c: &mut Criterion, vm: Option<&kvm_ioctls::VmFd>) {
    for w in workloads() {
        let mut group = c.benchmark_group(format!("e2e/{}", w.name));
        group.throughput(Throughput::Elements(w.reqs.len() as u64));
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(2));
        for s in STRATEGIES {
            let mut r = runner(s, &w, vm);
            group.bench_function(s.name(), |b| b.iter(|| r.run()));
        }
        group.finish();
    }
    let mut group = c.benchmark_group("e2e/manager-bounce");
    let mut extents = ManagerOnly::new();
    group.throughput(Throughput::Elements(extents.reqs.len() as u64));
    group.bench_function("extents", |b| b.iter(|| extents.run()));
    let mut bitmap = BitmapOnly::new();
    group.bench_function("bitmap", |b| b.iter(|| bitmap.run()));
    group.finish();
}

fn main() {
    let (_kvm, vm) = kvm_vm();
    if let Ok(spec) = std::env::var("E2E_ONLY") {
        only(&spec, vm.as_ref());
        return;
    }
    // `cargo bench` passes --bench; `cargo test --benches` does not and only smoke-tests.
    if std::env::args().any(|a| a == "--bench") && std::env::var_os("E2E_NO_SUMMARY").is_none() {
        summary(vm.as_ref());
    }
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c, vm.as_ref());
    c.final_summary();
}
