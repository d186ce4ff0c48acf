//! The conversion queue: vCPU threads submit conversions, one worker per region runs them.
//!
//! # Workers
//! Each guest RAM region has its own worker thread (started with the queue for the regions
//! that exist, on the first request for regions added later), so regions convert in parallel. A
//! request goes to the worker of the region holding its first byte.
//!
//! # Merging
//! A worker takes everything queued for its region at once and merges consecutive requests of
//! the same direction whose ranges overlap or touch into one transaction (so a burst of
//! page-by-page requests costs one pass through the IOMMU and KVM). Each submitter gets an
//! answer about its own request ([`Completed::runs`] is the part of *its* range that changed).
//! When a merged transaction fails, its requests are run again one by one, so one bad request
//! does not fail its neighbours. Requests of opposite directions are never reordered across
//! each other.
//!
//! # Chunks
//! A long request (or merged span) is converted in chunks of at most
//! [`QueueConfig::chunk_bytes`], aligned to that size: each chunk is one
//! [`GuestRam::convert`], all or nothing under the region's lock, and the lock is released
//! between chunks (so device attach, flushes and direct conversions get in, and a pause or
//! cancel takes effect). A request that fails or is stopped after some chunks keeps them;
//! its error says how many bytes from its start were converted. What each platform's guest
//! learns of that is in [`crate::answer`].
//!
//! # Running on the submitter's thread
//! [`ConversionQueue::convert`] and [`crate::ExitHandler`] (without a slice) submit with
//! [`ConversionQueue::submit_and_run`]: when the region's worker is idle, the submitting thread
//! runs the batch (its request and whatever is queued beside it) itself, so a request costs no
//! hand-off between threads; while a batch runs, requests queue up for the next one and are
//! merged as usual. Either way one batch at a time runs per region.
//!
//! # Completion without blocking
//! A [`Ticket`] can be waited on ([`Ticket::wait`], [`Ticket::wait_timeout`]), polled
//! ([`Ticket::try_wait`], [`Ticket::is_answered`]) or cancelled ([`Ticket::cancel`]). A request
//! submitted with [`ConversionQueue::submit_notify`] also adds 1 to an eventfd of the caller's
//! when it is answered: a VMM's epoll loop waits on that fd with its others (one fd per vCPU
//! thread, or one for the loop, shared by all its tickets). [`ConversionQueue::pause`] answers
//! every pending request `Paused` (the guest is told to retry) and waits for running chunks to
//! end; new requests are answered `Paused` until [`ConversionQueue::resume`].
//!
//! Shutdown runs what is already queued before the workers exit.

mod run;
mod ticket;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;

use discard_manager::{Attribute, GpaRange};
use vmm_sys_util::eventfd::EventFd;

use ticket::Slot;
pub use ticket::{Answer, Completed, QueueError, Ticket};

use crate::exits::ConversionRequest;
use crate::lock;
use crate::ram::GuestRam;

/// How long an idle worker spins for the next request before it sleeps: one per region, so
/// it may spin longer than a submitter.
const WORK_SPIN: std::time::Duration = std::time::Duration::from_micros(10);

/// How the queue runs conversions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// The most bytes one transaction converts: a power of two, at least 4 KiB (a region with
    /// a coarser granularity uses its granularity). Default 2 MiB, TDX's own split of MapGPA:
    /// at 4 KiB granules that is 512 IOMMU mappings per lock hold, a few milliseconds on a
    /// real IOMMU.
    pub chunk_bytes: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: 2 << 20,
        }
    }
}

/// The queue could not start.
#[derive(Debug, thiserror::Error)]
pub enum QueueStartError {
    /// [`QueueConfig::chunk_bytes`] is not a power of two of at least 4 KiB.
    #[error("chunk size {chunk_bytes:#x} is not a power of two of at least 4 KiB")]
    ChunkSize {
        /// The size given.
        chunk_bytes: u64,
    },
    /// A region's worker thread could not be started.
    #[error("starting the conversion worker of region {region} failed")]
    Worker {
        /// The region.
        region: GpaRange,
        /// The OS's refusal.
        #[source]
        source: std::io::Error,
    },
}

/// Counters of the queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Requests answered by a worker (not those answered at submission or by a cancel).
    pub requests: u64,
    /// Transactions run for them (merged ones count once, retries and chunks count each).
    pub transactions: u64,
    /// Region workers running.
    pub workers: u64,
}

/// What every worker shares.
struct Shared {
    ram: Arc<GuestRam>,
    config: QueueConfig,
    paused: AtomicBool,
    requests: AtomicU64,
    transactions: AtomicU64,
}

/// One region's queue and worker.
struct Lane {
    region: GpaRange,
    /// The chunk bound for this region (the configured one, at least the granularity).
    chunk: u64,
    queue: Mutex<LaneQueue>,
    /// Set when a request is queued, cleared when the worker takes the queue: lets the worker
    /// spin without the lock.
    has_work: AtomicBool,
    /// Signalled when work arrives or the lane stops.
    work: Condvar,
    /// Signalled when the worker finishes a batch.
    idle: Condvar,
}

