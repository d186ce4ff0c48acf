//! Every raw system call of this crate that its dependencies do not wrap: VFIO and IOMMUFD
//! ioctls missing from vfio-ioctls 0.10 / iommufd-ioctls 0.4, the no-IOMMU group path
//! (vfio-ioctls has none), positioned reads and writes on device fds, `mlock`/`munlock` and
//! `getrlimit`.
//!
//! Each function is safe: it takes borrowed fds and owned or borrowed Rust values, makes one
//! call, and returns the kernel's errno untouched so callers can name the step that failed.
//! The kernel structs come from vfio-bindings / iommufd-bindings; their layouts are pinned below
//! at compile time and the ioctl numbers in a test, so a bindings update that drifts from the
//! uAPI fails the build instead of corrupting an ioctl argument.

use std::ffi::CStr;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use iommufd_bindings::iommufd::{
    IOMMUFD_CMD_IOAS_IOVA_RANGES, IOMMUFD_CMD_IOAS_MAP_FILE, IOMMUFD_CMD_VFIO_IOAS, IOMMUFD_TYPE,
    iommu_ioas_iova_ranges, iommu_ioas_map, iommu_ioas_map_file, iommu_ioas_unmap,
    iommu_iova_range, iommu_vfio_ioas, iommufd_vfio_ioas_op_IOMMU_VFIO_IOAS_SET,
};
use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_TYPE, vfio_device_info, vfio_group_status, vfio_iommu_type1_dma_unmap,
    vfio_iommu_type1_info, vfio_region_info,
};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ptr};
use vmm_sys_util::ioctl_io_nr;

// VFIO: every ioctl is `_IO(VFIO_TYPE, VFIO_BASE + n)` (include/uapi/linux/vfio.h).
ioctl_io_nr!(VFIO_GET_API_VERSION, VFIO_TYPE as u32, VFIO_BASE);
ioctl_io_nr!(VFIO_CHECK_EXTENSION, VFIO_TYPE as u32, VFIO_BASE + 1);
ioctl_io_nr!(VFIO_SET_IOMMU, VFIO_TYPE as u32, VFIO_BASE + 2);
ioctl_io_nr!(VFIO_GROUP_GET_STATUS, VFIO_TYPE as u32, VFIO_BASE + 3);
ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, VFIO_TYPE as u32, VFIO_BASE + 4);
ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, VFIO_TYPE as u32, VFIO_BASE + 6);
ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 7);
ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE as u32, VFIO_BASE + 8);
ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 12);
ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 14);
// IOMMUFD: every ioctl is `_IO(IOMMUFD_TYPE, IOMMUFD_CMD_*)` (include/uapi/linux/iommufd.h).
ioctl_io_nr!(
    IOMMU_IOAS_IOVA_RANGES,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_IOAS_IOVA_RANGES
);
ioctl_io_nr!(
    IOMMU_IOAS_MAP_FILE,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_IOAS_MAP_FILE
);
ioctl_io_nr!(IOMMU_VFIO_IOAS, IOMMUFD_TYPE as u32, IOMMUFD_CMD_VFIO_IOAS);

