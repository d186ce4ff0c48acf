//! Every KVM constant kvm-ioctls 0.25 / kvm-bindings 0.14 lack, and every raw system call this
//! crate makes (memfd, fallocate, lseek, mincore, guest_memfd creation), each behind one safe
//! function. This is the only module with `unsafe` system calls; the layout of each kernel struct
//! we pass and each number we hard-code is pinned by a test against the uAPI headers.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use kvm_bindings::{kvm_create_guest_memfd, kvm_userspace_memory_region2};
use kvm_ioctls::VmFd;
use vmm_sys_util::errno;

/// `GUEST_MEMFD_FLAG_MMAP` (Linux 6.18): the guest_memfd can be mmap'ed by the host.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED` (Linux 6.18): every page starts shared (host-faultable).
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
/// `KVM_CAP_GUEST_MEMFD_FLAGS` (Linux 6.18): `KVM_CHECK_EXTENSION` on a VM returns the flag mask
/// `KVM_CREATE_GUEST_MEMFD` accepts for that VM.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;
/// `KVM_HC_MAP_GPA_RANGE` (`include/uapi/linux/kvm_para.h`): the guest asks to convert a range.
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;
/// Page-size field of the hypercall's `attrs` argument (bits 0-1).
pub const KVM_MAP_GPA_RANGE_PAGE_SZ_MASK: u64 = 0b11;
/// `attrs` page size 4 KiB.
pub const KVM_MAP_GPA_RANGE_PAGE_SZ_4K: u64 = 0;
/// `attrs` page size 2 MiB.
pub const KVM_MAP_GPA_RANGE_PAGE_SZ_2M: u64 = 1 << 0;
/// `attrs` page size 1 GiB.
pub const KVM_MAP_GPA_RANGE_PAGE_SZ_1G: u64 = 1 << 1;
/// `attrs` bit: the range becomes encrypted (private). Clear means decrypted (shared).
pub const KVM_MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;

/// Creates a guest_memfd of `size` bytes on `vm` with `flags` (`KVM_CREATE_GUEST_MEMFD`).
///
/// kvm-ioctls returns a bare `RawFd`; this takes ownership at once so the fd cannot leak.
pub fn create_guest_memfd(vm: &VmFd, size: u64, flags: u64) -> Result<OwnedFd, errno::Error> {
    let args = kvm_create_guest_memfd {
        size,
        flags,
        ..Default::default()
    };
    let raw = vm.create_guest_memfd(args)?;
    // SAFETY: on success KVM_CREATE_GUEST_MEMFD returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Binds `[gpa, gpa + size)` of `vm` to host memory at `userspace_addr` (shared side) and to
/// `[gmem_offset, gmem_offset + size)` of `guest_memfd` (private side)
/// (`KVM_SET_USER_MEMORY_REGION2` with `KVM_MEM_GUEST_MEMFD`).
///
/// # Safety
/// `[userspace_addr, userspace_addr + size)` must stay mapped in this process until the slot is
/// deleted or replaced: the guest reads and writes it at any time. `guest_memfd` must have been
/// created on `vm`.
pub unsafe fn set_guest_memfd_memslot(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    size: u64,
    userspace_addr: u64,
    guest_memfd: BorrowedFd<'_>,
    gmem_offset: u64,
) -> Result<(), errno::Error> {
    let region = kvm_userspace_memory_region2 {
        slot,
        flags: kvm_bindings::KVM_MEM_GUEST_MEMFD,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr,
        guest_memfd_offset: gmem_offset,
        guest_memfd: guest_memfd.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the caller keeps the host range mapped for the slot's life and created the
    // guest_memfd on this VM, which is everything KVM_SET_USER_MEMORY_REGION2 relies on.
    unsafe { vm.set_user_memory_region2(region) }
}

vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION2,
    kvm_bindings::KVMIO,
    0x49,
    kvm_userspace_memory_region2
);

/// Deletes KVM memslot `slot` of the VM `vm` (`KVM_SET_USER_MEMORY_REGION2` with size 0), after
/// which KVM no longer uses the memory the slot pointed at. Takes the VM's fd (any duplicate
/// of it), so a backing can delete its slot from `Drop`.
pub fn delete_memslot(vm: BorrowedFd<'_>, slot: u32) -> Result<(), errno::Error> {
    let region = kvm_userspace_memory_region2 {
        slot,
        ..Default::default()
    };
    // SAFETY: `vm` is an open fd for the call; `region` is a fully initialised struct the
    // kernel only reads; a region of size 0 deletes the slot, so KVM dereferences no host
    // address for it. The result is checked below.
    let ret =
        unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&vm, KVM_SET_USER_MEMORY_REGION2(), &region) };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

