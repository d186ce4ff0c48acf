//! IOMMU address spaces: a VFIO container, an IOMMUFD IOAS, a no-IOMMU container or an emulated
//! IOMMU, as guest RAM holds them.
//!
//! Real VMMs put every assigned device in one container (or IOAS), so the mappings, the mapping
//! budget and the stale set belong to the address space, not to a device:
//! - **one ledger per address space.** [`crate::GuestRam::attach_device`] finds the address
//!   space by the identity of the backend `Arc` it is given: a device attached with the same
//!   backend as another *joins* its address space (nothing is mapped again: one mapping per
//!   guest granule per address space, whatever the number of devices); leaving one of several
//!   devices unmaps nothing; the last one leaving unmaps everything. Giving the same backend
//!   twice can therefore never create two ledgers over one kernel object.
//! - **one view per address space.** Every device of an address space must have the same
//!   [`DeviceConfig`] (view, how mappings name memory, IOVA offset, access): a mapping is the
//!   address space's, so all its devices see the same IOVA → memory translation anyway. A
//!   shared-view device and a trusted-IO (private-view) device in one address space are refused
//!   at attach ([`AttachError::MixedViews`]): with one IOVA space, GPA + offset of a granule
//!   would have to name the shared page for one device and the private page for the other,
//!   and a merged unmap over one view's gap could remove the other view's mapping of a page
//!   that did not change. Put a trusted-IO device in its own address space.
//! - **no mapping outlives the memory it names.** The address space holds the backing of every
//!   region it ever mapped, and lets one go only once its ledger maps nothing of it; its ledger
//!   drops (unmapping what is left) before the backings. If that last unmap fails too, the
//!   backings are leaked on purpose: a device may still reach them.
//! - **the budget is checked under the address space's own lock**,
//!   held by every region converting or attaching over a budgeted address space across the
//!   check and the maps, so two regions cannot both pass a check that only one fits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use iommu::{DmaBackend, Ledger, LedgerError};

use crate::backing::RegionBacking;
use crate::device::{AttachError, DeviceConfig, DeviceId};
use crate::lock;

/// One IOMMU address space and the devices in it.
pub(crate) struct AddressSpace {
    // Field order: the ledger unmaps what is left when it drops, before the backings go.
    pub(crate) ledger: Ledger,
    /// Backings of the regions this address space maps or mapped; see [`Self::release_unmapped`].
    backings: Mutex<Vec<Arc<RegionBacking>>>,
    /// Orders the budget locks of several address spaces (taken by ascending id).
    pub(crate) id: u64,
    /// The backend's identity: the address of the `Arc`'s data.
    key: usize,
    pub(crate) config: DeviceConfig,
    /// Names the address space in logs and errors when it has no device left.
    opened_by: String,
    members: Mutex<Vec<(DeviceId, String)>>,
    budget: Mutex<()>,
    /// A failed rollback cut the address space off a region: its devices are being detached,
    /// and none may join it until the last has left.
    cut: AtomicBool,
}

/// The identity of a backend: two `Arc`s are the same address space when they point at the
/// same object.
pub(crate) fn backend_key(backend: &Arc<dyn DmaBackend>) -> usize {
    Arc::as_ptr(backend).cast::<()>() as usize
}

impl AddressSpace {
    /// A new address space over `backend`, opened by device `name` with `config`.
    pub(crate) fn new(
        id: u64,
        backend: Arc<dyn DmaBackend>,
        name: &str,
        config: DeviceConfig,
    ) -> Result<Self, LedgerError> {
        let key = backend_key(&backend);
        Ok(Self {
            ledger: Ledger::new(backend)?,
            backings: Mutex::new(Vec::new()),
            id,
            key,
            config,
            opened_by: name.to_string(),
            members: Mutex::new(Vec::new()),
            budget: Mutex::new(()),
            cut: AtomicBool::new(false),
        })
    }

    /// True when this address space is `backend`'s.
    pub(crate) fn is_of(&self, backend: &Arc<dyn DmaBackend>) -> bool {
        self.key == backend_key(backend)
    }

