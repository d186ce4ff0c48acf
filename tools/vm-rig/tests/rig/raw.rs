//! The two VFIO ioctls this test needs that vfio-ioctls does not expose (it keeps its syscall
//! module private): the container's API version and extension check, used to prove no-IOMMU mode.
//! Both take no structure, so only their numbers need pinning.

use std::fs::File;

use vmm_sys_util::ioctl::{ioctl, ioctl_with_val};
use vmm_sys_util::ioctl_io_nr;

const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;

ioctl_io_nr!(VFIO_GET_API_VERSION, VFIO_TYPE, VFIO_BASE);
ioctl_io_nr!(VFIO_CHECK_EXTENSION, VFIO_TYPE, VFIO_BASE + 1);

/// `VFIO_GET_API_VERSION` on a container fd (the kernel answers 0, `VFIO_API_VERSION`).
pub fn api_version(container: &File) -> i32 {
    // SAFETY: VFIO_GET_API_VERSION takes no argument and only returns a number; `container`
    // is an open file for the duration of the call.
    unsafe { ioctl(container, VFIO_GET_API_VERSION()) }
}

/// `VFIO_CHECK_EXTENSION`: 1 when the container supports IOMMU model `extension`.
pub fn check_extension(container: &File, extension: u32) -> i32 {
    // SAFETY: VFIO_CHECK_EXTENSION takes its argument by value and only returns a number;
    // `container` is an open file for the duration of the call.
    unsafe { ioctl_with_val(container, VFIO_CHECK_EXTENSION(), extension.into()) }
}

#[test]
fn vfio_ioctl_numbers_match_the_kernel() {
    // include/uapi/linux/vfio.h: _IO(VFIO_TYPE, VFIO_BASE + 0) and _IO(VFIO_TYPE, VFIO_BASE + 1).
    assert_eq!(VFIO_GET_API_VERSION(), 0x3b64);
    assert_eq!(VFIO_CHECK_EXTENSION(), 0x3b65);
}
