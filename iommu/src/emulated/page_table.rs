//! The emulated page table and its rules: what a map or unmap call does to the table, exactly
//! as VFIO type1v2 and IOMMUFD decide it, and the [`DmaBackend`] implementation on top.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use vmm_sys_util::errno;

use super::{Call, CallKind, EmulatedIommu, State, UnmapStyle, lock};
use crate::backend::{
    BackendKind, Capabilities, DmaBackend, DmaError, DmaProt, FdAccess, FileMapSupport,
};

/// A host address recorded by `map_va`.
#[derive(Clone, Copy, Debug)]
pub(super) struct HostPtr(pub(super) *mut u8);

// SAFETY: the pointer is only an address the caller of `map_va` promised stays mapped and may be
// accessed by a device at any time from any thread (map_va's safety contract); the emulator only
// dereferences it under its state lock while the mapping is live, as a device would.
unsafe impl Send for HostPtr {}
// SAFETY: as for `Send`: shared access only reads the address; dereferences follow map_va's
// contract, which allows access from any thread at any time.
unsafe impl Sync for HostPtr {}

#[derive(Debug)]
pub(super) enum Target {
    HostVa(HostPtr),
    File { file: Arc<File>, offset: u64 },
}

impl Target {
    /// The target `delta` bytes further on (for the right half of a split area).
    fn advance(&self, delta: u64) -> Target {
        match self {
            Target::HostVa(p) => Target::HostVa(HostPtr(p.0.wrapping_add(delta as usize))),
            Target::File { file, offset } => Target::File {
                file: Arc::clone(file),
                offset: offset + delta,
            },
        }
    }
}

/// Which file a mapping reads and writes: device and inode, and whether the fd the emulator
/// holds for it was opened for writing (a read-only fd cannot serve a writable mapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct FileKey {
    dev: u64,
    ino: u64,
    writable: bool,
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) len: u64,
    pub(super) prot: DmaProt,
    pub(super) target: Target,
}

impl Entry {
    /// Last IOVA of a mapping starting at `iova` (cannot overflow: checked when mapped).
    pub(super) fn last(&self, iova: u64) -> u64 {
        iova + (self.len - 1)
    }
}

/// Where a map call's memory comes from.
enum Source<'a> {
    Va(*mut u8),
    File { file: BorrowedFd<'a>, offset: u64 },
}

impl EmulatedIommu {
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
        let injected = self.injected(kind, iova, len);
        let mut state = lock(&self.state);
        let result = match injected {
            Some(errno) => Err(errno::Error::new(errno)),
            None => self.try_map(&mut state, iova, len, prot, source),
        };
        self.log(
            &mut state,
            Call {
                kind,
                iova,
                len,
                offset,
                result: result.as_ref().map(|()| len).map_err(|e| e.errno()),
                injected: injected.is_some(),
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
        if self.config.fault_in {
            fault_in(&source, len)?;
        }
        let target = match source {
            Source::Va(p) => Target::HostVa(HostPtr(p)),
            Source::File { file, offset } => Target::File {
                file: self.accept_file(state, file, offset, len, prot)?,
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
    /// for a writable mapping (`EPERM`; stricter than Linux 7.3, which does not check, so the
    /// [`Ledger`](crate::Ledger) refuses such a map before any backend), range inside the file
    /// (`EINVAL`, as pinning a shmem page beyond EOF fails). Returns the emulator's duplicate of
    /// the fd for this file and access mode, made now or shared with the file's other mappings.
    fn accept_file(
        &self,
        state: &mut State,
        file: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        prot: DmaProt,
    ) -> Result<Arc<File>, errno::Error> {
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
        let writable = FdAccess::of(file)?.writable();
        if prot.write && !writable {
            return Err(errno::Error::new(libc::EPERM));
        }
        // SAFETY: `stat` is plain old data; all-zero is a valid value of it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `file` is open for the whole call and `st` is a valid, writable stat the
        // kernel fills in; the return value is checked.
        if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } != 0 {
            return Err(errno::Error::last());
        }
        let size = u64::try_from(st.st_size).unwrap_or(0);
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(errno::Error::new(libc::EINVAL));
        }
        #[allow(clippy::unnecessary_cast)] // st_dev/st_ino widths differ between targets
        let key = FileKey {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            writable,
        };
        if let Some(shared) = state.files.get(&key).and_then(std::sync::Weak::upgrade) {
            return Ok(shared);
        }
        let own =
            Arc::new(File::from(file.try_clone_to_owned().map_err(|e| {
                errno::Error::new(e.raw_os_error().unwrap_or(libc::EIO))
            })?));
        // Forget files no mapping uses any more, so the map grows with the files in use.
        state.files.retain(|_, f| f.strong_count() > 0);
        state.files.insert(key, Arc::downgrade(&own));
        Ok(own)
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
                Self::unmap_iova_range(state, iova, last)
            }
            UnmapStyle::Cutting => {
                // iommufd_vfio_unmap_dma(): with large pages disabled, cut at the last byte of
                // the range, then (unless it starts at 0) just before it; C's unsigned
                // arithmetic wraps, and a failed cut keeps the cuts before it.
                self.split_area(state, iova.wrapping_add(len).wrapping_sub(1))?;
                if iova != 0 {
                    self.split_area(state, iova - 1)?;
                }
                // iopt_unmap_iova().
                if len == 0 {
                    return Err(einval);
                }
                let last = iova
                    .checked_add(len - 1)
                    .ok_or(errno::Error::new(libc::EOVERFLOW))?;
                Self::unmap_iova_range(state, iova, last)
            }
        }
    }

