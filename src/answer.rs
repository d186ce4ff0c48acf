//! What the guest is told when a conversion it asked for failed, chosen for its VM platform.
//!
//! # Two answer styles
//! The kernel hands `hypercall.ret` of a `KVM_HC_MAP_GPA_RANGE` exit to the guest differently per
//! VM type (Linux 7.3: `kvm_is_valid_map_gpa_range_ret()` in `arch/x86/kvm/x86.h`, TDX's
//! `tdx_complete_vmcall_map_gpa()`, SEV-SNP's `snp_complete_psc_msr()`):
//!
//! - **Restricted** ([`VmPlatform::SevSnp`], [`VmPlatform::Tdx`]): the only values KVM accepts are
//!   `0`, `EINVAL` and `EAGAIN`, **positive** (`kvm_is_valid_map_gpa_range_ret`). Anything else
//!   makes `KVM_RUN` fail with `-EINVAL`, which stops the VM in every VMM. TDX turns `EAGAIN`
//!   into `TDVMCALL_STATUS_RETRY` and `EINVAL` into `TDVMCALL_STATUS_INVALID_OPERAND`; SNP turns
//!   either into a PSC error.
//! - **Register** ([`VmPlatform::Default`], [`VmPlatform::SwProtected`]):
//!   `complete_hypercall_exit` writes `hypercall.ret` to the guest's RAX as is (truncated to 32
//!   bits for a 32-bit hypercall). The answer is `0` on success and `-errno` (two's complement)
//!   on failure, KVM's own convention for hypercall results, with the errno of the table below.
//!
//! # The table
//! Every failure is one of two kinds ([`FailureKind`]): **invalid** (the request can never
//! succeed as asked; restricted answer `EINVAL`) or **retry** (nothing changed, or only a prefix
//! did, and the same request may succeed later; restricted answer `EAGAIN`).
//!
//! | failure | kind | restricted | register |
//! |---|---|---|---|
//! | success | - | `0` | `0` |
//! | the exit is not a valid request ([`crate::RequestError`]) | invalid | `EINVAL` | `-EINVAL` |
//! | [`ConversionError::Range`]: not granule-aligned or not inside the region | invalid | `EINVAL` | `-EINVAL` |
//! | [`ConversionError::NoRegion`]: no single region holds the range | invalid | `EINVAL` | `-EINVAL` |
//! | [`ConversionError::Unplugged`]: part of the range is unplugged (virtio-mem) | invalid | `EINVAL` | `-EINVAL` |
//! | [`ConversionError::Removed`]: the region was removed while the request waited | invalid | `EINVAL` | `-EINVAL` |
//! | [`ConversionError::MappingBudget`]: a device's mapping budget is full; frees as pages go private | retry | `EAGAIN` | `-ENOSPC` |
//! | [`ConversionError::Unmap`]: a device unmap failed; rolled back, the device may free up | retry | `EAGAIN` | `-EBUSY` |
//! | [`ConversionError::StaleMapping`]: an earlier failed unmap is being retried | retry | `EAGAIN` | `-EBUSY` |
//! | [`ConversionError::Map`]: a device refused to map; rolled back | retry | `EAGAIN` | `-EIO` |
//! | [`ConversionError::Attribute`] with errno `EAGAIN`, `EINTR`, `ENOMEM` or `EBUSY` | retry | `EAGAIN` | `-errno` |
//! | [`ConversionError::Attribute`] with any other errno (KVM refuses the call itself) | invalid | `EINVAL` | `-errno` |
//! | [`ConversionError::AttributeRollback`]: KVM kept the new attribute of a run; converting again sets it consistently | retry | `EAGAIN` | `-EIO` |
//! | [`ConversionError::RollbackFailed`]: devices that refused the rollback were detached; the retry runs without them | retry | `EAGAIN` | `-EIO` |
//! | [`ConversionError::Manager`]: the state manager is poisoned or was re-entered; retrying cannot help | invalid | `EINVAL` | `-EIO` |
//! | [`crate::QueueError::Cancelled`] / [`crate::QueueError::Paused`]: the VMM stopped it (between chunks) | retry | `EAGAIN` | `-EAGAIN` |
//! | [`crate::QueueError::Shutdown`] / [`crate::QueueError::Worker`]: the queue could not run it | retry | `EAGAIN` | `-EAGAIN` |
//!
//! The register column keeps the errno this crate answered every guest before platforms were
//! told apart, except that a request the VMM stopped now reads `-EAGAIN` (it read `-EIO`).
//!
//! # How far a chunked request got
//! The queue converts a long request in chunks, each all or nothing ([`crate::QueueConfig`]).
//! A request that fails or is stopped after some chunks keeps them converted; converting the
//! same range again changes only the rest. What the guest learns of that prefix:
//! - **TDX**: KVM itself splits one MapGPA into exits of at most 2 MiB and, on `EAGAIN`, tells
//!   the guest to retry from the start of the failed exit (`map_gpa_next`); Linux guests retry
//!   up to three times without progress. So the guest learns progress in whole exits.
//! - **SNP**: KVM walks the guest's page-state-change buffer one exit per entry run and records
//!   the entries done in the buffer's header; the failed exit's entries are not done. A Linux
//!   SNP guest terminates on any PSC error (`EINVAL` and `EAGAIN` alike), which is why
//!   [`crate::ExitHandler`] retries retry-kind failures itself before answering on SNP.
//! - **Register** platforms: RAX holds one errno and no progress. The prefix stays converted.
//!
//! # `KVM_EXIT_MEMORY_FAULT`
//! A memory fault is not answered through a register: `KVM_RUN` returned `-EFAULT` and the VMM
//! decides what happens next ([`MemoryFaultAction`]): after a successful conversion, or a
//! retry-kind failure, it runs the vCPU again (the access repeats; after a retry-kind failure it
//! faults again and asks again, so the VMM may first wait, e.g. for a pause to end); after an
//! invalid-kind failure resuming would fault forever, so the vCPU must be failed (stopped, or
//! handed to the VMM's error path) instead.