    /// The name errors and stale reports use: its devices' names joined by `+` (the device
    /// that opened it once none is left).
    pub(crate) fn name(&self) -> String {
        let members = lock(&self.members);
        if members.is_empty() {
            return self.opened_by.clone();
        }
        members
            .iter()
            .map(|(_, n)| n.as_str())
            .collect::<Vec<_>>()
            .join("+")
    }

    /// Its devices: id and name.
    pub(crate) fn members(&self) -> Vec<(DeviceId, String)> {
        lock(&self.members).clone()
    }

    /// Checks that device `name` with `config` may join this address space.
    ///
    /// # Errors
    /// [`AttachError::MixedViews`] or [`AttachError::AddressSpaceConfig`].
    pub(crate) fn check_joins(&self, name: &str, config: DeviceConfig) -> Result<(), AttachError> {
        if config.view() != self.config.view() {
            return Err(AttachError::MixedViews {
                device: name.to_string(),
                view: config.view(),
                address_space: self.name(),
                serves: self.config.view(),
            });
        }
        if config != self.config {
            return Err(AttachError::AddressSpaceConfig {
                device: name.to_string(),
                config,
                address_space: self.name(),
                serves: self.config,
            });
        }
        Ok(())
    }

    /// A failed rollback cut the address space off a region: returns its devices, which are
    /// to be detached. Under the member lock, so that a device either joined before (and is
    /// returned) or is refused by [`Self::join`].
    pub(crate) fn cut(&self) -> Vec<(DeviceId, String)> {
        let members = lock(&self.members);
        self.cut.store(true, Ordering::Release);
        members.clone()
    }

    /// About to be attached to every region again (revived after its devices left).
    pub(crate) fn mend(&self) {
        self.cut.store(false, Ordering::Release);
    }

    /// Adds device `id`; false (nothing added) if the address space was cut off a region.
    #[must_use]
    pub(crate) fn join(&self, id: DeviceId, name: &str) -> bool {
        let mut members = lock(&self.members);
        if self.cut.load(Ordering::Acquire) {
            return false;
        }
        members.push((id, name.to_string()));
        true
    }

    /// Removes device `id`; returns `None` if it is not a member, else whether it was the last.
    pub(crate) fn leave(&self, id: DeviceId) -> Option<bool> {
        let mut members = lock(&self.members);
        let pos = members.iter().position(|(m, _)| *m == id)?;
        members.remove(pos);
        Some(members.is_empty())
    }

    /// True when the backend counts mappings: conversions over it take [`Self::budget`].
    pub(crate) fn budgeted(&self) -> bool {
        self.ledger.capabilities().mapping_budget.is_some()
    }

    /// The budget lock: held from a budget check to the end of the maps it allowed.
    pub(crate) fn budget(&self) -> MutexGuard<'_, ()> {
        lock(&self.budget)
    }

    /// Keeps `backing` alive as long as this address space may map it.
    pub(crate) fn hold(&self, backing: &Arc<RegionBacking>) {
        let mut held = lock(&self.backings);
        if !held.iter().any(|b| Arc::ptr_eq(b, backing)) {
            held.push(Arc::clone(backing));
        }
    }

    /// Lets go of every backing the ledger no longer maps anything of.
    pub(crate) fn release_unmapped(&self) {
        let offset = self.config.iova_offset();
        lock(&self.backings).retain(|b| {
            b.range().is_some_and(|r| {
                r.start()
                    .checked_add(offset)
                    .is_some_and(|iova| self.ledger.maps_any(iova, r.len()))
            })
        });
    }
}

impl Drop for AddressSpace {
    fn drop(&mut self) {
        if self.ledger.mapping_count() == 0 {
            return;
        }
        if let Err(e) = self.ledger.unmap_all() {
            // A device may still reach this memory: never give it back to the allocator.
            let held = std::mem::take(self.backings.get_mut().unwrap_or_else(|p| p.into_inner()));
            log::error!(
                "{}: {} mappings left after the last unmap failed ({e}); leaking {} backing(s)",
                self.name(),
                self.ledger.mapping_count(),
                held.len()
            );
            std::mem::forget(held);
        }
    }
}
