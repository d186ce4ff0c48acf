//! DMA listeners: what turns a region's view changes into IOMMU mappings of one device.
//!
//! A [`DmaListener`] follows one view of one region for one device, through that device's
//! [`Ledger`]:
//! - **shared view**: every shared granule is mapped on its own (kernels cannot split a mapping
//!   later, so the unit of map must be the unit of conversion), by host address in the region's
//!   shared mapping or by the shared file + offset;
//! - **private view** (trusted-IO devices): every private granule is mapped by the private file
//!   (guest_memfd) + offset, since private memory has no host address.
//!
//! IOVA = GPA + `iova_offset` (identity by default). A discard of one run is one
//! [`Ledger::unmap`]; the runs one conversion takes from the view (a mixed range) go to
//! [`Ledger::unmap_ranges`] together, so the ledger merges them into the fewest whole-mapping
//! kernel calls: one across the gaps unless something else it maps (a stale mapping, another
//! buffer) lies in one.
//!
//! # When an unmap fails
//! The state manager's `discard` cannot fail, but a kernel unmap can. A failed unmap leaves the
//! granules mapped, so the listener keeps them in its *stale* set (the manager believes they are
//! gone; the IOMMU still has them) and reports the failure to the region's [`UnmapFailures`].
//! The conversion's transaction step checks that log before it changes the KVM attribute and
//! fails the transaction, so the manager re-populates the view (which maps only what is not
//! stale) and a conversion to private never reports success while a device still maps one of its
//! pages (invariant 1). Stale granules are unmapped again before the region's next conversion.

use std::fmt;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use discard_manager::{GpaRange, ListenerError, View, ViewListener};
use iommu::{DmaProt, Ledger, LedgerError};

use crate::backing::RegionBacking;
use crate::device::MapBy;
use crate::range_set::RangeSet;

/// One unmap that failed inside a discard.
#[derive(Debug, thiserror::Error)]
#[error("device {device}: unmap of {view} view {range} failed")]
pub struct UnmapFailure {
    /// The device's name.
    pub device: String,
    /// The view that was being discarded.
    pub view: View,
    /// The run being discarded.
    pub range: GpaRange,
    /// The ledger's error.
    #[source]
    pub source: LedgerError,
}

/// The failed unmaps of one region since the last check, filled by its listeners' discards and
/// drained by the conversion step, and whether a listener of the region may hold stale
/// mappings. Both are read on every conversion, so each has a flag that answers the common
/// case (nothing failed, nothing stale) without a lock.
#[derive(Debug, Default)]
pub struct UnmapFailures {
    log: Mutex<Vec<UnmapFailure>>,
    /// Entries in `log` (changed only under its lock).
    logged: AtomicUsize,
    /// Set when a listener adds to its stale set; cleared by [`UnmapFailures::take_stale_hint`].
    maybe_stale: AtomicBool,
}

impl UnmapFailures {
    fn lock(&self) -> MutexGuard<'_, Vec<UnmapFailure>> {
        crate::lock(&self.log)
    }

    pub(crate) fn record(&self, failure: UnmapFailure) {
        let mut log = self.lock();
        log.push(failure);
        self.logged.store(log.len(), Ordering::Release);
    }

    /// True when a failure was recorded since the last drain.
    pub(crate) fn any(&self) -> bool {
        self.logged.load(Ordering::Acquire) > 0
    }

    /// Takes every failure recorded so far.
    pub(crate) fn drain(&self) -> Vec<UnmapFailure> {
        let mut log = self.lock();
        self.logged.store(0, Ordering::Release);
        std::mem::take(&mut *log)
    }

    /// A listener of the region added to its stale set.
    pub(crate) fn mark_stale(&self) {
        self.maybe_stale.store(true, Ordering::Release);
    }

    /// True when a listener may hold stale mappings (set since the last call); clears the hint,
    /// so a caller that finds some still stale calls [`UnmapFailures::mark_stale`] again.
    pub(crate) fn take_stale_hint(&self) -> bool {
        self.maybe_stale.swap(false, Ordering::AcqRel)
    }
}

