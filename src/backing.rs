//! The files behind one guest RAM region, their host mapping, the KVM memslot that binds them,
//! and the one irreversible operation on them: freeing pages (fallocate `PUNCH_HOLE`).
//!
//! - [`BackingModel::Classic`]: a memfd holds the shared view (mmap'ed `MAP_SHARED`; devices map
//!   it by address or by memfd + offset) and a guest_memfd holds the private view.
//! - [`BackingModel::InPlace`]: one guest_memfd created `MMAP | INIT_SHARED` and mmap'ed for the
//!   shared view; the private view is the same file, so conversions free nothing.
//! - [`RegionBacking::software`]: the classic shape with a memfd standing in for the guest_memfd,
//!   for VMs without guest_memfd and for tests that need to see which private pages hold memory
//!   (guest_memfd reports no `st_blocks` and cannot be inspected without mmap).
//!
//! Offsets in both files equal `gpa - base`.

use std::ffi::CStr;
use std::fmt;
use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use discard_manager::{GpaRange, View};
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};
use vmm_sys_util::errno;

use crate::host::BackingModel;
use crate::sys;

/// What kind of file backs one side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// A memfd (shmem).
    Memfd,
    /// A KVM guest_memfd.
    GuestMemfd,
}

/// Creating, binding or freeing a backing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackingError {
    /// The region's size does not fit the host's address space.
    #[error("region size {size:#x} does not fit in the host address space")]
    TooLarge {
        /// Requested size.
        size: u64,
    },
    /// `memfd_create` or its `ftruncate` failed.
    #[error("creating the {size:#x}-byte memfd failed")]
    CreateMemfd {
        /// Requested size.
        size: u64,
        /// The kernel's errno.
        #[source]
        source: errno::Error,
    },
    /// `KVM_CREATE_GUEST_MEMFD` failed.
    #[error("creating the {size:#x}-byte guest_memfd with flags {flags:#x} failed")]
    CreateGuestMemfd {
        /// Requested size.
        size: u64,
        /// Requested flags.
        flags: u64,
        /// The kernel's errno.
        #[source]
        source: errno::Error,
    },
    /// mmap of the shared backing failed.
    #[error("mapping the {size:#x}-byte shared backing into the host failed")]
    Mmap {
        /// Requested size.
        size: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The mapping's guest range overflows.
    #[error("region at {base:#x} of {size:#x} bytes overflows the guest address space")]
    GuestRange {
        /// Region base.
        base: u64,
        /// Region size.
        size: u64,
    },
    /// A memslot needs a guest_memfd for the private side.
    #[error(
        "region at {base:#x} has a memfd stand-in, not a guest_memfd; it cannot be bound to KVM"
    )]
    NotGuestMemfd {
        /// Region base.
        base: u64,
    },
    /// The backing is bound to a memslot already (a backing binds one slot, which it deletes
    /// when it drops).
    #[error("region at {base:#x} is bound to KVM memslot {bound} already")]
    AlreadyBound {
        /// Region base.
        base: u64,
        /// The slot it is bound to.
        bound: u32,
    },
    /// `KVM_SET_USER_MEMORY_REGION2` failed (or duplicating the VM fd the binding keeps).
    #[error("binding region at {base:#x} to KVM memslot {slot} failed")]
    Bind {
        /// Region base.
        base: u64,
        /// The slot.
        slot: u32,
        /// The kernel's errno.
        #[source]
        source: errno::Error,
    },
    /// Deleting the KVM memslot failed.
    #[error("deleting KVM memslot {slot} of region at {base:#x} failed")]
    Unbind {
        /// Region base.
        base: u64,
        /// The slot.
        slot: u32,
        /// The kernel's errno.
        #[source]
        source: errno::Error,
    },
    /// `fallocate(PUNCH_HOLE)` failed (or an injected failure).
    #[error("freeing {range} of the {side} backing failed")]
    PunchHole {
        /// Which side.
        side: View,
        /// The range.
        range: GpaRange,
        /// The kernel's errno.
        #[source]
        source: errno::Error,
    },
    /// A range outside the region.
    #[error("{range} is outside the region")]
    OutsideRegion {
        /// The range.
        range: GpaRange,
    },
    /// The VMM's shared file or mapping cannot back the region.
    #[error("the VMM's shared file cannot back the {size:#x}-byte region: {reason}")]
    SharedFile {
        /// The region's size.
        size: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Inspecting the VMM's shared file failed.
    #[error("inspecting the VMM's shared file failed")]
    SharedFileStat(#[source] errno::Error),
    /// Asking which pages hold memory failed or is impossible for this file.
    #[error("cannot tell which pages of the {side} backing hold memory")]
    Residency {
        /// Which side.
        side: View,
        /// The kernel's errno (`EOPNOTSUPP` for a guest_memfd without a host mapping).
        #[source]
        source: errno::Error,
    },
}

#[cfg(any(test, feature = "testing"))]
type PunchRule = Box<dyn FnMut(View, GpaRange) -> bool + Send>;

/// Counters and (with the `testing` feature) fault injection of the frees. Counters are
/// atomics and the rule sits behind a flag, so a free (on every eager conversion) takes no
/// lock unless a rule is installed.
#[derive(Default)]
struct PunchLog {
    calls: AtomicU64,
    bytes: AtomicU64,
    #[cfg(any(test, feature = "testing"))]
    failing: std::sync::atomic::AtomicBool,
    #[cfg(any(test, feature = "testing"))]
    fail: std::sync::Mutex<Option<PunchRule>>,
}

/// Counters of the frees this backing made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PunchStats {
    /// Successful `fallocate(PUNCH_HOLE)` calls.
    pub calls: u64,
    /// Bytes they freed (requested lengths).
    pub bytes: u64,
}

