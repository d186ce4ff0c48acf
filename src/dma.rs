//! DMA listeners: what turns a region's view changes into IOMMU mappings of one device.
//!
//! A [`DmaListener`] follows one view of one region for one IOMMU address space (every device
//! in it), through the address space's [`Ledger`]:
//! - **shared view**: by host address in the region's shared mapping or by the shared file +
//!   offset;
//! - **private view** (trusted-IO devices): by the private file (guest_memfd) + offset, since
//!   private memory has no host address.
//!
//! **How big a mapping is** ([`MappingUnit`]). Where the address space cuts mappings
//! ([`iommu::Capabilities::cuts_mappings`]: IOMMUFD with type1 (v1) semantics, the emulated
//! IOMMU's cutting style), each run the state manager hands the listener is **one** mapping, and
//! a later discard of any granule inside it cuts exactly that granule out (the kernel splits the
//! area; its neighbours keep their IOPTEs, so there is no window). Where it does not (a real
//! VFIO type1 container, no-IOMMU), a mapping can only be removed whole, so the unit of map must
//! be the unit of conversion: one mapping per granule, counted against the mapping budget.
//!
//! IOVA = GPA + `iova_offset` (identity by default). A discard of one run is one
//! [`Ledger::unmap`]; the runs one conversion takes from the view (a mixed range) go to
//! [`Ledger::unmap_ranges`] together, so the ledger merges them into the fewest kernel calls:
//! one across the gaps unless something it maps (a stale mapping, another buffer, or, on a
//! cutting space, the rest of a run mapping that stays) lies in one, so no call ever removes a
//! mapping outside the discarded runs.
//!
//! # When an unmap fails
//! A failed unmap travels back the way it came: `discard` returns it to the state manager,
//! which fails the transaction before the KVM attribute changes and re-populates the view (the
//! listener contract, `discard_manager::ViewListener`); the conversion returns
//! [`crate::ConversionError::Unmap`]. As the contract says, after a discard the listener no
//! longer holds the range whatever happened: what the IOMMU still maps is the listener's
//! *stale* set, which it re-adopts if the range is populated again (the rollback does exactly
//! that), retries before the region's next conversion, and reports
//! ([`crate::Region::stale_mappings`]). Stale mappings also come from unmaps that fail where
//! nothing can be rolled back: undoing a populate's own maps, a rollback's discards, the
//! discards of an unregistration. A conversion to private over a stale granule is refused
//! until a retry removed it (invariant 1).

use std::fmt;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};

use discard_manager::{GpaRange, ListenerError, View, ViewListener};
use iommu::{Capabilities, DmaProt, Ledger, LedgerError};

use crate::backing::RegionBacking;
use crate::device::MapBy;
use crate::range_set::RangeSet;
use crate::space::AddressSpace;

/// How a listener splits a run it maps into mappings: the one decision of the mapping size,
/// used by the listener to map and by the budget checks (attach, conversion) to count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MappingUnit {
    /// The address space cuts mappings: one mapping per run.
    Run,
    /// It does not: one mapping per granule of this many bytes.
    Granule(u64),
}

impl MappingUnit {
    /// The unit for an address space whose backend reports `caps`, on a region of
    /// `granularity`.
    pub(crate) fn of(caps: &Capabilities, granularity: u64) -> Self {
        if caps.cuts_mappings {
            MappingUnit::Run
        } else {
            MappingUnit::Granule(granularity)
        }
    }

    /// Bytes of each mapping of a run of `run_len` bytes (granule-aligned).
    pub(crate) fn piece_len(self, run_len: u64) -> u64 {
        match self {
            MappingUnit::Run => run_len,
            MappingUnit::Granule(granularity) => granularity,
        }
    }

    /// Mappings that mapping `runs` makes (each run is mapped on its own, never joined to a
    /// neighbour already mapped).
    pub(crate) fn count(self, runs: &[GpaRange]) -> u64 {
        match self {
            MappingUnit::Run => runs.len() as u64,
            MappingUnit::Granule(granularity) => runs.iter().map(|r| r.len() / granularity).sum(),
        }
    }
}

