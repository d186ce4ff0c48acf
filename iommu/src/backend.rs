//! The one trait every DMA backend implements, and the vocabulary it speaks.
//!
//! A backend is one IOMMU address space: a VFIO type1 container, an IOMMUFD IOAS, a VFIO
//! no-IOMMU group, or the emulated IOMMU. It does exactly what the kernel does and nothing more:
//! it does not remember what it mapped (the [`Ledger`](crate::Ledger) does), and it follows the
//! kernel's rule that **the unit of unmap is the unit of map**: an unmap must cover whole earlier
//! mappings, never part of one, unless the backend reports [`Capabilities::cuts_mappings`].

use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd};

use vmm_sys_util::errno;

/// Which kind of backend this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendKind {
    /// A VFIO type1v2 container (`/dev/vfio/vfio`).
    Type1,
    /// An IOMMUFD I/O address space (`/dev/iommu`) with the device attached through its vfio cdev.
    Iommufd,
    /// VFIO no-IOMMU mode: no translation; "mapping" pins memory and resolves physical addresses.
    NoIommu,
    /// The in-process emulated IOMMU.
    Emulated,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Type1 => "vfio-type1",
            BackendKind::Iommufd => "iommufd",
            BackendKind::NoIommu => "vfio-noiommu",
            BackendKind::Emulated => "emulated",
        })
    }
}

/// Access a device gets to a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DmaProt {
    /// The device may read the memory.
    pub read: bool,
    /// The device may write the memory.
    pub write: bool,
}

impl DmaProt {
    /// Device reads and writes.
    pub const READ_WRITE: DmaProt = DmaProt {
        read: true,
        write: true,
    };
    /// Device reads only.
    pub const READ_ONLY: DmaProt = DmaProt {
        read: true,
        write: false,
    };
}

impl fmt::Display for DmaProt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match (self.read, self.write) {
            (true, true) => "read-write",
            (true, false) => "read-only",
            (false, true) => "write-only",
            (false, false) => "no",
        })
    }
}

/// The access an open file description grants: its `O_ACCMODE`, or none at all for an `O_PATH`
/// descriptor (which no I/O may use).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FdAccess {
    /// `O_RDONLY`.
    ReadOnly,
    /// `O_WRONLY`.
    WriteOnly,
    /// `O_RDWR`.
    ReadWrite,
    /// `O_PATH`: neither.
    PathOnly,
}

impl FdAccess {
    /// How `fd` was opened (`fcntl(F_GETFL)`).
    ///
    /// # Errors
    /// The kernel's errno from `fcntl`.
    pub fn of(fd: BorrowedFd<'_>) -> Result<Self, errno::Error> {
        // SAFETY: F_GETFL on an fd open for the whole call takes no pointer; result checked.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(errno::Error::last());
        }
        Ok(if flags & libc::O_PATH != 0 {
            FdAccess::PathOnly
        } else {
            match flags & libc::O_ACCMODE {
                libc::O_RDONLY => FdAccess::ReadOnly,
                libc::O_WRONLY => FdAccess::WriteOnly,
                _ => FdAccess::ReadWrite,
            }
        })
    }

    /// True when the descriptor may be read.
    pub fn readable(self) -> bool {
        matches!(self, FdAccess::ReadOnly | FdAccess::ReadWrite)
    }

    /// True when the descriptor may be written.
    pub fn writable(self) -> bool {
        matches!(self, FdAccess::WriteOnly | FdAccess::ReadWrite)
    }

    /// True when a device with `prot` access to the file gets nothing the descriptor does not
    /// grant its holder.
    pub fn grants(self, prot: DmaProt) -> bool {
        (!prot.read || self.readable()) && (!prot.write || self.writable())
    }
}

impl fmt::Display for FdAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FdAccess::ReadOnly => "O_RDONLY",
            FdAccess::WriteOnly => "O_WRONLY",
            FdAccess::ReadWrite => "O_RDWR",
            FdAccess::PathOnly => "O_PATH",
        })
    }
}