/// The files and host mapping behind one guest RAM region.
pub struct RegionBacking {
    model: BackingModel,
    base: u64,
    size: u64,
    shared_kind: FileKind,
    shared: Arc<File>,
    private_kind: FileKind,
    /// `None` for in-place: the private view is `shared`.
    private: Option<Arc<File>>,
    /// The memslot bound to the mapping, deleted before the mapping goes (see `Drop`).
    memslot: Mutex<Option<Memslot>>,
    /// Unmapped (or, for the VMM's mapping, released) in `Drop`, after the memslot is
    /// deleted, or leaked if that fails.
    mapping: ManuallyDrop<HostMapping>,
    punches: PunchLog,
}

/// A KVM memslot a backing is bound to, with its own duplicate of the VM fd so that the slot
/// can be deleted whoever still holds the `VmFd`.
struct Memslot {
    vm: OwnedFd,
    slot: u32,
}

impl Drop for RegionBacking {
    /// Deletes the bound memslot, so that KVM never uses the host mapping after it goes; if
    /// that fails, the mapping is leaked (the guest may still read and write it).
    fn drop(&mut self) {
        let memslot = self
            .memslot
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(m) = memslot {
            if let Err(e) = sys::delete_memslot(m.vm.as_fd(), m.slot) {
                log::error!(
                    "deleting KVM memslot {} of region {:#x} failed ({e}): leaking its memory",
                    m.slot,
                    self.base
                );
                return;
            }
        }
        // SAFETY: `mapping` is not used after this; no memslot points at it any more. For the
        // VMM's mapping this drops our hold on its region, which it unmaps once the last goes.
        unsafe { ManuallyDrop::drop(&mut self.mapping) };
    }
}

/// The host mapping of the shared view: made here, or the VMM's own (one mmap either way).
enum HostMapping {
    /// Mapped by this crate.
    Own(GuestRegionMmap),
    /// The VMM's vm-memory mapping (with its own bitmap type), kept alive here; `ptr` is its
    /// start.
    Vmm {
        ptr: usize,
        _region: Arc<dyn std::any::Any + Send + Sync>,
    },
}

impl HostMapping {
    fn as_ptr(&self) -> *mut u8 {
        match self {
            HostMapping::Own(region) => region.as_ptr(),
            HostMapping::Vmm { ptr, .. } => *ptr as *mut u8,
        }
    }
}

impl fmt::Debug for RegionBacking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionBacking")
            .field("model", &self.model)
            .field("base", &format_args!("{:#x}", self.base))
            .field("size", &format_args!("{:#x}", self.size))
            .field("shared_kind", &self.shared_kind)
            .field("private_kind", &self.private_kind)
            .finish()
    }
}

impl RegionBacking {
    /// Classic model: a memfd for the shared view and a guest_memfd created on `vm` for the
    /// private view.
    ///
    /// # Errors
    /// The step that failed.
    pub fn classic(vm: &VmFd, base: u64, size: u64) -> Result<Self, BackingError> {
        let private = private_guest_memfd(vm, size)?;
        Self::two_files(base, size, private, FileKind::GuestMemfd)
    }

