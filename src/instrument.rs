//! Counting wrappers around the library's two kernel-facing traits, so a run can report how
//! many attribute sets, IOMMU maps and unmaps it caused, whatever the backend: they forward
//! every call unchanged and count the successful ones. `dma-map` reports its runs with them
//! (an account kept outside the ledger it checks), and the end-to-end bench counts every
//! strategy's calls with them.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{AttributeError, MemoryAttributes};
use discard_manager::{Attribute, GpaRange};
use iommu::{Capabilities, DmaBackend, DmaError, DmaProt};

/// Counts successful `set` calls of the attribute table it wraps.
#[derive(Debug)]
pub struct CountingAttributes {
    inner: Arc<dyn MemoryAttributes>,
    sets: AtomicU64,
}

impl CountingAttributes {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn MemoryAttributes>) -> Self {
        CountingAttributes {
            inner,
            sets: AtomicU64::new(0),
        }
    }

    /// Successful attribute sets so far.
    pub fn sets(&self) -> u64 {
        self.sets.load(Ordering::Relaxed)
    }
}

impl MemoryAttributes for CountingAttributes {
    fn set(&self, range: GpaRange, attribute: Attribute) -> Result<(), AttributeError> {
        self.inner.set(range, attribute)?;
        self.sets.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Counts successful map and unmap calls of the DMA backend it wraps, and the bytes it holds
/// mapped (current and peak).
#[derive(Debug)]
pub struct CountingBackend {
    inner: Arc<dyn DmaBackend>,
    maps: AtomicU64,
    unmaps: AtomicU64,
    live_bytes: AtomicU64,
    peak_bytes: AtomicU64,
}

/// What a [`CountingBackend`] counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendCounts {
    /// Successful map calls (one mapping each).
    pub maps: u64,
    /// Successful unmap calls.
    pub unmaps: u64,
    /// Bytes mapped now.
    pub live_bytes: u64,
    /// Most bytes mapped at once.
    pub peak_bytes: u64,
}

impl CountingBackend {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn DmaBackend>) -> Self {
        CountingBackend {
            inner,
            maps: AtomicU64::new(0),
            unmaps: AtomicU64::new(0),
            live_bytes: AtomicU64::new(0),
            peak_bytes: AtomicU64::new(0),
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> BackendCounts {
        BackendCounts {
            maps: self.maps.load(Ordering::Relaxed),
            unmaps: self.unmaps.load(Ordering::Relaxed),
            live_bytes: self.live_bytes.load(Ordering::Relaxed),
            peak_bytes: self.peak_bytes.load(Ordering::Relaxed),
        }
    }

    fn mapped(&self, len: u64) {
        self.maps.fetch_add(1, Ordering::Relaxed);
        let live = self.live_bytes.fetch_add(len, Ordering::Relaxed) + len;
        self.peak_bytes.fetch_max(live, Ordering::Relaxed);
    }
}

impl DmaBackend for CountingBackend {
    fn capabilities(&self) -> Result<Capabilities, DmaError> {
        self.inner.capabilities()
    }

    unsafe fn map_va(
        &self,
        iova: u64,
        len: u64,
        host_addr: *mut u8,
        prot: DmaProt,
    ) -> Result<(), DmaError> {
        // SAFETY: forwarded unchanged; our caller upholds `map_va`'s contract for exactly this
        // call.
        unsafe { self.inner.map_va(iova, len, host_addr, prot) }?;
        self.mapped(len);
        Ok(())
    }

    fn map_file(
        &self,
        iova: u64,
        len: u64,
        file: BorrowedFd<'_>,
        offset: u64,
        prot: DmaProt,
    ) -> Result<(), DmaError> {
        self.inner.map_file(iova, len, file, offset, prot)?;
        self.mapped(len);
        Ok(())
    }

    fn unmap(&self, iova: u64, len: u64) -> Result<u64, DmaError> {
        let bytes = self.inner.unmap(iova, len)?;
        self.unmaps.fetch_add(1, Ordering::Relaxed);
        self.live_bytes.fetch_sub(
            bytes.min(self.live_bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iommu::EmulatedIommu;

    #[test]
    fn counting_backend_counts_calls_and_tracks_the_peak() {
        let emu = Arc::new(EmulatedIommu::new());
        let counting = CountingBackend::new(emu.clone());
        // Three page-aligned pages (the IOMMU maps whole pages only).
        let mut page = vec![0u8; 4 * 4096];
        let base = page.as_mut_ptr();
        // SAFETY: `align_offset` is below 4096, so the result stays inside `page`, which has
        // room for three whole pages after it.
        let base = unsafe { base.add(base.align_offset(4096)) };
        for i in 0..3u64 {
            // SAFETY: `page` outlives every mapping (all are unmapped below before it drops),
            // and no reference into it is used while mapped.
            unsafe {
                counting
                    .map_va(
                        i * 4096,
                        4096,
                        base.add(i as usize * 4096),
                        DmaProt::READ_WRITE,
                    )
                    .unwrap()
            };
        }
        counting.unmap(0, 2 * 4096).unwrap();
        // A refused call is not counted.
        assert!(counting.unmap(0x1000, 0x800).is_err());
        counting.unmap(2 * 4096, 4096).unwrap();
        assert_eq!(
            counting.counts(),
            BackendCounts {
                maps: 3,
                unmaps: 2,
                live_bytes: 0,
                peak_bytes: 3 * 4096
            }
        );
        assert_eq!(emu.mapping_count(), 0);
        drop(page);
    }
}
