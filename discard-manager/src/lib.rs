//! The state authority for guest RAM regions of a VMM whose guest memory is backed by KVM
//! guest_memfd: which granules are plugged, which are shared or private, who must hear of it.
//!
//! Pure state, no system calls. One [`DiscardManager`] per region keeps, per granule, two
//! sources of truth as **extents** (maximal runs, not a bitmap):
//! * plugged / unplugged (virtio-mem style hot-plug),
//! * shared / private (the guest_memfd attribute),
//!
//! and derives two views: the **shared view** (plugged and shared) and the **private view**
//! (plugged and private; private is not "discarded"). [`ViewListener`]s subscribe to one view
//! over a range; every change reaches them as maximal, granule-aligned runs. Conversions and
//! plug/unplug are transactions: discard on the view that loses the pages, the caller's own
//! [`TransactionStep`] (the KVM attribute change), populate on the view that gains them; a
//! refused populate or a failed discard rolls everything back.
//!
//! # Locking rule
//! Each manager has **one mutex, held for the whole of every call**: the plan, all listener
//! notifications, the caller's step, the rollback and the commit. So transactions on one
//! region are serialised and every listener sees them in the order in which they take
//! effect. That is what lets a listener's holdings equal the view at every point between
//! calls, which the DMA invariants (isolation, no window) need; finer locking would let two
//! overlapping conversions interleave their discards and populates. The cost is that
//! concurrent vCPU conversions of one region wait for each other; they would serialise on
//! the IOMMU's own lock anyway, and the manager's own work per conversion is two binary
//! searches and one short in-chunk shift. Queries take the same lock (they are
//! O(log runs + runs in the range); counts are O(1)).
//!
//! # Storage
//! Each region's state is a sorted list of runs (one packed `u64` per run, in chunks of 64),
//! so memory, replay and queries grow with the number of runs, never with the region size:
//! a 1 TiB region with 10,000 shared runs takes about 350 KiB and replays in well under a
//! millisecond (see `benches/conversions.rs`), where a 4 KiB bitmap takes 32 MiB.
//!
//! # Re-entrancy rule
//! Listeners and steps run on the calling thread with the lock held. Any call they make
//! into the **same** manager (transaction, registration, query) returns `Reentrant`
//! ([`Error::Reentrant`], [`TransactionError::Reentrant`]) instead of deadlocking: the
//! manager records the token of the thread that holds its lock and compares. Calling into it
//! from another thread and waiting for that thread deadlocks and is forbidden. Calls into
//! *other* managers are fine (take locks in a fixed order if two managers call each other).
//! A panic inside a listener or step poisons the manager: every later call returns
//! `Poisoned`, because the listeners' holdings are no longer known.
//!
//! # Example
//! ```
//! use std::sync::{Arc, Mutex};
//! use gmem_dma_discard_manager::{
//!     Attribute, DiscardManager, GpaRange, ListenerError, RegionConfig, View, ViewListener,
//! };
//!
//! /// Records what the shared view asks it to map.
//! #[derive(Default)]
//! struct Mapper(Mutex<Vec<String>>);
//! impl ViewListener for Mapper {
//!     fn populate(&self, view: View, range: GpaRange) -> Result<(), ListenerError> {
//!         self.0.lock().unwrap().push(format!("map {view} {range}"));
//!         Ok(())
//!     }
//!     fn discard(&self, view: View, range: GpaRange) -> Result<(), ListenerError> {
//!         self.0.lock().unwrap().push(format!("unmap {view} {range}"));
//!         Ok(())
//!     }
//! }
//!
//! // A confidential guest: 1 GiB, 4 KiB granules, everything private and plugged.
//! let mgr = DiscardManager::new(RegionConfig {
//!     base: 0x1_0000_0000,
//!     size: 1 << 30,
//!     granularity: 4096,
//!     initial_attribute: Attribute::Private,
//!     initially_plugged: true,
//! })?;
//! let mapper = Arc::new(Mapper::default());
//! mgr.register(View::Shared, mgr.region(), mapper.clone())?;
//!
//! // The guest shares 16 KiB, then takes back the middle 8 KiB.
//! let bounce = GpaRange::new(0x1_0000_4000, 0x4000).unwrap();
//! let change = mgr.convert(bounce, Attribute::Shared)?;
//! assert_eq!(change.runs(), [bounce]);
//! mgr.convert(GpaRange::new(0x1_0000_5000, 0x2000).unwrap(), Attribute::Private)?;
//!
//! assert_eq!(*mapper.0.lock().unwrap(), [
//!     "map shared [0x100004000, 0x100007fff]",
//!     "unmap shared [0x100005000, 0x100006fff]",
//! ]);
//! assert_eq!(mgr.counts()?.shared_bytes, 0x2000);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
mod change;
mod config;
mod error;
mod extents;
mod listener;
mod manager;
mod range;

pub use change::{Change, ChangeKind, ViewRange};
pub use config::{ConfigError, MIN_GRANULARITY, RegionConfig};
pub use error::{Detached, DiscardFailure, Error, Refusal, RollbackCause, TransactionError};
pub use listener::{ListenerError, ListenerId, NoStep, TransactionStep, ViewListener};
pub use manager::{Counts, DiscardManager, ListenerInfo, Run};
pub use range::{Attribute, GpaRange, RangeError, View};

#[cfg(test)]
mod tests;