    /// In-place model: one guest_memfd created on `vm` with `MMAP | INIT_SHARED`, mmap'ed.
    ///
    /// # Errors
    /// The step that failed (`EINVAL` from the kernel when the VM lacks the flags).
    pub fn in_place(vm: &VmFd, base: u64, size: u64) -> Result<Self, BackingError> {
        let flags = sys::GUEST_MEMFD_FLAG_MMAP | sys::GUEST_MEMFD_FLAG_INIT_SHARED;
        let gmem = sys::create_guest_memfd(vm, size, flags).map_err(|source| {
            BackingError::CreateGuestMemfd {
                size,
                flags,
                source,
            }
        })?;
        let shared = Arc::new(File::from(gmem));
        let mapping = HostMapping::Own(map_shared(&shared, base, size)?);
        Ok(Self {
            model: BackingModel::InPlace,
            base,
            size,
            shared_kind: FileKind::GuestMemfd,
            shared,
            private_kind: FileKind::GuestMemfd,
            private: None,
            memslot: Mutex::new(None),
            mapping: ManuallyDrop::new(mapping),
            punches: PunchLog::default(),
        })
    }

    /// Classic shape without KVM: a memfd for each side. For VMs without guest_memfd (the
    /// private side then only holds what the VMM puts there) and for tests that must see which
    /// private pages hold memory. Cannot be bound to a memslot.
    ///
    /// # Errors
    /// The step that failed.
    pub fn software(base: u64, size: u64) -> Result<Self, BackingError> {
        let private = memfd(c"gmem-dma-private", size)?;
        Self::two_files(base, size, private, FileKind::Memfd)
    }

    /// Classic model over the VMM's own shared file (a memfd, `MFD_HUGETLB` or not, or a
    /// hugetlbfs file) instead of one created here; the file is mapped here, once. The file
    /// must be open read-write, at least `size` bytes long, on shmem or hugetlbfs (so frees and
    /// `IOMMU_IOAS_MAP_FILE` work), and not sealed against writes. File offsets equal
    /// `gpa - base`.
    ///
    /// # Errors
    /// [`BackingError::SharedFile`] naming what is wrong with the file; the step that failed.
    pub fn classic_with_file(
        vm: &VmFd,
        base: u64,
        size: u64,
        shared: OwnedFd,
    ) -> Result<Self, BackingError> {
        check_shared_file(shared.as_fd(), size)?;
        let shared = Arc::new(File::from(shared));
        let mapping = HostMapping::Own(map_shared(&shared, base, size)?);
        Self::with_guest_memfd(vm, base, size, (shared, mapping))
    }