// The uAPI layouts this module relies on (sizes and offsets from the kernel headers).
const _: () = {
    assert!(size_of::<vfio_group_status>() == 8);
    assert!(offset_of!(vfio_group_status, flags) == 4);
    assert!(size_of::<vfio_device_info>() == 24);
    assert!(offset_of!(vfio_device_info, flags) == 4);
    assert!(offset_of!(vfio_device_info, num_regions) == 8);
    assert!(offset_of!(vfio_device_info, num_irqs) == 12);
    assert!(size_of::<vfio_region_info>() == 32);
    assert!(offset_of!(vfio_region_info, flags) == 4);
    assert!(offset_of!(vfio_region_info, index) == 8);
    assert!(offset_of!(vfio_region_info, cap_offset) == 12);
    assert!(offset_of!(vfio_region_info, size) == 16);
    assert!(offset_of!(vfio_region_info, offset) == 24);
    assert!(size_of::<vfio_iommu_type1_info>() == 24);
    assert!(offset_of!(vfio_iommu_type1_info, flags) == 4);
    assert!(offset_of!(vfio_iommu_type1_info, iova_pgsizes) == 8);
    assert!(offset_of!(vfio_iommu_type1_info, cap_offset) == 16);
    assert!(size_of::<vfio_iommu_type1_dma_unmap>() == 24);
    assert!(offset_of!(vfio_iommu_type1_dma_unmap, flags) == 4);
    assert!(offset_of!(vfio_iommu_type1_dma_unmap, iova) == 8);
    assert!(offset_of!(vfio_iommu_type1_dma_unmap, size) == 16);
    assert!(size_of::<iommu_ioas_iova_ranges>() == 32);
    assert!(offset_of!(iommu_ioas_iova_ranges, ioas_id) == 4);
    assert!(offset_of!(iommu_ioas_iova_ranges, num_iovas) == 8);
    assert!(offset_of!(iommu_ioas_iova_ranges, allowed_iovas) == 16);
    assert!(offset_of!(iommu_ioas_iova_ranges, out_iova_alignment) == 24);
    assert!(size_of::<iommu_iova_range>() == 16);
    assert!(size_of::<iommu_vfio_ioas>() == 12);
    assert!(offset_of!(iommu_vfio_ioas, ioas_id) == 4);
    assert!(offset_of!(iommu_vfio_ioas, op) == 8);
    assert!(offset_of!(iommu_iova_range, last) == 8);
    // Built in iommufd.rs and handed to iommufd-ioctls' wrappers.
    assert!(size_of::<iommu_ioas_map>() == 40);
    assert!(offset_of!(iommu_ioas_map, flags) == 4);
    assert!(offset_of!(iommu_ioas_map, ioas_id) == 8);
    assert!(offset_of!(iommu_ioas_map, user_va) == 16);
    assert!(offset_of!(iommu_ioas_map, length) == 24);
    assert!(offset_of!(iommu_ioas_map, iova) == 32);
    assert!(size_of::<iommu_ioas_map_file>() == 40);
    assert!(offset_of!(iommu_ioas_map_file, fd) == 12);
    assert!(offset_of!(iommu_ioas_map_file, start) == 16);
    assert!(offset_of!(iommu_ioas_map_file, length) == 24);
    assert!(offset_of!(iommu_ioas_map_file, iova) == 32);
    assert!(size_of::<iommu_ioas_unmap>() == 24);
    assert!(offset_of!(iommu_ioas_unmap, ioas_id) == 4);
    assert!(offset_of!(iommu_ioas_unmap, iova) == 8);
    assert!(offset_of!(iommu_ioas_unmap, length) == 16);
    // Lengths and addresses travel as u64 in the uAPI; usize must fit.
    assert!(size_of::<u64>() >= size_of::<usize>());
};

/// Byte offsets inside `VFIO_IOMMU_GET_INFO`'s answer (the fixed part and its capabilities),
/// for the parser in `type1.rs`, which reads them out of a byte buffer.
pub(crate) mod type1_info_layout {
    use super::*;
    use vfio_bindings::bindings::vfio::{
        vfio_info_cap_header, vfio_iommu_type1_info_cap_iova_range,
        vfio_iommu_type1_info_dma_avail, vfio_iova_range,
    };

    pub(crate) const ARGSZ: usize = offset_of!(vfio_iommu_type1_info, argsz);
    pub(crate) const FLAGS: usize = offset_of!(vfio_iommu_type1_info, flags);
    pub(crate) const IOVA_PGSIZES: usize = offset_of!(vfio_iommu_type1_info, iova_pgsizes);
    pub(crate) const CAP_OFFSET: usize = offset_of!(vfio_iommu_type1_info, cap_offset);
    pub(crate) const FIXED_SIZE: usize = size_of::<vfio_iommu_type1_info>();
    pub(crate) const CAP_ID: usize = offset_of!(vfio_info_cap_header, id);
    pub(crate) const CAP_NEXT: usize = offset_of!(vfio_info_cap_header, next);
    pub(crate) const CAP_HEADER_SIZE: usize = size_of::<vfio_info_cap_header>();
    pub(crate) const IOVA_NR: usize = offset_of!(vfio_iommu_type1_info_cap_iova_range, nr_iovas);
    pub(crate) const IOVA_RANGES: usize =
        offset_of!(vfio_iommu_type1_info_cap_iova_range, iova_ranges);
    pub(crate) const IOVA_RANGE_SIZE: usize = size_of::<vfio_iova_range>();
    pub(crate) const IOVA_RANGE_END: usize = offset_of!(vfio_iova_range, end);
    pub(crate) const DMA_AVAIL: usize = offset_of!(vfio_iommu_type1_info_dma_avail, avail);