use kvm_ioctls::VmFd;

use crate::conversion::ConversionError;

/// The x86 VM types `KVM_CREATE_VM` takes, as far as their conversion answer differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VmPlatform {
    /// `KVM_X86_DEFAULT_VM` (and SEV, SEV-ES: no private memory, RAX answer).
    Default,
    /// `KVM_X86_SW_PROTECTED_VM`: private memory in software, RAX answer.
    SwProtected,
    /// `KVM_X86_SNP_VM`: `0`, `EINVAL` or `EAGAIN` only.
    SevSnp,
    /// `KVM_X86_TDX_VM`: `0`, `EINVAL` or `EAGAIN` only.
    Tdx,
}

/// How a platform hands `hypercall.ret` to the guest; see the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AnswerStyle {
    /// Written to RAX as is: `0` or `-errno`.
    Register,
    /// Only `0`, `EINVAL` or `EAGAIN` (positive); anything else stops the VM.
    Restricted,
}

/// The kind of a failure, which decides the restricted answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The request can never succeed as asked (`EINVAL`).
    Invalid,
    /// The same request may succeed later (`EAGAIN`).
    Retry,
}

/// A failure as the guest is told it: its kind and the errno of the register answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuestError {
    /// Invalid or retry.
    pub kind: FailureKind,
    /// The errno (positive) a register-style platform reads negated.
    pub errno: i32,
}

impl GuestError {
    /// An invalid request (`EINVAL` on every platform).
    pub const INVALID: GuestError = GuestError {
        kind: FailureKind::Invalid,
        errno: libc::EINVAL,
    };
    /// Stopped or not run by the VMM: try again (`EAGAIN` on every platform).
    pub const AGAIN: GuestError = GuestError {
        kind: FailureKind::Retry,
        errno: libc::EAGAIN,
    };

    const fn retry(errno: i32) -> Self {
        GuestError {
            kind: FailureKind::Retry,
            errno,
        }
    }
}