/// Creates an anonymous shared-memory file (`memfd_create(MFD_CLOEXEC)`) of `size` bytes.
pub fn memfd_create(name: &CStr, size: u64) -> Result<OwnedFd, errno::Error> {
    let len = libc::off_t::try_from(size).map_err(|_| errno::Error::new(libc::EFBIG))?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call; the
    // return value is checked below.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(errno::Error::last());
    }
    // SAFETY: memfd_create returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `fd` is open for the whole call; ftruncate only changes the file size.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } < 0 {
        return Err(errno::Error::last());
    }
    Ok(fd)
}

/// Frees `[offset, offset + len)` of `fd` without changing its size
/// (`fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`). Works on memfd and guest_memfd
/// (which requires page-aligned offset and length).
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<(), errno::Error> {
    let off = libc::off_t::try_from(offset).map_err(|_| errno::Error::new(libc::EINVAL))?;
    let n = libc::off_t::try_from(len).map_err(|_| errno::Error::new(libc::EINVAL))?;
    // SAFETY: `fd` is open for the whole call; fallocate only touches the file's pages.
    let ret = unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        )
    };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

/// Bytes of memory the file holds (`fstat` `st_blocks * 512`). shmem/memfd count their pages;
/// guest_memfd (Linux 6.18) reports 0 whatever it holds.
pub fn allocated_bytes(fd: BorrowedFd<'_>) -> Result<u64, errno::Error> {
    Ok(u64::try_from(fstat(fd)?.st_blocks).unwrap_or(0) * 512)
}

/// The file's size in bytes (`fstat` `st_size`).
pub fn file_size(fd: BorrowedFd<'_>) -> Result<u64, errno::Error> {
    Ok(u64::try_from(fstat(fd)?.st_size).unwrap_or(0))
}

fn fstat(fd: BorrowedFd<'_>) -> Result<libc::stat, errno::Error> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `fd` is open; `st` is a writable stat buffer of the right size.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } < 0 {
        return Err(errno::Error::last());
    }
    // SAFETY: fstat succeeded, so it filled the whole struct (and it was zeroed before).
    Ok(unsafe { st.assume_init() })
}

/// `TMPFS_MAGIC` (`include/uapi/linux/magic.h`): shmem, which memfds live on.
pub const TMPFS_MAGIC: i64 = 0x0102_1994;
/// `HUGETLBFS_MAGIC` (`include/uapi/linux/magic.h`): hugetlbfs, and `MFD_HUGETLB` memfds.
pub const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// The magic number of the filesystem holding the file (`fstatfs` `f_type`).
pub fn fs_magic(fd: BorrowedFd<'_>) -> Result<i64, errno::Error> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `fd` is open; `st` is a writable statfs buffer of the right size.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) } < 0 {
        return Err(errno::Error::last());
    }
    // SAFETY: fstatfs succeeded, so it filled the whole struct (and it was zeroed before).
    let st = unsafe { st.assume_init() };
    // `f_type` is `__fsword_t`, whose width differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

/// The file's seals (`fcntl(F_GET_SEALS)`); 0 for a file that cannot be sealed (`EINVAL`).
pub fn seals(fd: BorrowedFd<'_>) -> Result<i32, errno::Error> {
    // SAFETY: `fd` is open; F_GET_SEALS takes no argument and only reads the file's seals.
    let ret = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if ret < 0 {
        let err = errno::Error::last();
        return if err.errno() == libc::EINVAL {
            Ok(0)
        } else {
            Err(err)
        };
    }
    Ok(ret)
}

/// Whether the file was opened for reading and writing (`fcntl(F_GETFL)`).
pub fn is_read_write(fd: BorrowedFd<'_>) -> Result<bool, errno::Error> {
    // SAFETY: `fd` is open; F_GETFL takes no argument and only reads the status flags.
    let ret = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(ret & libc::O_ACCMODE == libc::O_RDWR)
}

/// Start of the first range of data at or after `offset` (`lseek(SEEK_DATA)`), `None` when only
/// a hole follows. shmem treats pages never written as holes.
pub fn seek_data(fd: BorrowedFd<'_>, offset: u64) -> Result<Option<u64>, errno::Error> {
    seek(fd, offset, libc::SEEK_DATA)
}

/// Start of the first hole at or after `offset` (`lseek(SEEK_HOLE)`), `None` past the end.
pub fn seek_hole(fd: BorrowedFd<'_>, offset: u64) -> Result<Option<u64>, errno::Error> {
    seek(fd, offset, libc::SEEK_HOLE)
}