    /// Classic model over the VMM's own vm-memory mapping of its shared file: the VMM keeps
    /// `region` in its `GuestMemoryMmap<B>` (with its dirty-bitmap type `B`), so emulated
    /// devices and assigned devices see the same pages, and nothing is mapped twice. The
    /// mapping must be of a file (checked as for [`classic_with_file`](Self::classic_with_file))
    /// from offset 0, `MAP_SHARED`, readable and writable, exactly `size` bytes; it is kept
    /// alive as long as the backing.
    ///
    /// # Example
    /// The VMM's `GuestMemoryMmap`, with a dirty bitmap, over its own file: an emulated device
    /// reads through it what an assigned device DMA'd (the emulated IOMMU here).
    /// ```
    /// use std::sync::Arc;
    /// use discard_manager::{Attribute, GpaRange};
    /// use gmem_dma::*;
    /// use vm_memory::bitmap::AtomicBitmap;
    /// use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
    ///
    /// let (base, size) = (0x1_0000_0000u64, 2u64 << 20);
    /// let (kvm, vm) = { let kvm = kvm_ioctls::Kvm::new()?; let vm = kvm.create_vm()?; (kvm, vm) };
    /// // The VMM's own shared file (on tmpfs) and its own mapping of it.
    /// let path = format!("/dev/shm/gmem-dma-doc-{}", std::process::id());
    /// let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
    /// std::fs::remove_file(&path)?;
    /// file.set_len(size)?;
    /// let mmap = MmapRegion::<AtomicBitmap>::from_file(FileOffset::new(file, 0), size as usize)?;
    /// let mmap = Arc::new(mmap);
    /// let backing = RegionBacking::classic_over(&vm, base, Arc::clone(&mmap))?;
    /// let vmm_region = GuestRegionMmap::with_arc(mmap, GuestAddress(base)).unwrap();
    /// let mem = GuestMemoryMmap::from_arc_regions(vec![Arc::new(vmm_region)])?;
    ///
    /// let ram = GuestRam::new(Arc::new(RecordingAttributes::new()));
    /// let policy = DiscardPolicy::Eager;
    /// let spec = RegionSpec { granularity: 4096, initial: Attribute::Private, policy, initially_plugged: true };
    /// ram.add_region(backing, spec)?;
    /// let iommu = Arc::new(iommu::EmulatedIommu::new());
    /// ram.attach_device("nic", iommu.clone(), DeviceConfig::shared())?;
    /// let buffer = GpaRange::new(base + 0x1000, 0x1000).unwrap();
    /// ram.convert(buffer, Attribute::Shared)?;
    /// iommu.dma_write(buffer.start(), b"packet")?; // the assigned device DMAs
    ///
    /// // The VMM checks before it touches guest memory through its own objects.
    /// assert!(!ram.is_private(buffer.start()));
    /// let mut seen = [0u8; 6];
    /// mem.read_slice(&mut seen, GuestAddress(buffer.start()))?;
    /// assert_eq!(&seen, b"packet");
    /// assert!(ram.is_private(base), "the rest is private: not the VMM's to touch");
    /// # drop(kvm);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`BackingError::SharedFile`] naming what is wrong with the mapping; the step that failed.
    pub fn classic_over<B>(
        vm: &VmFd,
        base: u64,
        region: Arc<MmapRegion<B>>,
    ) -> Result<Self, BackingError>
    where
        B: vm_memory::bitmap::Bitmap + Send + Sync + 'static,
    {
        let size = region.size() as u64;
        let refuse = |reason| BackingError::SharedFile { size, reason };
        let file = region
            .file_offset()
            .ok_or(refuse("its mapping is anonymous, not of a file"))?;
        if file.start() != 0 {
            return Err(refuse("its mapping does not start at file offset 0"));
        }
        if region.flags() & libc::MAP_SHARED == 0 {
            return Err(refuse("its mapping is private (not MAP_SHARED)"));
        }
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        if region.prot() & rw != rw {
            return Err(refuse("its mapping is not readable and writable"));
        }
        let shared = Arc::clone(file.arc());
        check_shared_file(shared.as_fd(), size)?;
        let mapping = HostMapping::Vmm {
            ptr: region.as_ptr() as usize,
            _region: region,
        };
        GpaRange::new(base, size).ok_or(BackingError::GuestRange { base, size })?;
        Self::with_guest_memfd(vm, base, size, (shared, mapping))
    }

    fn two_files(
        base: u64,
        size: u64,
        private: OwnedFd,
        private_kind: FileKind,
    ) -> Result<Self, BackingError> {
        let shared = Arc::new(File::from(memfd(c"gmem-dma-shared", size)?));
        let mapping = HostMapping::Own(map_shared(&shared, base, size)?);
        Ok(Self::parts(
            base,
            size,
            (shared, mapping),
            private,
            private_kind,
        ))
    }

    /// The classic model over `shared` (file and its host mapping): a guest_memfd created on
    /// `vm` holds the private view.
    fn with_guest_memfd(
        vm: &VmFd,
        base: u64,
        size: u64,
        shared: (Arc<File>, HostMapping),
    ) -> Result<Self, BackingError> {
        let private = private_guest_memfd(vm, size)?;
        Ok(Self::parts(
            base,
            size,
            shared,
            private,
            FileKind::GuestMemfd,
        ))
    }

    /// The classic shape: `shared` (file and its host mapping) and a separate private file.
    fn parts(
        base: u64,
        size: u64,
        (shared, mapping): (Arc<File>, HostMapping),
        private: OwnedFd,
        private_kind: FileKind,
    ) -> Self {
        Self {
            model: BackingModel::Classic,
            base,
            size,
            shared_kind: FileKind::Memfd,
            shared,
            private_kind,
            private: Some(Arc::new(File::from(private))),
            memslot: Mutex::new(None),
            mapping: ManuallyDrop::new(mapping),
            punches: PunchLog::default(),
        }
    }

