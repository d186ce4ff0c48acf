//! One submitted request and its answer: the slot the worker fills, the [`Ticket`] the submitter
//! holds, and what the answer can be.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use discard_manager::GpaRange;
use vmm_sys_util::eventfd::EventFd;

use crate::answer::{GuestError, conversion_failure};
use crate::conversion::ConversionError;
use crate::exits::ConversionRequest;
use crate::lock;
use crate::policy::HeldBack;

/// What a queued conversion did for its own request (not for the transaction it was merged
/// into).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completed {
    /// The request answered.
    pub request: ConversionRequest,
    /// The runs of the request's range whose attribute changed, in address order (empty when
    /// it already had it).
    pub(crate) runs: Vec<GpaRange>,
    /// Backing the region holds back after the request's last chunk.
    pub held: HeldBack,
}

impl Completed {
    /// The runs of the request's range whose attribute changed, in address order.
    pub fn runs(&self) -> &[GpaRange] {
        &self.runs
    }

    /// Bytes of the request's range whose attribute changed.
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(GpaRange::len).sum()
    }
}

/// Why a queued request was not (wholly) converted. `converted` counts the bytes from the
/// start of the request that were converted before it stopped (whole chunks; they stay
/// converted, and converting the range again changes only the rest).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A chunk's conversion failed; that chunk changed nothing.
    #[error("converting {} failed after {converted:#x} of its bytes were converted", .request.range)]
    Conversion {
        /// The request.
        request: ConversionRequest,
        /// Bytes converted before the failing chunk.
        converted: u64,
        /// Why the chunk failed (boxed: the answer travels by value through every wait).
        #[source]
        source: Box<ConversionError>,
    },
    /// Cancelled through [`Ticket::cancel`] before it ran, or between two of its chunks.
    #[error("cancelled after {converted:#x} bytes were converted")]
    Cancelled {
        /// Bytes converted before it stopped.
        converted: u64,
    },
    /// The queue was paused ([`crate::ConversionQueue::pause`]) before it ran, or between two
    /// of its chunks.
    #[error("the conversion queue paused after {converted:#x} bytes were converted")]
    Paused {
        /// Bytes converted before it stopped.
        converted: u64,
    },
    /// The queue shut down before running it.
    #[error("the conversion queue shut down before running the request")]
    Shutdown,
    /// The worker thread for the request's region could not be started.
    #[error("starting the conversion worker of region {region} failed")]
    Worker {
        /// The region.
        region: GpaRange,
        /// The OS's refusal.
        #[source]
        source: std::io::Error,
    },
}

impl QueueError {
    /// What the guest is told ([`crate::answer`]'s table).
    pub fn guest_error(&self) -> GuestError {
        match self {
            QueueError::Conversion { source, .. } => conversion_failure(source),
            QueueError::Cancelled { .. }
            | QueueError::Paused { .. }
            | QueueError::Shutdown
            | QueueError::Worker { .. } => GuestError::AGAIN,
        }
    }