/// The row of the [table](self) for a failed conversion. No wildcard arm: a new
/// [`ConversionError`] variant does not compile until it has its row.
pub fn conversion_failure(e: &ConversionError) -> GuestError {
    match e {
        ConversionError::Range(_)
        | ConversionError::NoRegion { .. }
        | ConversionError::Unplugged { .. }
        | ConversionError::Removed { .. } => GuestError::INVALID,
        ConversionError::MappingBudget { .. } => GuestError::retry(libc::ENOSPC),
        ConversionError::Unmap { .. } | ConversionError::StaleMapping { .. } => {
            GuestError::retry(libc::EBUSY)
        }
        ConversionError::Map { .. }
        | ConversionError::AttributeRollback { .. }
        | ConversionError::RollbackFailed { .. } => GuestError::retry(libc::EIO),
        ConversionError::Attribute(a) => {
            let errno = a.source.errno();
            let kind = match errno {
                libc::EAGAIN | libc::EINTR | libc::ENOMEM | libc::EBUSY => FailureKind::Retry,
                _ => FailureKind::Invalid,
            };
            GuestError { kind, errno }
        }
        ConversionError::Manager(_) => GuestError {
            kind: FailureKind::Invalid,
            errno: libc::EIO,
        },
    }
}

/// What the VMM does with a vCPU after a `KVM_EXIT_MEMORY_FAULT`; see the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryFaultAction {
    /// The range has the attribute the access needs: run the vCPU again.
    Resume,
    /// Nothing (or only a prefix) changed, but it may later: run the vCPU again (it faults and
    /// asks again), after waiting if the VMM is pausing.
    Retry,
    /// The access can never be satisfied: running the vCPU again would fault forever. Fail it.
    Fail,
}

impl MemoryFaultAction {
    /// The action for the outcome of a memory fault's conversion (`None`: it succeeded).
    pub fn for_outcome(failure: Option<GuestError>) -> Self {
        match failure.map(|f| f.kind) {
            None => MemoryFaultAction::Resume,
            Some(FailureKind::Retry) => MemoryFaultAction::Retry,
            Some(FailureKind::Invalid) => MemoryFaultAction::Fail,
        }
    }
}

/// `KVM_X86_DEFAULT_VM` .. `KVM_X86_TDX_VM` (`arch/x86/include/uapi/asm/kvm.h`).
const KVM_X86_DEFAULT_VM: u64 = 0;
const KVM_X86_SW_PROTECTED_VM: u64 = 1;
const KVM_X86_SEV_VM: u64 = 2;
const KVM_X86_SEV_ES_VM: u64 = 3;
const KVM_X86_SNP_VM: u64 = 4;
const KVM_X86_TDX_VM: u64 = 5;

impl VmPlatform {
    /// The platform of a VM created with `KVM_CREATE_VM` type `vm_type`; `None` for a type this
    /// crate does not know (its answer rules are unknown).
    pub fn from_vm_type(vm_type: u64) -> Option<Self> {
        match vm_type {
            KVM_X86_DEFAULT_VM | KVM_X86_SEV_VM | KVM_X86_SEV_ES_VM => Some(VmPlatform::Default),
            KVM_X86_SW_PROTECTED_VM => Some(VmPlatform::SwProtected),
            KVM_X86_SNP_VM => Some(VmPlatform::SevSnp),
            KVM_X86_TDX_VM => Some(VmPlatform::Tdx),
            _ => None,
        }
    }

    /// How the platform hands the answer to the guest.
    pub fn style(self) -> AnswerStyle {
        match self {
            VmPlatform::Default | VmPlatform::SwProtected => AnswerStyle::Register,
            VmPlatform::SevSnp | VmPlatform::Tdx => AnswerStyle::Restricted,
        }
    }

    /// `hypercall.ret` for an outcome (`None`: success), per the [table](self).
    pub fn hypercall_ret(self, failure: Option<GuestError>) -> u64 {
        let Some(failure) = failure else { return 0 };
        match (self.style(), failure.kind) {
            (AnswerStyle::Register, _) => negative_errno(failure.errno),
            (AnswerStyle::Restricted, FailureKind::Invalid) => libc::EINVAL as u64,
            (AnswerStyle::Restricted, FailureKind::Retry) => libc::EAGAIN as u64,
        }
    }
}

