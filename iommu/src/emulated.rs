//! An in-process IOMMU that follows the kernel's mapping rules to the letter.
//!
//! [`EmulatedIommu`] implements [`DmaBackend`] with a page table of whole mappings (a `BTreeMap`
//! keyed by IOVA) and enforces what VFIO type1v2 and IOMMUFD enforce (notes/kernel-uapi.md 1.2,
//! 1.3, 2.2):
//! - a map that overlaps a live mapping is refused with `EEXIST`; one that is misaligned to the
//!   smallest page size, empty, wraps around or has no access is refused with `EINVAL`; one
//!   outside the IOVA ranges with `EINVAL`; one beyond the mapping budget with `ENOSPC` (the
//!   checks run in `vfio_dma_do_map()`'s order);
//! - an unmap must cover whole mappings: one that bisects a mapping is refused. With
//!   [`UnmapStyle::Type1v2`] that is `EINVAL` and atomic, and an unmap of a range holding nothing
//!   returns 0 bytes. With [`UnmapStyle::Iommufd`] it is `ENOENT` *after* removing the whole areas
//!   that precede the bisected one (the kernel's loop is not atomic), a range holding nothing is
//!   also `ENOENT`, and `iova 0, len u64::MAX` removes everything;
//! - `map_file` accepts any file, guest_memfd included ([`FileMapSupport::AnyFile`], standing in
//!   for the trusted-IO kernel that does not exist yet), or only memfd/hugetlbfs like mainline
//!   `IOMMU_IOAS_MAP_FILE`, or nothing like type1.
//!
//! It records every call ([`EmulatedIommu::calls`]), lets a test "DMA" through the table from the
//! device side ([`EmulatedIommu::dma_read`], [`EmulatedIommu::dma_write`]) and records every fault
//! ([`EmulatedIommu::faults`]), and injects failures on demand
//! ([`EmulatedIommu::inject_failures`]). Device accesses reach host-address mappings through the
//! recorded pointer, and file mappings through `pread`/`pwrite` on the emulator's own duplicate of
//! the fd, or, for files without read/write methods (an mmap-able guest_memfd answers `ESPIPE`),
//! through a temporary shared mapping of the file.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use vm_memory::VolatileSlice;
use vmm_sys_util::errno;

use crate::backend::{
    BackendKind, Capabilities, DmaBackend, DmaError, DmaProt, FileMapSupport, IovaRange,
};

/// Page sizes the emulated IOMMU reports unless told otherwise: 4 KiB, 2 MiB and 1 GiB, what an
/// x86 IOMMU typically reports.
pub const DEFAULT_PAGE_SIZES: u64 = 0x4020_1000;

/// The IOVA range the emulated IOMMU allows unless told otherwise: a 48-bit address space.
pub const DEFAULT_IOVA_RANGE: IovaRange = IovaRange {
    start: 0,
    last: (1 << 48) - 1,
};

/// How the emulated IOMMU answers an unmap that bisects a mapping or holds no mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum UnmapStyle {
    /// VFIO type1v2: misaligned or bisecting unmaps fail with `EINVAL` before anything is removed;
    /// a range holding no mapping succeeds with 0 bytes.
    #[default]
    Type1v2,
    /// Native IOMMUFD: no alignment rule on unmap; a bisected area fails with `ENOENT` after the
    /// whole areas before it were already removed; a range holding no mapping fails with `ENOENT`;
    /// `iova 0, len u64::MAX` removes everything and always succeeds.
    Iommufd,
}

/// Which backend call a [`Call`] records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CallKind {
    /// [`DmaBackend::map_va`].
    MapVa,
    /// [`DmaBackend::map_file`].
    MapFile,
    /// [`DmaBackend::unmap`].
    Unmap,
}

/// One call the emulated IOMMU received, with its outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    /// Which call.
    pub kind: CallKind,
    /// The IOVA asked for.
    pub iova: u64,
    /// The length asked for.
    pub len: u64,
    /// The file offset, for [`CallKind::MapFile`].
    pub offset: Option<u64>,
    /// Bytes mapped or unmapped, or the errno returned.
    pub result: Result<u64, i32>,
    /// True when the result came from [`EmulatedIommu::inject_failures`], not from the rules.
    pub injected: bool,
}

/// Why a device access faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultReason {
    /// No mapping covers the page.
    NotMapped,
    /// The mapping covering the page forbids this direction of access.
    Forbidden,
}

/// A device access the IOMMU refused. No byte of the access was read or written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DmaFault {
    /// Start of the whole access.
    pub iova: u64,
    /// Length of the whole access.
    pub len: u64,
    /// True for a device write (to memory), false for a device read.
    pub write: bool,
    /// The first address of the access that could not be translated.
    pub fault_iova: u64,
    /// Why it could not.
    pub reason: FaultReason,
}

/// A device-side access through the emulated IOMMU that failed.
#[derive(Debug, thiserror::Error)]
pub enum DmaAccessError {
    /// The IOMMU refused the access; nothing was read or written.
    #[error(
        "DMA {} at iova {:#x} len {:#x} faulted at {:#x}: {:?}",
        if .0.write { "write" } else { "read" }, .0.iova, .0.len, .0.fault_iova, .0.reason
    )]
    Fault(DmaFault),
    /// Reading or writing the backing file of a mapping failed (the access may be partly done).
    #[error("DMA to file-backed iova {iova:#x} len {len:#x} (file offset {offset:#x}) failed")]
    FileIo {
        /// Start of the piece that failed.
        iova: u64,
        /// Length of the piece that failed.
        len: u64,
        /// The file offset it translates to.
        offset: u64,
        /// What the file said.
        #[source]
        source: io::Error,
    },
}

/// One live mapping of the emulated page table, as [`EmulatedIommu::page_table`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TableEntry {
    /// First IOVA.
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
    /// Device access.
    pub prot: DmaProt,
    /// What the IOVA translates to.
    pub target: TableTarget,
}

/// What a [`TableEntry`] translates to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TableTarget {
    /// Host memory at this address.
    HostVa {
        /// The host virtual address of the mapping's first byte.
        addr: usize,
    },
    /// A file (the emulator holds its own duplicate of the fd) at this offset.
    File {
        /// Offset in the file of the mapping's first byte.
        offset: u64,
    },
}