    const _: () = {
        assert!(FIXED_SIZE == 24 && CAP_OFFSET == 16 && IOVA_PGSIZES == 8);
        assert!(CAP_HEADER_SIZE == 8 && CAP_ID == 0 && CAP_NEXT == 4);
        assert!(IOVA_NR == 8 && IOVA_RANGES == 16 && IOVA_RANGE_SIZE == 16);
        assert!(IOVA_RANGE_END == 8 && DMA_AVAIL == 8);
    };
}

/// Borrows the fd of a vfio-ioctls / iommufd-ioctls object for the length of `&owner`.
///
/// Only for types whose `as_raw_fd` returns an fd they own and keep open for their whole
/// lifetime, which is what the three impls below promise.
pub(crate) trait OwnsFd: AsRawFd {
    fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: implementors (below) own the fd behind `as_raw_fd` and close it only when
        // dropped, which cannot happen while `&self` is borrowed.
        unsafe { BorrowedFd::borrow_raw(self.as_raw_fd()) }
    }
}
impl OwnsFd for vfio_ioctls::VfioContainer {}
impl OwnsFd for vfio_ioctls::VfioDevice {}
impl OwnsFd for iommufd_ioctls::IommuFd {}

fn check(ret: libc::c_int) -> Result<libc::c_int, errno::Error> {
    if ret < 0 {
        Err(errno::Error::last())
    } else {
        Ok(ret)
    }
}

/// `VFIO_GET_API_VERSION` on a container fd.
pub(crate) fn vfio_get_api_version(container: BorrowedFd<'_>) -> Result<i32, errno::Error> {
    // SAFETY: `container` is open for the call; this ioctl takes no argument.
    check(unsafe { ioctl(&container, VFIO_GET_API_VERSION()) })
}

/// `VFIO_CHECK_EXTENSION`: `Ok(true)` when the container supports IOMMU type `extension`.
pub(crate) fn vfio_check_extension(
    container: BorrowedFd<'_>,
    extension: u32,
) -> Result<bool, errno::Error> {
    // SAFETY: `container` is open for the call; the argument is a plain integer.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_val(
            &container,
            VFIO_CHECK_EXTENSION(),
            libc::c_ulong::from(extension),
        )
    };
    check(ret).map(|r| r > 0)
}

/// `VFIO_SET_IOMMU`: selects the IOMMU driver of a container that has a group attached.
pub(crate) fn vfio_set_iommu(
    container: BorrowedFd<'_>,
    iommu_type: u32,
) -> Result<(), errno::Error> {
    // SAFETY: `container` is open for the call; the argument is a plain integer.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_val(
            &container,
            VFIO_SET_IOMMU(),
            libc::c_ulong::from(iommu_type),
        )
    };
    check(ret).map(drop)
}

/// `VFIO_GROUP_GET_STATUS`: the group's `VFIO_GROUP_FLAGS_*`.
pub(crate) fn vfio_group_get_status(group: BorrowedFd<'_>) -> Result<u32, errno::Error> {
    let mut status = vfio_group_status {
        argsz: size_of::<vfio_group_status>() as u32,
        flags: 0,
    };
    // SAFETY: `group` is open; `status` is a valid, exclusively borrowed struct of the size
    // `argsz` announces, which the kernel writes.
    check(unsafe { ioctl_with_mut_ref(&group, VFIO_GROUP_GET_STATUS(), &mut status) })?;
    Ok(status.flags)
}

/// `VFIO_GROUP_SET_CONTAINER`: attaches `group` to `container`.
pub(crate) fn vfio_group_set_container(
    group: BorrowedFd<'_>,
    container: BorrowedFd<'_>,
) -> Result<(), errno::Error> {
    let container_fd: libc::c_int = container.as_raw_fd();
    // SAFETY: `group` is open; the kernel reads one int (an fd that stays open because
    // `container` is borrowed for the call) through the pointer.
    check(unsafe { ioctl_with_ptr(&group, VFIO_GROUP_SET_CONTAINER(), &container_fd) }).map(drop)
}