/// `-errno` as the 64-bit register value the guest reads.
pub fn negative_errno(errno: i32) -> u64 {
    (-i64::from(errno)) as u64
}

/// Enabling `KVM_HC_MAP_GPA_RANGE` exits failed; the guest's conversion requests would never
/// reach the VMM.
#[derive(Debug, thiserror::Error)]
pub enum ExitCapError {
    /// `KVM_CHECK_EXTENSION(KVM_CAP_EXIT_HYPERCALL)` does not list `KVM_HC_MAP_GPA_RANGE`.
    #[error(
        "this kernel cannot exit to userspace on KVM_HC_MAP_GPA_RANGE \
         (KVM_CAP_EXIT_HYPERCALL offers hypercall mask {offered:#x}; needs Linux 5.19+ on x86)"
    )]
    Unsupported {
        /// The mask of hypercalls the kernel can forward (0: the capability is unknown).
        offered: u64,
    },
    /// `KVM_ENABLE_CAP` refused although the extension was offered.
    #[error("KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL, {mask:#x}) failed")]
    Enable {
        /// The mask asked for.
        mask: u64,
        /// The kernel's errno.
        #[source]
        source: vmm_sys_util::errno::Error,
    },
}

/// Makes `KVM_HC_MAP_GPA_RANGE` exit to userspace (`KVM_EXIT_HYPERCALL`) on `vm`, keeping any
/// hypercall exit already enabled. Without it, SNP and TDX conversions never reach the VMM
/// (KVM answers the guest an error itself). Call it before running vCPUs.
///
/// # Errors
/// [`ExitCapError::Unsupported`] when `KVM_CHECK_EXTENSION` does not offer it (checked first,
/// so a kernel without it is named, not guessed from an errno), [`ExitCapError::Enable`] when
/// `KVM_ENABLE_CAP` fails.
pub fn enable_map_gpa_range_exits(vm: &VmFd) -> Result<(), ExitCapError> {
    use kvm_bindings::{KVM_CAP_EXIT_HYPERCALL, kvm_enable_cap};
    let mask = 1u64 << crate::sys::KVM_HC_MAP_GPA_RANGE;
    let offered = map_gpa_range_exit_mask(vm);
    if offered & mask == 0 {
        return Err(ExitCapError::Unsupported { offered });
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_EXIT_HYPERCALL,
        ..Default::default()
    };
    cap.args[0] = mask;
    vm.enable_cap(&cap)
        .map_err(|source| ExitCapError::Enable { mask, source })
}