/// A failure-injection hook: called before every map and unmap with the call's kind, IOVA and
/// length; `Some(errno)` makes the call fail with that errno and change nothing.
pub type FailureInjector = dyn FnMut(&CallKind, u64, u64) -> Option<i32> + Send;

/// Builds an [`EmulatedIommu`].
#[derive(Clone, Debug)]
pub struct EmulatedIommuBuilder {
    page_sizes: u64,
    iova_ranges: Vec<IovaRange>,
    mapping_budget: Option<u64>,
    unmap_style: UnmapStyle,
    map_file: FileMapSupport,
    record_calls: bool,
}

impl Default for EmulatedIommuBuilder {
    fn default() -> Self {
        Self {
            page_sizes: DEFAULT_PAGE_SIZES,
            iova_ranges: vec![DEFAULT_IOVA_RANGE],
            mapping_budget: None,
            unmap_style: UnmapStyle::Type1v2,
            map_file: FileMapSupport::AnyFile,
            record_calls: true,
        }
    }
}

impl EmulatedIommuBuilder {
    /// Sets the page-size bitmap; its lowest set bit is the alignment of every map and unmap.
    /// `0` is treated as 4 KiB, like [`Capabilities::min_page_size`].
    pub fn page_sizes(mut self, page_sizes: u64) -> Self {
        self.page_sizes = page_sizes;
        self
    }

    /// Sets the IOVA ranges a mapping may use; an empty list allows any IOVA, as type1 does when
    /// the kernel reports no ranges.
    pub fn iova_ranges(mut self, ranges: Vec<IovaRange>) -> Self {
        self.iova_ranges = ranges;
        self
    }

    /// Sets the mapping budget: `None` for no count limit (IOMMUFD), `Some(n)` for type1's
    /// `dma_entry_limit` (65535 by default in the kernel).
    pub fn mapping_budget(mut self, budget: Option<u64>) -> Self {
        self.mapping_budget = budget;
        self
    }

    /// Sets how bisecting and empty unmaps are answered.
    pub fn unmap_style(mut self, style: UnmapStyle) -> Self {
        self.unmap_style = style;
        self
    }

    /// Sets which files `map_file` accepts.
    pub fn map_file(mut self, support: FileMapSupport) -> Self {
        self.map_file = support;
        self
    }

    /// Turns the call log on (the default) or off (for benchmarks of millions of calls).
    pub fn record_calls(mut self, record: bool) -> Self {
        self.record_calls = record;
        self
    }

    /// Builds the emulated IOMMU with an empty page table.
    pub fn build(self) -> EmulatedIommu {
        let page_size = match self.page_sizes {
            0 => 4096,
            sizes => 1 << sizes.trailing_zeros(),
        };
        EmulatedIommu {
            page_size,
            state: Mutex::new(State {
                table: BTreeMap::new(),
                budget: self.mapping_budget,
                calls: Vec::new(),
                faults: Vec::new(),
            }),
            injector: Mutex::new(None),
            config: self,
        }
    }
}

/// A host address recorded by `map_va`.
#[derive(Clone, Copy, Debug)]
struct HostPtr(*mut u8);

// SAFETY: the pointer is only an address the caller of `map_va` promised stays mapped and may be
// accessed by a device at any time from any thread (map_va's safety contract); the emulator only
// dereferences it under its state lock while the mapping is live, as a device would.
unsafe impl Send for HostPtr {}
// SAFETY: as for `Send`: shared access only reads the address; dereferences follow map_va's
// contract, which allows access from any thread at any time.
unsafe impl Sync for HostPtr {}

#[derive(Debug)]
enum Target {
    HostVa(HostPtr),
    File { file: File, offset: u64 },
}

#[derive(Debug)]
struct Entry {
    len: u64,
    prot: DmaProt,
    target: Target,
}

impl Entry {
    /// Last IOVA of a mapping starting at `iova` (cannot overflow: checked when mapped).
    fn last(&self, iova: u64) -> u64 {
        iova + (self.len - 1)
    }
}

#[derive(Debug)]
struct State {
    table: BTreeMap<u64, Entry>,
    budget: Option<u64>,
    calls: Vec<Call>,
    faults: Vec<DmaFault>,
}

/// An in-process IOMMU page table that follows the kernel's rules; see the [module
/// docs](self).
pub struct EmulatedIommu {
    config: EmulatedIommuBuilder,
    page_size: u64,
    state: Mutex<State>,
    injector: Mutex<Option<Box<FailureInjector>>>,
}

impl fmt::Debug for EmulatedIommu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatedIommu")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Default for EmulatedIommu {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a map call's memory comes from.
enum Source<'a> {
    Va(*mut u8),
    File { file: BorrowedFd<'a>, offset: u64 },
}