#[derive(Default)]
struct LaneQueue {
    pending: Vec<Arc<Slot>>,
    running: bool,
    stop: bool,
    /// The worker waits on `work`: only then does a submitter signal it (saves a futex wake
    /// per request while the worker is busy or spinning).
    sleeping: bool,
}

impl Lane {
    /// Queues `slot`; wakes the worker if `wake` and it sleeps.
    fn push(&self, slot: Arc<Slot>, wake: bool) {
        let mut q = lock(&self.queue);
        q.pending.push(slot);
        self.has_work.store(true, Ordering::Release);
        if wake && q.sleeping {
            drop(q);
            self.work.notify_one();
        }
    }

    /// Takes everything queued, unless a batch is running (its runner takes the rest when it
    /// finishes).
    fn take_batch(&self, q: &mut LaneQueue) -> Option<Vec<Arc<Slot>>> {
        if q.running || q.pending.is_empty() {
            return None;
        }
        q.running = true;
        self.has_work.store(false, Ordering::Release);
        Some(std::mem::take(&mut q.pending))
    }

    /// Runs a batch taken with [`Lane::take_batch`], then hands what arrived meanwhile to the
    /// worker.
    fn run(&self, shared: &Shared, batch: Vec<Arc<Slot>>) {
        run::run_batch(shared, self, batch);
        let mut q = lock(&self.queue);
        q.running = false;
        let wake = q.sleeping && !q.pending.is_empty();
        drop(q);
        self.idle.notify_all();
        if wake {
            self.work.notify_one();
        }
    }

    /// Runs what is queued on the calling thread if no batch is running: a vCPU thread that
    /// would otherwise wait for the worker converts its own request (and any queued with it),
    /// with no hand-off between threads.
    fn run_here(&self, shared: &Shared) {
        let batch = self.take_batch(&mut lock(&self.queue));
        if let Some(batch) = batch {
            self.run(shared, batch);
        }
    }

    fn worker(&self, shared: &Shared) {
        loop {
            ticket::spin_until(WORK_SPIN, || self.has_work.load(Ordering::Acquire));
            let batch = {
                let mut q = lock(&self.queue);
                loop {
                    if let Some(batch) = self.take_batch(&mut q) {
                        break batch;
                    }
                    if q.stop && q.pending.is_empty() && !q.running {
                        return;
                    }
                    q.sleeping = true;
                    q = self
                        .work
                        .wait(q)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    q.sleeping = false;
                }
            };
            self.run(shared, batch);
        }
    }
}