/// `VFIO_GROUP_GET_DEVICE_FD`: opens the device called `name` (e.g. `0000:00:03.0`).
pub(crate) fn vfio_group_get_device_fd(
    group: BorrowedFd<'_>,
    name: &CStr,
) -> Result<OwnedFd, errno::Error> {
    // SAFETY: `group` is open; the kernel reads a NUL-terminated string that `name` keeps alive.
    let fd = check(unsafe { ioctl_with_ptr(&group, VFIO_GROUP_GET_DEVICE_FD(), name.as_ptr()) })?;
    // SAFETY: on success the return value is a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `VFIO_DEVICE_GET_INFO` (the fixed part; capabilities are not needed here).
pub(crate) fn vfio_device_get_info(
    device: BorrowedFd<'_>,
) -> Result<vfio_device_info, errno::Error> {
    let mut info = vfio_device_info {
        argsz: size_of::<vfio_device_info>() as u32,
        ..Default::default()
    };
    // SAFETY: `device` is open; `info` is exclusively borrowed and `argsz` bytes long.
    check(unsafe { ioctl_with_mut_ref(&device, VFIO_DEVICE_GET_INFO(), &mut info) })?;
    Ok(info)
}

/// `VFIO_DEVICE_GET_REGION_INFO` for region `index` (the fixed part).
pub(crate) fn vfio_device_get_region_info(
    device: BorrowedFd<'_>,
    index: u32,
) -> Result<vfio_region_info, errno::Error> {
    let mut info = vfio_region_info {
        argsz: size_of::<vfio_region_info>() as u32,
        index,
        ..Default::default()
    };
    // SAFETY: `device` is open; `info` is exclusively borrowed and `argsz` bytes long; with
    // that argsz the kernel writes no capability data beyond it.
    check(unsafe { ioctl_with_mut_ref(&device, VFIO_DEVICE_GET_REGION_INFO(), &mut info) })?;
    Ok(info)
}

/// `VFIO_IOMMU_GET_INFO` with its capability chain: the raw bytes of the answer.
///
/// The kernel reports in `argsz` how large a buffer the capabilities need; ask once with the
/// fixed size, then again with that size.
pub(crate) fn vfio_iommu_get_info(container: BorrowedFd<'_>) -> Result<Vec<u8>, errno::Error> {
    use type1_info_layout::{ARGSZ, FIXED_SIZE};
    let mut argsz = FIXED_SIZE;
    for _ in 0..4 {
        // u64 words keep the buffer 8-byte aligned like the struct.
        let mut buf = vec![0u64; argsz.div_ceil(8)];
        // argsz is the struct's first u32: the first four bytes of word 0, whatever the
        // host's byte order.
        let mut first = [0u8; 8];
        first[ARGSZ..ARGSZ + 4].copy_from_slice(&(argsz as u32).to_ne_bytes());
        buf[0] = u64::from_ne_bytes(first);
        // SAFETY: `container` is open; `buf` is exclusively borrowed, 8-byte aligned, at least
        // `argsz` bytes long, and `argsz` (its first u32) tells the kernel not to write more.
        check(unsafe { ioctl_with_mut_ptr(&container, VFIO_IOMMU_GET_INFO(), buf.as_mut_ptr()) })?;
        let out: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let wanted =
            u32::from_ne_bytes([out[ARGSZ], out[ARGSZ + 1], out[ARGSZ + 2], out[ARGSZ + 3]])
                as usize;
        if wanted <= argsz {
            let mut out = out;
            out.truncate(argsz);
            return Ok(out);
        }
        argsz = wanted;
    }
    // The chain kept growing between calls; give up rather than loop.
    Err(errno::Error::new(libc::EAGAIN))
}

/// `VFIO_IOMMU_UNMAP_DMA`: returns the number of bytes the kernel unmapped. On a type1
/// container; or on an iommufd whose compat IOAS was chosen with [`iommu_vfio_ioas_set`], where
/// with type1 (v1) semantics it cuts the areas at both ends first.
///
/// Written here rather than using `VfioContainer::vfio_dma_unmap` because that one reports a
/// size mismatch only as `InvalidDmaUnmapSize` without the size, and passes the struct the
/// kernel writes through a shared reference.
pub(crate) fn vfio_iommu_unmap_dma(
    container: BorrowedFd<'_>,
    iova: u64,
    size: u64,
) -> Result<u64, errno::Error> {
    let mut unmap = vfio_iommu_type1_dma_unmap {
        argsz: size_of::<vfio_iommu_type1_dma_unmap>() as u32,
        flags: 0,
        iova,
        size,
        ..Default::default()
    };
    // SAFETY: `container` is open; `unmap` is exclusively borrowed, `argsz` bytes long, and
    // with flags 0 the kernel reads no trailing data and writes back only `size`.
    check(unsafe { ioctl_with_mut_ref(&container, VFIO_IOMMU_UNMAP_DMA(), &mut unmap) })?;
    Ok(unmap.size)
}

/// `IOMMU_IOAS_IOVA_RANGES`: the usable IOVA ranges of `ioas_id` and the IOVA alignment.
///
/// The kernel answers `EMSGSIZE` with the needed `num_iovas` when the array is too small.
pub(crate) fn iommu_ioas_iova_ranges(
    iommufd: BorrowedFd<'_>,
    ioas_id: u32,
) -> Result<(Vec<iommu_iova_range>, u64), errno::Error> {
    let mut ranges: Vec<iommu_iova_range> = Vec::new();
    for _ in 0..4 {
        let mut cmd = iommu_ioas_iova_ranges {
            size: size_of::<iommu_ioas_iova_ranges>() as u32,
            ioas_id,
            num_iovas: ranges.len() as u32,
            __reserved: 0,
            allowed_iovas: ranges.as_mut_ptr() as u64,
            out_iova_alignment: 0,
        };
        // SAFETY: `iommufd` is open; `cmd` is exclusively borrowed; `allowed_iovas` points to
        // `num_iovas` writable, exclusively owned entries of the kernel's layout (or is unused
        // when 0), and the kernel never writes more than `num_iovas` of them.
        let ret = unsafe { ioctl_with_mut_ref(&iommufd, IOMMU_IOAS_IOVA_RANGES(), &mut cmd) };
        if ret == 0 {
            ranges.truncate(cmd.num_iovas as usize);
            return Ok((ranges, cmd.out_iova_alignment));
        }
        let err = errno::Error::last();
        if err.errno() != libc::EMSGSIZE {
            return Err(err);
        }
        ranges = vec![iommu_iova_range::default(); cmd.num_iovas as usize];
    }
    Err(errno::Error::new(libc::EAGAIN))
}

/// `IOMMU_VFIO_IOAS` with op SET: makes `ioas_id` the IOAS that the VFIO container ioctls on this
/// iommufd (`VFIO_SET_IOMMU`, `VFIO_IOMMU_UNMAP_DMA`, ...) act on.
pub(crate) fn iommu_vfio_ioas_set(
    iommufd: BorrowedFd<'_>,
    ioas_id: u32,
) -> Result<(), errno::Error> {
    let mut cmd = iommu_vfio_ioas {
        size: size_of::<iommu_vfio_ioas>() as u32,
        ioas_id,
        op: iommufd_vfio_ioas_op_IOMMU_VFIO_IOAS_SET as u16,
        __reserved: 0,
    };
    // SAFETY: `iommufd` is open; `cmd` is exclusively borrowed and `size` bytes long; for SET
    // the kernel only reads it.
    check(unsafe { ioctl_with_mut_ref(&iommufd, IOMMU_VFIO_IOAS(), &mut cmd) }).map(drop)
}

/// Asks whether the kernel knows `IOMMU_IOAS_MAP_FILE` (Linux 6.13+) without mapping anything.
///
/// It sends the ioctl with `size = 0`: a kernel that knows the command rejects the too-small
/// struct with `EINVAL` before looking at anything else; one that does not answers `ENOTTY`.
pub(crate) fn iommu_ioas_map_file_known(iommufd: BorrowedFd<'_>) -> Result<bool, errno::Error> {
    let mut size: u32 = 0;
    // SAFETY: `iommufd` is open; the kernel reads the leading u32 `size` (0) and stops there,
    // because every iommufd command needs more than 0 bytes.
    let ret = unsafe { ioctl_with_mut_ref(&iommufd, IOMMU_IOAS_MAP_FILE(), &mut size) };
    if ret == 0 {
        return Ok(true);
    }
    match errno::Error::last().errno() {
        libc::ENOTTY => Ok(false),
        libc::EINVAL => Ok(true),
        other => Err(errno::Error::new(other)),
    }
}

/// Reads exactly `buf.len()` bytes at `offset` of `fd` (a VFIO device region, usually).
pub(crate) fn pread_exact(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), errno::Error> {
    let offset = libc::off_t::try_from(offset).map_err(|_| errno::Error::new(libc::EINVAL))?;
    // SAFETY: `fd` is open; the kernel writes at most `buf.len()` bytes into `buf`, which is
    // exclusively borrowed.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset) };
    match n {
        n if n < 0 => Err(errno::Error::last()),
        n if n as usize != buf.len() => Err(errno::Error::new(libc::EIO)),
        _ => Ok(()),
    }
}

/// Writes all of `buf` at `offset` of `fd`.
pub(crate) fn pwrite_all(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> Result<(), errno::Error> {
    let offset = libc::off_t::try_from(offset).map_err(|_| errno::Error::new(libc::EINVAL))?;
    // SAFETY: `fd` is open; the kernel reads at most `buf.len()` bytes from `buf`.
    let n = unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset) };
    match n {
        n if n < 0 => Err(errno::Error::last()),
        n if n as usize != buf.len() => Err(errno::Error::new(libc::EIO)),
        _ => Ok(()),
    }
}