/// Locks `m`, ignoring poison: every critical section below leaves the state consistent before
/// anything that can panic, so a panic elsewhere (for example in a test's injector) must not
/// make the IOMMU unusable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EmulatedIommu {
    /// An emulated IOMMU with the defaults: 4 KiB minimum page, a 48-bit IOVA range, no mapping
    /// budget, type1v2 unmap rules, any file accepted by `map_file`, calls recorded.
    pub fn new() -> Self {
        EmulatedIommuBuilder::default().build()
    }

    /// A builder to choose page size, IOVA ranges, budget, unmap style and file support.
    pub fn builder() -> EmulatedIommuBuilder {
        EmulatedIommuBuilder::default()
    }

    /// The smallest page size: every map and (type1v2) unmap must be aligned to it.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The live mappings, in IOVA order.
    pub fn page_table(&self) -> Vec<TableEntry> {
        let state = lock(&self.state);
        state
            .table
            .iter()
            .map(|(&iova, e)| TableEntry {
                iova,
                len: e.len,
                prot: e.prot,
                target: match &e.target {
                    Target::HostVa(p) => TableTarget::HostVa { addr: p.0 as usize },
                    Target::File { offset, .. } => TableTarget::File { offset: *offset },
                },
            })
            .collect()
    }

    /// Number of live mappings.
    pub fn mapping_count(&self) -> usize {
        lock(&self.state).table.len()
    }

    /// The calls received so far, oldest first (empty when recording is off).
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.state).calls.clone()
    }

    /// Returns the calls received so far and clears the log.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut lock(&self.state).calls)
    }

    /// The device accesses refused so far, oldest first.
    pub fn faults(&self) -> Vec<DmaFault> {
        lock(&self.state).faults.clone()
    }

    /// Returns the faults recorded so far and clears them.
    pub fn take_faults(&self) -> Vec<DmaFault> {
        std::mem::take(&mut lock(&self.state).faults)
    }

    /// Installs a failure injector, replacing any earlier one. It is called before every map and
    /// unmap; when it returns `Some(errno)` the call fails with that errno, the page table and
    /// budget are left unchanged, and the call is logged with `injected: true`.
    ///
    /// The injector runs without the page-table lock held but under its own lock: it must not
    /// call back into this `EmulatedIommu`'s map or unmap.
    pub fn inject_failures(
        &self,
        injector: impl FnMut(&CallKind, u64, u64) -> Option<i32> + Send + 'static,
    ) {
        *lock(&self.injector) = Some(Box::new(injector));
    }

    /// Removes the failure injector.
    pub fn clear_failures(&self) {
        *lock(&self.injector) = None;
    }

    fn injected(&self, kind: CallKind, iova: u64, len: u64) -> Option<i32> {
        lock(&self.injector)
            .as_mut()
            .and_then(|inject| inject(&kind, iova, len))
    }

    fn log(&self, state: &mut State, call: Call) {
        if self.config.record_calls {
            state.calls.push(call);
        }
    }

    fn is_aligned(&self, value: u64) -> bool {
        value & (self.page_size - 1) == 0
    }

    /// Applies `vfio_dma_do_map()`'s checks in its order, then the file checks, then inserts.
    fn map_common(
        &self,
        kind: CallKind,
        iova: u64,
        len: u64,
        prot: DmaProt,
        source: Source<'_>,
    ) -> Result<(), errno::Error> {
        let offset = match source {
            Source::File { offset, .. } => Some(offset),
            Source::Va(_) => None,
        };
        if let Some(errno) = self.injected(kind, iova, len) {
            let mut state = lock(&self.state);
            self.log(
                &mut state,
                Call {
                    kind,
                    iova,
                    len,
                    offset,
                    result: Err(errno),
                    injected: true,
                },
            );
            return Err(errno::Error::new(errno));
        }
        let mut state = lock(&self.state);
        let result = self.try_map(&mut state, iova, len, prot, source);
        self.log(
            &mut state,
            Call {
                kind,
                iova,
                len,
                offset,
                result: result.as_ref().map(|()| len).map_err(|e| e.errno()),
                injected: false,
            },
        );
        result
    }

    fn try_map(
        &self,
        state: &mut State,
        iova: u64,
        len: u64,
        prot: DmaProt,
        source: Source<'_>,
    ) -> Result<(), errno::Error> {
        let einval = errno::Error::new(libc::EINVAL);
        let source_addr = match source {
            Source::Va(p) => p as u64,
            Source::File { offset, .. } => offset,
        };
        if !(prot.read || prot.write) || len == 0 || !self.is_aligned(iova | len | source_addr) {
            return Err(einval);
        }
        let last = iova.checked_add(len - 1).ok_or(einval)?;
        source_addr.checked_add(len - 1).ok_or(einval)?;
        if state
            .table
            .range(..=last)
            .next_back()
            .is_some_and(|(&start, e)| e.last(start) >= iova)
        {
            return Err(errno::Error::new(libc::EEXIST));
        }
        if state.budget == Some(0) {
            return Err(errno::Error::new(libc::ENOSPC));
        }
        // As `vfio_iommu_iova_dma_valid()`: an empty list restricts nothing.
        let ranges = &self.config.iova_ranges;
        if !ranges.is_empty() && !ranges.iter().any(|r| r.contains(iova, len)) {
            return Err(einval);
        }
        let target = match source {
            Source::Va(p) => Target::HostVa(HostPtr(p)),
            Source::File { file, offset } => Target::File {
                file: self.accept_file(file, offset, len, prot)?,
                offset,
            },
        };
        state.table.insert(iova, Entry { len, prot, target });
        if let Some(budget) = state.budget.as_mut() {
            *budget -= 1;
        }
        Ok(())
    }

    /// The file checks of `IOMMU_IOAS_MAP_FILE`: file type (per [`FileMapSupport`]), write access
    /// for a writable mapping (`EPERM`), range inside the file (`EINVAL`, as pinning a shmem page
    /// beyond EOF fails). Returns the emulator's own duplicate of the fd.
    fn accept_file(
        &self,
        file: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        prot: DmaProt,
    ) -> Result<File, errno::Error> {
        let to_errno = |e: io::Error| errno::Error::new(e.raw_os_error().unwrap_or(libc::EIO));
        if self.config.map_file == FileMapSupport::Memfd {
            // SAFETY: `statfs` is plain old data; all-zero is a valid value of it.
            let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
            // SAFETY: `file` is an open fd for the whole call and `fs` is a valid, writable
            // statfs the kernel fills in; the return value is checked.
            if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
                return Err(errno::Error::last());
            }
            const TMPFS_MAGIC: i64 = 0x0102_1994;
            const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
            #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
            let fs_type = fs.f_type as i64;
            if fs_type != TMPFS_MAGIC && fs_type != HUGETLBFS_MAGIC {
                return Err(errno::Error::new(libc::EINVAL));
            }
        }
        let file = File::from(file.try_clone_to_owned().map_err(to_errno)?);
        if prot.write {
            // SAFETY: F_GETFL on an fd we own takes no pointer; the result is checked.
            let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
            if flags < 0 {
                return Err(errno::Error::last());
            }
            if flags & libc::O_ACCMODE == libc::O_RDONLY {
                return Err(errno::Error::new(libc::EPERM));
            }
        }
        let size = file.metadata().map_err(to_errno)?.len();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(file),
            _ => Err(errno::Error::new(libc::EINVAL)),
        }
    }

    fn try_unmap(&self, state: &mut State, iova: u64, len: u64) -> Result<u64, errno::Error> {
        let einval = errno::Error::new(libc::EINVAL);
        match self.config.unmap_style {
            UnmapStyle::Type1v2 => {
                if len == 0 || !self.is_aligned(iova | len) {
                    return Err(einval);
                }
                let last = iova.checked_add(len - 1).ok_or(einval)?;
                // `vfio_dma_do_unmap()` checks only the two ends, before removing anything:
                // any bisected mapping must straddle one of them.
                if state
                    .table
                    .range(..iova)
                    .next_back()
                    .is_some_and(|(&start, e)| e.last(start) >= iova)
                {
                    return Err(einval);
                }
                // (Searched by one bound: a `iova..=last` range descends the tree twice.)
                if state
                    .table
                    .range(..=last)
                    .next_back()
                    .is_some_and(|(&start, e)| start >= iova && e.last(start) > last)
                {
                    return Err(einval);
                }
                Ok(Self::remove_range(state, iova, last))
            }
            UnmapStyle::Iommufd => {
                let enoent = errno::Error::new(libc::ENOENT);
                if iova == 0 && len == u64::MAX {
                    return Ok(Self::remove_range(state, 0, u64::MAX));
                }
                if len == 0 {
                    return Err(einval);
                }
                // iommufd_ioas_unmap(): iova and length must be below ULONG_MAX.
                let eoverflow = errno::Error::new(libc::EOVERFLOW);
                if iova == u64::MAX || len == u64::MAX {
                    return Err(eoverflow);
                }
                let last = iova.checked_add(len - 1).ok_or(eoverflow)?;
                // iopt_unmap_iova_range(): take the lowest area intersecting the range; fail
                // with ENOENT at the first one not wholly inside, keeping earlier removals.
                let mut removed = 0;
                loop {
                    let first = match state.table.range(..iova).next_back() {
                        Some((&start, e)) if e.last(start) >= iova => Some(start),
                        _ => state.table.range(iova..=last).next().map(|(&s, _)| s),
                    };
                    let Some(start) = first else { break };
                    let Some(e) = state.table.get(&start) else {
                        break;
                    };
                    if start < iova || e.last(start) > last {
                        return Err(enoent);
                    }
                    removed += Self::remove_range(state, start, start);
                }
                if removed == 0 {
                    return Err(enoent);
                }
                Ok(removed)
            }
        }
    }

    /// Removes every mapping starting in `[first, last]`, gives back their budget, returns bytes.
    fn remove_range(state: &mut State, first: u64, last: u64) -> u64 {
        let mut bytes = 0;
        while let Some((&start, _)) = state
            .table
            .range(first..)
            .next()
            .filter(|&(&s, _)| s <= last)
        {
            if let Some(e) = state.table.remove(&start) {
                bytes += e.len;
                if let Some(budget) = state.budget.as_mut() {
                    *budget += 1;
                }
            }
        }
        bytes
    }

    /// Reads `buf.len()` bytes at `iova` as the device would (a device read of memory).
    ///
    /// Every page of the range is translated first; if any is unmapped or not readable, a
    /// [`DmaFault`] is recorded, nothing is read and [`DmaAccessError::Fault`] is returned.
    pub fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaAccessError> {
        self.dma_access(iova, DeviceAccess::Read(buf))
    }

    /// Writes `buf` at `iova` as the device would (a device write to memory).
    ///
    /// Every page of the range is translated first; if any is unmapped or not writable, a
    /// [`DmaFault`] is recorded, nothing is written and [`DmaAccessError::Fault`] is returned.
    pub fn dma_write(&self, iova: u64, buf: &[u8]) -> Result<(), DmaAccessError> {
        self.dma_access(iova, DeviceAccess::Write(buf))
    }

    /// Translates the whole range, then copies mapping by mapping in the access's direction.
    fn dma_access(&self, iova: u64, mut access: DeviceAccess<'_>) -> Result<(), DmaAccessError> {
        let len = access.len();
        let mut state = lock(&self.state);
        self.translate(&mut state, iova, len as u64, access.is_write())?;
        let mut done = 0usize;
        for (start, entry) in Self::covering(&state, iova, len as u64) {
            let in_entry = (iova + done as u64) - start;
            let n = (entry.len - in_entry).min((len - done) as u64) as usize;
            let chunk = done..done + n;
            match &entry.target {
                Target::HostVa(p) => {
                    // SAFETY: the mapping is live (we hold the table lock, so it cannot be
                    // unmapped meanwhile), and map_va's contract says `[p, p + entry.len)` stays
                    // mapped until then and may be read and written by a device at any time,
                    // with no Rust reference assuming exclusive access; `in_entry + n <=
                    // entry.len`. Volatile copies are what a device's accesses look like to Rust.
                    let memory = unsafe { VolatileSlice::new(p.0.add(in_entry as usize), n) };
                    match &mut access {
                        // The chunk is exactly `n` bytes long, so the copy is whole.
                        DeviceAccess::Read(buf) => {
                            memory.copy_to(&mut buf[chunk]);
                        }
                        DeviceAccess::Write(buf) => memory.copy_from(&buf[chunk]),
                    }
                }
                Target::File { file, offset } => {
                    let at = offset + in_entry;
                    match &mut access {
                        DeviceAccess::Read(buf) => read_file_at(file, &mut buf[chunk], at),
                        DeviceAccess::Write(buf) => write_file_at(file, &buf[chunk], at),
                    }
                    .map_err(|source| DmaAccessError::FileIo {
                        iova: start + in_entry,
                        len: n as u64,
                        offset: at,
                        source,
                    })?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Checks that every page of `[iova, iova + len)` is mapped with the access needed; records
    /// and returns a fault otherwise.
    fn translate(
        &self,
        state: &mut State,
        iova: u64,
        len: u64,
        write: bool,
    ) -> Result<(), DmaAccessError> {
        if len == 0 {
            return Ok(());
        }
        let fault = |fault_iova, reason| DmaFault {
            iova,
            len,
            write,
            fault_iova,
            reason,
        };
        let result = match iova.checked_add(len - 1) {
            None => Err(fault(iova, FaultReason::NotMapped)),
            Some(last) => {
                let mut cur = iova;
                loop {
                    match state.table.range(..=cur).next_back() {
                        Some((&start, e)) if e.last(start) >= cur => {
                            if !(if write { e.prot.write } else { e.prot.read }) {
                                break Err(fault(cur, FaultReason::Forbidden));
                            }
                            let end = e.last(start);
                            if end >= last {
                                break Ok(());
                            }
                            cur = end + 1;
                        }
                        _ => break Err(fault(cur, FaultReason::NotMapped)),
                    }
                }
            }
        };
        result.map_err(|f| {
            state.faults.push(f);
            DmaAccessError::Fault(f)
        })
    }

    /// The mappings covering `[iova, iova + len)`, in order; only call after `translate`
    /// succeeded for the range.
    fn covering(state: &State, iova: u64, len: u64) -> impl Iterator<Item = (u64, &Entry)> {
        let first = state
            .table
            .range(..=iova)
            .next_back()
            .map_or(iova, |(&s, _)| s);
        let last = iova + (len.max(1) - 1);
        state
            .table
            .range(first..=last)
            .map(|(&s, e)| (s, e))
            .filter(move |&(s, e)| len > 0 && e.last(s) >= iova)
    }
}

/// Reads `buf.len()` bytes at `offset` of `file`: with `pread`, or through a temporary shared
/// mapping for files that have no read method (an mmap-able guest_memfd answers `ESPIPE`).
/// A device access: into the caller's buffer (read) or from it (write).
enum DeviceAccess<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl DeviceAccess<'_> {
    fn len(&self) -> usize {
        match self {
            DeviceAccess::Read(buf) => buf.len(),
            DeviceAccess::Write(buf) => buf.len(),
        }
    }

    fn is_write(&self) -> bool {
        matches!(self, DeviceAccess::Write(_))
    }
}

fn read_file_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    match file.read_exact_at(buf, offset) {
        Err(e) if e.raw_os_error() == Some(libc::ESPIPE) => {
            let map = FileWindow::new(file, offset, buf.len())?;
            map.slice().copy_to(buf);
            Ok(())
        }
        other => other,
    }
}

/// Writes `buf` at `offset` of `file`, like [`read_file_at`].
fn write_file_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    match file.write_all_at(buf, offset) {
        Err(e) if e.raw_os_error() == Some(libc::ESPIPE) => {
            let map = FileWindow::new(file, offset, buf.len())?;
            map.slice().copy_from(buf);
            Ok(())
        }
        other => other,
    }
}