/// An inclusive range of I/O virtual addresses, `[start, last]`, as the kernel reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IovaRange {
    /// First address in the range.
    pub start: u64,
    /// Last address in the range (inclusive, so a range may end at `u64::MAX`).
    pub last: u64,
}

impl IovaRange {
    /// True when `[iova, iova + len)` lies inside this range. `len == 0` is never contained.
    pub fn contains(&self, iova: u64, len: u64) -> bool {
        match len.checked_sub(1).and_then(|l| iova.checked_add(l)) {
            Some(last) => iova >= self.start && last <= self.last,
            None => false,
        }
    }
}

/// Which files [`DmaBackend::map_file`] accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FileMapSupport {
    /// No fd-based maps at all (type1; IOMMUFD before Linux 6.13).
    None,
    /// shmem/memfd and hugetlbfs files (IOMMUFD `IOMMU_IOAS_MAP_FILE`, Linux 6.13+). guest_memfd is
    /// refused by mainline kernels.
    Memfd,
    /// Any file, guest_memfd included: what trusted-IO private mappings need (the emulated backend).
    AnyFile,
}

/// What a backend can do, read from the kernel where the kernel says it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Which backend this is.
    pub kind: BackendKind,
    /// Bitmap of IOMMU page sizes. The smallest one is the alignment every iova, length, host
    /// address and file offset must have.
    pub page_sizes: u64,
    /// IOVA ranges a mapping may use.
    pub iova_ranges: Vec<IovaRange>,
    /// How many more mappings the kernel will accept (type1's `VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL`),
    /// or `None` where there is no count limit (IOMMUFD).
    pub mapping_budget: Option<u64>,
    /// Which files fd-based maps accept.
    pub map_file: FileMapSupport,
    /// False for no-IOMMU mode: the device sees physical addresses, not IOVAs.
    pub translates: bool,
    /// True when an unmap may cut a mapping: any sub-range whose ends are aligned to the smallest
    /// page size can be unmapped and the rest of the mapping stays mapped, without a window. Read
    /// from the kernel: IOMMUFD after it accepted type1 (v1) semantics for the IOAS; never a real
    /// VFIO type1 container or no-IOMMU mode. Where it is false, the unit of unmap is the unit
    /// of map.
    pub cuts_mappings: bool,
}

impl Capabilities {
    /// The smallest IOMMU page size: the alignment of every map and unmap.
    pub fn min_page_size(&self) -> u64 {
        // A backend that reports no page size at all is treated as 4 KiB-granular.
        match self.page_sizes {
            0 => 4096,
            sizes => 1 << sizes.trailing_zeros(),
        }
    }
}