/// `mlock(2)`: faults in and locks `[addr, addr + len)`. Only touches page tables, never the
/// bytes, so it is sound for any address (an unmapped one gives `ENOMEM`).
pub(crate) fn mlock(addr: *const u8, len: usize) -> Result<(), errno::Error> {
    // SAFETY: mlock does not read or write the memory through Rust; invalid ranges are
    // reported by the kernel as errors.
    check(unsafe { libc::mlock(addr.cast(), len) }).map(drop)
}

/// `munlock(2)`: the inverse of [`mlock`].
pub(crate) fn munlock(addr: *const u8, len: usize) -> Result<(), errno::Error> {
    // SAFETY: as for `mlock`: only page-table state changes.
    check(unsafe { libc::munlock(addr.cast(), len) }).map(drop)
}

/// `getrlimit(RLIMIT_MEMLOCK)`: `(soft, hard)` in bytes, `None` meaning unlimited.
pub(crate) fn memlock_limit() -> Result<(Option<u64>, Option<u64>), errno::Error> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, exclusively borrowed rlimit the kernel fills in.
    check(unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) })?;
    let finite = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v);
    Ok((finite(limit.rlim_cur), finite(limit.rlim_max)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_uapi_headers() {
        // include/uapi/linux/vfio.h: _IO(';', 100 + n)
        assert_eq!(VFIO_GET_API_VERSION(), 0x3b64);
        assert_eq!(VFIO_CHECK_EXTENSION(), 0x3b65);
        assert_eq!(VFIO_SET_IOMMU(), 0x3b66);
        assert_eq!(VFIO_GROUP_GET_STATUS(), 0x3b67);
        assert_eq!(VFIO_GROUP_SET_CONTAINER(), 0x3b68);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD(), 0x3b6a);
        assert_eq!(VFIO_DEVICE_GET_INFO(), 0x3b6b);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO(), 0x3b6c);
        assert_eq!(VFIO_IOMMU_GET_INFO(), 0x3b70);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA(), 0x3b72);
        // include/uapi/linux/iommufd.h: _IO(';', 0x80 + n)
        assert_eq!(IOMMU_IOAS_IOVA_RANGES(), 0x3b84);
        assert_eq!(IOMMU_IOAS_MAP_FILE(), 0x3b8f);
        assert_eq!(IOMMU_VFIO_IOAS(), 0x3b88);
    }

    #[test]
    fn wrappers_report_ebadf_on_a_closed_fd() {
        // An fd number far above anything this test process opens.
        // SAFETY: the fd is only used for syscalls that fail with EBADF; nothing is closed.
        let bad = unsafe { BorrowedFd::borrow_raw(1 << 20) };
        assert_eq!(vfio_get_api_version(bad).unwrap_err().errno(), libc::EBADF);
        assert_eq!(
            vfio_iommu_unmap_dma(bad, 0, 4096).unwrap_err().errno(),
            libc::EBADF
        );
        assert_eq!(vfio_iommu_get_info(bad).unwrap_err().errno(), libc::EBADF);
        assert_eq!(
            iommu_ioas_iova_ranges(bad, 1).unwrap_err().errno(),
            libc::EBADF
        );
        assert_eq!(
            iommu_vfio_ioas_set(bad, 1).unwrap_err().errno(),
            libc::EBADF
        );
        let mut buf = [0u8; 4];
        assert_eq!(
            pread_exact(bad, &mut buf, 0).unwrap_err().errno(),
            libc::EBADF
        );
    }

    #[test]
    fn memlock_limit_reads_the_process_limit() {
        let (soft, hard) = memlock_limit().unwrap();
        if let (Some(s), Some(h)) = (soft, hard) {
            assert!(s <= h);
        }
    }

    #[test]
    fn mlock_of_an_unmapped_range_is_an_error_not_a_crash() {
        // Page 0 is never mapped in a Linux process.
        assert_eq!(
            mlock(std::ptr::null(), 4096).unwrap_err().errno(),
            libc::ENOMEM
        );
    }
}