/// A temporary `MAP_SHARED` window on part of a file, unmapped on drop.
struct FileWindow {
    base: *mut u8,
    map_len: usize,
    skip: usize,
    len: usize,
}

impl FileWindow {
    fn new(file: &File, offset: u64, len: usize) -> io::Result<Self> {
        // SAFETY: sysconf takes no pointer.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            p if p > 0 => p as u64,
            _ => 4096,
        };
        let start = offset - offset % page;
        let skip = (offset - start) as usize;
        let map_len = skip + len;
        let file_offset = libc::off_t::try_from(start)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: a fresh shared mapping chosen by the kernel (no MAP_FIXED), so it cannot
        // replace any existing memory; the fd is open for the whole call; result checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len.max(1),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_fd().as_raw_fd(),
                file_offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            base: base.cast(),
            map_len: map_len.max(1),
            skip,
            len,
        })
    }

    fn slice(&self) -> VolatileSlice<'_> {
        // SAFETY: `[base + skip, base + skip + len)` lies inside our live mapping of `map_len`
        // bytes, which lives as long as `self`; other users of a shared file mapping (the guest,
        // other processes) are outside Rust's aliasing rules, as for any guest memory.
        unsafe { VolatileSlice::new(self.base.add(self.skip), self.len) }
    }
}

