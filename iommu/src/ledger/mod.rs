//! The mapping ledger: the one record of what is mapped in a DMA backend, and the only way the
//! rest of the project maps and unmaps.
//!
//! The kernel never splits a mapping (`vfio_dma_do_unmap()` in type1, `iopt_unmap_iova_range()` in
//! IOMMUFD; docs/DESIGN.md section 5): an unmap must cover whole
//! earlier mappings. Type1v2 refuses a bisecting unmap, but IOMMUFD fails with `ENOENT` *after*
//! removing whatever whole areas came before the bisected one, and neither says how much it
//! removed on failure. So the [`Ledger`] keeps its own exact record and checks every request
//! against it before the kernel sees it:
//! - a map by file that asks for device access its descriptor does not grant (writable from an
//!   fd not open for writing, readable from one not open for reading) is refused, as the kernel
//!   does not refuse it ([`LedgerError::FileAccess`]);
//! - a map that is empty, has no access, is misaligned to the smallest IOMMU page, wraps around,
//!   falls outside the IOVA ranges (when the backend reports any), overlaps a live mapping or
//!   exceeds the mapping budget is refused with nothing changed;
//! - an unmap whose range would bisect a mapping is refused, naming the mapping; any other unmap
//!   becomes the fewest kernel calls that cover whole mappings (one, gaps allowed, unless the span
//!   would not fit one call's length), and no call at all for a range holding no mapping (native
//!   IOMMUFD answers `ENOENT` there);
//! - [`Ledger::unmap_ranges`] unmaps several sorted, disjoint ranges together: consecutive ones
//!   share a call when no mapping lies in the gap between them (a call never sweeps away a
//!   mapping outside the ranges), every range checked before the first call;
//! - [`Ledger::map_va_pieces`] / [`Ledger::map_file_pieces`] map a range as equal pieces, all or
//!   nothing.
//!
//! **Backends that cut.** Where the backend reports
//! [`Capabilities::cuts_mappings`](crate::Capabilities::cuts_mappings) (IOMMUFD with type1 v1
//! semantics, or the emulated IOMMU's cutting style), a whole shared run can be one mapping and
//! any sub-range of it can be unmapped later: the record cuts the mappings straddling the
//! unmap's ends exactly as the kernel splits its areas (the halves stay mapped, each a mapping
//! of its own), and the call then covers whole mappings again. A cut point inside a mapping
//! that is not aligned to the smallest IOMMU page is refused before the kernel sees it
//! ([`LedgerError::Misaligned`], "cut point"). If the call fails, the record keeps the mapping
//! whole. (The kernel also refuses to cut dma-buf areas and areas with an in-kernel access; the
//! ledger never maps either.) On a backend that does not cut, a bisecting unmap is refused as
//! above.
//!
//! The record keeps runs of equal, back-to-back pieces (one entry for a 1 GiB range mapped as
//! 262144 separate 4 KiB mappings), so its memory and its queries grow with the number of runs,
//! like the discard manager's extents, while every piece stays a mapping of its own.
//!
//! ```
//! # use std::os::fd::AsFd;
//! # use std::sync::Arc;
//! use gmem_dma_iommu::emulated::{CallKind, EmulatedIommu};
//! use gmem_dma_iommu::{DmaProt, Ledger, LedgerError};
//!
//! let iommu = Arc::new(EmulatedIommu::builder().mapping_budget(Some(100)).build());
//! let ledger = Ledger::new(iommu.clone())?;
//! # let path = std::env::temp_dir().join(format!("ledger-doc-{}", std::process::id()));
//! # let file = std::fs::File::options().read(true).write(true).create(true).open(&path)?;
//! # std::fs::remove_file(&path)?;
//! # file.set_len(0x4000)?;
//! // Four 4 KiB granules of a file, each its own mapping, so each can be unmapped alone later.
//! ledger.map_file_pieces(0x10_0000, 0x4000, file.as_fd(), 0, 0x1000, DmaProt::READ_WRITE)?;
//! assert_eq!(ledger.remaining_budget(), Some(96));
//!
//! // Half of a mapping cannot be unmapped: refused before the backend sees it.
//! assert!(matches!(ledger.unmap(0x10_0000, 0x800), Err(LedgerError::Bisects { .. })));
//! // Three whole mappings become one backend call.
//! assert_eq!(ledger.unmap(0x10_1000, 0x3000)?.calls, 1);
//! let last = iommu.calls().last().map(|c| (c.kind, c.iova, c.len));
//! assert_eq!(last, Some((CallKind::Unmap, 0x10_1000, 0x3000)));
//! assert!(ledger.is_mapped(0x10_0000, 0x1000));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Locking
//! One mutex guards the record, the budget and the statistics, and is held across the backend
//! calls of one operation: checking the record and changing the kernel must be one step, or two
//! threads could both pass the overlap check. The kernel serialises calls on one container or
//! IOAS anyway.

mod errors;
mod policy;
mod record;
#[cfg(test)]
mod tests;

pub use errors::LedgerError;
pub use policy::{Ledger, LedgerStats, UnmapReport};
pub use record::{Mapping, MappingSource};