/// Follows one view of one region for one device.
pub struct DmaListener {
    // Field order matters: the ledger (which unmaps what is left when its last owner drops)
    // must drop before the backing whose memory it maps.
    ledger: Arc<Ledger>,
    backing: Arc<RegionBacking>,
    device: String,
    view: View,
    map_by: MapBy,
    iova_offset: u64,
    granularity: u64,
    prot: DmaProt,
    stale: Mutex<RangeSet>,
    failures: Arc<UnmapFailures>,
}

impl fmt::Debug for DmaListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaListener")
            .field("device", &self.device)
            .field("view", &self.view)
            .field("map_by", &self.map_by)
            .field("iova_offset", &format_args!("{:#x}", self.iova_offset))
            .finish()
    }
}

/// Everything a listener needs besides the region.
pub(crate) struct ListenerConfig {
    pub(crate) device: String,
    pub(crate) view: View,
    pub(crate) map_by: MapBy,
    pub(crate) iova_offset: u64,
    pub(crate) granularity: u64,
    pub(crate) prot: DmaProt,
}

impl DmaListener {
    pub(crate) fn new(
        config: ListenerConfig,
        ledger: Arc<Ledger>,
        backing: Arc<RegionBacking>,
        failures: Arc<UnmapFailures>,
    ) -> Self {
        Self {
            ledger,
            backing,
            device: config.device,
            view: config.view,
            map_by: config.map_by,
            iova_offset: config.iova_offset,
            granularity: config.granularity,
            prot: config.prot,
            stale: Mutex::new(RangeSet::new()),
            failures,
        }
    }

    fn stale(&self) -> MutexGuard<'_, RangeSet> {
        crate::lock(&self.stale)
    }

    fn iova(&self, gpa: u64) -> u64 {
        // Checked for the whole region when the device was attached.
        gpa + self.iova_offset
    }

    /// Maps `[start, end)` (granule-aligned GPAs) as one mapping per granule, all or nothing.
    fn map_run(&self, start: u64, end: u64) -> Result<(), LedgerError> {
        let (iova, len) = (self.iova(start), end - start);
        match (self.view, self.map_by) {
            (View::Shared, MapBy::Address) => {
                let Some(host) = self.backing.host_addr(start) else {
                    return Err(LedgerError::EmptyRange { iova });
                };
                // SAFETY: `host..host + len` lies in the region's shared mapping, which lives
                // as long as `self.backing`; this listener holds the backing and drops its
                // ledger reference first, and the ledger unmaps everything when its last
                // owner drops, so the memory outlives the mapping. Guest RAM is only ever
                // accessed through volatile slices and raw pointers, never through Rust
                // references, so device access cannot break aliasing rules.
                unsafe {
                    self.ledger
                        .map_va_pieces(iova, len, host, self.granularity, self.prot)
                }
            }
            (View::Shared, MapBy::File) => self.ledger.map_file_pieces(
                iova,
                len,
                self.backing.shared_file().as_fd(),
                self.backing.file_offset(start),
                self.granularity,
                self.prot,
            ),
            (View::Private, _) => self.ledger.map_file_pieces(
                iova,
                len,
                self.backing.private_file().as_fd(),
                self.backing.file_offset(start),
                self.granularity,
                self.prot,
            ),
        }
    }

    /// Granule-aligned GPA ranges of `[start, end)` the ledger still maps.
    fn still_mapped(&self, start: u64, end: u64) -> RangeSet {
        let mut left = RangeSet::new();
        let mut gpa = start;
        while gpa < end {
            if self.ledger.mapping_at(self.iova(gpa)).is_some() {
                left.insert(gpa, gpa + self.granularity);
            }
            gpa += self.granularity;
        }
        left
    }

    /// Unmaps `range`; what stays mapped after a failure joins the stale set.
    fn unmap_range(&self, range: GpaRange) -> Result<(), LedgerError> {
        match self.ledger.unmap(self.iova(range.start()), range.len()) {
            Ok(_) => Ok(()),
            Err(e) => {
                self.keep_stale(range.start(), range.end());
                Err(e)
            }
        }
    }

    /// Keeps what `[start, end)` still maps after a failed unmap in the stale set.
    fn keep_stale(&self, start: u64, end: u64) {
        let left = self.still_mapped(start, end);
        if left.is_empty() {
            return;
        }
        let mut stale = self.stale();
        for (s, e) in left.iter() {
            stale.insert(s, e);
        }
        self.failures.mark_stale();
    }

    fn record_failure(&self, range: GpaRange, source: LedgerError) {
        log::warn!(
            "{}: unmap of {} {range} failed: {source}",
            self.device,
            self.view
        );
        self.failures.record(UnmapFailure {
            device: self.device.clone(),
            view: self.view,
            range,
            source,
        });
    }

    /// Tries again to unmap every stale granule. Returns the bytes still stale.
    pub(crate) fn retry_stale(&self) -> u64 {
        // The common case, checked without collecting anything.
        if self.stale().is_empty() {
            return 0;
        }
        let extents: Vec<(u64, u64)> = self.stale().iter().collect();
        for (s, e) in extents {
            let Some(range) = GpaRange::new(s, e - s) else {
                continue;
            };
            self.stale().remove(s, e);
            if let Err(err) = self.unmap_range(range) {
                log::warn!(
                    "{}: {range} stays mapped after a retried unmap: {err}",
                    self.device
                );
            }
        }
        self.stale().bytes()
    }

    /// Bytes the manager considers discarded but the IOMMU still maps.
    pub(crate) fn stale_bytes(&self) -> u64 {
        self.stale().bytes()
    }

    /// The stale GPA extents `[start, end)`.
    pub(crate) fn stale_ranges(&self) -> Vec<(u64, u64)> {
        self.stale().iter().collect()
    }

    /// True when a stale extent overlaps `range`.
    pub(crate) fn stale_overlaps(&self, range: GpaRange) -> bool {
        self.stale()
            .iter()
            .any(|(s, e)| s < range.end() && range.start() < e)
    }

    /// The device's name.
    pub fn device(&self) -> &str {
        &self.device
    }
}

