//! [`ExitHandler`]: a vCPU's conversion exits through the [`ConversionQueue`], answered the way
//! the VM's platform accepts, in one call.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use gmem_dma::*;
//! # fn vcpu_loop(vcpu: &mut kvm_ioctls::VcpuFd, queue: Arc<ConversionQueue>) {
//! let handler = ExitHandler::new(queue, VmPlatform::SwProtected);
//! loop {
//!     match vcpu.run() {
//!         Ok(kvm_ioctls::VcpuExit::Hypercall(mut exit)) => {
//!             // Converted (or refused) and answered in exit.ret; the guest goes on either way.
//!             let _ = handler.hypercall(&mut exit);
//!         }
//!         Ok(kvm_ioctls::VcpuExit::MemoryFault { flags, gpa, size }) => {
//!             match handler.memory_fault(flags, gpa, size).action {
//!                 MemoryFaultAction::Resume | MemoryFaultAction::Retry => {}
//!                 MemoryFaultAction::Fail => break, // the access can never be satisfied
//!             }
//!         }
//!         _ => break,
//!     }
//! }
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use kvm_ioctls::HypercallExit;
use vmm_sys_util::eventfd::EventFd;

use crate::answer::{FailureKind, MemoryFaultAction, VmPlatform};
use crate::exits::{ConversionRequest, ExitError, RequestError, answer_map_gpa_range};
use crate::queue::{Answer, Completed, ConversionQueue, QueueError, Ticket};

/// How an [`ExitHandler`] waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandlerConfig {
    /// The longest a vCPU thread waits for its request: then the request is cancelled (a
    /// running one stops at its next chunk boundary) and the guest told to retry (`EAGAIN`),
    /// with the chunks done kept. `None`: wait for the answer.
    pub slice: Option<Duration>,
    /// How many times a retry-kind conversion failure ([`crate::answer`]) is retried by the
    /// handler before the guest is told, `retry_pause` apart. Requests the VMM stopped
    /// (cancel, pause, shutdown) are never retried.
    pub vmm_retries: u32,
    /// The wait between two such retries.
    pub retry_pause: Duration,
}

impl HandlerConfig {
    /// The defaults for `platform`: no slice; on SNP two retries 1 ms apart, because a Linux
    /// SNP guest terminates on any page-state-change error (`EAGAIN` included); elsewhere the
    /// guest is told at once (TDX guests retry `EAGAIN` themselves).
    pub fn for_platform(platform: VmPlatform) -> Self {
        let vmm_retries = match platform {
            VmPlatform::SevSnp => 2,
            VmPlatform::Default | VmPlatform::SwProtected | VmPlatform::Tdx => 0,
        };
        Self {
            slice: None,
            vmm_retries,
            retry_pause: Duration::from_millis(1),
        }
    }
}

/// What a memory-fault exit came to: what to do with the vCPU, and why.
#[derive(Debug)]
pub struct MemoryFaultOutcome {
    /// Run the vCPU again, retry, or fail it.
    pub action: MemoryFaultAction,
    /// The conversion's answer.
    pub result: Result<Completed, ExitError>,
}

/// Runs a vCPU's conversion exits through a [`ConversionQueue`] and answers the guest for its
/// [`VmPlatform`]; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct ExitHandler {
    queue: Arc<ConversionQueue>,
    platform: VmPlatform,
    config: HandlerConfig,
}

impl ExitHandler {
    /// A handler for a VM of `platform`, with [`HandlerConfig::for_platform`].
    pub fn new(queue: Arc<ConversionQueue>, platform: VmPlatform) -> Self {
        Self::with_config(queue, platform, HandlerConfig::for_platform(platform))
    }

    /// A handler with an explicit configuration.
    pub fn with_config(
        queue: Arc<ConversionQueue>,
        platform: VmPlatform,
        config: HandlerConfig,
    ) -> Self {
        Self {
            queue,
            platform,
            config,
        }
    }

    /// The queue.
    pub fn queue(&self) -> &Arc<ConversionQueue> {
        &self.queue
    }

    /// The platform answered for.
    pub fn platform(&self) -> VmPlatform {
        self.platform
    }

