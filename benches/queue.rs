//! Conversions per second through the [`ConversionQueue`] against direct [`GuestRam::convert`]
//! calls, with 1, 2 and 4 submitting threads on 1 and 2 regions, in one run; and the queue's
//! overhead per request (median latency through the queue minus the direct median), both for
//! `ConversionQueue::convert` (the submitter runs the batch itself when the region's worker is
//! idle) and for `submit` + `wait` (always a hand-off to the worker and back). Latencies are
//! per conversion (p50 over every conversion of a run); rates are conversions per second of
//! wall time over all threads.
//!
//! Each thread flips its own page shared and back (the firmware bounce pattern), in the region
//! `thread % regions`; one assigned device (emulated IOMMU) maps the shared view of every
//! region; the backing is software and the attribute table the recording one, so what is
//! measured is this crate's own work plus the hand-offs between threads. Direct and queued runs
//! of one configuration alternate in rounds so load drift on a shared machine hits both; the
//! figures are medians over rounds.
//!
//! Run: `nice cargo bench -p gmem-dma --bench queue` (`-- --rounds N --ops N` to change the
//! amounts).

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use discard_manager::{Attribute, GpaRange};
use gmem_dma::{
    ConversionQueue, ConversionRequest, DeviceConfig, DiscardPolicy, GuestRam, RecordingAttributes,
    RegionBacking, RegionSpec,
};
use iommu::EmulatedIommu;

const PAGE: u64 = 4096;
const REGION_SIZE: u64 = 4 << 20;
const BASES: [u64; 2] = [0x1_0000_0000, 0x2_0000_0000];

fn guest_ram(regions: usize) -> Arc<GuestRam> {
    let ram = Arc::new(GuestRam::new(Arc::new(RecordingAttributes::new())));
    for &base in &BASES[..regions] {
        let spec = RegionSpec {
            granularity: PAGE,
            initial: Attribute::Private,
            policy: DiscardPolicy::Eager,
            initially_plugged: true,
        };
        let backing = RegionBacking::software(base, REGION_SIZE).unwrap();
        ram.add_region(backing, spec).unwrap();
    }
    let iommu = Arc::new(EmulatedIommu::builder().record_calls(false).build());
    ram.attach_device("nic", iommu, DeviceConfig::shared())
        .unwrap();
    ram
}

#[derive(Clone, Copy, PartialEq)]
enum Path {
    /// `GuestRam::convert` on the submitting thread.
    Direct,
    /// `ConversionQueue::convert`: the submitter runs the batch itself when the region's
    /// worker is idle (what `ExitHandler` does without a slice).
    Queue,
    /// `submit` then `wait`: always handed to the region's worker and back.
    Handoff,
}

/// One timed run: `threads` threads each doing `ops` conversions. Returns conversions per
/// second and the median latency of one conversion.
fn run(
    ram: &Arc<GuestRam>,
    queue: &Arc<ConversionQueue>,
    path: Path,
    threads: usize,
    regions: usize,
    ops: usize,
) -> (f64, Duration) {
    let start = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (ram, queue, start) = (ram.clone(), queue.clone(), start.clone());
            let base = BASES[t % regions] + (t as u64 / regions as u64 + 1) * 16 * PAGE;
            let page = GpaRange::new(base, PAGE).unwrap();
            std::thread::spawn(move || {
                let mut latencies = Vec::with_capacity(ops);
                start.wait();
                for i in 0..ops {
                    let to = if i % 2 == 0 {
                        Attribute::Shared
                    } else {
                        Attribute::Private
                    };
                    let t0 = Instant::now();
                    match path {
                        Path::Direct => drop(ram.convert(page, to).unwrap()),
                        Path::Queue => drop(queue.convert(page, to).unwrap()),
                        Path::Handoff => {
                            let request = ConversionRequest { range: page, to };
                            drop(queue.submit(request).wait().unwrap())
                        }
                    }
                    latencies.push(t0.elapsed());
                }
                latencies
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    let mut all: Vec<Duration> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let wall = t0.elapsed();
    all.sort();
    (
        (threads * ops) as f64 / wall.as_secs_f64(),
        all[all.len() / 2],
    )
}

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this once, quickly.
    let quick = !std::env::args().any(|a| a == "--bench");
    let rounds = arg("--rounds", if quick { 1 } else { 9 });
    let ops = arg("--ops", if quick { 200 } else { 20_000 });
    println!(
        "queue vs direct: {rounds} rounds of {ops} conversions per thread; medians over rounds"
    );
    println!(
        "{:>7} {:>7} | {:>10} {:>10} {:>10} | {:>9} {:>9} {:>9} | {:>9} {:>9}",
        "regions",
        "threads",
        "direct/s",
        "queue/s",
        "handoff/s",
        "direct",
        "queue",
        "handoff",
        "queue+",
        "handoff+"
    );
    for regions in [1, 2] {
        for threads in [1, 2, 4] {
            let ram = guest_ram(regions);
            let queue = Arc::new(ConversionQueue::start(ram.clone()).unwrap());
            let (mut rate, mut p50) = ([vec![], vec![], vec![]], [vec![], vec![], vec![]]);
            for _ in 0..rounds {
                for (i, path) in [Path::Direct, Path::Queue, Path::Handoff]
                    .into_iter()
                    .enumerate()
                {
                    let (r, l) = run(&ram, &queue, path, threads, regions, ops);
                    rate[i].push(r);
                    p50[i].push(l.as_nanos() as f64 / 1e3);
                }
            }
            let [rd, rq, rh] = rate.map(median);
            let [ld, lq, lh] = p50.map(median);
            println!(
                "{regions:>7} {threads:>7} | {rd:>10.0} {rq:>10.0} {rh:>10.0} | {ld:>7.2}us {lq:>7.2}us {lh:>7.2}us | {:>+7.2}us {:>+7.2}us",
                lq - ld,
                lh - ld
            );
        }
    }
}
