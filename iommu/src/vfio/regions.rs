//! Checked access to a VFIO device's regions (BARs, config space) by positioned reads and
//! writes on the device fd.

use std::os::fd::BorrowedFd;

use vfio_bindings::bindings::vfio::{VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE};
use vmm_sys_util::errno;

use super::sys;

/// Where one device region lives on the device fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRegionInfo {
    /// Offset of the region on the device fd.
    pub offset: u64,
    /// Size of the region in bytes.
    pub size: u64,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
}

impl DeviceRegionInfo {
    /// The region may be read.
    pub fn readable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_READ != 0
    }
    /// The region may be written.
    pub fn writable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_WRITE != 0
    }
}

/// A region access that failed, with the region, the range and the errno.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceRegionError {
    /// The device has no such region.
    #[error("the device has no region {index}")]
    NoSuchRegion {
        /// Region index.
        index: u32,
    },
    /// The range leaves the region.
    #[error("region {index}: {len} bytes at {offset:#x} leave the region of {size:#x} bytes")]
    OutOfBounds {
        /// Region index.
        index: u32,
        /// Offset in the region.
        offset: u64,
        /// Bytes asked for.
        len: usize,
        /// Region size.
        size: u64,
    },
    /// The region does not allow this access.
    #[error("region {index} is not {access}")]
    Forbidden {
        /// Region index.
        index: u32,
        /// "readable" or "writable".
        access: &'static str,
    },
    /// The read or write on the device fd failed.
    #[error("{access} of {len} bytes at {offset:#x} of region {index} failed")]
    Io {
        /// Region index.
        index: u32,
        /// "read" or "write".
        access: &'static str,
        /// Offset in the region.
        offset: u64,
        /// Bytes asked for.
        len: usize,
        /// The errno.
        #[source]
        source: errno::Error,
    },
}

/// Checked access to a VFIO device's regions (BARs, config space) by positioned reads and
/// writes on the device fd.
pub trait DeviceRegions {
    /// Where region `index` is, or `None` when the device has no such region.
    fn region(&self, index: u32) -> Option<DeviceRegionInfo>;

    /// The VFIO device fd.
    fn device_fd(&self) -> BorrowedFd<'_>;

    /// Reads `buf.len()` bytes at `offset` of region `index`.
    ///
    /// # Errors
    /// A missing region, a range outside it, a region without read access, or the errno of
    /// the read.
    fn read_region(
        &self,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), DeviceRegionError> {
        let region = checked_region(self.region(index), index, offset, buf.len())?;
        if !region.readable() {
            return Err(DeviceRegionError::Forbidden {
                index,
                access: "readable",
            });
        }
        sys::pread_exact(self.device_fd(), buf, region.offset + offset).map_err(|source| {
            DeviceRegionError::Io {
                index,
                access: "read",
                offset,
                len: buf.len(),
                source,
            }
        })
    }

    /// Writes `buf` at `offset` of region `index`.
    ///
    /// # Errors
    /// As [`DeviceRegions::read_region`], for writing.
    fn write_region(&self, index: u32, offset: u64, buf: &[u8]) -> Result<(), DeviceRegionError> {
        let region = checked_region(self.region(index), index, offset, buf.len())?;
        if !region.writable() {
            return Err(DeviceRegionError::Forbidden {
                index,
                access: "writable",
            });
        }
        sys::pwrite_all(self.device_fd(), buf, region.offset + offset).map_err(|source| {
            DeviceRegionError::Io {
                index,
                access: "write",
                offset,
                len: buf.len(),
                source,
            }
        })
    }
}

/// Backends hand devices out as `Arc`s; drivers take any `DeviceRegions`.
impl<T: DeviceRegions + ?Sized> DeviceRegions for std::sync::Arc<T> {
    fn region(&self, index: u32) -> Option<DeviceRegionInfo> {
        (**self).region(index)
    }
    fn device_fd(&self) -> BorrowedFd<'_> {
        (**self).device_fd()
    }
    fn read_region(
        &self,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), DeviceRegionError> {
        (**self).read_region(index, offset, buf)
    }
    fn write_region(&self, index: u32, offset: u64, buf: &[u8]) -> Result<(), DeviceRegionError> {
        (**self).write_region(index, offset, buf)
    }
}

fn checked_region(
    region: Option<DeviceRegionInfo>,
    index: u32,
    offset: u64,
    len: usize,
) -> Result<DeviceRegionInfo, DeviceRegionError> {
    let region = region.ok_or(DeviceRegionError::NoSuchRegion { index })?;
    let fits = offset
        .checked_add(len as u64)
        .is_some_and(|end| end <= region.size);
    if !fits {
        return Err(DeviceRegionError::OutOfBounds {
            index,
            offset,
            len,
            size: region.size,
        });
    }
    Ok(region)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::vfio::host::tests::FakeHost;

    struct FakeRegions {
        file: fs::File,
        regions: Vec<DeviceRegionInfo>,
    }

    impl DeviceRegions for FakeRegions {
        fn region(&self, index: u32) -> Option<DeviceRegionInfo> {
            self.regions.get(index as usize).copied()
        }
        fn device_fd(&self) -> BorrowedFd<'_> {
            use std::os::fd::AsFd;
            self.file.as_fd()
        }
    }

    #[test]
    fn region_access_is_bounds_and_permission_checked() {
        let host = FakeHost::new("regions");
        let path = host.root.join("devfd");
        fs::write(&path, vec![0u8; 0x200]).unwrap();
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let dev = FakeRegions {
            file,
            regions: vec![
                DeviceRegionInfo {
                    offset: 0x100,
                    size: 0x10,
                    flags: rw,
                },
                DeviceRegionInfo {
                    offset: 0,
                    size: 0x10,
                    flags: VFIO_REGION_INFO_FLAG_READ,
                },
            ],
        };
        dev.write_region(0, 4, &0xdead_beefu32.to_le_bytes())
            .unwrap();
        let mut word = [0u8; 4];
        dev.read_region(0, 4, &mut word).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0xdead_beef);
        // It landed at region offset + 4 in the file.
        assert_eq!(&fs::read(&path).unwrap()[0x104..0x108], &word);
        assert!(matches!(
            dev.read_region(0, 0xd, &mut word),
            Err(DeviceRegionError::OutOfBounds { .. })
        ));
        assert!(matches!(
            dev.read_region(0, u64::MAX, &mut word),
            Err(DeviceRegionError::OutOfBounds { .. })
        ));
        assert!(matches!(
            dev.write_region(1, 0, &word),
            Err(DeviceRegionError::Forbidden { .. })
        ));
        assert!(matches!(
            dev.read_region(2, 0, &mut word),
            Err(DeviceRegionError::NoSuchRegion { index: 2 })
        ));
    }
}