/// A map or unmap a backend refused or failed, naming the step, the range and the kernel's errno.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DmaError {
    /// The backend cannot do this at all (for example `map_file` on type1).
    #[error("{kind} does not support {operation}")]
    Unsupported {
        /// The backend.
        kind: BackendKind,
        /// What was asked.
        operation: &'static str,
    },
    /// An address, length or offset is not aligned to the IOMMU page size.
    #[error("iova {iova:#x} len {len:#x} is not aligned to the IOMMU page size {page_size:#x}")]
    Misaligned {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        len: u64,
        /// The alignment required.
        page_size: u64,
    },
    /// Mapping by host virtual address failed.
    #[error("{kind}: mapping iova {iova:#x} len {len:#x} by address failed")]
    MapVa {
        /// The backend.
        kind: BackendKind,
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        len: u64,
        /// The kernel's errno (EEXIST overlap, ENOSPC budget, EINVAL range, ENOMEM memlock, ...).
        #[source]
        source: errno::Error,
    },
    /// Mapping by file descriptor + offset failed.
    #[error("{kind}: mapping iova {iova:#x} len {len:#x} from file offset {offset:#x} failed")]
    MapFile {
        /// The backend.
        kind: BackendKind,
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        len: u64,
        /// Offset in the file.
        offset: u64,
        /// The kernel's errno.
        #[source]
        source: errno::Error,
    },
    /// The unmap call failed.
    #[error("{kind}: unmapping iova {iova:#x} len {len:#x} failed")]
    Unmap {
        /// The backend.
        kind: BackendKind,
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        len: u64,
        /// The kernel's errno (EINVAL/ENOENT when the range bisects a mapping).
        #[source]
        source: errno::Error,
    },
    /// The kernel reported unmapping a different number of bytes than asked.
    #[error("{kind}: unmap of iova {iova:#x} len {len:#x} removed {unmapped:#x} bytes")]
    PartialUnmap {
        /// The backend.
        kind: BackendKind,
        /// Start of the range.
        iova: u64,
        /// Length asked for.
        len: u64,
        /// Bytes the kernel says it unmapped.
        unmapped: u64,
    },
    /// Reading capabilities or another backend query failed.
    #[error("{kind}: {operation} failed")]
    Query {
        /// The backend.
        kind: BackendKind,
        /// Which query.
        operation: &'static str,
        /// The kernel's errno.
        #[source]
        source: errno::Error,
    },
    /// A no-IOMMU map pinned memory but could not learn the physical address the device must
    /// be given (there is no IOVA translation to fall back on).
    #[error(
        "{kind}: no physical address for host address {host_addr:#x} (iova {iova:#x}): {reason}"
    )]
    PhysicalAddress {
        /// The backend.
        kind: BackendKind,
        /// The IOVA (lookup key) being mapped.
        iova: u64,
        /// The host virtual address of the page.
        host_addr: u64,
        /// Why (for example, the missing privilege).
        reason: &'static str,
    },
}

/// Refuses a map whose iova, length or host address is not a multiple of `page`.
pub(crate) fn check_aligned(iova: u64, len: u64, addr: u64, page: u64) -> Result<(), DmaError> {
    if page != 0 && (iova | len | addr) & (page - 1) != 0 {
        return Err(DmaError::Misaligned {
            iova,
            len,
            page_size: page,
        });
    }
    Ok(())
}

/// The bytes a kernel unmap call reported for `[iova, iova + len)`: fewer than `len` when the
/// range has holes between mappings (the ledger compares with its record); more is a kernel bug,
/// reported as [`DmaError::PartialUnmap`].
pub(crate) fn checked_unmapped(
    kind: BackendKind,
    iova: u64,
    len: u64,
    unmapped: u64,
) -> Result<u64, DmaError> {
    if unmapped > len {
        return Err(DmaError::PartialUnmap {
            kind,
            iova,
            len,
            unmapped,
        });
    }
    Ok(unmapped)
}

/// One IOMMU address space. Implementations are thin: one kernel call per method call, no
/// bookkeeping. Use it through a [`Ledger`](crate::Ledger), which keeps the record of mappings,
/// refuses bisecting unmaps and budget overruns before the kernel sees them, and merges unmaps.
pub trait DmaBackend: Send + Sync + fmt::Debug {
    /// What this backend can do. Kernel backends ask the kernel each time (the budget and the
    /// IOVA ranges change as mappings and devices come and go).
    fn capabilities(&self) -> Result<Capabilities, DmaError>;

    /// Maps `[iova, iova + len)` to the host memory at `host_addr` as one mapping.
    ///
    /// # Safety
    /// `[host_addr, host_addr + len)` must be memory of this process that stays mapped (not
    /// unmapped or replaced) until this exact mapping has been unmapped through this backend,
    /// and while it is mapped a device may read and write it at any time: no Rust reference that
    /// assumes exclusive or immutable access may exist to it.
    unsafe fn map_va(
        &self,
        iova: u64,
        len: u64,
        host_addr: *mut u8,
        prot: DmaProt,
    ) -> Result<(), DmaError>;

