//! The conversion queue: merging, per-submitter answers, concurrency, per-region workers,
//! chunks, completion without blocking (timeouts, polling, eventfd), cancel, pause, shutdown.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::gate::gated;
use common::{PAGE, Rig, range};
use discard_manager::{Attribute, GpaRange, ListenerError, View, ViewListener};
use gmem_dma::{
    ConversionError, ConversionQueue, ConversionRequest, DeviceConfig, DiscardPolicy, QueueConfig,
    QueueError, QueueStartError, RegionBacking, RegionSpec,
};
use iommu::EmulatedIommu;
use iommu::emulated::CallKind;
use std::os::fd::AsRawFd;
use vmm_sys_util::eventfd::EventFd;

const BASE: u64 = 0x2_0000_0000;

fn share(queue: &ConversionQueue, range: GpaRange) -> gmem_dma::Ticket {
    queue.submit(ConversionRequest {
        range,
        to: Attribute::Shared,
    })
}

#[test]
fn queued_adjacent_requests_run_as_one_transaction_and_each_gets_an_answer() {
    let rig = Rig::new(BASE, 64, DiscardPolicy::Eager);
    let dev = rig.attach("nic", EmulatedIommu::new(), DeviceConfig::shared());
    let (entered, release) = gated(&rig.region);
    let ram = rig.ram.clone();
    let queue = ConversionQueue::start(ram.clone()).unwrap();
    // The first request blocks inside its transaction...
    let first = queue.submit(ConversionRequest {
        range: range(BASE + 63 * PAGE, PAGE),
        to: Attribute::Shared,
    });
    entered.recv_timeout(Duration::from_secs(10)).unwrap();
    // ...while sixteen single-page requests pile up behind it.
    let tickets: Vec<_> = (0..16)
        .map(|p| {
            queue.submit(ConversionRequest {
                range: range(BASE + p * PAGE, PAGE),
                to: Attribute::Shared,
            })
        })
        .collect();
    dev.iommu.take_calls();
    release.send(()).unwrap();
    first.wait().unwrap();
    for (p, t) in (0..16).zip(tickets) {
        let c = t.wait().unwrap();
        assert_eq!(
            c.runs(),
            [range(BASE + p * PAGE, PAGE)],
            "every submitter sees its own part of the merged change"
        );
    }
    let stats = queue.stats();
    assert_eq!((stats.requests, stats.transactions), (17, 2));
    let maps = dev.iommu.take_calls();
    assert_eq!(
        maps.iter().filter(|c| c.kind == CallKind::MapVa).count(),
        16
    );
    queue.shutdown();
}

#[test]
fn a_failing_merged_request_does_not_fail_its_neighbours() {
    let rig = Rig::new(BASE, 64, DiscardPolicy::Eager);
    let (entered, release) = gated(&rig.region);
    let ram = rig.ram.clone();
    let queue = ConversionQueue::start(ram.clone()).unwrap();
    let first = share(&queue, range(BASE + 40 * PAGE, PAGE));
    entered.recv_timeout(Duration::from_secs(10)).unwrap();
    let good = share(&queue, range(BASE, 4 * PAGE));
    // Overlaps the good one but runs past the end of the region: the merged range is invalid.
    let bad = share(&queue, range(BASE + 2 * PAGE, 70 * PAGE));
    release.send(()).unwrap();
    first.wait().unwrap();
    assert_eq!(good.wait().unwrap().runs(), [range(BASE, 4 * PAGE)]);
    match bad.wait() {
        Err(QueueError::Conversion {
            source,
            converted: 0,
            ..
        }) => assert!(matches!(*source, ConversionError::NoRegion { .. })),
        other => panic!("{other:?}"),
    }
    // Merged attempt, then one by one.
    assert_eq!(queue.stats().transactions, 4);
}