    /// The conversion's error, when a conversion failed.
    pub fn conversion(&self) -> Option<&ConversionError> {
        match self {
            QueueError::Conversion { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

/// The answer to one request.
pub type Answer = Result<Completed, QueueError>;

enum State {
    Queued,
    Running,
    Answered(Answer),
    Taken,
}

/// A request between submission and answer, shared by the worker and the [`Ticket`].
pub(crate) struct Slot {
    pub(crate) request: ConversionRequest,
    state: Mutex<State>,
    /// Set once the answer is stored: lets a waiter spin without the lock.
    done: AtomicBool,
    /// A thread waits on `answered` (set under the `state` lock): only then is it signalled,
    /// which saves a futex wake per answer when the submitter caught it spinning.
    sleepers: AtomicBool,
    answered: Condvar,
    notify: Option<Arc<EventFd>>,
    /// Cancel asked while running: stop at the next chunk boundary.
    stop: AtomicBool,
}

impl Slot {
    pub(crate) fn new(request: ConversionRequest, notify: Option<Arc<EventFd>>) -> Arc<Self> {
        Arc::new(Self {
            request,
            state: Mutex::new(State::Queued),
            done: AtomicBool::new(false),
            sleepers: AtomicBool::new(false),
            answered: Condvar::new(),
            notify,
            stop: AtomicBool::new(false),
        })
    }

    /// Queued -> running; false when it was already answered (cancelled, paused).
    pub(crate) fn claim(&self) -> bool {
        let mut state = lock(&self.state);
        match *state {
            State::Queued => {
                *state = State::Running;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Stores the answer (unless one is there already), wakes the waiter, signals the eventfd.
    pub(crate) fn answer(&self, answer: Answer) -> bool {
        {
            let mut state = lock(&self.state);
            if matches!(*state, State::Answered(_) | State::Taken) {
                return false;
            }
            *state = State::Answered(answer);
            self.done.store(true, Ordering::Release);
            if !self.sleepers.load(Ordering::Relaxed) {
                drop(state);
                return self.signal();
            }
        }
        self.answered.notify_all();
        self.signal()
    }

    fn signal(&self) -> bool {
        if let Some(fd) = &self.notify {
            // Written after the answer is stored, so a loop woken by it finds the answer. It
            // fails only when the counter would overflow (2^64 - 2 unread completions); the
            // fd is then readable anyway, which is all it is for.
            let _ = fd.write(1);
        }
        true
    }
}

/// The answer to one submitted conversion, to wait for (with or without a timeout), poll, or
/// be woken for through an eventfd ([`crate::ConversionQueue::submit_notify`]).
pub struct Ticket {
    pub(crate) slot: Arc<Slot>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("request", &self.slot.request)
            .field("answered", &self.is_answered())
            .finish()
    }
}

impl Ticket {
    /// The request.
    pub fn request(&self) -> ConversionRequest {
        self.slot.request
    }

    /// True once the answer is there (never blocks).
    pub fn is_answered(&self) -> bool {
        matches!(*lock(&self.slot.state), State::Answered(_))
    }

    /// The answer if it is there, else the ticket back (never blocks).
    ///
    /// # Errors
    /// The ticket itself while the request is queued or running.
    pub fn try_wait(self) -> Result<Answer, Ticket> {
        let taken = take(&mut lock(&self.slot.state));
        taken.ok_or(self)
    }

    /// Waits at most `timeout` for the answer.
    ///
    /// # Errors
    /// The ticket itself when the timeout passed first.
    pub fn wait_timeout(self, timeout: Duration) -> Result<Answer, Ticket> {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = lock(&self.slot.state);
        loop {
            if let Some(answer) = take(&mut state) {
                return Ok(answer);
            }
            let now = Instant::now();
            let left = match deadline {
                Some(d) if d > now => d - now,
                Some(_) => break,
                None => Duration::MAX,
            };
            self.slot.sleepers.store(true, Ordering::Relaxed);
            state = self
                .slot
                .answered
                .wait_timeout(state, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        drop(state);
        Err(self)
    }

    /// Waits for the answer: spins briefly first (a conversion takes microseconds, a sleep and
    /// wake-up about as long again), then sleeps.
    pub fn wait(self) -> Answer {
        spin_until(ANSWER_SPIN, || self.slot.done.load(Ordering::Acquire));
        let mut state = lock(&self.slot.state);
        loop {
            if let Some(answer) = take(&mut state) {
                return answer;
            }
            self.slot.sleepers.store(true, Ordering::Relaxed);
            state = self
                .slot
                .answered
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Cancels the request: a queued request is answered [`QueueError::Cancelled`] at once
    /// (nothing of it converted) and `true` returned; a running one stops at its next chunk
    /// boundary (or completes, if it is in its last chunk) and `false` is returned. Either way
    /// the ticket then gives the final answer.
    pub fn cancel(&self) -> bool {
        self.slot.stop.store(true, Ordering::Relaxed);
        let mut state = lock(&self.slot.state);
        if matches!(*state, State::Queued) {
            *state = State::Running;
            drop(state);
            return self
                .slot
                .answer(Err(QueueError::Cancelled { converted: 0 }));
        }
        false
    }
}

/// Spins until `ready`, for at most `limit`, so a hand-off between two running threads costs no
/// sleep and no wake-up system call. (Yielding instead would give the CPU away for a whole time
/// slice on a loaded machine.)
pub(crate) fn spin_until(limit: Duration, ready: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    loop {
        for _ in 0..16 {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() > limit {
            return ready();
        }
    }
}

/// How long a submitter spins for its answer: a few conversions' time. Longer spins take the
/// core the worker needs when submitters outnumber cores.
const ANSWER_SPIN: Duration = Duration::from_micros(10);

fn take(state: &mut State) -> Option<Answer> {
    match std::mem::replace(state, State::Taken) {
        State::Answered(answer) => Some(answer),
        other => {
            *state = other;
            None
        }
    }
}