impl Drop for FileWindow {
    fn drop(&mut self) {
        // SAFETY: `base`/`map_len` are exactly the mapping created in `new`, and no slice
        // borrowing it outlives `self`.
        let ret = unsafe { libc::munmap(self.base.cast(), self.map_len) };
        // munmap of a mapping we created can only fail on a kernel bug; there is nothing to undo,
        // and Drop cannot report it.
        debug_assert_eq!(ret, 0);
    }
}

impl DmaBackend for EmulatedIommu {
    fn capabilities(&self) -> Result<Capabilities, DmaError> {
        Ok(Capabilities {
            kind: BackendKind::Emulated,
            page_sizes: self.config.page_sizes,
            iova_ranges: self.config.iova_ranges.clone(),
            mapping_budget: lock(&self.state).budget,
            map_file: self.config.map_file,
            translates: true,
        })
    }

    unsafe fn map_va(
        &self,
        iova: u64,
        len: u64,
        host_addr: *mut u8,
        prot: DmaProt,
    ) -> Result<(), DmaError> {
        self.map_common(CallKind::MapVa, iova, len, prot, Source::Va(host_addr))
            .map_err(|source| DmaError::MapVa {
                kind: BackendKind::Emulated,
                iova,
                len,
                source,
            })
    }

    fn map_file(
        &self,
        iova: u64,
        len: u64,
        file: BorrowedFd<'_>,
        offset: u64,
        prot: DmaProt,
    ) -> Result<(), DmaError> {
        if self.config.map_file == FileMapSupport::None {
            return Err(DmaError::Unsupported {
                kind: BackendKind::Emulated,
                operation: "map_file",
            });
        }
        self.map_common(
            CallKind::MapFile,
            iova,
            len,
            prot,
            Source::File { file, offset },
        )
        .map_err(|source| DmaError::MapFile {
            kind: BackendKind::Emulated,
            iova,
            len,
            offset,
            source,
        })
    }