#[test]
fn many_vcpu_threads_converting_at_once_leave_everything_consistent() {
    let rig = Arc::new(Rig::new(
        BASE,
        64,
        DiscardPolicy::Lazy {
            budget_bytes: 8 * PAGE,
        },
    ));
    rig.touch(View::Private, rig.region.range());
    let dev = rig.attach("nic", EmulatedIommu::new(), DeviceConfig::shared());
    let queue = Arc::new(ConversionQueue::start(rig.ram.clone()).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|vcpu| {
            let queue = queue.clone();
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    let page = (vcpu * 16) + (i * 7 % 16);
                    let to = if i % 3 == 0 {
                        Attribute::Private
                    } else {
                        Attribute::Shared
                    };
                    queue.convert(range(BASE + page * PAGE, PAGE), to).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = queue.stats();
    assert_eq!(stats.requests, 200);
    // Use each page on its current side, as the guest would, then check everything agrees.
    for view in [View::Shared, View::Private] {
        for r in rig
            .region
            .state()
            .view_runs(view, rig.region.range())
            .unwrap()
        {
            rig.touch(view, r);
        }
    }
    rig.check(&[&dev], &[vec![]], None);
}

#[test]
fn shutdown_runs_what_is_already_queued() {
    let rig = Rig::new(BASE, 64, DiscardPolicy::Eager);
    let (entered, release) = gated(&rig.region);
    let queue = ConversionQueue::start(rig.ram.clone()).unwrap();
    let first = share(&queue, range(BASE + 60 * PAGE, PAGE));
    entered.recv_timeout(Duration::from_secs(10)).unwrap();
    let queued: Vec<_> = (0..8)
        .map(|p| share(&queue, range(BASE + p * 2 * PAGE, PAGE)))
        .collect();
    let stopper = std::thread::spawn(move || queue.shutdown());
    release.send(()).unwrap();
    stopper.join().unwrap();
    first.wait().unwrap();
    for t in queued {
        assert_eq!(t.wait().unwrap().bytes(), PAGE);
    }
    assert_eq!(rig.region.state().counts().unwrap().shared_bytes, 9 * PAGE);
}

const BASE2: u64 = 0x3_0000_0000;

/// The runs of `region` that are shared.
fn shared_runs(region: &gmem_dma::Region) -> Vec<GpaRange> {
    region
        .state()
        .view_runs(View::Shared, region.range())
        .unwrap()
}

#[test]
fn two_regions_convert_in_parallel_while_a_third_request_waits() {
    let rig = Rig::new(BASE, 64, DiscardPolicy::Eager);
    let spec = RegionSpec {
        granularity: PAGE,
        initial: Attribute::Private,
        policy: DiscardPolicy::Eager,
        initially_plugged: true,
    };
    let backing = RegionBacking::software(BASE2, 64 * PAGE).unwrap();
    let second = rig.ram.add_region(backing, spec).unwrap();
    // The queue before the gate: if an assertion fails, the gate's release drops first and the
    // queue's drop does not wait forever for the gated worker.
    let queue = ConversionQueue::start(rig.ram.clone()).unwrap();
    let (entered, release) = gated(&rig.region);
    let blocked = share(&queue, range(BASE, PAGE));
    entered.recv_timeout(Duration::from_secs(10)).unwrap();
    let behind = share(&queue, range(BASE + 8 * PAGE, PAGE));
    // The first region's worker is stuck inside a transaction; the second region's is not.
    let other = share(&queue, range(BASE2, 2 * PAGE));
    let done = other
        .wait_timeout(Duration::from_secs(10))
        .expect("the second region converts while the first one's worker is busy")
        .unwrap();
    assert_eq!(done.runs(), [range(BASE2, 2 * PAGE)]);
    assert_eq!(shared_runs(&second), [range(BASE2, 2 * PAGE)]);
    assert!(
        !behind.is_answered(),
        "the third request waits for its region"
    );
    release.send(()).unwrap();
    blocked.wait().unwrap();
    behind.wait().unwrap();
    assert_eq!(queue.stats().workers, 2);
}

#[test]
fn a_ticket_can_be_polled_and_waited_on_with_a_timeout() {
    let rig = Rig::new(BASE, 64, DiscardPolicy::Eager);
    let (entered, release) = gated(&rig.region);
    let queue = ConversionQueue::start(rig.ram.clone()).unwrap();
    let ticket = share(&queue, range(BASE, PAGE));
    entered.recv_timeout(Duration::from_secs(10)).unwrap();
    let ticket = ticket.try_wait().expect_err("still running");
    let ticket = ticket
        .wait_timeout(Duration::from_millis(20))
        .expect_err("still running after the timeout");
    assert!(!ticket.is_answered());
    release.send(()).unwrap();
    let answer = ticket.wait_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(answer.unwrap().runs(), [range(BASE, PAGE)]);
}

/// True when `fd` becomes readable within `ms` milliseconds.
fn readable(fd: &EventFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call; `fd` stays open.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n == 1 && p.revents & libc::POLLIN != 0
}

#[test]
fn an_answer_signals_the_submitters_eventfd_after_it_is_stored() {
    let rig = Rig::new(BASE, 64, DiscardPolicy::Eager);
    let (entered, release) = gated(&rig.region);
    let queue = ConversionQueue::start(rig.ram.clone()).unwrap();
    let fd = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let request = |p| ConversionRequest {
        range: range(BASE + p * PAGE, PAGE),
        to: Attribute::Shared,
    };
    let first = queue.submit_notify(request(0), fd.clone());
    entered.recv_timeout(Duration::from_secs(10)).unwrap();
    let second = queue.submit_notify(request(4), fd.clone());
    assert!(!readable(&fd, 0), "nothing answered yet");
    release.send(()).unwrap();
    // An event loop: wait on the fd, read it, collect whatever tickets are answered.
    let mut pending = vec![first, second];
    let mut answered = Vec::new();
    while !pending.is_empty() {
        assert!(readable(&fd, 10_000), "the fd signals every answer");
        fd.read().unwrap();
        for t in std::mem::take(&mut pending) {
            match t.try_wait() {
                Ok(answer) => answered.push(answer.unwrap()),
                Err(t) => pending.push(t),
            }
        }
    }
    assert_eq!(answered.len(), 2);
    assert!(!readable(&fd, 0), "read clears it");
}

#[test]
fn a_queued_request_can_be_cancelled_and_never_runs() {
    let rig = Rig::new(BASE, 64, DiscardPolicy::Eager);
    let (entered, release) = gated(&rig.region);
    let queue = ConversionQueue::start(rig.ram.clone()).unwrap();
    let first = share(&queue, range(BASE, PAGE));
    entered.recv_timeout(Duration::from_secs(10)).unwrap();
    let queued = share(&queue, range(BASE + 8 * PAGE, PAGE));
    assert!(queued.cancel(), "it had not started");
    assert!(matches!(
        queued.wait(),
        Err(QueueError::Cancelled { converted: 0 })
    ));
    release.send(()).unwrap();
    first.wait().unwrap();
    queue.shutdown();
    assert_eq!(shared_runs(&rig.region), [range(BASE, PAGE)]);
}

fn chunked(rig: &Rig, chunk_pages: u64) -> ConversionQueue {
    let config = QueueConfig {
        chunk_bytes: chunk_pages * PAGE,
    };
    ConversionQueue::start_with(rig.ram.clone(), config).unwrap()
}

/// Records every populate and the thread it ran on, to see the chunks and who ran them.
#[derive(Default)]
struct Populates(Mutex<Vec<(GpaRange, String)>>);

impl Populates {
    fn ranges(&self) -> Vec<GpaRange> {
        self.0.lock().unwrap().iter().map(|p| p.0).collect()
    }

    fn threads(&self) -> Vec<String> {
        self.0.lock().unwrap().iter().map(|p| p.1.clone()).collect()
    }
}

impl ViewListener for Populates {
    fn populate(&self, _view: View, range: GpaRange) -> Result<(), ListenerError> {
        let thread = std::thread::current().name().unwrap_or("").to_string();
        self.0.lock().unwrap().push((range, thread));
        Ok(())
    }
    fn discard(&self, _view: View, _range: GpaRange) -> Result<(), ListenerError> {
        Ok(())
    }
}

#[test]
fn a_long_request_is_converted_in_aligned_chunks_and_answered_as_one() {
    let rig = Rig::new(BASE, 64, DiscardPolicy::Eager);
    let seen = Arc::new(Populates::default());
    let all = rig.region.range();
    rig.region
        .state()
        .register(View::Shared, all, seen.clone())
        .unwrap();
    let queue = chunked(&rig, 4);
    // 2 pages before a 4-page boundary, then 3 whole chunks, then 1 page.
    let r = range(BASE + 2 * PAGE, 15 * PAGE);
    let done = queue.convert(r, Attribute::Shared).unwrap();
    assert_eq!(done.runs(), [r], "the chunks' runs are answered as one");
    let chunks = seen.ranges();
    assert_eq!(
        chunks,
        [
            range(BASE + 2 * PAGE, 2 * PAGE),
            range(BASE + 4 * PAGE, 4 * PAGE),
            range(BASE + 8 * PAGE, 4 * PAGE),
            range(BASE + 12 * PAGE, 4 * PAGE),
            range(BASE + 16 * PAGE, PAGE),
        ]
    );
    assert_eq!(queue.stats().transactions, 5);
}

/// Refuses to populate any range holding `page`.
struct Refuse(u64);

impl ViewListener for Refuse {
    fn populate(&self, _view: View, range: GpaRange) -> Result<(), ListenerError> {
        if range.start() <= self.0 && self.0 < range.end() {
            return Err("refused".into());
        }
        Ok(())
    }
    fn discard(&self, _view: View, _range: GpaRange) -> Result<(), ListenerError> {
        Ok(())
    }
}

#[test]
fn a_failing_chunk_keeps_the_chunks_before_it_and_says_how_far_it_got() {
    let rig = Rig::new(BASE, 64, DiscardPolicy::Eager);
    let all = rig.region.range();
    let refuse = Arc::new(Refuse(BASE + 9 * PAGE));
    rig.region
        .state()
        .register(View::Shared, all, refuse)
        .unwrap();
    let queue = chunked(&rig, 4);
    let err = queue
        .convert(range(BASE, 16 * PAGE), Attribute::Shared)
        .unwrap_err();
    match &err {
        QueueError::Conversion {
            converted, source, ..
        } => {
            assert_eq!(*converted, 8 * PAGE);
            assert!(
                matches!(**source, ConversionError::Map { .. }),
                "{source:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Two chunks converted, the failing one and the one after it not.
    assert_eq!(shared_runs(&rig.region), [range(BASE, 8 * PAGE)]);
}

#[test]
fn a_running_request_cancelled_stops_at_the_next_chunk_boundary() {
    let rig = Rig::new(BASE, 64, DiscardPolicy::Eager);
    let (entered, release) = gated(&rig.region);
    let queue = chunked(&rig, 4);
    let long = share(&queue, range(BASE, 16 * PAGE));
    entered.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(!long.cancel(), "it is running");
    release.send(()).unwrap();
    assert!(matches!(
        long.wait(),
        Err(QueueError::Cancelled { converted }) if converted == 4 * PAGE
    ));
    assert_eq!(shared_runs(&rig.region), [range(BASE, 4 * PAGE)]);
}

#[test]
fn pause_answers_what_waits_stops_what_runs_between_chunks_and_resume_goes_on() {
    let rig = Rig::new(BASE, 64, DiscardPolicy::Eager);
    let (entered, release) = gated(&rig.region);
    let queue = Arc::new(chunked(&rig, 4));
    let long = share(&queue, range(BASE, 16 * PAGE));
    entered.recv_timeout(Duration::from_secs(10)).unwrap();
    let queued = share(&queue, range(BASE + 32 * PAGE, PAGE));
    let pauser = {
        let queue = queue.clone();
        std::thread::spawn(move || queue.pause())
    };
    // The queued request is answered at once, while the running chunk still runs.
    assert!(matches!(
        queued.wait(),
        Err(QueueError::Paused { converted: 0 })
    ));
    std::thread::sleep(Duration::from_millis(20));
    assert!(!pauser.is_finished(), "pause waits for the running chunk");
    assert!(!long.is_answered());
    release.send(()).unwrap();
    assert_eq!(pauser.join().unwrap(), 1, "one queued request answered");
    assert!(matches!(
        long.wait(),
        Err(QueueError::Paused { converted }) if converted == 4 * PAGE
    ));
    // While paused, new requests are answered at once.
    assert!(queue.is_paused());
    let refused = share(&queue, range(BASE + 40 * PAGE, PAGE)).wait();
    assert!(matches!(refused, Err(QueueError::Paused { converted: 0 })));
    queue.resume();
    // The guest retries: the chunk already done changes nothing, the rest converts.
    let again = share(&queue, range(BASE, 16 * PAGE)).wait().unwrap();
    assert_eq!(again.runs(), [range(BASE + 4 * PAGE, 12 * PAGE)]);
    assert_eq!(shared_runs(&rig.region), [range(BASE, 16 * PAGE)]);
}

#[test]
fn a_bad_chunk_size_is_refused_at_start() {
    let rig = Rig::new(BASE, 4, DiscardPolicy::Eager);
    for chunk_bytes in [0, 2048, 3 * PAGE] {
        let config = QueueConfig { chunk_bytes };
        assert!(matches!(
            ConversionQueue::start_with(rig.ram.clone(), config),
            Err(QueueStartError::ChunkSize { chunk_bytes: c }) if c == chunk_bytes
        ));
    }
}

#[test]
fn convert_runs_on_the_submitting_thread_when_the_worker_is_idle_and_submit_hands_off() {
    let rig = Rig::new(BASE, 64, DiscardPolicy::Eager);
    let threads = Arc::new(Populates::default());
    let all = rig.region.range();
    rig.region
        .state()
        .register(View::Shared, all, threads.clone())
        .unwrap();
    let queue = ConversionQueue::start(rig.ram.clone()).unwrap();
    queue.convert(range(BASE, PAGE), Attribute::Shared).unwrap();
    share(&queue, range(BASE + PAGE, PAGE)).wait().unwrap();
    let names = threads.threads();
    let me = std::thread::current().name().unwrap().to_string();
    assert_eq!(names.len(), 2);
    assert_eq!(names[0], me, "convert ran on the submitter");
    assert!(names[1].starts_with("gmem-dma-convert-"), "{names:?}");
    assert_eq!(queue.stats().requests, 2);
}