    /// Binds the region to KVM memslot `slot` of `vm` (`KVM_SET_USER_MEMORY_REGION2`, with the
    /// guest_memfd at offset 0 and the shared mapping as `userspace_addr`). The backing keeps
    /// a duplicate of the VM fd and deletes the slot when it drops, before unmapping the
    /// memory, so the guest can never reach host memory the backing no longer owns (RAII: no
    /// convention to follow). [`unbind`](Self::unbind) deletes it earlier.
    ///
    /// # Errors
    /// [`BackingError::NotGuestMemfd`] for a software backing; [`BackingError::AlreadyBound`];
    /// [`BackingError::Bind`].
    pub fn bind(&self, vm: &VmFd, slot: u32) -> Result<(), BackingError> {
        if self.private_kind != FileKind::GuestMemfd {
            return Err(BackingError::NotGuestMemfd { base: self.base });
        }
        let mut memslot = crate::lock(&self.memslot);
        if let Some(m) = memslot.as_ref() {
            return Err(BackingError::AlreadyBound {
                base: self.base,
                bound: m.slot,
            });
        }
        let bind_failed = |source| BackingError::Bind {
            base: self.base,
            slot,
            source,
        };
        // SAFETY: `vm` owns its fd for the duration of this borrow.
        let vm_fd = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(|e| bind_failed(errno::Error::new(e.raw_os_error().unwrap_or(libc::EBADF))))?;
        let gmem = self.private_file().as_fd();
        // SAFETY: the shared mapping lives as long as `self`, and `Drop` deletes the slot
        // (through `vm_fd`, kept below) before unmapping it, or leaks it; the kernel refuses
        // a guest_memfd created on another VM.
        unsafe {
            sys::set_guest_memfd_memslot(
                vm,
                slot,
                self.base,
                self.size,
                self.mapping.as_ptr() as u64,
                gmem,
                0,
            )
        }
        .map_err(bind_failed)?;
        *memslot = Some(Memslot { vm: vm_fd, slot });
        Ok(())
    }