/// The hypercalls `vm`'s kernel can forward to userspace (`KVM_CHECK_EXTENSION` of
/// `KVM_CAP_EXIT_HYPERCALL`: a mask of hypercall numbers; 0 when unknown).
pub fn map_gpa_range_exit_mask(vm: &VmFd) -> u64 {
    let raw = vm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_EXIT_HYPERCALL));
    u64::try_from(raw).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attributes::AttributeError;
    use crate::conversion::UnmapFailure;
    use discard_manager::{Attribute, GpaRange, RangeError, View};
    use iommu::LedgerError;
    use vmm_sys_util::errno;

    const ALL: [VmPlatform; 4] = [
        VmPlatform::Default,
        VmPlatform::SwProtected,
        VmPlatform::SevSnp,
        VmPlatform::Tdx,
    ];

    fn r() -> GpaRange {
        GpaRange::new(0x1000, 0x1000).unwrap()
    }

    fn attribute(errno: i32) -> ConversionError {
        ConversionError::Attribute(AttributeError {
            range: r(),
            attribute: Attribute::Private,
            source: errno::Error::new(errno),
        })
    }

    /// One of each variant. The match below has no wildcard: a new variant fails this test's
    /// compilation until it is built here too.
    fn one_of_each() -> Vec<ConversionError> {
        let budget = LedgerError::BudgetExceeded {
            requested: 4,
            remaining: 3,
        };
        let all = vec![
            ConversionError::Range(RangeError::Empty { start: 0 }),
            ConversionError::NoRegion { range: r() },
            ConversionError::MappingBudget {
                device: "nic".into(),
                range: r(),
                needed: 4,
                source: budget,
            },
            ConversionError::Unmap {
                first: Box::new(UnmapFailure {
                    device: "nic".into(),
                    view: View::Shared,
                    range: r(),
                    source: Box::new(LedgerError::EmptyRange { iova: 0 }),
                }),
                count: 1,
            },
            attribute(libc::EIO),
            ConversionError::Map {
                device: "nic".into(),
                view: View::Shared,
                range: r(),
                source: "refused".into(),
            },
            ConversionError::AttributeRollback {
                range: r(),
                source: AttributeError {
                    range: r(),
                    attribute: Attribute::Shared,
                    source: errno::Error::new(libc::EIO),
                },
            },
            ConversionError::RollbackFailed {
                detached: vec!["nic".into()],
                devices: Vec::new(),
                source: "rollback".into(),
            },
            ConversionError::StaleMapping {
                device: "nic".into(),
                range: r(),
            },
            ConversionError::Manager("poisoned".into()),
            ConversionError::Unplugged {
                range: r(),
                unplugged: r(),
            },
            ConversionError::Removed { range: r() },
        ];
        let mut seen: Vec<usize> = all
            .iter()
            .map(|e| match e {
                ConversionError::Range(_) => 0,
                ConversionError::NoRegion { .. } => 1,
                ConversionError::MappingBudget { .. } => 2,
                ConversionError::Unmap { .. } => 3,
                ConversionError::Attribute(_) => 4,
                ConversionError::Map { .. } => 5,
                ConversionError::AttributeRollback { .. } => 6,
                ConversionError::RollbackFailed { .. } => 7,
                ConversionError::StaleMapping { .. } => 8,
                ConversionError::Manager(_) => 9,
                ConversionError::Unplugged { .. } => 10,
                ConversionError::Removed { .. } => 11,
            })
            .collect();
        seen.dedup();
        assert_eq!(seen, (0..=11).collect::<Vec<_>>(), "one of each, in order");
        all
    }

    #[test]
    fn every_conversion_error_gets_only_0_einval_or_eagain_on_snp_and_tdx() {
        for e in one_of_each() {
            for p in [VmPlatform::SevSnp, VmPlatform::Tdx] {
                let ret = p.hypercall_ret(Some(conversion_failure(&e)));
                assert!(
                    [libc::EINVAL as u64, libc::EAGAIN as u64].contains(&ret),
                    "{p:?} answers {ret:#x} for {e:?}"
                );
            }
        }
        for p in [VmPlatform::SevSnp, VmPlatform::Tdx] {
            assert_eq!(p.hypercall_ret(None), 0);
        }
    }

    #[test]
    fn register_platforms_answer_minus_errno_as_before() {
        // The errno this crate answered before platforms were told apart, variant by variant
        // (in `one_of_each` order).
        let before = [
            libc::EINVAL,
            libc::EINVAL,
            libc::ENOSPC,
            libc::EBUSY,
            libc::EIO, // the attribute's own errno, here EIO
            libc::EIO,
            libc::EIO,
            libc::EIO,
            libc::EBUSY,
            libc::EIO,
            libc::EINVAL,
            libc::EINVAL,
        ];
        let all = one_of_each();
        assert_eq!(all.len(), before.len(), "one errno per variant");
        for (e, errno) in all.iter().zip(before) {
            for p in [VmPlatform::Default, VmPlatform::SwProtected] {
                let ret = p.hypercall_ret(Some(conversion_failure(e)));
                assert_eq!(ret as i64, -i64::from(errno), "{p:?} {e:?}");
            }
        }
    }

    /// One row of the table: the failure, its restricted answer and its register errno.
    fn row(e: ConversionError, restricted: i32, register: i32) {
        let f = conversion_failure(&e);
        for p in ALL {
            let want = match p.style() {
                AnswerStyle::Restricted => restricted as u64,
                AnswerStyle::Register => negative_errno(register),
            };
            assert_eq!(p.hypercall_ret(Some(f)), want, "{p:?} for {e:?}");
        }
    }

    #[test]
    fn row_bad_range_is_einval() {
        row(
            ConversionError::Range(RangeError::Empty { start: 0 }),
            libc::EINVAL,
            libc::EINVAL,
        );
    }

    #[test]
    fn row_no_region_is_einval() {
        row(
            ConversionError::NoRegion { range: r() },
            libc::EINVAL,
            libc::EINVAL,
        );
    }

    #[test]
    fn row_unplugged_is_einval() {
        row(
            ConversionError::Unplugged {
                range: r(),
                unplugged: r(),
            },
            libc::EINVAL,
            libc::EINVAL,
        );
    }

    #[test]
    fn row_removed_is_einval() {
        row(
            ConversionError::Removed { range: r() },
            libc::EINVAL,
            libc::EINVAL,
        );
    }

    #[test]
    fn row_mapping_budget_is_eagain_or_enospc() {
        let e = one_of_each().swap_remove(2);
        assert!(matches!(e, ConversionError::MappingBudget { .. }));
        row(e, libc::EAGAIN, libc::ENOSPC);
    }

    #[test]
    fn row_unmap_is_eagain_or_ebusy() {
        let e = one_of_each().swap_remove(3);
        assert!(matches!(e, ConversionError::Unmap { .. }));
        row(e, libc::EAGAIN, libc::EBUSY);
    }

    #[test]
    fn row_stale_mapping_is_eagain_or_ebusy() {
        let e = ConversionError::StaleMapping {
            device: "nic".into(),
            range: r(),
        };
        row(e, libc::EAGAIN, libc::EBUSY);
    }

    #[test]
    fn row_map_is_eagain_or_eio() {
        let e = one_of_each().swap_remove(5);
        assert!(matches!(e, ConversionError::Map { .. }));
        row(e, libc::EAGAIN, libc::EIO);
    }

    #[test]
    fn row_transient_attribute_errors_are_eagain_with_their_errno() {
        for errno in [libc::EAGAIN, libc::EINTR, libc::ENOMEM, libc::EBUSY] {
            row(attribute(errno), libc::EAGAIN, errno);
        }
    }

    #[test]
    fn row_other_attribute_errors_are_einval_with_their_errno() {
        for errno in [libc::EINVAL, libc::EFAULT, libc::EIO, libc::ENOTTY] {
            row(attribute(errno), libc::EINVAL, errno);
        }
    }

    #[test]
    fn row_attribute_rollback_is_eagain_or_eio() {
        let e = one_of_each().swap_remove(6);
        assert!(matches!(e, ConversionError::AttributeRollback { .. }));
        row(e, libc::EAGAIN, libc::EIO);
    }

    #[test]
    fn row_rollback_failed_is_eagain_or_eio() {
        let e = one_of_each().swap_remove(7);
        assert!(matches!(e, ConversionError::RollbackFailed { .. }));
        row(e, libc::EAGAIN, libc::EIO);
    }

    #[test]
    fn row_manager_is_einval_or_eio() {
        row(
            ConversionError::Manager("poisoned".into()),
            libc::EINVAL,
            libc::EIO,
        );
    }

    #[test]
    fn row_success_is_zero_everywhere() {
        for p in ALL {
            assert_eq!(p.hypercall_ret(None), 0);
        }
    }

    #[test]
    fn memory_fault_resumes_retries_or_fails_by_kind() {
        assert_eq!(
            MemoryFaultAction::for_outcome(None),
            MemoryFaultAction::Resume
        );
        assert_eq!(
            MemoryFaultAction::for_outcome(Some(GuestError::AGAIN)),
            MemoryFaultAction::Retry
        );
        assert_eq!(
            MemoryFaultAction::for_outcome(Some(conversion_failure(&ConversionError::NoRegion {
                range: r()
            }))),
            MemoryFaultAction::Fail
        );
    }

    #[test]
    fn vm_types_map_to_platforms() {
        let got: Vec<_> = (0..7).map(VmPlatform::from_vm_type).collect();
        use VmPlatform::*;
        assert_eq!(
            got,
            [
                Some(Default),
                Some(SwProtected),
                Some(Default),
                Some(Default),
                Some(SevSnp),
                Some(Tdx),
                None
            ]
        );
    }
}
