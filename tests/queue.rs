//! The conversion queue: merging, per-submitter answers, concurrency and shutdown.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{PAGE, Rig, range};
use crossbeam_channel::{Receiver, Sender};
use discard_manager::{Attribute, GpaRange, ListenerError, View, ViewListener};
use gmem_dma::{
    ConversionError, ConversionQueue, ConversionRequest, DeviceConfig, DiscardPolicy, QueueError,
};
use iommu::EmulatedIommu;
use iommu::emulated::CallKind;

const BASE: u64 = 0x2_0000_0000;

/// A listener whose first populate waits until the test lets it go, so requests pile up.
struct Gate {
    entered: Sender<()>,
    release: Receiver<()>,
    once: Mutex<bool>,
}

impl ViewListener for Gate {
    fn populate(&self, _view: View, _range: GpaRange) -> Result<(), ListenerError> {
        let mut first = self.once.lock().unwrap();
        if !*first {
            *first = true;
            self.entered.send(()).unwrap();
            self.release.recv().unwrap();
        }
        Ok(())
    }
    fn discard(&self, _view: View, _range: GpaRange) {}
}

fn share(queue: &ConversionQueue, range: GpaRange) -> gmem_dma::Ticket {
    queue.submit(ConversionRequest {
        range,
        to: Attribute::Shared,
    })
}

fn gated(rig: &Rig) -> (Receiver<()>, Sender<()>) {
    let (entered_tx, entered) = crossbeam_channel::bounded(1);
    let (release, release_rx) = crossbeam_channel::bounded(1);
    let gate = Arc::new(Gate {
        entered: entered_tx,
        release: release_rx,
        once: Mutex::new(false),
    });
    rig.region
        .manager()
        .register(View::Shared, rig.region.range(), gate)
        .unwrap();
    (entered, release)
}

#[test]
fn queued_adjacent_requests_run_as_one_transaction_and_each_gets_an_answer() {
    let rig = Rig::new(BASE, 64, DiscardPolicy::Eager);
    let dev = rig.attach("nic", EmulatedIommu::new(), DeviceConfig::shared());
    let (entered, release) = gated(&rig);
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
    let (entered, release) = gated(&rig);
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
            .manager()
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
    let (entered, release) = gated(&rig);
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
    assert_eq!(
        rig.region.manager().counts().unwrap().shared_bytes,
        9 * PAGE
    );
}
