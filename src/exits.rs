//! Guest conversion requests from vCPU exits, and the value the guest gets back.
//!
//! Two exits ask for a conversion: `KVM_EXIT_MEMORY_FAULT` (an access whose kind, private or
//! shared, disagrees with the attribute; [`ConversionRequest::from_memory_fault`]) and the
//! `KVM_HC_MAP_GPA_RANGE` hypercall (SNP page-state change, TDX MapGPA;
//! [`ConversionRequest::from_map_gpa_range`]). What the guest is told is chosen for its VM
//! platform ([`crate::answer`]); the VM keeps running. [`crate::ExitHandler`] runs exits through
//! the [`crate::ConversionQueue`]; [`handle_map_gpa_range`] and [`handle_memory_fault`] convert
//! on the calling thread.

use discard_manager::{Attribute, GpaRange};
use kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE;

use kvm_ioctls::HypercallExit;

use crate::answer::{GuestError, VmPlatform, conversion_failure};
use crate::conversion::{Conversion, ConversionError};
use crate::queue::QueueError;
use crate::ram::GuestRam;
use crate::sys::{
    KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MAP_GPA_RANGE_PAGE_SZ_1G,
    KVM_MAP_GPA_RANGE_PAGE_SZ_2M, KVM_MAP_GPA_RANGE_PAGE_SZ_4K, KVM_MAP_GPA_RANGE_PAGE_SZ_MASK,
};

/// A conversion the guest asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConversionRequest {
    /// The range.
    pub range: GpaRange,
    /// The attribute it must get.
    pub to: Attribute,
}

/// An exit that does not describe a valid conversion; answer the guest with `EINVAL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The hypercall is not `KVM_HC_MAP_GPA_RANGE`.
    #[error("hypercall {nr} is not KVM_HC_MAP_GPA_RANGE")]
    NotMapGpaRange {
        /// The hypercall number.
        nr: u64,
    },
    /// Empty or overflowing range.
    #[error("range of {len:#x} bytes at {gpa:#x} is empty or overflows")]
    BadRange {
        /// Start.
        gpa: u64,
        /// Length in bytes (saturated).
        len: u64,
    },
    /// The page-size field holds the reserved value 3.
    #[error("page-size field of attrs {attrs:#x} is reserved")]
    BadPageSize {
        /// The attrs argument.
        attrs: u64,
    },
}

impl RequestError {
    /// What the guest is told: the request is invalid (`EINVAL` on every platform).
    pub fn guest_error(&self) -> GuestError {
        GuestError::INVALID
    }
}

impl ConversionRequest {
    /// From `KVM_EXIT_MEMORY_FAULT` (`VcpuExit::MemoryFault { flags, gpa, size }`): the guest
    /// accessed `[gpa, gpa + size)` as private when `flags` has `KVM_MEMORY_EXIT_FLAG_PRIVATE`,
    /// as shared otherwise, so the range must become that.
    ///
    /// # Errors
    /// [`RequestError::BadRange`].
    pub fn from_memory_fault(flags: u64, gpa: u64, size: u64) -> Result<Self, RequestError> {
        let range = GpaRange::new(gpa, size).ok_or(RequestError::BadRange { gpa, len: size })?;
        let to = if flags & u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE) != 0 {
            Attribute::Private
        } else {
            Attribute::Shared
        };
        Ok(Self { range, to })
    }

    /// From a `KVM_EXIT_HYPERCALL` with `nr` and `args` (`HypercallExit`): for
    /// `KVM_HC_MAP_GPA_RANGE`, `args[0]` = GPA, `args[1]` = number of pages, `args[2]` = attrs
    /// (bits 0-1: page size 4K/2M/1G; bit 4: encrypted, i.e. private).
    ///
    /// # Errors
    /// [`RequestError`] for another hypercall, a reserved page size or a bad range.
    pub fn from_map_gpa_range(nr: u64, args: &[u64; 6]) -> Result<Self, RequestError> {
        if nr != KVM_HC_MAP_GPA_RANGE {
            return Err(RequestError::NotMapGpaRange { nr });
        }
        let (gpa, pages, attrs) = (args[0], args[1], args[2]);
        let page_size: u64 = match attrs & KVM_MAP_GPA_RANGE_PAGE_SZ_MASK {
            KVM_MAP_GPA_RANGE_PAGE_SZ_4K => 1 << 12,
            KVM_MAP_GPA_RANGE_PAGE_SZ_2M => 1 << 21,
            KVM_MAP_GPA_RANGE_PAGE_SZ_1G => 1 << 30,
            _ => return Err(RequestError::BadPageSize { attrs }),
        };
        let len = pages.saturating_mul(page_size);
        let range = pages
            .checked_mul(page_size)
            .and_then(|len| GpaRange::new(gpa, len))
            .ok_or(RequestError::BadRange { gpa, len })?;
        let to = if attrs & KVM_MAP_GPA_RANGE_ENCRYPTED != 0 {
            Attribute::Private
        } else {
            Attribute::Shared
        };
        Ok(Self { range, to })
    }
}