    /// Deletes the memslot [`bind`](Self::bind) created, before the backing drops (once no
    /// vCPU runs), e.g. to re-use its guest range. `vm` and `slot` must name it.
    ///
    /// # Errors
    /// [`BackingError::Unbind`] (`EINVAL` when the backing is not bound to `slot`).
    pub fn unbind(&self, vm: &VmFd, slot: u32) -> Result<(), BackingError> {
        let unbind_failed = |errno| BackingError::Unbind {
            base: self.base,
            slot,
            source: errno::Error::new(errno),
        };
        let mut memslot = crate::lock(&self.memslot);
        if memslot.as_ref().is_none_or(|m| m.slot != slot) {
            return Err(unbind_failed(libc::EINVAL));
        }
        // SAFETY: `vm` owns its fd for the duration of this borrow.
        let vm_fd = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) };
        sys::delete_memslot(vm_fd, slot).map_err(|e| unbind_failed(e.errno()))?;
        *memslot = None;
        Ok(())
    }

    /// Deletes the memslot [`bind`](Self::bind) created, whichever it is, through the VM fd the
    /// backing keeps (nothing to do when it is not bound): the region leaves guest RAM now,
    /// even while something still holds the backing.
    ///
    /// # Errors
    /// [`BackingError::Unbind`]; the slot stays bound, and `Drop` tries again (leaking the
    /// mapping if that fails too).
    pub fn delete_memslot(&self) -> Result<(), BackingError> {
        let mut memslot = crate::lock(&self.memslot);
        if let Some(m) = memslot.as_ref() {
            sys::delete_memslot(m.vm.as_fd(), m.slot).map_err(|e| BackingError::Unbind {
                base: self.base,
                slot: m.slot,
                source: errno::Error::new(e.errno()),
            })?;
        }
        *memslot = None;
        Ok(())
    }

    /// The backing model.
    pub fn model(&self) -> BackingModel {
        self.model
    }

    /// The region as a guest range.
    pub fn range(&self) -> Option<GpaRange> {
        GpaRange::new(self.base, self.size)
    }

    /// The host mapping of the shared view, as vm-memory sees it, when this crate made it
    /// (`None` for [`classic_over`](Self::classic_over): the VMM holds that one). A VMM whose
    /// `GuestMemoryMmap` has no bitmap can hold this region itself (its `get_mmap()` shares
    /// the mapping), so nothing is mapped twice.
    pub fn mapping(&self) -> Option<&GuestRegionMmap> {
        match &*self.mapping {
            HostMapping::Own(region) => Some(region),
            HostMapping::Vmm { .. } => None,
        }
    }

    /// The file holding the shared view (memfd, or the guest_memfd in place).
    pub fn shared_file(&self) -> &Arc<File> {
        &self.shared
    }

    /// What kind of file holds the shared view.
    pub fn shared_kind(&self) -> FileKind {
        self.shared_kind
    }

    /// The file holding the private view.
    pub fn private_file(&self) -> &Arc<File> {
        self.private.as_ref().unwrap_or(&self.shared)
    }

    /// What kind of file holds the private view.
    pub fn private_kind(&self) -> FileKind {
        self.private_kind
    }

    /// Offset in either file of guest address `gpa` (which must be inside the region).
    pub fn file_offset(&self, gpa: u64) -> u64 {
        gpa - self.base
    }

    /// Host address of guest address `gpa` in the shared mapping, or `None` outside the region.
    pub fn host_addr(&self, gpa: u64) -> Option<*mut u8> {
        let off = usize::try_from(gpa.checked_sub(self.base)?).ok()?;
        (gpa < self.base + self.size).then(|| self.mapping.as_ptr().wrapping_add(off))
    }

    fn check(&self, range: GpaRange) -> Result<(), BackingError> {
        let end = self.base.checked_add(self.size);
        if range.start() >= self.base && end.is_some_and(|end| range.end() <= end) {
            Ok(())
        } else {
            Err(BackingError::OutsideRegion { range })
        }
    }

    /// Frees `range` of the `side` backing (fallocate `PUNCH_HOLE | KEEP_SIZE`). Irreversible:
    /// the data is gone.
    ///
    /// # Errors
    /// [`BackingError::PunchHole`] with the kernel's errno (or `EIO` when injected).
    pub fn punch_hole(&self, side: View, range: GpaRange) -> Result<(), BackingError> {
        self.check(range)?;
        let log = &self.punches;
        #[cfg(any(test, feature = "testing"))]
        if log.failing.load(Ordering::Acquire)
            && crate::lock(&log.fail)
                .as_mut()
                .is_some_and(|rule| rule(side, range))
        {
            return Err(BackingError::PunchHole {
                side,
                range,
                source: errno::Error::new(libc::EIO),
            });
        }
        let file = match side {
            View::Shared => &self.shared,
            View::Private => self.private_file(),
        };
        sys::punch_hole(file.as_fd(), self.file_offset(range.start()), range.len()).map_err(
            |source| BackingError::PunchHole {
                side,
                range,
                source,
            },
        )?;
        log.calls.fetch_add(1, Ordering::Relaxed);
        log.bytes.fetch_add(range.len(), Ordering::Relaxed);
        Ok(())
    }

    /// From now on, a free for which `rule` returns true fails with `EIO` and frees nothing
    /// (a test hook: `testing` feature).
    #[cfg(any(test, feature = "testing"))]
    pub fn inject_punch_failures(&self, rule: impl FnMut(View, GpaRange) -> bool + Send + 'static) {
        *crate::lock(&self.punches.fail) = Some(Box::new(rule));
        self.punches.failing.store(true, Ordering::Release);
    }

    /// Stops injecting free failures (`testing` feature).
    #[cfg(any(test, feature = "testing"))]
    pub fn clear_punch_failures(&self) {
        self.punches.failing.store(false, Ordering::Release);
        *crate::lock(&self.punches.fail) = None;
    }

    /// How many frees were made, and how many bytes they covered.
    pub fn punch_stats(&self) -> PunchStats {
        PunchStats {
            calls: self.punches.calls.load(Ordering::Relaxed),
            bytes: self.punches.bytes.load(Ordering::Relaxed),
        }
    }

    /// Bytes of memory the `side` file holds per `fstat` (a guest_memfd always reports 0).
    ///
    /// # Errors
    /// [`BackingError::Residency`].
    pub fn allocated_bytes(&self, side: View) -> Result<u64, BackingError> {
        let file = match side {
            View::Shared => &self.shared,
            View::Private => self.private_file(),
        };
        sys::allocated_bytes(file.as_fd())
            .map_err(|source| BackingError::Residency { side, source })
    }

    /// False where the `side` file cannot say which of its pages hold memory: the guest_memfd of
    /// a classic backing. Linux 7.3's guest_memfd has no `llseek` (`SEEK_DATA`/`SEEK_HOLE` fail
    /// with `ESPIPE`), keeps no `i_blocks`, and a classic one has no host mapping for `mincore`
    /// (creating it `MMAP` would make `kvm_gmem_bind()` mark the memslot
    /// `KVM_MEMSLOT_GMEM_ONLY`, so KVM would fault shared pages from it instead of the memfd).
    pub fn reports_residency(&self, side: View) -> bool {
        let kind = match side {
            View::Shared => self.shared_kind,
            View::Private => self.private_kind,
        };
        !(kind == FileKind::GuestMemfd && self.model == BackingModel::Classic)
    }

    /// The parts of `range` the `side` backing holds memory for (pages never touched, or
    /// freed, are holes): memfds answer with `SEEK_DATA`/`SEEK_HOLE`, an mmap'ed guest_memfd
    /// with `mincore`; a classic guest_memfd cannot answer (no `lseek`: `ESPIPE`).
    ///
    /// # Errors
    /// [`BackingError::Residency`] when the file cannot answer (`ESPIPE`, `EINVAL`, ...).
    pub fn backed_ranges(
        &self,
        side: View,
        range: GpaRange,
    ) -> Result<Vec<GpaRange>, BackingError> {
        self.check(range)?;
        let (file, kind) = match side {
            View::Shared => (&self.shared, self.shared_kind),
            View::Private => (self.private_file(), self.private_kind),
        };
        let err = |source| BackingError::Residency { side, source };
        if !self.reports_residency(side) {
            // Answered without a system call, as the conversions that ask are the hot path of
            // a lazy policy.
            return Err(err(errno::Error::new(libc::EOPNOTSUPP)));
        }
        if kind == FileKind::GuestMemfd {
            // guest_memfd has no SEEK_DATA; its host mapping answers (mincore).
            let page = sys::page_size() as u64;
            let resident = self.resident_pages(side, range)?;
            let mut out: Vec<GpaRange> = Vec::new();
            for (i, _) in resident.iter().enumerate().filter(|(_, r)| **r) {
                let gpa = range.start() + i as u64 * page;
                match out.last_mut() {
                    Some(last) if last.end() == gpa => {
                        *last = GpaRange::new(last.start(), last.len() + page).unwrap_or(*last);
                    }
                    _ => out.extend(GpaRange::new(gpa, page)),
                }
            }
            return Ok(out);
        }
        let start = self.file_offset(range.start());
        let extents = data_extents(file.as_fd(), start, range.len()).map_err(err)?;
        Ok(extents
            .into_iter()
            .filter_map(|(s, e)| GpaRange::new(s + self.base, e - s))
            .collect())
    }

    /// For each host page of `range`, whether the `side` backing holds memory for it. memfds
    /// answer with `SEEK_DATA` (pages never written count as holes); an mmap'ed guest_memfd
    /// answers with `mincore` on the shared mapping; a classic guest_memfd cannot answer.
    ///
    /// # Errors
    /// [`BackingError::Residency`] (`EOPNOTSUPP` for a classic guest_memfd).
    pub fn resident_pages(&self, side: View, range: GpaRange) -> Result<Vec<bool>, BackingError> {
        self.check(range)?;
        let (file, kind) = match side {
            View::Shared => (&self.shared, self.shared_kind),
            View::Private => (self.private_file(), self.private_kind),
        };
        let page = sys::page_size() as u64;
        let err = |source| BackingError::Residency { side, source };
        if !self.reports_residency(side) {
            return Err(err(errno::Error::new(libc::EOPNOTSUPP)));
        }
        match kind {
            FileKind::Memfd => residency_by_seek(
                file.as_fd(),
                self.file_offset(range.start()),
                range.len(),
                page,
            )
            .map_err(err),
            // In place: the guest_memfd's own host mapping answers.
            FileKind::GuestMemfd => {
                let addr = self
                    .host_addr(range.start())
                    .ok_or(BackingError::OutsideRegion { range })?;
                let len = usize::try_from(range.len())
                    .map_err(|_| err(errno::Error::new(libc::EINVAL)))?;
                sys::resident_pages(addr, len).map_err(err)
            }
        }
    }
}

