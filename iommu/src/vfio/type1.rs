//! VFIO type1v2: one container (`/dev/vfio/vfio`) with one or more groups attached.
//!
//! A [`Type1Backend`] exists only once a device's group is attached and `VFIO_SET_IOMMU`
//! succeeded (vfio-ioctls does both when the first device opens), and it keeps every device it
//! opened attached for its whole life: the kernel drops a container's IOMMU, and every
//! mapping, when its last group leaves. So no method can be called "too early" or "too late".
//!
//! Maps go through vfio-ioctls' `VfioContainer`, which maps read+write only: a read-only or
//! write-only request is refused as unsupported rather than silently granted write access.
//! Unmaps and `VFIO_IOMMU_GET_INFO` are raw ioctls in [`sys`](super::sys) (see there why).

use std::fmt;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioOps};
use vmm_sys_util::errno;

use super::sys::{self, OwnsFd, type1_info_layout as L};
use super::{AttachedDevices, HostPaths, OpenError, PciAddress, VfioMode, VfioPciDevice};
use crate::backend::{
    BackendKind, Capabilities, DmaBackend, DmaError, DmaProt, FileMapSupport, IovaRange,
    check_aligned, checked_unmapped,
};

const KIND: BackendKind = BackendKind::Type1;

/// What `VFIO_IOMMU_GET_INFO` says about a type1 container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Type1Info {
    /// Bitmap of supported IOMMU page sizes (0 when the kernel did not report them).
    pub page_sizes: u64,
    /// Usable IOVA ranges (`VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`); empty when not reported.
    pub iova_ranges: Vec<IovaRange>,
    /// How many more mappings the container accepts (`VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL`);
    /// `None` on kernels before 5.10, which do not report it.
    pub dma_avail: Option<u32>,
}

/// Why a `VFIO_IOMMU_GET_INFO` answer could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InfoParseError {
    /// Shorter than the fixed struct.
    Short,
    /// A capability header or body runs past the end.
    Truncated,
    /// A `next` offset points backwards or into the fixed part: the chain would loop.
    BadNext,
}