impl ViewListener for DmaListener {
    fn populate(&self, view: View, range: GpaRange) -> Result<(), ListenerError> {
        debug_assert_eq!(view, self.view);
        // The common case: nothing stale, so the whole range is one map run (all or nothing).
        if self.stale().is_empty() {
            return self
                .map_run(range.start(), range.end())
                .map_err(|err| Box::new(err) as ListenerError);
        }
        // Stale granules are still mapped: they need no map, and they are held again.
        let still = self.stale().intersection(range.start(), range.end());
        let mut todo = RangeSet::new();
        todo.insert(range.start(), range.end());
        for &(s, e) in &still {
            todo.remove(s, e);
        }
        let mut done: Vec<(u64, u64)> = Vec::new();
        for (s, e) in todo.iter() {
            if let Err(err) = self.map_run(s, e) {
                // All or nothing: undo this call's own maps. A failure here leaves them stale,
                // to be retried before the next conversion.
                for &(ds, de) in done.iter().rev() {
                    if let Some(r) = GpaRange::new(ds, de - ds) {
                        if let Err(undo) = self.unmap_range(r) {
                            log::warn!("{}: undoing map of {r} failed: {undo}", self.device);
                        }
                    }
                }
                return Err(Box::new(err));
            }
            done.push((s, e));
        }
        let mut stale = self.stale();
        for (s, e) in still {
            stale.remove(s, e);
        }
        Ok(())
    }

    fn discard(&self, view: View, range: GpaRange) {
        debug_assert_eq!(view, self.view);
        if let Err(source) = self.unmap_range(range) {
            self.record_failure(range, source);
        }
    }

    fn discard_runs(&self, view: View, runs: &[GpaRange]) {
        debug_assert_eq!(view, self.view);
        let ranges: Vec<(u64, u64)> = runs
            .iter()
            .map(|r| (self.iova(r.start()), r.len()))
            .collect();
        let Err(source) = self.ledger.unmap_ranges(&ranges) else {
            return;
        };
        // Some calls may have succeeded before the failure: what any run still maps is stale.
        for r in runs {
            self.keep_stale(r.start(), r.end());
        }
        // One failure for the whole discard (the error is not `Clone`), naming the first run
        // that stays mapped: the attribute step refuses on any.
        let first_left = runs.iter().find(|r| self.stale_overlaps(**r));
        if let Some(&range) = first_left.or(runs.first()) {
            self.record_failure(range, source);
        }
    }
}
