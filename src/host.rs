//! What the running kernel offers for guest_memfd-backed guest RAM, and the choice of backing
//! model that follows from it.
//!
//! Probed once into plain data ([`KvmSupport`]) so that a tool can print it, a test can fake it,
//! and [`KvmSupport::choose_model`] can say in words what a refused model lacks.

use std::fmt;

use kvm_bindings::{
    KVM_CAP_GUEST_MEMFD, KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_VM_TYPES, KVM_MEMORY_ATTRIBUTE_PRIVATE,
};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::sys::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_CAP_GUEST_MEMFD_FLAGS};

/// How a region's shared and private memory are backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum BackingModel {
    /// Two files: a memfd for the shared view (mmap'ed, mapped for DMA) and a guest_memfd for the
    /// private view. A conversion frees the side that lost the page (fallocate `PUNCH_HOLE`).
    Classic,
    /// One guest_memfd created with `MMAP | INIT_SHARED` (Linux 6.18+), mmap'ed for the shared
    /// view. Both views live in the same pages, so a conversion frees nothing.
    InPlace,
}

impl fmt::Display for BackingModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackingModel::Classic => "classic (memfd + guest_memfd)",
            BackingModel::InPlace => "in-place (mmap-able guest_memfd)",
        })
    }
}

/// Which model a VMM asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelChoice {
    /// Exactly [`BackingModel::Classic`].
    Classic,
    /// Exactly [`BackingModel::InPlace`].
    InPlace,
    /// In-place where the VM supports it, classic otherwise.
    Auto,
}

/// What one VM on this kernel supports, as `KVM_CHECK_EXTENSION` on the VM fd reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct KvmSupport {
    /// `KVM_CAP_VM_TYPES`: bit `n` set when VM type `n` can be created (0 when the cap is absent).
    pub vm_types: u64,
    /// `KVM_CAP_GUEST_MEMFD`: guest_memfd can be created.
    pub guest_memfd: bool,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS`: flags `KVM_CREATE_GUEST_MEMFD` accepts for this VM
    /// (`MMAP = 1`, `INIT_SHARED = 2`; 0 before Linux 6.18).
    pub guest_memfd_flags: u64,
    /// `KVM_CAP_USER_MEMORY2`: `KVM_SET_USER_MEMORY_REGION2` exists.
    pub user_memory2: bool,
    /// `KVM_CAP_MEMORY_ATTRIBUTES`: attribute mask `KVM_SET_MEMORY_ATTRIBUTES` accepts
    /// (`PRIVATE = 8`); 0 for VMs without private memory.
    pub memory_attributes: u64,
}

impl KvmSupport {
    /// Asks the kernel about `vm` (and `kvm` for the VM types).
    pub fn probe(kvm: &Kvm, vm: &VmFd) -> Self {
        let raw = |cap: u32| u64::try_from(vm.check_extension_raw(cap.into())).unwrap_or(0);
        KvmSupport {
            vm_types: u64::try_from(kvm.check_extension_raw(KVM_CAP_VM_TYPES.into())).unwrap_or(0),
            guest_memfd: raw(KVM_CAP_GUEST_MEMFD) != 0,
            guest_memfd_flags: raw(KVM_CAP_GUEST_MEMFD_FLAGS),
            user_memory2: vm.check_extension(Cap::UserMemory2),
            memory_attributes: raw(KVM_CAP_MEMORY_ATTRIBUTES),
        }
    }

    /// True when KVM itself keeps private/shared attributes for this VM.
    pub fn has_private_attribute(&self) -> bool {
        self.memory_attributes & u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0
    }

    /// True when a guest_memfd can be created mmap-able and initially shared.
    pub fn has_mmap_init_shared(&self) -> bool {
        let both = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
        self.guest_memfd_flags & both == both
    }

    /// Picks the backing model for `choice`, or says what this VM lacks.
    ///
    /// # Errors
    /// [`ModelError`] naming the missing capability.
    pub fn choose_model(&self, choice: ModelChoice) -> Result<BackingModel, ModelError> {
        if !self.guest_memfd {
            return Err(ModelError::NoGuestMemfd);
        }
        if !self.user_memory2 {
            return Err(ModelError::NoUserMemory2);
        }
        match choice {
            ModelChoice::Classic => Ok(BackingModel::Classic),
            ModelChoice::InPlace if self.has_mmap_init_shared() => Ok(BackingModel::InPlace),
            ModelChoice::InPlace => Err(ModelError::NoMmapInitShared {
                flags: self.guest_memfd_flags,
            }),
            ModelChoice::Auto if self.has_mmap_init_shared() => Ok(BackingModel::InPlace),
            ModelChoice::Auto => Ok(BackingModel::Classic),
        }
    }
}

/// A backing model this VM cannot have, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// No guest_memfd at all.
    #[error(
        "KVM lacks KVM_CAP_GUEST_MEMFD (guest_memfd needs Linux 6.8+ with CONFIG_KVM_GUEST_MEMFD)"
    )]
    NoGuestMemfd,
    /// No memslots that name a guest_memfd.
    #[error("KVM lacks KVM_CAP_USER_MEMORY2 (KVM_SET_USER_MEMORY_REGION2 needs Linux 6.8+)")]
    NoUserMemory2,
    /// In-place needs `MMAP | INIT_SHARED`.
    #[error(
        "in-place backing needs guest_memfd flags MMAP|INIT_SHARED, but KVM_CAP_GUEST_MEMFD_FLAGS \
         is {flags:#x} for this VM (Linux 6.18+, and VMs without private memory only)"
    )]
    NoMmapInitShared {
        /// The flags this VM accepts.
        flags: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn support(flags: u64) -> KvmSupport {
        KvmSupport {
            vm_types: 1,
            guest_memfd: true,
            guest_memfd_flags: flags,
            user_memory2: true,
            memory_attributes: 0,
        }
    }

    #[test]
    fn auto_prefers_in_place_and_falls_back_to_classic() {
        assert_eq!(
            support(3).choose_model(ModelChoice::Auto),
            Ok(BackingModel::InPlace)
        );
        assert_eq!(
            support(1).choose_model(ModelChoice::Auto),
            Ok(BackingModel::Classic)
        );
    }

    #[test]
    fn refusals_say_what_the_kernel_lacks() {
        let err = support(1).choose_model(ModelChoice::InPlace).unwrap_err();
        assert_eq!(err, ModelError::NoMmapInitShared { flags: 1 });
        assert!(err.to_string().contains("MMAP|INIT_SHARED"));
        let none = KvmSupport::default();
        assert_eq!(
            none.choose_model(ModelChoice::Classic),
            Err(ModelError::NoGuestMemfd)
        );
    }
}