    /// Maps `[iova, iova + len)` to `[offset, offset + len)` of `file` as one mapping. Backends
    /// whose [`Capabilities::map_file`] is [`FileMapSupport::None`] return
    /// [`DmaError::Unsupported`] without calling the kernel.
    fn map_file(
        &self,
        iova: u64,
        len: u64,
        file: BorrowedFd<'_>,
        offset: u64,
        prot: DmaProt,
    ) -> Result<(), DmaError>;

    /// Unmaps every mapping inside `[iova, iova + len)`; the range must not bisect any mapping,
    /// unless [`Capabilities::cuts_mappings`], and then the mappings it bisects are cut at its
    /// ends first. Returns the number of bytes the kernel unmapped.
    fn unmap(&self, iova: u64, len: u64) -> Result<u64, DmaError>;
}

/// A backend seen as one that cannot cut mappings ([`Capabilities::cuts_mappings`] false), so
/// a ledger and the listeners above it map one granule per mapping, as they must on a type1
/// container: to compare the two mapping modes on one kernel (`dma-map compare`, the rig's
/// measurements). Every call goes to the wrapped backend unchanged; an unmap never bisects a mapping then, so a
/// cutting backend removes whole mappings only.
#[derive(Debug)]
pub struct WithoutCutting(pub std::sync::Arc<dyn DmaBackend>);

impl DmaBackend for WithoutCutting {
    fn capabilities(&self) -> Result<Capabilities, DmaError> {
        Ok(Capabilities {
            cuts_mappings: false,
            ..self.0.capabilities()?
        })
    }

    unsafe fn map_va(
        &self,
        iova: u64,
        len: u64,
        host_addr: *mut u8,
        prot: DmaProt,
    ) -> Result<(), DmaError> {
        // SAFETY: the caller's contract is the wrapped backend's `map_va`'s, passed on unchanged.
        unsafe { self.0.map_va(iova, len, host_addr, prot) }
    }

    fn map_file(
        &self,
        iova: u64,
        len: u64,
        file: BorrowedFd<'_>,
        offset: u64,
        prot: DmaProt,
    ) -> Result<(), DmaError> {
        self.0.map_file(iova, len, file, offset, prot)
    }

    fn unmap(&self, iova: u64, len: u64) -> Result<u64, DmaError> {
        self.0.unmap(iova, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iova_range_contains_checks_both_ends_and_overflow() {
        let r = IovaRange {
            start: 0x1000,
            last: 0x1fff,
        };
        assert!(r.contains(0x1000, 0x1000));
        assert!(!r.contains(0x1000, 0x1001));
        assert!(!r.contains(0xfff, 2));
        assert!(!r.contains(0x1000, 0));
        let top = IovaRange {
            start: 0,
            last: u64::MAX,
        };
        assert!(top.contains(u64::MAX, 1));
        assert!(!top.contains(u64::MAX, 2));
    }

    #[test]
    fn min_page_size_is_the_lowest_set_bit() {
        let caps = Capabilities {
            kind: BackendKind::Emulated,
            page_sizes: 0x4020_1000,
            iova_ranges: vec![],
            mapping_budget: None,
            map_file: FileMapSupport::None,
            translates: true,
            cuts_mappings: false,
        };
        assert_eq!(caps.min_page_size(), 0x1000);
    }

    #[test]
    fn alignment_is_checked_on_iova_length_and_address() {
        assert!(check_aligned(0x1000, 0x2000, 0x7000_0000, 0x1000).is_ok());
        for (iova, len, addr) in [(0x800, 0x1000, 0), (0, 0x1800, 0), (0, 0x1000, 0x10)] {
            match check_aligned(iova, len, addr, 0x1000) {
                Err(DmaError::Misaligned { page_size, .. }) => assert_eq!(page_size, 0x1000),
                other => panic!("{iova:#x} {len:#x} {addr:#x}: {other:?}"),
            }
        }
    }
}
