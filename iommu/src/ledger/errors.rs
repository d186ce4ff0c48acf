//! Why the ledger refused a request, or how a backend call it made failed.

use std::os::fd::RawFd;

use vmm_sys_util::errno;

use super::Mapping;
use crate::backend::{DmaError, DmaProt, FdAccess, IovaRange};

/// A request the ledger refused, or a backend call that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// Reading the backend's capabilities when creating the ledger failed.
    #[error("reading the backend's capabilities failed")]
    Capabilities(#[source] DmaError),
    /// A range of length zero.
    #[error("empty range at iova {iova:#x}")]
    EmptyRange {
        /// Start of the range.
        iova: u64,
    },
    /// A map with neither read nor write access.
    #[error("map of iova {iova:#x} len {len:#x} grants the device no access")]
    NoAccess {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        len: u64,
    },
    /// An address, length, offset or piece length not aligned to the smallest IOMMU page.
    #[error("{what} {value:#x} is not aligned to the IOMMU page size {page_size:#x}")]
    Misaligned {
        /// Which value: "iova", "length", "host address", "file offset", "piece length", or
        /// "cut point" (an end of an unmap range inside a mapping, on a backend that cuts).
        what: &'static str,
        /// The value.
        value: u64,
        /// The alignment required.
        page_size: u64,
    },
    /// The range (or its host address or file offset range) wraps around the address space.
    #[error("{what} range at {start:#x} len {len:#x} wraps around")]
    Overflow {
        /// Which range: "iova", "host address" or "file offset".
        what: &'static str,
        /// Start of the range.
        start: u64,
        /// Length of the range.
        len: u64,
    },
    /// The IOVA range is not inside any usable IOVA range of the backend.
    #[error("iova {iova:#x} len {len:#x} is outside the backend's IOVA ranges {ranges:x?}")]
    OutsideIovaRanges {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        len: u64,
        /// The usable ranges, as read when the ledger was created.
        ranges: Vec<IovaRange>,
    },
    /// The map overlaps a live mapping.
    #[error("map of iova {iova:#x} len {len:#x} overlaps live mapping {existing}")]
    Overlap {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        len: u64,
        /// The lowest live mapping it overlaps.
        existing: Mapping,
    },
    /// A map by file asks for device access the file descriptor does not grant (a writable
    /// mapping of an fd not open for writing, a readable one of an fd not open for reading).
    /// The kernel does not check this (Linux 7.3's `IOMMU_IOAS_MAP_FILE` maps an `O_RDONLY`
    /// memfd device-writable), so the ledger refuses it before any backend call.
    #[error(
        "map of iova {iova:#x} len {len:#x} asks {requested} device access to fd {fd}, opened \
         {fd_access}"
    )]
    FileAccess {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        len: u64,
        /// The file descriptor.
        fd: RawFd,
        /// What the descriptor grants.
        fd_access: FdAccess,
        /// What the mapping asked for.
        requested: DmaProt,
    },
    /// Reading a map's file descriptor's access mode (`fcntl(F_GETFL)`) failed.
    #[error("reading the access mode of fd {fd} failed")]
    FileMode {
        /// The file descriptor.
        fd: RawFd,
        /// The kernel's errno.
        #[source]
        source: errno::Error,
    },
    /// More mappings were asked for than the backend's budget has left.
    #[error("{requested} more mappings requested but the mapping budget has {remaining} left")]
    BudgetExceeded {
        /// Mappings asked for.
        requested: u64,
        /// Mappings the budget has left.
        remaining: u64,
    },
    /// The piece length is zero or does not divide the range length.
    #[error("piece length {piece_len:#x} does not divide length {len:#x} into whole pieces")]
    PieceLength {
        /// Length of the range.
        len: u64,
        /// The piece length asked for.
        piece_len: u64,
    },
    /// The unmap range would cut a live mapping in two, and the backend cannot split mappings
    /// ([`Capabilities::cuts_mappings`](crate::Capabilities::cuts_mappings) is false).
    #[error("unmap of iova {iova:#x} len {len:#x} would bisect live mapping {mapping}")]
    Bisects {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        len: u64,
        /// The mapping it would bisect.
        mapping: Mapping,
    },
    /// A list of ranges to unmap is not sorted and disjoint: the range at `iova` starts at or
    /// before the end of the one before it.
    #[error(
        "unmap range at iova {iova:#x} does not start after the previous range's last byte {previous_last:#x}"
    )]
    Unsorted {
        /// Start of the offending range.
        iova: u64,
        /// Last byte of the range before it.
        previous_last: u64,
    },
    /// The backend refused or failed a map; nothing is left mapped by this request.
    #[error("backend map failed")]
    Map(#[source] DmaError),
    /// A map of pieces failed, and unmapping the pieces it had already mapped failed too. Those
    /// pieces stay mapped and recorded (unmap them later or drop the ledger).
    #[error(
        "map of iova {iova:#x} len {len:#x} failed ({map_error}), and undoing the {left_mapped} \
         pieces already mapped failed"
    )]
    Rollback {
        /// Start of the whole request.
        iova: u64,
        /// Length of the whole request.
        len: u64,
        /// Why the map failed.
        map_error: DmaError,
        /// Pieces of this request still mapped and recorded.
        left_mapped: u64,
        /// Why undoing failed.
        #[source]
        source: Box<LedgerError>,
    },
    /// A backend unmap call failed. Its mappings stay recorded as mapped (type1v2 removes nothing
    /// on error; the ledger never issues the bisecting unmaps after which IOMMUFD removes part).
    #[error("backend unmap failed after {done_calls} successful calls")]
    Unmap {
        /// Unmap calls of this request that succeeded before (their mappings are gone).
        done_calls: u64,
        /// The failure.
        #[source]
        source: DmaError,
    },
    /// The backend reported unmapping a different number of bytes than the ledger recorded in
    /// the call's range (or returned [`DmaError::PartialUnmap`]): the record and the kernel
    /// disagreed. The kernel holds no mapping in the
    /// range after a successful unmap, so the ledger drops its records there and, where the
    /// backend reports a mapping budget, re-reads the budget from it.
    #[error(
        "unmap of iova {iova:#x} len {len:#x} removed {unmapped:#x} bytes, the ledger recorded \
         {expected:#x}"
    )]
    UnmapMismatch {
        /// Start of the call's range.
        iova: u64,
        /// Length of the call's range.
        len: u64,
        /// Bytes the ledger had recorded there.
        expected: u64,
        /// Bytes the backend reported.
        unmapped: u64,
    },
}