/// Follows one view of one region for one IOMMU address space (all the devices in it).
pub(crate) struct DmaListener {
    /// The address space, whose ledger every map and unmap goes through; it holds the backing
    /// as long as its ledger maps any of it ([`crate::space`]).
    space: Arc<AddressSpace>,
    backing: Arc<RegionBacking>,
    device: String,
    view: View,
    map_by: MapBy,
    iova_offset: u64,
    granularity: u64,
    unit: MappingUnit,
    prot: DmaProt,
    stale: Mutex<RangeSet>,
}

impl fmt::Debug for DmaListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaListener")
            .field("device", &self.device)
            .field("view", &self.view)
            .field("map_by", &self.map_by)
            .field("iova_offset", &format_args!("{:#x}", self.iova_offset))
            .field("unit", &self.unit)
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
        space: Arc<AddressSpace>,
        backing: Arc<RegionBacking>,
    ) -> Self {
        Self {
            unit: MappingUnit::of(space.ledger.capabilities(), config.granularity),
            space,
            backing,
            device: config.device,
            view: config.view,
            map_by: config.map_by,
            iova_offset: config.iova_offset,
            granularity: config.granularity,
            prot: config.prot,
            stale: Mutex::new(RangeSet::new()),
        }
    }

    fn ledger(&self) -> &Ledger {
        &self.space.ledger
    }

    /// The address space it maps into.
    pub(crate) fn space(&self) -> &Arc<AddressSpace> {
        &self.space
    }

    fn stale(&self) -> MutexGuard<'_, RangeSet> {
        crate::lock(&self.stale)
    }

    fn iova(&self, gpa: u64) -> u64 {
        // Checked for the whole region when the device was attached.
        gpa + self.iova_offset
    }

    /// Maps `[start, end)` (granule-aligned GPAs) in pieces of the listener's [`MappingUnit`],
    /// all or nothing.
    fn map_run(&self, start: u64, end: u64) -> Result<(), LedgerError> {
        let (iova, len) = (self.iova(start), end - start);
        let piece_len = self.unit.piece_len(len);
        match (self.view, self.map_by) {
            (View::Shared, MapBy::Address) => {
                let Some(host) = self.backing.host_addr(start) else {
                    return Err(LedgerError::EmptyRange { iova });
                };
                // SAFETY: `host..host + len` lies in the region's shared mapping, which lives
                // as long as `self.backing`; the address space that owns the ledger held the
                // backing before this listener was registered and lets it go only once its
                // ledger maps nothing of it (or leaks it if the last unmap fails), so the
                // memory outlives the mapping. Guest RAM is only ever
                // accessed through volatile slices and raw pointers, never through Rust
                // references, so device access cannot break aliasing rules.
                unsafe {
                    self.ledger()
                        .map_va_pieces(iova, len, host, piece_len, self.prot)
                }
            }
            (View::Shared, MapBy::File) => self.ledger().map_file_pieces(
                iova,
                len,
                self.backing.shared_file().as_fd(),
                self.backing.file_offset(start),
                piece_len,
                self.prot,
            ),
            (View::Private, _) => self.ledger().map_file_pieces(
                iova,
                len,
                self.backing.private_file().as_fd(),
                self.backing.file_offset(start),
                piece_len,
                self.prot,
            ),
        }
    }

    /// Granule-aligned GPA ranges of `[start, end)` the ledger still maps.
    fn still_mapped(&self, start: u64, end: u64) -> RangeSet {
        let mut left = RangeSet::new();
        let mut gpa = start;
        while gpa < end {
            if self.ledger().mapping_at(self.iova(gpa)).is_some() {
                left.insert(gpa, gpa + self.granularity);
            }
            gpa += self.granularity;
        }
        left
    }

    /// Unmaps `range`; what stays mapped after a failure joins the stale set.
    fn unmap_range(&self, range: GpaRange) -> Result<(), LedgerError> {
        match self.ledger().unmap(self.iova(range.start()), range.len()) {
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
    }

    fn unmap_failed(&self, range: GpaRange, source: LedgerError) -> ListenerError {
        log::warn!(
            "{}: unmap of {} {range} failed: {source}",
            self.device,
            self.view
        );
        Box::new(source)
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

    /// The stale GPA extents `[start, end)`, less what the ledger no longer maps (a device's
    /// whole-ledger teardown may have removed it since).
    pub(crate) fn stale_ranges(&self) -> Vec<GpaRange> {
        let mut stale = self.stale();
        let extents: Vec<(u64, u64)> = stale.iter().collect();
        for (s, e) in extents {
            stale.remove(s, e);
            for (ms, me) in self.still_mapped(s, e).iter() {
                stale.insert(ms, me);
            }
        }
        stale
            .iter()
            .filter_map(|(s, e)| GpaRange::new(s, e - s))
            .collect()
    }

    /// True when a stale extent overlaps `range`.
    pub(crate) fn stale_overlaps(&self, range: GpaRange) -> bool {
        self.stale()
            .iter()
            .any(|(s, e)| s < range.end() && range.start() < e)
    }
}

impl ViewListener for DmaListener {
    fn populate(&self, view: View, range: GpaRange) -> Result<(), ListenerError> {
        debug_assert_eq!(view, self.view);
        // The common case: nothing stale, so the whole range is one map run (all or nothing).
        if self.stale().is_empty() {
            return self.map_run(range.start(), range.end()).map_err(|err| {
                // A failed map whose undo failed too leaves pieces mapped.
                self.keep_stale(range.start(), range.end());
                Box::new(err) as ListenerError
            });
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
                self.keep_stale(s, e);
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

    fn discard(&self, view: View, range: GpaRange) -> Result<(), ListenerError> {
        debug_assert_eq!(view, self.view);
        self.unmap_range(range)
            .map_err(|source| self.unmap_failed(range, source))
    }

    fn discard_runs(&self, view: View, runs: &[GpaRange]) -> Result<(), ListenerError> {
        debug_assert_eq!(view, self.view);
        let ranges: Vec<(u64, u64)> = runs
            .iter()
            .map(|r| (self.iova(r.start()), r.len()))
            .collect();
        let Err(source) = self.ledger().unmap_ranges(&ranges) else {
            return Ok(());
        };
        // Some calls may have succeeded before the failure: what any run still maps is stale.
        for r in runs {
            self.keep_stale(r.start(), r.end());
        }
        let first_left = runs.iter().find(|r| self.stale_overlaps(**r));
        let range = first_left.or(runs.first()).copied();
        Err(match range {
            Some(range) => self.unmap_failed(range, source),
            None => Box::new(source),
        })
    }
}

#[cfg(test)]
mod tests {
    use iommu::emulated::UnmapStyle;
    use iommu::{DmaBackend, EmulatedIommu};

    use super::*;

    fn unit(style: UnmapStyle) -> MappingUnit {
        let iommu = EmulatedIommu::builder().unmap_style(style).build();
        MappingUnit::of(&iommu.capabilities().unwrap(), 0x1000)
    }

    #[test]
    fn a_cutting_space_maps_a_run_as_one_mapping_and_counts_runs() {
        let runs = [
            GpaRange::new(0x10_0000, 0x20_0000).unwrap(),
            GpaRange::new(0x40_0000, 0x1000).unwrap(),
        ];
        let run = unit(UnmapStyle::Cutting);
        assert_eq!((run.piece_len(0x20_0000), run.count(&runs)), (0x20_0000, 2));
        let granule = unit(UnmapStyle::Type1v2);
        assert_eq!(
            (granule.piece_len(0x20_0000), granule.count(&runs)),
            (0x1000, 513)
        );
    }
}