    /// Handles a `KVM_EXIT_HYPERCALL` (`VcpuExit::Hypercall`): a `KVM_HC_MAP_GPA_RANGE` is
    /// converted through the queue, and the guest's answer written to `exit.ret`.
    ///
    /// # Errors
    /// What went wrong, for the VMM's log; the guest was already answered.
    pub fn hypercall(&self, exit: &mut HypercallExit<'_>) -> Result<Completed, ExitError> {
        self.hypercall_fields(exit.nr, &exit.args, exit.ret)
    }

    /// As [`ExitHandler::hypercall`], from `kvm_run`'s `hypercall` fields.
    ///
    /// # Errors
    /// As [`ExitHandler::hypercall`].
    pub fn hypercall_fields(
        &self,
        nr: u64,
        args: &[u64; 6],
        ret: &mut u64,
    ) -> Result<Completed, ExitError> {
        answer_map_gpa_range(self.platform, nr, args, ret, |req| Ok(self.run(req)?))
    }

    /// Handles a `KVM_EXIT_MEMORY_FAULT` (`VcpuExit::MemoryFault { flags, gpa, size }`):
    /// converts the range to the kind of access the guest made, through the queue, and says
    /// what to do with the vCPU ([`MemoryFaultAction`]).
    pub fn memory_fault(&self, flags: u64, gpa: u64, size: u64) -> MemoryFaultOutcome {
        let result = ConversionRequest::from_memory_fault(flags, gpa, size)
            .map_err(ExitError::from)
            .and_then(|req| Ok(self.run(req)?));
        MemoryFaultOutcome {
            action: MemoryFaultAction::for_outcome(
                result.as_ref().err().map(ExitError::guest_error),
            ),
            result,
        }
    }

    /// Submits a `KVM_HC_MAP_GPA_RANGE` without waiting, for a VMM that waits in its own event
    /// loop: the request's answer adds 1 to `notify`; then [`PendingHypercall::answer`] gives
    /// the value for `hypercall.ret` (write it before the next `KVM_RUN`). Not retried by the
    /// handler.
    ///
    /// # Errors
    /// The exit is not a valid request: the value for `hypercall.ret` and why.
    pub fn submit_hypercall(
        &self,
        nr: u64,
        args: &[u64; 6],
        notify: Arc<EventFd>,
    ) -> Result<PendingHypercall, (u64, RequestError)> {
        match ConversionRequest::from_map_gpa_range(nr, args) {
            Ok(req) => Ok(PendingHypercall {
                ticket: self.queue.submit_notify(req, notify),
                platform: self.platform,
            }),
            Err(e) => Err((self.platform.hypercall_ret(Some(e.guest_error())), e)),
        }
    }

    /// Submits and waits, cutting the wait at the slice and retrying as configured.
    fn run(&self, req: ConversionRequest) -> Answer {
        let mut retries = self.config.vmm_retries;
        loop {
            let answer = self.wait(req);
            let retry = match &answer {
                Err(QueueError::Conversion { source, .. }) => {
                    crate::answer::conversion_failure(source).kind == FailureKind::Retry
                }
                _ => false,
            };
            if !retry || retries == 0 {
                return answer;
            }
            retries -= 1;
            std::thread::sleep(self.config.retry_pause);
        }
    }

    fn wait(&self, req: ConversionRequest) -> Answer {
        let Some(slice) = self.config.slice else {
            // Nothing bounds the wait: the vCPU thread may run the conversion itself.
            return self.queue.submit_and_run(req).wait();
        };
        let ticket = self.queue.submit(req);
        ticket.wait_timeout(slice).unwrap_or_else(|ticket| {
            // Stops it at the next chunk boundary; the answer says how far it got.
            ticket.cancel();
            ticket.wait()
        })
    }
}

/// A hypercall submitted by [`ExitHandler::submit_hypercall`], waiting for its answer.
#[derive(Debug)]
pub struct PendingHypercall {
    ticket: Ticket,
    platform: VmPlatform,
}

impl PendingHypercall {
    /// The ticket (to poll, cancel, or wait on with a timeout).
    pub fn ticket(&self) -> &Ticket {
        &self.ticket
    }

    /// True once answered (never blocks).
    pub fn is_answered(&self) -> bool {
        self.ticket.is_answered()
    }

    /// Waits for the answer: the value for `hypercall.ret`, and the result.
    pub fn answer(self) -> (u64, Result<Completed, ExitError>) {
        let result = self.ticket.wait().map_err(ExitError::from);
        let ret = self
            .platform
            .hypercall_ret(result.as_ref().err().map(ExitError::guest_error));
        (ret, result)
    }
}
