//! The device side of the emulated IOMMU: DMA reads and writes translated through the page
//! table, with faults recorded exactly where a real IOMMU would raise them.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;

use vm_memory::VolatileSlice;

use super::page_table::{Entry, Target};
use super::{EmulatedIommu, State, lock};

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
#[non_exhaustive]
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

impl EmulatedIommu {
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

/// Reads `buf.len()` bytes at `offset` of `file`: with `pread`, or through a temporary shared
/// mapping for files that have no read method (an mmap-able guest_memfd answers `ESPIPE`).
/// A device access: into the caller's buffer (read) or from it (write).
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
pub(super) struct FileWindow {
    base: *mut u8,
    map_len: usize,
    skip: usize,
    len: usize,
}

impl FileWindow {
    pub(super) fn new(file: &File, offset: u64, len: usize) -> io::Result<Self> {
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

    pub(super) fn slice(&self) -> VolatileSlice<'_> {
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