/// A vCPU exit that asked for a conversion and did not get it.
#[derive(Debug, thiserror::Error)]
pub enum ExitError {
    /// The exit does not describe a valid conversion.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The conversion failed (nothing changed unless the error says otherwise).
    #[error(transparent)]
    Conversion(#[from] ConversionError),
    /// The queued conversion failed or was stopped (its prefix of whole chunks converted).
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl ExitError {
    /// What the guest is told ([`crate::answer`]'s table).
    pub fn guest_error(&self) -> GuestError {
        match self {
            ExitError::Request(e) => e.guest_error(),
            ExitError::Conversion(e) => conversion_failure(e),
            ExitError::Queue(e) => e.guest_error(),
        }
    }
}

/// Decodes a `KVM_HC_MAP_GPA_RANGE`, runs it with `convert`, and writes `platform`'s answer to
/// `ret`: the one place a hypercall exit is answered.
pub(crate) fn answer_map_gpa_range<T>(
    platform: VmPlatform,
    nr: u64,
    args: &[u64; 6],
    ret: &mut u64,
    convert: impl FnOnce(ConversionRequest) -> Result<T, ExitError>,
) -> Result<T, ExitError> {
    let result = ConversionRequest::from_map_gpa_range(nr, args)
        .map_err(ExitError::from)
        .and_then(convert);
    *ret = platform.hypercall_ret(result.as_ref().err().map(ExitError::guest_error));
    if let Err(e) = &result {
        log::debug!(
            "KVM_HC_MAP_GPA_RANGE {:x?} answered {:#x} ({platform:?}): {e}",
            &args[..3],
            *ret
        );
    }
    result
}

/// Handles a `KVM_EXIT_HYPERCALL` (`VcpuExit::Hypercall`) on the calling thread: converts the
/// range of a `KVM_HC_MAP_GPA_RANGE` and writes what a guest of `platform` reads back into
/// `exit.ret` ([`crate::answer`]). The vCPU then simply resumes; a failure never stops the VM.
///
/// # Errors
/// What went wrong, for the VMM's log; the guest was already answered.
pub fn handle_map_gpa_range(
    ram: &GuestRam,
    platform: VmPlatform,
    exit: &mut HypercallExit<'_>,
) -> Result<Conversion, ExitError> {
    answer_map_gpa_range(platform, exit.nr, &exit.args, exit.ret, |req| {
        Ok(ram.convert(req.range, req.to)?)
    })
}

/// Handles a `KVM_EXIT_MEMORY_FAULT` (`VcpuExit::MemoryFault { flags, gpa, size }`) on the
/// calling thread: converts the range to the kind of access the guest made. What to do with
/// the vCPU next is [`MemoryFaultAction::for_outcome`] of the result's
/// [`ExitError::guest_error`].
///
/// # Errors
/// The request or the conversion failed.
pub fn handle_memory_fault(
    ram: &GuestRam,
    flags: u64,
    gpa: u64,
    size: u64,
) -> Result<Conversion, ExitError> {
    let req = ConversionRequest::from_memory_fault(flags, gpa, size)?;
    Ok(ram.convert(req.range, req.to)?)
}

/// The hypercall return value of a register-style VM ([`VmPlatform::Default`],
/// [`VmPlatform::SwProtected`]) for a conversion result: 0 on success, `-errno` on failure.
/// For any platform use [`VmPlatform::hypercall_ret`].
pub fn hypercall_return(result: &Result<Conversion, ConversionError>) -> u64 {
    VmPlatform::Default.hypercall_ret(result.as_ref().err().map(conversion_failure))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_gpa_range_decodes_page_size_and_direction() {
        let r =
            ConversionRequest::from_map_gpa_range(12, &[0x20_0000, 2, 1 | 16, 0, 0, 0]).unwrap();
        assert_eq!(r.range, GpaRange::new(0x20_0000, 4 << 20).unwrap());
        assert_eq!(r.to, Attribute::Private);
        let r = ConversionRequest::from_map_gpa_range(12, &[0x1000, 3, 0, 0, 0, 0]).unwrap();
        assert_eq!((r.range.len(), r.to), (0x3000, Attribute::Shared));
        assert_eq!(
            ConversionRequest::from_map_gpa_range(12, &[0, 1, 3, 0, 0, 0]),
            Err(RequestError::BadPageSize { attrs: 3 })
        );
        assert_eq!(
            ConversionRequest::from_map_gpa_range(11, &[0; 6]),
            Err(RequestError::NotMapGpaRange { nr: 11 })
        );
        assert!(matches!(
            ConversionRequest::from_map_gpa_range(12, &[0x1000, 0, 0, 0, 0, 0]),
            Err(RequestError::BadRange { .. })
        ));
        assert!(matches!(
            ConversionRequest::from_map_gpa_range(12, &[u64::MAX - 0xfff, 2, 0, 0, 0, 0]),
            Err(RequestError::BadRange { .. })
        ));
    }

    #[test]
    fn memory_fault_direction_follows_the_private_flag() {
        let r = ConversionRequest::from_memory_fault(8, 0x1000, 0x1000).unwrap();
        assert_eq!(r.to, Attribute::Private);
        let r = ConversionRequest::from_memory_fault(0, 0x1000, 0x1000).unwrap();
        assert_eq!(r.to, Attribute::Shared);
        assert!(ConversionRequest::from_memory_fault(0, 0x1000, 0).is_err());
    }

    #[test]
    fn a_map_gpa_range_exit_is_converted_and_answered() {
        use std::sync::Arc;
        let ram = GuestRam::new(Arc::new(crate::RecordingAttributes::new()));
        let backing = crate::RegionBacking::software(0x10_0000, 0x10_0000).unwrap();
        let spec = crate::RegionSpec {
            granularity: 4096,
            initial: Attribute::Private,
            policy: crate::DiscardPolicy::Eager,
            initially_plugged: true,
        };
        ram.add_region(backing, spec).unwrap();
        let mut ret = u64::MAX;
        let mut exit = HypercallExit {
            nr: KVM_HC_MAP_GPA_RANGE,
            args: [0x10_2000, 2, 0, 0, 0, 0],
            ret: &mut ret,
            longmode: 1,
        };
        let c = handle_map_gpa_range(&ram, VmPlatform::Default, &mut exit).unwrap();
        assert_eq!((c.to, c.bytes()), (Attribute::Shared, 0x2000));
        assert_eq!(ret, 0);
        // Outside every region: the guest reads -EINVAL and the VM goes on.
        let mut exit = HypercallExit {
            nr: KVM_HC_MAP_GPA_RANGE,
            args: [0x8000_0000, 1, 16, 0, 0, 0],
            ret: &mut ret,
            longmode: 1,
        };
        assert!(handle_map_gpa_range(&ram, VmPlatform::Default, &mut exit).is_err());
        assert_eq!(ret as i64, -i64::from(libc::EINVAL));
        // The same on TDX: positive EINVAL, the only invalid answer KVM accepts there.
        let mut exit = HypercallExit {
            nr: KVM_HC_MAP_GPA_RANGE,
            args: [0x8000_0000, 1, 16, 0, 0, 0],
            ret: &mut ret,
            longmode: 1,
        };
        assert!(handle_map_gpa_range(&ram, VmPlatform::Tdx, &mut exit).is_err());
        assert_eq!(ret, libc::EINVAL as u64);
        let c = handle_memory_fault(&ram, 8, 0x10_2000, 0x1000).unwrap();
        assert_eq!(c.to, Attribute::Private);
    }

    #[test]
    fn errors_reach_the_guest_as_negative_errno() {
        let err: Result<Conversion, ConversionError> = Err(ConversionError::NoRegion {
            range: GpaRange::new(0, 0x1000).unwrap(),
        });
        assert_eq!(hypercall_return(&err) as i64, -i64::from(libc::EINVAL));
    }
}