impl InfoParseError {
    fn describe(self) -> &'static str {
        match self {
            InfoParseError::Short => "VFIO_IOMMU_GET_INFO (answer shorter than the fixed struct)",
            InfoParseError::Truncated => {
                "VFIO_IOMMU_GET_INFO (a capability runs past the end of the answer)"
            }
            InfoParseError::BadNext => "VFIO_IOMMU_GET_INFO (capability chain points backwards)",
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, InfoParseError> {
    let bytes = b.get(at..at + 4).ok_or(InfoParseError::Truncated)?;
    Ok(u32::from_ne_bytes(
        bytes.try_into().map_err(|_| InfoParseError::Truncated)?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, InfoParseError> {
    let bytes = b.get(at..at + 8).ok_or(InfoParseError::Truncated)?;
    Ok(u64::from_ne_bytes(
        bytes.try_into().map_err(|_| InfoParseError::Truncated)?,
    ))
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, InfoParseError> {
    let bytes = b.get(at..at + 2).ok_or(InfoParseError::Truncated)?;
    Ok(u16::from_ne_bytes(
        bytes.try_into().map_err(|_| InfoParseError::Truncated)?,
    ))
}

/// Parses a `VFIO_IOMMU_GET_INFO` answer: the fixed `vfio_iommu_type1_info` and its capability
/// chain (`vfio_info_cap_header { id, version, next }`, `next` an offset from the start of the
/// answer, 0 ending the chain). Unknown capabilities are skipped.
pub(crate) fn parse_type1_info(b: &[u8]) -> Result<Type1Info, InfoParseError> {
    use vfio_bindings::bindings::vfio::{
        VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
        VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL,
    };
    if b.len() < L::FIXED_SIZE {
        return Err(InfoParseError::Short);
    }
    let flags = u32_at(b, L::FLAGS)?;
    let mut info = Type1Info {
        page_sizes: if flags & VFIO_IOMMU_INFO_PGSIZES != 0 {
            u64_at(b, L::IOVA_PGSIZES)?
        } else {
            0
        },
        iova_ranges: Vec::new(),
        dma_avail: None,
    };
    if flags & VFIO_IOMMU_INFO_CAPS == 0 {
        return Ok(info);
    }
    let mut at = u32_at(b, L::CAP_OFFSET)? as usize;
    let mut floor = L::FIXED_SIZE;
    while at != 0 {
        // The kernel lays capabilities out one after another; an offset that does not move
        // forward would make the walk loop.
        if at < floor {
            return Err(InfoParseError::BadNext);
        }
        if at + L::CAP_HEADER_SIZE > b.len() {
            return Err(InfoParseError::Truncated);
        }
        let id = u16_at(b, at + L::CAP_ID)?;
        let next = u32_at(b, at + L::CAP_NEXT)? as usize;
        match u32::from(id) {
            VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE => {
                let nr = u32_at(b, at + L::IOVA_NR)? as usize;
                for i in 0..nr {
                    let range = at + L::IOVA_RANGES + i * L::IOVA_RANGE_SIZE;
                    // `end` is inclusive in the uAPI, like our `last`.
                    info.iova_ranges.push(IovaRange {
                        start: u64_at(b, range)?,
                        last: u64_at(b, range + L::IOVA_RANGE_END)?,
                    });
                }
            }
            VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL => info.dma_avail = Some(u32_at(b, at + L::DMA_AVAIL)?),
            _ => {}
        }
        floor = at + L::CAP_HEADER_SIZE;
        at = next;
    }
    Ok(info)
}

/// A VFIO type1v2 container with at least one device attached.
pub struct Type1Backend {
    // Field order is drop order: devices leave the container before it closes.
    devices: AttachedDevices,
    container: Arc<VfioContainer>,
    min_page: u64,
}

impl fmt::Debug for Type1Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Type1Backend")
            .field("devices", &self.devices)
            .field("min_page", &self.min_page)
            .finish_non_exhaustive()
    }
}

impl Type1Backend {
    /// Opens a new container, attaches `address`'s group (which selects type1v2) and opens
    /// the device.
    ///
    /// # Errors
    /// [`OpenError::Device`] when sysfs shows the device cannot be used (naming the fix), or
    /// the vfio-ioctls step that failed.
    pub fn open(address: &PciAddress) -> Result<(Type1Backend, Arc<VfioPciDevice>), OpenError> {
        let usable = HostPaths::default().check(address, VfioMode::Type1)?;
        let container = VfioContainer::new(None).map_err(|source| OpenError::Vfio {
            address: *address,
            step: "opening /dev/vfio/vfio with type1v2",
            source,
        })?;
        let container = Arc::new(container);
        let device = open_device(address, &usable.sysfs_dir, &container)?;
        let info = query_info(container.fd()).map_err(|source| OpenError::Capabilities {
            address: *address,
            source,
        })?;
        let min_page = match info.page_sizes {
            0 => 4096,
            sizes => 1 << sizes.trailing_zeros(),
        };
        let backend = Type1Backend {
            devices: AttachedDevices::default(),
            container,
            min_page,
        };
        let device = backend.devices.keep(device);
        Ok((backend, device))
    }

    /// Attaches another device (its group joins this container) and opens it.
    ///
    /// # Errors
    /// As [`Type1Backend::open`]; the kernel refuses a group whose IOMMU cannot share this
    /// container's.
    pub fn attach(&self, address: &PciAddress) -> Result<Arc<VfioPciDevice>, OpenError> {
        let usable = HostPaths::default().check(address, VfioMode::Type1)?;
        let device = open_device(address, &usable.sysfs_dir, &self.container)?;
        Ok(self.devices.keep(device))
    }

    /// The container's page sizes, IOVA ranges and remaining mapping budget, as the kernel
    /// reports them now.
    ///
    /// # Errors
    /// [`DmaError::Query`] when the ioctl fails or its answer is malformed.
    pub fn info(&self) -> Result<Type1Info, DmaError> {
        query_info(self.container.fd())
    }
}

fn open_device(
    address: &PciAddress,
    sysfs_dir: &Path,
    container: &Arc<VfioContainer>,
) -> Result<VfioPciDevice, OpenError> {
    let ops: Arc<dyn VfioOps> = Arc::clone(container) as Arc<dyn VfioOps>;
    let device = VfioDevice::new(sysfs_dir, ops, false).map_err(|source| OpenError::Vfio {
        address: *address,
        step: "attaching the group to the container and opening the device",
        source,
    })?;
    Ok(VfioPciDevice::new(*address, device))
}

fn query_info(container: BorrowedFd<'_>) -> Result<Type1Info, DmaError> {
    let bytes = sys::vfio_iommu_get_info(container).map_err(|source| DmaError::Query {
        kind: KIND,
        operation: "VFIO_IOMMU_GET_INFO",
        source,
    })?;
    parse_type1_info(&bytes).map_err(|e| DmaError::Query {
        kind: KIND,
        operation: e.describe(),
        source: errno::Error::new(libc::EPROTO),
    })
}

impl DmaBackend for Type1Backend {
    fn capabilities(&self) -> Result<Capabilities, DmaError> {
        let info = self.info()?;
        Ok(Capabilities {
            kind: KIND,
            page_sizes: info.page_sizes,
            iova_ranges: info.iova_ranges,
            mapping_budget: info.dma_avail.map(u64::from),
            map_file: FileMapSupport::None,
            translates: true,
            // VFIO type1 v2 refuses a bisecting unmap; v1 removes every mapping it touches,
            // a window for their other pages.
            cuts_mappings: false,
        })
    }

    unsafe fn map_va(
        &self,
        iova: u64,
        len: u64,
        host_addr: *mut u8,
        prot: DmaProt,
    ) -> Result<(), DmaError> {
        if prot != DmaProt::READ_WRITE {
            // vfio-ioctls always passes READ|WRITE; granting more than asked is not an option.
            return Err(DmaError::Unsupported {
                kind: KIND,
                operation: "mappings other than read+write (vfio-ioctls maps read+write only)",
            });
        }
        check_aligned(iova, len, host_addr as u64, self.min_page)?;
        let size = usize::try_from(len).map_err(|_| DmaError::MapVa {
            kind: KIND,
            iova,
            len,
            source: errno::Error::new(libc::EOVERFLOW),
        })?;
        // SAFETY: the caller upholds `DmaBackend::map_va`'s contract, which is
        // `VfioContainer::vfio_dma_map`'s: the range stays mapped and unaliased by Rust
        // references until this exact mapping is unmapped through this backend.
        let result = unsafe { self.container.vfio_dma_map(iova, size, host_addr) };
        result.map_err(|e| DmaError::MapVa {
            kind: KIND,
            iova,
            len,
            source: match e {
                VfioError::IommuDmaMap(source) => source,
                // vfio_dma_map has no other failure; keep the error typed if that changes.
                _ => errno::Error::new(libc::EIO),
            },
        })
    }

    fn map_file(
        &self,
        _iova: u64,
        _len: u64,
        _file: BorrowedFd<'_>,
        _offset: u64,
        _prot: DmaProt,
    ) -> Result<(), DmaError> {
        Err(DmaError::Unsupported {
            kind: KIND,
            operation: "mapping by file descriptor",
        })
    }

    /// `VFIO_IOMMU_UNMAP_DMA`. Returns the bytes the kernel reports: fewer than `len` when
    /// the range has holes between mappings (the ledger compares with its record); more than
    /// `len` would be a kernel bug and is reported as [`DmaError::PartialUnmap`].
    fn unmap(&self, iova: u64, len: u64) -> Result<u64, DmaError> {
        // Raw ioctl (sys.rs) instead of `VfioContainer::vfio_dma_unmap`: that one turns a size
        // mismatch into `InvalidDmaUnmapSize` without the size, so the caller could not tell a
        // range with holes from a failure, and it hands the kernel a shared reference to write.
        let unmapped =
            sys::vfio_iommu_unmap_dma(self.container.fd(), iova, len).map_err(|source| {
                DmaError::Unmap {
                    kind: KIND,
                    iova,
                    len,
                    source,
                }
            })?;
        checked_unmapped(KIND, iova, len, unmapped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a `VFIO_IOMMU_GET_INFO` answer: fixed part, then the given capabilities laid out
    /// one after another (each `(id, body)`; the header is added here).
    fn answer(flags: u32, pgsizes: u64, caps: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![0u8; L::FIXED_SIZE];
        b[L::FLAGS..L::FLAGS + 4].copy_from_slice(&flags.to_ne_bytes());
        b[L::IOVA_PGSIZES..L::IOVA_PGSIZES + 8].copy_from_slice(&pgsizes.to_ne_bytes());
        if !caps.is_empty() {
            b[L::CAP_OFFSET..L::CAP_OFFSET + 4]
                .copy_from_slice(&(L::FIXED_SIZE as u32).to_ne_bytes());
        }
        for (i, (id, body)) in caps.iter().enumerate() {
            let start = b.len();
            let end = start + L::CAP_HEADER_SIZE + body.len();
            let next = if i + 1 == caps.len() { 0 } else { end as u32 };
            b.extend_from_slice(&id.to_ne_bytes());
            b.extend_from_slice(&1u16.to_ne_bytes());
            b.extend_from_slice(&next.to_ne_bytes());
            b.extend_from_slice(body);
        }
        let len = b.len() as u32;
        b[L::ARGSZ..L::ARGSZ + 4].copy_from_slice(&len.to_ne_bytes());
        b
    }

    fn iova_cap(ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(ranges.len() as u32).to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        for (s, e) in ranges {
            body.extend_from_slice(&s.to_ne_bytes());
            body.extend_from_slice(&e.to_ne_bytes());
        }
        body
    }

    fn avail_cap(n: u32) -> Vec<u8> {
        // u32 avail, padded like the kernel's 12-byte struct rounded to 8.
        let mut body = n.to_ne_bytes().to_vec();
        body.extend_from_slice(&[0; 4]);
        body
    }

    const PGSIZES: u32 = 1;
    const CAPS: u32 = 2;

    #[test]
    fn parses_page_sizes_iova_ranges_and_dma_avail() {
        let b = answer(
            PGSIZES | CAPS,
            0x4020_1000,
            &[
                (
                    1,
                    iova_cap(&[(0, 0xfedf_ffff), (0xfef0_0000, 0xffff_ffff_ffff)]),
                ),
                (2, vec![0; 24]), // migration: skipped
                (3, avail_cap(65_000)),
            ],
        );
        let info = parse_type1_info(&b).unwrap();
        assert_eq!(info.page_sizes, 0x4020_1000);
        assert_eq!(
            info.iova_ranges,
            vec![
                IovaRange {
                    start: 0,
                    last: 0xfedf_ffff
                },
                IovaRange {
                    start: 0xfef0_0000,
                    last: 0xffff_ffff_ffff
                }
            ]
        );
        assert_eq!(info.dma_avail, Some(65_000));
    }

    #[test]
    fn missing_flags_mean_nothing_reported() {
        let b = answer(0, 0x1000, &[(3, avail_cap(7))]);
        let info = parse_type1_info(&b).unwrap();
        assert_eq!(info.page_sizes, 0);
        assert_eq!(info.dma_avail, None);
        assert!(info.iova_ranges.is_empty());
    }

    #[test]
    fn malformed_chains_are_errors_not_panics_or_loops() {
        assert_eq!(parse_type1_info(&[0; 8]), Err(InfoParseError::Short));
        // A range count that runs past the end.
        let mut b = answer(CAPS, 0, &[(1, iova_cap(&[(0, 0xfff)]))]);
        let nr_at = L::FIXED_SIZE + L::IOVA_NR;
        b[nr_at..nr_at + 4].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(parse_type1_info(&b), Err(InfoParseError::Truncated));
        // A chain whose `next` points back at itself.
        let mut b = answer(CAPS, 0, &[(3, avail_cap(1))]);
        let next_at = L::FIXED_SIZE + L::CAP_NEXT;
        b[next_at..next_at + 4].copy_from_slice(&(L::FIXED_SIZE as u32).to_ne_bytes());
        assert_eq!(parse_type1_info(&b), Err(InfoParseError::BadNext));
        // cap_offset pointing past the end.
        let mut b = answer(CAPS, 0, &[]);
        b[L::CAP_OFFSET..L::CAP_OFFSET + 4].copy_from_slice(&4096u32.to_ne_bytes());
        assert_eq!(parse_type1_info(&b), Err(InfoParseError::Truncated));
    }
}