    fn unmap(&self, iova: u64, len: u64) -> Result<u64, DmaError> {
        let injected = self.injected(CallKind::Unmap, iova, len);
        let mut state = lock(&self.state);
        let result = match injected {
            Some(errno) => Err(errno::Error::new(errno)),
            None => self.try_unmap(&mut state, iova, len),
        };
        self.log(
            &mut state,
            Call {
                kind: CallKind::Unmap,
                iova,
                len,
                offset: None,
                result: result.as_ref().map(|&b| b).map_err(|e| e.errno()),
                injected: injected.is_some(),
            },
        );
        result.map_err(|source| DmaError::Unmap {
            kind: BackendKind::Emulated,
            iova,
            len,
            source,
        })
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::os::fd::{FromRawFd, OwnedFd};

    /// Page-aligned host memory for mappings; only ever touched through its raw pointer while
    /// mapped.
    pub(crate) struct HostMem {
        _storage: Vec<u8>,
        base: *mut u8,
    }

    impl HostMem {
        pub(crate) fn new(len: usize) -> Self {
            let mut storage = vec![0u8; len + 4096];
            let p = storage.as_mut_ptr();
            let base = p.wrapping_add(p.align_offset(4096));
            Self {
                _storage: storage,
                base,
            }
        }

        pub(crate) fn at(&self, offset: u64) -> *mut u8 {
            self.base.wrapping_add(offset as usize)
        }
    }

    /// A memfd of `len` bytes.
    pub(crate) fn memfd(len: u64) -> OwnedFd {
        // SAFETY: the name is a NUL-terminated string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"emulated-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        std::fs::File::from(fd.try_clone().unwrap())
            .set_len(len)
            .unwrap();
        fd
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::test_support::{HostMem, memfd};
    use super::*;

    const PAGE: u64 = 4096;

    fn map(iommu: &EmulatedIommu, mem: &HostMem, iova: u64, len: u64) -> Result<(), i32> {
        // SAFETY: `mem` outlives every mapping in these tests: each test drops the IOMMU (or
        // unmaps) before `mem`, and only the emulator touches it while mapped.
        unsafe { iommu.map_va(iova, len, mem.at(iova), DmaProt::READ_WRITE) }
            .map_err(|e| errno_of(&e))
    }

    fn errno_of(e: &DmaError) -> i32 {
        match e {
            DmaError::MapVa { source, .. }
            | DmaError::MapFile { source, .. }
            | DmaError::Unmap { source, .. } => source.errno(),
            other => panic!("unexpected error {other:?}"),
        }
    }

    fn unmap(iommu: &EmulatedIommu, iova: u64, len: u64) -> Result<u64, i32> {
        iommu.unmap(iova, len).map_err(|e| errno_of(&e))
    }

    fn starts(iommu: &EmulatedIommu) -> Vec<(u64, u64)> {
        iommu.page_table().iter().map(|e| (e.iova, e.len)).collect()
    }

    #[test]
    fn overlapping_map_is_refused_with_eexist_and_changes_nothing() {
        let mem = HostMem::new(16 * PAGE as usize);
        let iommu = EmulatedIommu::new();
        map(&iommu, &mem, 2 * PAGE, 2 * PAGE).unwrap();
        assert_eq!(map(&iommu, &mem, 3 * PAGE, 2 * PAGE), Err(libc::EEXIST));
        assert_eq!(map(&iommu, &mem, PAGE, 2 * PAGE), Err(libc::EEXIST));
        assert_eq!(map(&iommu, &mem, 0, 8 * PAGE), Err(libc::EEXIST));
        assert_eq!(starts(&iommu), [(2 * PAGE, 2 * PAGE)]);
        map(&iommu, &mem, 4 * PAGE, PAGE).unwrap(); // adjacent is fine
        map(&iommu, &mem, PAGE, PAGE).unwrap();
        assert_eq!(iommu.mapping_count(), 3);
    }

    #[test]
    fn misaligned_empty_wrapping_or_no_access_maps_are_einval() {
        let mem = HostMem::new(4 * PAGE as usize);
        let iommu = EmulatedIommu::new();
        assert_eq!(map(&iommu, &mem, 0x800, PAGE), Err(libc::EINVAL));
        assert_eq!(map(&iommu, &mem, 0, PAGE + 1), Err(libc::EINVAL));
        assert_eq!(map(&iommu, &mem, 0, 0), Err(libc::EINVAL));
        // SAFETY: refused before the pointer is recorded.
        let r = unsafe { iommu.map_va(0, PAGE, mem.at(0x10), DmaProt::READ_WRITE) };
        assert_eq!(errno_of(&r.unwrap_err()), libc::EINVAL);
        let none = DmaProt {
            read: false,
            write: false,
        };
        // SAFETY: refused before the pointer is recorded.
        let r = unsafe { iommu.map_va(0, PAGE, mem.at(0), none) };
        assert_eq!(errno_of(&r.unwrap_err()), libc::EINVAL);
        let wide = EmulatedIommu::builder()
            .iova_ranges(vec![IovaRange {
                start: 0,
                last: u64::MAX,
            }])
            .build();
        assert_eq!(
            map(&wide, &mem, u64::MAX - PAGE + 1, 2 * PAGE),
            Err(libc::EINVAL)
        );
        assert!(iommu.page_table().is_empty());
        assert!(
            iommu
                .calls()
                .iter()
                .all(|c| c.result == Err(libc::EINVAL) && !c.injected)
        );
    }

    #[test]
    fn larger_page_size_is_the_alignment() {
        let mem = HostMem::new(1 << 22);
        let iommu = EmulatedIommu::builder().page_sizes(0x20_0000).build();
        assert_eq!(iommu.page_size(), 0x20_0000);
        assert_eq!(map(&iommu, &mem, 0x1000, 0x20_0000), Err(libc::EINVAL));
        assert_eq!(map(&iommu, &mem, 0x20_0000, 0x1000), Err(libc::EINVAL));
    }

    #[test]
    fn map_outside_the_iova_ranges_is_einval() {
        let mem = HostMem::new(16 * PAGE as usize);
        let iommu = EmulatedIommu::builder()
            .iova_ranges(vec![
                IovaRange {
                    start: 0,
                    last: 4 * PAGE - 1,
                },
                IovaRange {
                    start: 8 * PAGE,
                    last: 12 * PAGE - 1,
                },
            ])
            .build();
        assert_eq!(map(&iommu, &mem, 3 * PAGE, 2 * PAGE), Err(libc::EINVAL));
        assert_eq!(map(&iommu, &mem, 4 * PAGE, PAGE), Err(libc::EINVAL));
        assert_eq!(map(&iommu, &mem, 11 * PAGE, 2 * PAGE), Err(libc::EINVAL));
        map(&iommu, &mem, 8 * PAGE, 4 * PAGE).unwrap();
        map(&iommu, &mem, 0, 4 * PAGE).unwrap();
        assert_eq!(iommu.mapping_count(), 2);
        let unrestricted = EmulatedIommu::builder().iova_ranges(vec![]).build();
        // SAFETY: never accessed; `mem` outlives `unrestricted` anyway.
        unsafe { unrestricted.map_va(1 << 60, PAGE, mem.at(0), DmaProt::READ_WRITE) }.unwrap();
    }

    #[test]
    fn exhausted_budget_is_enospc_and_unmap_gives_it_back() {
        let mem = HostMem::new(8 * PAGE as usize);
        let iommu = EmulatedIommu::builder().mapping_budget(Some(2)).build();
        assert_eq!(iommu.capabilities().unwrap().mapping_budget, Some(2));
        map(&iommu, &mem, 0, PAGE).unwrap();
        map(&iommu, &mem, PAGE, PAGE).unwrap();
        assert_eq!(iommu.capabilities().unwrap().mapping_budget, Some(0));
        assert_eq!(map(&iommu, &mem, 2 * PAGE, PAGE), Err(libc::ENOSPC));
        // Overlap is checked before the budget, as in vfio_dma_do_map().
        assert_eq!(map(&iommu, &mem, 0, PAGE), Err(libc::EEXIST));
        assert_eq!(unmap(&iommu, 0, 2 * PAGE), Ok(2 * PAGE));
        assert_eq!(iommu.capabilities().unwrap().mapping_budget, Some(2));
        map(&iommu, &mem, 2 * PAGE, PAGE).unwrap();
    }

    #[test]
    fn type1_unmap_refuses_bisection_atomically_and_allows_gaps() {
        let mem = HostMem::new(16 * PAGE as usize);
        let iommu = EmulatedIommu::new();
        map(&iommu, &mem, 0, PAGE).unwrap();
        map(&iommu, &mem, 2 * PAGE, 2 * PAGE).unwrap();
        map(&iommu, &mem, 6 * PAGE, PAGE).unwrap();
        let before = starts(&iommu);
        // Bisects [2, 4) at its end, and [2, 4) at its start.
        assert_eq!(unmap(&iommu, 0, 3 * PAGE), Err(libc::EINVAL));
        assert_eq!(unmap(&iommu, 3 * PAGE, 4 * PAGE), Err(libc::EINVAL));
        assert_eq!(unmap(&iommu, 0, 0x800), Err(libc::EINVAL));
        assert_eq!(starts(&iommu), before);
        // Nothing there: success, zero bytes.
        assert_eq!(unmap(&iommu, 8 * PAGE, 4 * PAGE), Ok(0));
        // Several whole mappings with gaps between them, in one call.
        assert_eq!(unmap(&iommu, 0, 7 * PAGE), Ok(4 * PAGE));
        assert!(iommu.page_table().is_empty());
    }

    #[test]
    fn iommufd_unmap_is_enoent_for_bisection_after_removing_earlier_areas() {
        let mem = HostMem::new(16 * PAGE as usize);
        let iommu = EmulatedIommu::builder()
            .unmap_style(UnmapStyle::Iommufd)
            .build();
        map(&iommu, &mem, 0, PAGE).unwrap();
        map(&iommu, &mem, 2 * PAGE, 2 * PAGE).unwrap();
        map(&iommu, &mem, 6 * PAGE, PAGE).unwrap();
        // [0, 1) is wholly inside and goes; [2, 4) is bisected: ENOENT, and it stays.
        assert_eq!(unmap(&iommu, 0, 3 * PAGE), Err(libc::ENOENT));
        assert_eq!(starts(&iommu), [(2 * PAGE, 2 * PAGE), (6 * PAGE, PAGE)]);
        // Nothing there: ENOENT, unlike type1.
        assert_eq!(unmap(&iommu, 8 * PAGE, PAGE), Err(libc::ENOENT));
        assert_eq!(unmap(&iommu, 0, 0), Err(libc::EINVAL));
        assert_eq!(unmap(&iommu, PAGE, u64::MAX), Err(libc::EOVERFLOW));
        // The whole address space always succeeds.
        assert_eq!(unmap(&iommu, 0, u64::MAX), Ok(3 * PAGE));
        assert_eq!(unmap(&iommu, 0, u64::MAX), Ok(0));
    }

    #[test]
    fn injected_failure_changes_nothing_and_is_logged() {
        let mem = HostMem::new(8 * PAGE as usize);
        let iommu = EmulatedIommu::builder().mapping_budget(Some(8)).build();
        map(&iommu, &mem, 0, PAGE).unwrap();
        iommu.inject_failures(|kind, iova, _| {
            (iova == PAGE || *kind == CallKind::Unmap).then_some(libc::ENOMEM)
        });
        assert_eq!(map(&iommu, &mem, PAGE, PAGE), Err(libc::ENOMEM));
        assert_eq!(unmap(&iommu, 0, PAGE), Err(libc::ENOMEM));
        map(&iommu, &mem, 2 * PAGE, PAGE).unwrap();
        assert_eq!(starts(&iommu), [(0, PAGE), (2 * PAGE, PAGE)]);
        assert_eq!(iommu.capabilities().unwrap().mapping_budget, Some(6));
        let calls = iommu.take_calls();
        assert_eq!(calls.len(), 4);
        assert!(calls[1].injected && calls[1].result == Err(libc::ENOMEM));
        assert!(calls[2].injected && calls[2].kind == CallKind::Unmap);
        assert!(!calls[3].injected && calls[3].result == Ok(PAGE));
        assert!(iommu.calls().is_empty());
        iommu.clear_failures();
        assert_eq!(unmap(&iommu, 0, PAGE), Ok(PAGE));
    }

    #[test]
    fn device_access_translates_through_host_mappings() {
        let mem = HostMem::new(4 * PAGE as usize);
        let iommu = EmulatedIommu::new();
        // IOVA 0x10000 -> host pages 0..2, IOVA 0x12000 -> host page 3 (not contiguous on host).
        // SAFETY: `mem` outlives `iommu`'s mappings (unmapped below before it drops).
        unsafe {
            iommu
                .map_va(0x10000, 2 * PAGE, mem.at(0), DmaProt::READ_WRITE)
                .unwrap();
            iommu
                .map_va(0x12000, PAGE, mem.at(3 * PAGE), DmaProt::READ_WRITE)
                .unwrap();
        }
        let data: Vec<u8> = (0..3 * PAGE).map(|i| (i * 7 % 251) as u8).collect();
        iommu
            .dma_write(0x10000 + 100, &data[..(3 * PAGE - 100) as usize])
            .unwrap();
        let mut back = vec![0u8; (3 * PAGE - 100) as usize];
        iommu.dma_read(0x10000 + 100, &mut back).unwrap();
        assert_eq!(back, data[..back.len()]);
        // The third IOVA page landed in host page 3, and host page 2 was never touched.
        let mut page3 = vec![0u8; 16];
        let mut page2 = vec![0xffu8; 16];
        // SAFETY: reading our own buffer through its pointer; the emulator is idle.
        unsafe {
            std::ptr::copy_nonoverlapping(mem.at(3 * PAGE), page3.as_mut_ptr(), 16);
            std::ptr::copy_nonoverlapping(mem.at(2 * PAGE), page2.as_mut_ptr(), 16);
        }
        let off = (2 * PAGE - 100) as usize;
        assert_eq!(page3, data[off..off + 16]);
        assert_eq!(page2, [0u8; 16]);
        assert!(iommu.faults().is_empty());
        assert_eq!(unmap(&iommu, 0x10000, 3 * PAGE), Ok(3 * PAGE));
    }

    #[test]
    fn device_access_to_an_unmapped_page_faults_and_touches_nothing() {
        let mem = HostMem::new(4 * PAGE as usize);
        let iommu = EmulatedIommu::new();
        map(&iommu, &mem, 0, PAGE).unwrap();
        // SAFETY: as in `map`.
        unsafe {
            iommu
                .map_va(2 * PAGE, PAGE, mem.at(2 * PAGE), DmaProt::READ_ONLY)
                .unwrap();
        }
        let err = iommu.dma_write(PAGE - 8, &[0xaa; 16]).unwrap_err();
        let DmaAccessError::Fault(fault) = err else {
            panic!("expected a fault, got {err:?}");
        };
        assert_eq!(
            fault,
            DmaFault {
                iova: PAGE - 8,
                len: 16,
                write: true,
                fault_iova: PAGE,
                reason: FaultReason::NotMapped,
            }
        );
        let mut first = [0u8; 8];
        iommu.dma_read(PAGE - 8, &mut first).unwrap();
        assert_eq!(
            first, [0u8; 8],
            "the mapped half must not have been written"
        );
        // Read-only mapping: reads work, writes fault as Forbidden.
        let mut buf = [1u8; 8];
        iommu.dma_read(2 * PAGE, &mut buf).unwrap();
        let err = iommu.dma_write(2 * PAGE, &[1]).unwrap_err();
        assert!(matches!(
            err,
            DmaAccessError::Fault(DmaFault {
                reason: FaultReason::Forbidden,
                write: true,
                ..
            })
        ));
        let mut out = [0u8; 4];
        assert!(iommu.dma_read(5 * PAGE, &mut out).is_err());
        assert_eq!(iommu.faults().len(), 3);
        assert_eq!(iommu.take_faults()[2].fault_iova, 5 * PAGE);
        assert!(iommu.faults().is_empty());
    }

    #[test]
    fn device_access_translates_through_file_mappings() {
        let fd = memfd(4 * PAGE);
        let iommu = EmulatedIommu::new();
        iommu
            .map_file(0x40000, 2 * PAGE, fd.as_fd(), PAGE, DmaProt::READ_WRITE)
            .unwrap();
        iommu.dma_write(0x40000 + PAGE - 2, b"abcd").unwrap();
        let mut back = [0u8; 4];
        File::from(fd.try_clone().unwrap())
            .read_exact_at(&mut back, 2 * PAGE - 2)
            .unwrap();
        assert_eq!(&back, b"abcd");
        assert_eq!(
            iommu.page_table()[0].target,
            TableTarget::File { offset: PAGE }
        );
        let calls = iommu.calls();
        assert_eq!(calls[0].kind, CallKind::MapFile);
        assert_eq!(calls[0].offset, Some(PAGE));
    }

    #[test]
    fn file_window_reads_and_writes_what_pread_sees() {
        // The fallback for files without read/write methods (mmap-able guest_memfd).
        let file = File::from(memfd(2 * PAGE));
        FileWindow::new(&file, PAGE + 5, 3)
            .unwrap()
            .slice()
            .copy_from(b"xyz");
        let mut back = [0u8; 3];
        file.read_exact_at(&mut back, PAGE + 5).unwrap();
        assert_eq!(&back, b"xyz");
        let mut via_window = [0u8; 3];
        FileWindow::new(&file, PAGE + 5, 3)
            .unwrap()
            .slice()
            .copy_to(&mut via_window);
        assert_eq!(&via_window, b"xyz");
    }

    #[test]
    fn map_file_checks_range_access_mode_and_file_type() {
        let fd = memfd(2 * PAGE);
        let iommu = EmulatedIommu::new();
        let map_file = |iommu: &EmulatedIommu, file: BorrowedFd<'_>, offset, prot| {
            iommu
                .map_file(0, PAGE, file, offset, prot)
                .map_err(|e| errno_of(&e))
        };
        assert_eq!(
            map_file(&iommu, fd.as_fd(), 2 * PAGE, DmaProt::READ_WRITE),
            Err(libc::EINVAL)
        );
        assert_eq!(
            map_file(&iommu, fd.as_fd(), 0x10, DmaProt::READ_WRITE),
            Err(libc::EINVAL)
        );
        let exe = File::open("/proc/self/exe").unwrap();
        assert_eq!(
            map_file(&iommu, exe.as_fd(), 0, DmaProt::READ_WRITE),
            Err(libc::EPERM)
        );
        // Any file is accepted read-only by the default (trusted-IO) emulator...
        map_file(&iommu, exe.as_fd(), 0, DmaProt::READ_ONLY).unwrap();
        // ...but mainline MAP_FILE takes only memfd/hugetlbfs.
        let mainline = EmulatedIommu::builder()
            .map_file(FileMapSupport::Memfd)
            .build();
        assert_eq!(
            map_file(&mainline, exe.as_fd(), 0, DmaProt::READ_ONLY),
            Err(libc::EINVAL)
        );
        map_file(&mainline, fd.as_fd(), 0, DmaProt::READ_WRITE).unwrap();
        let type1 = EmulatedIommu::builder()
            .map_file(FileMapSupport::None)
            .build();
        assert!(matches!(
            type1.map_file(0, PAGE, fd.as_fd(), 0, DmaProt::READ_WRITE),
            Err(DmaError::Unsupported { .. })
        ));
        assert!(type1.calls().is_empty());
    }

    #[test]
    fn disabled_call_log_records_nothing() {
        let mem = HostMem::new(PAGE as usize);
        let iommu = EmulatedIommu::builder().record_calls(false).build();
        map(&iommu, &mem, 0, PAGE).unwrap();
        assert_eq!(unmap(&iommu, 0, PAGE), Ok(PAGE));
        assert!(iommu.calls().is_empty());
    }
}
