//! The conversion queue: vCPU threads submit conversions, one worker runs them.
//!
//! The worker takes everything queued at once and merges consecutive requests of the same
//! direction whose ranges overlap or touch into one transaction (so a burst of page-by-page
//! requests costs one pass through the IOMMU and KVM). Each submitter gets its own answer: when a
//! merged transaction fails, its requests are run again one by one, so one bad request does not
//! fail its neighbours. Requests of opposite directions are never reordered across each other.
//! Shutdown runs what is already queued before the worker exits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use discard_manager::{Attribute, GpaRange};

use crate::conversion::{Conversion, ConversionError};
use crate::exits::ConversionRequest;
use crate::ram::GuestRam;

type Reply = Result<Conversion, ConversionError>;

struct Job {
    request: ConversionRequest,
    reply: Sender<Reply>,
}

/// The answer to one submitted conversion.
#[derive(Debug)]
pub struct Ticket(Receiver<Reply>);

impl Ticket {
    /// Waits for the result.
    ///
    /// # Errors
    /// The conversion's [`ConversionError`], or [`ConversionError::Shutdown`] if the worker
    /// is gone.
    pub fn wait(self) -> Reply {
        self.0.recv().unwrap_or(Err(ConversionError::Shutdown))
    }
}

/// Counters of the queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Requests answered.
    pub requests: u64,
    /// Transactions run for them (merged ones count once, retries count each).
    pub transactions: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    transactions: AtomicU64,
}

/// A worker thread that runs the conversions vCPU threads submit; see the [module docs](self).
pub struct ConversionQueue {
    tx: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for ConversionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConversionQueue")
            .field("stats", &self.stats())
            .finish()
    }
}

impl ConversionQueue {
    /// Starts the worker for `ram`.
    ///
    /// # Errors
    /// The OS refused to start the thread.
    pub fn start(ram: Arc<GuestRam>) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let counters = Arc::new(Counters::default());
        let c = Arc::clone(&counters);
        let worker = std::thread::Builder::new()
            .name("gmem-dma-convert".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter());
                    run_batch(&ram, batch, &c);
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            worker: Some(worker),
            counters,
        })
    }

    /// Queues a conversion; the ticket gives its result.
    pub fn submit(&self, request: ConversionRequest) -> Ticket {
        let (reply, rx) = crossbeam_channel::bounded(1);
        if let Some(tx) = &self.tx {
            // A send fails only when the worker is gone; the ticket then reports Shutdown.
            let _ = tx.send(Job { request, reply });
        }
        Ticket(rx)
    }

    /// Queues a conversion and waits for it.
    ///
    /// # Errors
    /// As [`Ticket::wait`].
    pub fn convert(&self, range: GpaRange, to: Attribute) -> Reply {
        self.submit(ConversionRequest { range, to }).wait()
    }

    /// Requests answered and transactions run so far.
    pub fn stats(&self) -> QueueStats {
        QueueStats {
            requests: self.counters.requests.load(Ordering::Relaxed),
            transactions: self.counters.transactions.load(Ordering::Relaxed),
        }
    }

    /// Runs what is queued, then stops the worker.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.tx = None;
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                log::warn!("the conversion worker panicked");
            }
        }
    }
}

impl Drop for ConversionQueue {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs one batch: consecutive same-direction requests are merged where they overlap or touch.
fn run_batch(ram: &GuestRam, batch: Vec<Job>, counters: &Counters) {
    let mut rest = batch.into_iter().peekable();
    while let Some(first) = rest.next() {
        let to = first.request.to;
        let mut group = vec![first];
        while let Some(job) = rest.next_if(|j| j.request.to == to) {
            group.push(job);
        }
        group.sort_by_key(|j| j.request.range.start());
        let mut merged: Vec<(GpaRange, Vec<Job>)> = Vec::new();
        for job in group {
            let r = job.request.range;
            match merged.last_mut() {
                Some((span, jobs)) if r.start() <= span.end() => {
                    let end = span.end().max(r.end());
                    if let Some(grown) = GpaRange::new(span.start(), end - span.start()) {
                        *span = grown;
                    }
                    jobs.push(job);
                }
                _ => merged.push((r, vec![job])),
            }
        }
        for (span, jobs) in merged {
            run_merged(ram, span, to, jobs, counters);
        }
    }
}

fn run_merged(ram: &GuestRam, span: GpaRange, to: Attribute, jobs: Vec<Job>, counters: &Counters) {
    counters.transactions.fetch_add(1, Ordering::Relaxed);
    let result = ram.convert(span, to);
    match result {
        Ok(conversion) => {
            for job in jobs {
                answer(job, Ok(conversion.clone()), counters);
            }
        }
        Err(e) if jobs.len() == 1 => {
            if let Some(job) = jobs.into_iter().next() {
                answer(job, Err(e), counters);
            }
        }
        Err(e) => {
            log::debug!(
                "merged conversion of {span} failed ({e}); running its requests one by one"
            );
            for job in jobs {
                counters.transactions.fetch_add(1, Ordering::Relaxed);
                let own = ram.convert(job.request.range, to);
                answer(job, own, counters);
            }
        }
    }
}

fn answer(job: Job, reply: Reply, counters: &Counters) {
    counters.requests.fetch_add(1, Ordering::Relaxed);
    // The submitter may have stopped waiting; its answer is then simply dropped.
    let _ = job.reply.send(reply);
}