fn residency_by_seek(
    fd: BorrowedFd<'_>,
    start: u64,
    len: u64,
    page: u64,
) -> Result<Vec<bool>, errno::Error> {
    let mut out = vec![false; len.div_ceil(page) as usize];
    for (data, hole) in data_extents(fd, start, len)? {
        for p in (data - start) / page..(hole - start).div_ceil(page) {
            out[p as usize] = true;
        }
    }
    Ok(out)
}

/// The extents `[data, hole)` of `[start, start + len)` of `fd` that hold data
/// (`SEEK_DATA`/`SEEK_HOLE`), clipped to the range.
fn data_extents(fd: BorrowedFd<'_>, start: u64, len: u64) -> Result<Vec<(u64, u64)>, errno::Error> {
    let end = start + len;
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let Some(data) = sys::seek_data(fd, at)? else {
            break;
        };
        if data >= end {
            break;
        }
        if data == start && len <= sys::page_size() as u64 {
            // One page holds data or not: one system call answers (a bounce page's flip).
            out.push((start, end));
            break;
        }
        let hole = sys::seek_hole(fd, data)?.unwrap_or(end).min(end);
        out.push((data, hole));
        at = hole;
    }
    Ok(out)
}

/// Checks that the VMM's `file` can hold the shared view of a `size`-byte region.
fn check_shared_file(file: BorrowedFd<'_>, size: u64) -> Result<(), BackingError> {
    let refuse = |reason| BackingError::SharedFile { size, reason };
    if !sys::is_read_write(file).map_err(BackingError::SharedFileStat)? {
        return Err(refuse("it is not open for reading and writing"));
    }
    let magic = sys::fs_magic(file).map_err(BackingError::SharedFileStat)?;
    if magic != sys::TMPFS_MAGIC && magic != sys::HUGETLBFS_MAGIC {
        return Err(refuse("it is not a memfd or a hugetlbfs file"));
    }
    if sys::file_size(file).map_err(BackingError::SharedFileStat)? < size {
        return Err(refuse("it is smaller than the region"));
    }
    let seals = sys::seals(file).map_err(BackingError::SharedFileStat)?;
    if seals & (libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE) != 0 {
        return Err(refuse("it is sealed against writes"));
    }
    Ok(())
}