fn seek(fd: BorrowedFd<'_>, offset: u64, whence: i32) -> Result<Option<u64>, errno::Error> {
    let off = libc::off_t::try_from(offset).map_err(|_| errno::Error::new(libc::EINVAL))?;
    // SAFETY: `fd` is open for the whole call; lseek only moves the file position.
    let ret = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if ret < 0 {
        let err = errno::Error::last();
        // ENXIO: no data (or hole) at or after `offset`.
        return if err.errno() == libc::ENXIO {
            Ok(None)
        } else {
            Err(err)
        };
    }
    Ok(Some(ret as u64))
}

/// Which pages of `[addr, addr + len)` of this process are resident in the page cache
/// (`mincore`). `addr` must be page-aligned and the range mapped.
pub fn resident_pages(addr: *const u8, len: usize) -> Result<Vec<bool>, errno::Error> {
    let pages = len.div_ceil(page_size());
    let mut vec = vec![0u8; pages];
    // SAFETY: mincore only writes one byte per page into `vec`, which has exactly that many
    // bytes; it reads no memory at `addr` (it queries page tables and the page cache).
    if unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) } < 0 {
        return Err(errno::Error::last());
    }
    Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
}

/// The host base page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;
    use kvm_bindings::kvm_memory_attributes;

    #[test]
    fn kernel_struct_layouts_match_the_uapi_headers() {
        // include/uapi/linux/kvm.h
        assert_eq!(size_of::<kvm_create_guest_memfd>(), 64);
        assert_eq!(offset_of!(kvm_create_guest_memfd, flags), 8);
        assert_eq!(size_of::<kvm_userspace_memory_region2>(), 160);
        assert_eq!(offset_of!(kvm_userspace_memory_region2, userspace_addr), 24);
        assert_eq!(
            offset_of!(kvm_userspace_memory_region2, guest_memfd_offset),
            32
        );
        assert_eq!(offset_of!(kvm_userspace_memory_region2, guest_memfd), 40);
        assert_eq!(size_of::<kvm_memory_attributes>(), 32);
        assert_eq!(offset_of!(kvm_memory_attributes, attributes), 16);
    }

    #[test]
    fn constants_match_the_uapi_headers() {
        assert_eq!(GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED, 3);
        assert_eq!(KVM_CAP_GUEST_MEMFD_FLAGS, 244);
        assert_eq!(KVM_HC_MAP_GPA_RANGE, 12);
        // _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2), 160 bytes.
        assert_eq!(KVM_SET_USER_MEMORY_REGION2(), 0x40a0_ae49);
        assert_eq!(
            [
                KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
                KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
                KVM_MAP_GPA_RANGE_PAGE_SZ_1G,
                KVM_MAP_GPA_RANGE_ENCRYPTED
            ],
            [0, 1, 2, 16]
        );
        // The ones kvm-bindings has, pinned because the engine relies on their values.
        assert_eq!(kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE, 8);
        assert_eq!(kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE, 8);
        assert_eq!(kvm_bindings::KVM_MEM_GUEST_MEMFD, 4);
        assert_eq!(kvm_bindings::KVM_CAP_MEMORY_ATTRIBUTES, 233);
        assert_eq!(kvm_bindings::KVM_CAP_GUEST_MEMFD, 234);
        assert_eq!(kvm_bindings::KVM_CAP_VM_TYPES, 235);
        assert_eq!(kvm_bindings::KVM_X86_SW_PROTECTED_VM, 1);
    }

    #[test]
    fn memfd_punch_hole_frees_written_pages() {
        let fd = memfd_create(c"sys-test", 1 << 20).unwrap();
        let page = vec![0xa5u8; 4096];
        for i in 0..4 {
            // SAFETY: `fd` is open; `page` is a readable buffer of the length passed.
            let n =
                unsafe { libc::pwrite(fd.as_raw_fd(), page.as_ptr().cast(), page.len(), i * 4096) };
            assert_eq!(n, 4096);
        }
        assert_eq!(allocated_bytes(fd.as_fd()).unwrap(), 4 * 4096);
        assert_eq!(seek_data(fd.as_fd(), 0).unwrap(), Some(0));
        punch_hole(fd.as_fd(), 0, 2 * 4096).unwrap();
        assert_eq!(allocated_bytes(fd.as_fd()).unwrap(), 2 * 4096);
        assert_eq!(seek_data(fd.as_fd(), 0).unwrap(), Some(2 * 4096));
        assert_eq!(seek_hole(fd.as_fd(), 2 * 4096).unwrap(), Some(4 * 4096));
    }

    use std::os::fd::AsFd;
}
