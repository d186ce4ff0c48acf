//! An in-process IOMMU that follows the kernel's mapping rules to the letter.
//!
//! [`EmulatedIommu`] implements [`DmaBackend`] with a page table of whole mappings (a `BTreeMap`
//! keyed by IOVA) and enforces what VFIO type1v2 and IOMMUFD enforce (`vfio_iommu_type1.c`,
//! `drivers/iommu/iommufd/io_pagetable.c`):
//! - a map that overlaps a live mapping is refused with `EEXIST`; one that is misaligned to the
//!   smallest page size, empty, wraps around or has no access is refused with `EINVAL`; one
//!   outside the IOVA ranges with `EINVAL`; one beyond the mapping budget with `ENOSPC` (the
//!   checks run in `vfio_dma_do_map()`'s order);
//! - an unmap must cover whole mappings: one that bisects a mapping is refused. With
//!   [`UnmapStyle::Type1v2`] that is `EINVAL` and atomic, and an unmap of a range holding nothing
//!   returns 0 bytes. With [`UnmapStyle::Iommufd`] it is `ENOENT` *after* removing the whole areas
//!   that precede the bisected one (the kernel's loop is not atomic), a range holding nothing is
//!   also `ENOENT`, and `iova 0, len u64::MAX` removes everything. With [`UnmapStyle::Cutting`]
//!   (IOMMUFD with type1 v1 semantics) an unmap first cuts the areas at its ends, as
//!   `iommufd_vfio_unmap_dma()` does, so an aligned sub-range of a mapping can be unmapped
//!   alone; a misaligned cut point is `EINVAL`;
//! - `map_file` accepts any file, guest_memfd included ([`FileMapSupport::AnyFile`], standing in
//!   for the trusted-IO kernel that does not exist yet), or only memfd/hugetlbfs like mainline
//!   `IOMMU_IOAS_MAP_FILE`, or nothing like type1.
//!
//! It records every call ([`EmulatedIommu::calls`]), lets a test "DMA" through the table from the
//! device side ([`EmulatedIommu::dma_read`], [`EmulatedIommu::dma_write`]) and records every fault
//! ([`EmulatedIommu::faults`]), and injects failures on demand
//! ([`EmulatedIommu::inject_failures`]). Device accesses reach host-address mappings through the
//! recorded pointer, and file mappings through `pread`/`pwrite` on the emulator's own duplicate of
//! the fd (one per file and access mode, however many mappings use it), or, for files without
//! read/write methods (an mmap-able guest_memfd answers `ESPIPE`), through a temporary shared
//! mapping of the file.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::sync::{Mutex, MutexGuard, PoisonError, Weak};

#[cfg(doc)]
use crate::backend::{Capabilities, DmaBackend};
use crate::backend::{DmaProt, FileMapSupport, IovaRange};

mod device;
mod page_table;
#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;

pub use device::{DmaAccessError, DmaFault, FaultReason};
use page_table::{Entry, FileKey, Target};

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
#[non_exhaustive]
pub enum UnmapStyle {
    /// VFIO type1v2: misaligned or bisecting unmaps fail with `EINVAL` before anything is removed;
    /// a range holding no mapping succeeds with 0 bytes.
    #[default]
    Type1v2,
    /// Native IOMMUFD: no alignment rule on unmap; a bisected area fails with `ENOENT` after the
    /// whole areas before it were already removed; a range holding no mapping fails with `ENOENT`;
    /// `iova 0, len u64::MAX` removes everything and always succeeds.
    Iommufd,
    /// IOMMUFD with type1 (v1) semantics chosen for the IOAS (`IOMMU_VFIO_IOAS` SET, then
    /// `VFIO_SET_IOMMU(VFIO_TYPE1_IOMMU)`), unmapping through the compat `VFIO_IOMMU_UNMAP_DMA`,
    /// which cuts: `iommufd_vfio_unmap_dma()` first splits the areas at `iova + len - 1` and at
    /// `iova - 1` (not when `iova` is 0), then unmaps `[iova, iova + len)` as [`UnmapStyle::Iommufd`]
    /// does. A split at an area's first or last byte is no split; any other split point whose
    /// next byte is not aligned to the smallest page size fails with `EINVAL` (a split done
    /// before it stays). So any aligned sub-range of a mapping can be unmapped while the rest
    /// stays mapped. IOMMUFD has no mapping budget: one set on the builder is ignored.
    Cutting,
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
    /// A file (the emulator holds one duplicate of the fd per file and access mode, shared by
    /// every mapping of it) at this offset.
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
    fault_in: bool,
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
            fault_in: false,
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
    /// `dma_entry_limit` (65535 by default in the kernel). Ignored by [`UnmapStyle::Cutting`].
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

    /// Makes every successful map allocate the memory it names, as pinning for DMA does on a
    /// real kernel (type1 and IOMMUFD pin, no-IOMMU mlocks): by host address with
    /// `MADV_POPULATE_WRITE`, by file with `fallocate(KEEP_SIZE)`. Off by default. With it, a
    /// test sees pages a failed conversion faulted in and left behind.
    pub fn fault_in(mut self, fault_in: bool) -> Self {
        self.fault_in = fault_in;
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
                budget: self
                    .mapping_budget
                    .filter(|_| self.unmap_style != UnmapStyle::Cutting),
                files: HashMap::new(),
                calls: Vec::new(),
                faults: Vec::new(),
            }),
            injector: Mutex::new(None),
            config: self,
        }
    }
}

#[derive(Debug)]
struct State {
    table: BTreeMap<u64, Entry>,
    budget: Option<u64>,
    /// The emulator's duplicate of each file mapped, shared by all its mappings (a trusted-IO
    /// device maps a million granules of one guest_memfd; one fd each would run out at the fd
    /// limit). Entries whose mappings are all gone are pruned when another file is added.
    files: HashMap<FileKey, Weak<File>>,
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
}