    /// `iopt_unmap_iova_range()`: takes the lowest area intersecting `[iova, last]`, fails with
    /// `ENOENT` at the first one not wholly inside (keeping earlier removals), and with `ENOENT`
    /// when nothing was there.
    fn unmap_iova_range(state: &mut State, iova: u64, last: u64) -> Result<u64, errno::Error> {
        let enoent = errno::Error::new(libc::ENOENT);
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

    /// `iopt_area_split()`: makes `at` the last byte of an area if an area holds it. Splitting
    /// at an area's first or last byte does nothing; a split whose right half would start
    /// unaligned fails with `EINVAL`.
    fn split_area(&self, state: &mut State, at: u64) -> Result<(), errno::Error> {
        let Some((&start, entry)) = state.table.range(..=at).next_back() else {
            return Ok(());
        };
        let last = entry.last(start);
        if at > last || at == start || at == last {
            return Ok(());
        }
        let right_start = at + 1;
        if !self.is_aligned(right_start) {
            return Err(errno::Error::new(libc::EINVAL));
        }
        let delta = right_start - start;
        let right = Entry {
            len: last - at,
            prot: entry.prot,
            target: entry.target.advance(delta),
        };
        if let Some(left) = state.table.get_mut(&start) {
            left.len = delta;
        }
        state.table.insert(right_start, right);
        Ok(())
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
}

impl DmaBackend for EmulatedIommu {
    fn capabilities(&self) -> Result<Capabilities, DmaError> {
        Ok(Capabilities {
            kind: BackendKind::Emulated,
            page_sizes: self.config.page_sizes,
            iova_ranges: self.config.iova_ranges.clone(),
            mapping_budget: lock(&self.state).budget,
            map_file: self.config.map_file,
            cuts_mappings: self.config.unmap_style == UnmapStyle::Cutting,
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

/// Allocates the memory `len` bytes of `source` name, as pinning does (see
/// [`super::EmulatedIommuBuilder::fault_in`]); changes no data.
fn fault_in(source: &Source<'_>, len: u64) -> Result<(), errno::Error> {
    let len_usize = usize::try_from(len).map_err(|_| errno::Error::new(libc::EINVAL))?;
    let ret = match *source {
        // SAFETY: `map_va`'s contract: the range is mapped in this process for as long as the
        // mapping exists; MADV_POPULATE_WRITE only faults it in writable (no data changes).
        Source::Va(p) => unsafe { libc::madvise(p.cast(), len_usize, libc::MADV_POPULATE_WRITE) },
        Source::File { ref file, offset } => {
            let offset =
                libc::off_t::try_from(offset).map_err(|_| errno::Error::new(libc::EINVAL))?;
            let len = libc::off_t::try_from(len).map_err(|_| errno::Error::new(libc::EINVAL))?;
            // SAFETY: `file` is a valid fd for the call; fallocate reads no user memory.
            unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, offset, len) }
        }
    };
    if ret != 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}