fn private_guest_memfd(vm: &VmFd, size: u64) -> Result<OwnedFd, BackingError> {
    sys::create_guest_memfd(vm, size, 0).map_err(|source| BackingError::CreateGuestMemfd {
        size,
        flags: 0,
        source,
    })
}

fn memfd(name: &CStr, size: u64) -> Result<OwnedFd, BackingError> {
    sys::memfd_create(name, size).map_err(|source| BackingError::CreateMemfd { size, source })
}

fn map_shared(file: &Arc<File>, base: u64, size: u64) -> Result<GuestRegionMmap, BackingError> {
    let len = usize::try_from(size).map_err(|_| BackingError::TooLarge { size })?;
    let region = MmapRegion::from_file(FileOffset::from_arc(Arc::clone(file), 0), len)
        .map_err(|source| BackingError::Mmap { size, source })?;
    GuestRegionMmap::new(region, GuestAddress(base)).ok_or(BackingError::GuestRange { base, size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn software_backing_frees_exactly_the_punched_pages() {
        let b = RegionBacking::software(0x10_0000, 0x10000).unwrap();
        let all = GpaRange::new(0x10_0000, 0x10000).unwrap();
        // Touch pages 1..4 of the shared view through the host mapping.
        for p in 1..4u64 {
            let addr = b.host_addr(0x10_0000 + p * 4096).unwrap();
            // SAFETY: `addr` is inside the live shared mapping, no reference to it exists.
            unsafe { addr.write_volatile(0xaa) };
        }
        let before = b.resident_pages(View::Shared, all).unwrap();
        assert_eq!(before.iter().filter(|&&r| r).count(), 3);
        b.punch_hole(View::Shared, GpaRange::new(0x10_1000, 0x2000).unwrap())
            .unwrap();
        let after = b.resident_pages(View::Shared, all).unwrap();
        assert_eq!(after.iter().positions(), [3]);
        assert_eq!(b.allocated_bytes(View::Shared).unwrap(), 4096);
        assert_eq!(
            b.punch_stats(),
            PunchStats {
                calls: 1,
                bytes: 0x2000
            }
        );
    }

    #[test]
    fn injected_punch_failure_frees_nothing() {
        let b = RegionBacking::software(0, 0x4000).unwrap();
        let addr = b.host_addr(0).unwrap();
        // SAFETY: `addr` is the start of the live shared mapping; no reference to it exists.
        unsafe { addr.write_volatile(1) };
        b.inject_punch_failures(|_, _| true);
        let r = GpaRange::new(0, 0x4000).unwrap();
        assert!(matches!(
            b.punch_hole(View::Shared, r),
            Err(BackingError::PunchHole {
                side: View::Shared,
                ..
            })
        ));
        assert_eq!(b.allocated_bytes(View::Shared).unwrap(), 4096);
        assert!(matches!(
            b.punch_hole(View::Shared, GpaRange::new(0x4000, 0x1000).unwrap()),
            Err(BackingError::OutsideRegion { .. })
        ));
    }

    trait Positions {
        fn positions(self) -> Vec<usize>;
    }
    impl<'a, I: Iterator<Item = &'a bool>> Positions for I {
        fn positions(self) -> Vec<usize> {
            self.enumerate()
                .filter(|(_, r)| **r)
                .map(|(i, _)| i)
                .collect()
        }
    }
}