/// Worker threads that run the conversions vCPU threads submit, one per region; see the
/// [module docs](self).
pub struct ConversionQueue {
    shared: Arc<Shared>,
    lanes: RwLock<Vec<Arc<Lane>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for ConversionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConversionQueue")
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl ConversionQueue {
    /// Starts a worker per region of `ram`, with the default [`QueueConfig`].
    ///
    /// # Errors
    /// As [`ConversionQueue::start_with`].
    pub fn start(ram: Arc<GuestRam>) -> Result<Self, QueueStartError> {
        Self::start_with(ram, QueueConfig::default())
    }

    /// Starts a worker per region of `ram`.
    ///
    /// # Errors
    /// [`QueueStartError`]: a bad chunk size, or the OS refused a thread (the workers already
    /// started are stopped).
    pub fn start_with(ram: Arc<GuestRam>, config: QueueConfig) -> Result<Self, QueueStartError> {
        let chunk_bytes = config.chunk_bytes;
        if !chunk_bytes.is_power_of_two() || chunk_bytes < 4096 {
            return Err(QueueStartError::ChunkSize { chunk_bytes });
        }
        let queue = Self {
            shared: Arc::new(Shared {
                ram: Arc::clone(&ram),
                config,
                paused: AtomicBool::new(false),
                requests: AtomicU64::new(0),
                transactions: AtomicU64::new(0),
            }),
            lanes: RwLock::new(Vec::new()),
            workers: Mutex::new(Vec::new()),
        };
        for region in ram.regions() {
            queue
                .start_lane(region.range(), region.granularity())
                .map_err(|source| QueueStartError::Worker {
                    region: region.range(),
                    source,
                })?;
        }
        Ok(queue)
    }

    fn start_lane(&self, region: GpaRange, granularity: u64) -> std::io::Result<Arc<Lane>> {
        let mut lanes = self.lanes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(lane) = lanes.iter().find(|l| l.region == region) {
            return Ok(Arc::clone(lane));
        }
        let lane = Arc::new(Lane {
            region,
            chunk: self.shared.config.chunk_bytes.max(granularity),
            queue: Mutex::new(LaneQueue::default()),
            has_work: AtomicBool::new(false),
            work: Condvar::new(),
            idle: Condvar::new(),
        });
        let (shared, mine) = (Arc::clone(&self.shared), Arc::clone(&lane));
        let worker = std::thread::Builder::new()
            .name(format!("gmem-dma-convert-{:#x}", region.start()))
            .spawn(move || mine.worker(&shared))?;
        lock(&self.workers).push(worker);
        lanes.push(Arc::clone(&lane));
        Ok(lane)
    }

    /// The lane of the region holding the request's first byte.
    fn lane_for(&self, request: ConversionRequest) -> Result<Arc<Lane>, QueueError> {
        let range = request.range;
        let first = GpaRange::new(range.start(), 1).unwrap_or(range);
        let Some(region) = self.shared.ram.region_of(first) else {
            return Err(QueueError::Conversion {
                request,
                converted: 0,
                source: Box::new(crate::ConversionError::NoRegion { range }),
            });
        };
        let known = self.lanes.read().unwrap_or_else(|p| p.into_inner());
        if let Some(lane) = known.iter().find(|l| l.region == region.range()) {
            return Ok(Arc::clone(lane));
        }
        drop(known);
        self.start_lane(region.range(), region.granularity())
            .map_err(|source| QueueError::Worker {
                region: region.range(),
                source,
            })
    }

    fn enqueue(
        &self,
        request: ConversionRequest,
        notify: Option<Arc<EventFd>>,
        inline: bool,
    ) -> Ticket {
        let slot = Slot::new(request, notify);
        let lane = if self.shared.paused.load(Ordering::Acquire) {
            Err(QueueError::Paused { converted: 0 })
        } else {
            self.lane_for(request)
        };
        match lane {
            Ok(lane) if inline => {
                lane.push(Arc::clone(&slot), false);
                lane.run_here(&self.shared);
            }
            Ok(lane) => lane.push(Arc::clone(&slot), true),
            Err(e) => {
                slot.answer(Err(e));
            }
        }
        Ticket { slot }
    }

    /// Queues a conversion; the ticket gives its result.
    pub fn submit(&self, request: ConversionRequest) -> Ticket {
        self.enqueue(request, None, false)
    }

    /// Queues a conversion and, when its region's worker is idle, runs it (with whatever is
    /// queued beside it) on the calling thread before returning the ticket: for a caller that
    /// is about to wait anyway, this saves the two hand-offs between threads. When a batch is
    /// running, the request waits for the next one as with [`ConversionQueue::submit`].
    pub fn submit_and_run(&self, request: ConversionRequest) -> Ticket {
        self.enqueue(request, None, true)
    }

    /// Queues a conversion whose answer also adds 1 to `notify` (after the answer is stored,
    /// so a reader woken by it finds the ticket answered).
    pub fn submit_notify(&self, request: ConversionRequest, notify: Arc<EventFd>) -> Ticket {
        self.enqueue(request, Some(notify), false)
    }

    /// Queues a conversion and waits for it ([`ConversionQueue::submit_and_run`]).
    pub fn convert(&self, range: GpaRange, to: Attribute) -> Answer {
        self.submit_and_run(ConversionRequest { range, to }).wait()
    }

    /// Requests answered and transactions run so far, and the workers running.
    pub fn stats(&self) -> QueueStats {
        QueueStats {
            requests: self.shared.requests.load(Ordering::Relaxed),
            transactions: self.shared.transactions.load(Ordering::Relaxed),
            workers: self.lanes.read().map_or(0, |l| l.len() as u64),
        }
    }

    /// Pauses: every queued request is answered [`QueueError::Paused`], running ones stop at
    /// their next chunk boundary, and new ones are answered `Paused` until
    /// [`ConversionQueue::resume`]. Returns once no worker runs a chunk, with the number of
    /// queued requests it answered.
    pub fn pause(&self) -> usize {
        self.shared.paused.store(true, Ordering::Release);
        let lanes: Vec<Arc<Lane>> = self.lanes.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut answered = 0;
        for lane in lanes {
            let mut q = lock(&lane.queue);
            for slot in std::mem::take(&mut q.pending) {
                if slot.claim() {
                    answered += 1;
                    slot.answer(Err(QueueError::Paused { converted: 0 }));
                }
            }
            while q.running {
                q = lane
                    .idle
                    .wait(q)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
        answered
    }

    /// Ends a [`ConversionQueue::pause`]: requests run again.
    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::Release);
    }

    /// True between [`ConversionQueue::pause`] and [`ConversionQueue::resume`].
    pub fn is_paused(&self) -> bool {
        self.shared.paused.load(Ordering::Acquire)
    }

    /// Runs what is queued, then stops the workers.
    pub fn shutdown(self) {
        drop(self);
    }

    fn stop(&mut self) {
        let lanes = std::mem::take(&mut *self.lanes.write().unwrap_or_else(|p| p.into_inner()));
        for lane in &lanes {
            lock(&lane.queue).stop = true;
            lane.has_work.store(true, Ordering::Release);
            lane.work.notify_all();
        }
        for worker in std::mem::take(&mut *lock(&self.workers)) {
            if worker.join().is_err() {
                log::warn!("a conversion worker panicked");
            }
        }
        // A worker that panicked left its queue behind: those requests never ran.
        for lane in lanes {
            for slot in std::mem::take(&mut lock(&lane.queue).pending) {
                if slot.claim() {
                    slot.answer(Err(QueueError::Shutdown));
                }
            }
        }
    }
}

impl Drop for ConversionQueue {
    fn drop(&mut self) {
        self.stop();
    }
}
