//! VFIO no-IOMMU mode against a real kernel: the device is programmed with physical addresses.

mod kernel_support;

use gmem_dma_iommu::{DeviceRegions, DmaBackend, DmaProt, Edu, NoIommuBackend, PAGE_SIZE};
use kernel_support::*;
use vm_rig::Feature;

/// edu's default DMA mask: the device wraps addresses above 256 MiB, so only pages below it
/// may be given to it.
const EDU_LIMIT: u64 = 1 << 28;
/// Map this much at a time while looking for pages under the mask.
const CHUNK: u64 = 16 << 20;

#[test]
fn kernel_noiommu_physical_addresses_are_reached_by_dma() {
    if !vm_rig::need(
        "kernel_noiommu_physical_addresses_are_reached_by_dma",
        &[Feature::Edu, Feature::NoIommu],
    ) {
        return;
    }
    let (backend, device) =
        NoIommuBackend::open(&edu_address()).expect("open edu through no-IOMMU");
    assert!(device.region(0).is_some(), "BAR0 region info");
    let caps = backend.capabilities().unwrap();
    assert!(!caps.translates);
    let edu = Edu::new(device).expect("edu answers with its id");

    // Map chunks until two pages sit below edu's DMA mask (guest RAM placement is up to the
    // kernel's allocator).
    let mut chunks = Vec::new();
    let mut usable: Vec<(usize, usize)> = Vec::new(); // (chunk, page)
    for c in 0..16usize {
        let buf = MemfdBuf::new(CHUNK as usize);
        let iova = c as u64 * CHUNK;
        // SAFETY: `buf` is kept in `chunks` until after the unmap below.
        unsafe { backend.map_va(iova, CHUNK, buf.addr(0), DmaProt::READ_WRITE) }
            .expect("lock and resolve");
        let pages = backend.physical_pages(iova).expect("mapping recorded");
        assert_eq!(pages.len() as u64, CHUNK / PAGE_SIZE);
        for (p, &phys) in pages.iter().enumerate() {
            assert_ne!(phys, 0, "physical address of page {p} is 0");
            assert_eq!(
                phys % PAGE_SIZE,
                0,
                "physical address {phys:#x} is not page-aligned"
            );
            assert_eq!(
                backend.physical_address(iova + p as u64 * PAGE_SIZE + 8),
                Some(phys + 8)
            );
            if phys + PAGE_SIZE <= EDU_LIMIT && usable.len() < 2 {
                usable.push((c, p));
            }
        }
        chunks.push(buf);
        if usable.len() == 2 {
            break;
        }
    }
    assert_eq!(
        usable.len(),
        2,
        "no two locked pages below 256 MiB in {} MiB",
        (chunks.len() as u64 * CHUNK) >> 20
    );
    let [(sc, sp), (dc, dp)] = [usable[0], usable[1]];
    let phys = |c: usize, p: usize| {
        backend
            .physical_address(c as u64 * CHUNK + p as u64 * PAGE_SIZE)
            .unwrap()
    };
    let (src_phys, dst_phys) = (phys(sc, sp), phys(dc, dp));
    eprintln!("DMA between physical pages {src_phys:#x} and {dst_phys:#x}");

    let data = pattern(0x66, DMA_LEN);
    chunks[sc].write(sp * PAGE_SIZE as usize, &data);
    chunks[dc].write(dp * PAGE_SIZE as usize, &vec![0; PAGE_SIZE as usize]);
    edu.copy_to_device(src_phys, DMA_LEN as u32).unwrap();
    edu.copy_from_device(dst_phys, DMA_LEN as u32).unwrap();
    assert_eq!(
        chunks[dc].read(dp * PAGE_SIZE as usize, DMA_LEN),
        data,
        "DMA by physical address did not arrive"
    );

    let total = chunks.len() as u64 * CHUNK;
    assert_eq!(backend.unmap(0, total).unwrap(), total);
    assert_eq!(backend.physical_address(0), None);
}

#[test]
fn kernel_noiommu_translating_backends_refuse_the_device_and_probe_sees_the_mode() {
    let name = "kernel_noiommu_translating_backends_refuse_the_device_and_probe_sees_the_mode";
    if !vm_rig::need(name, &[Feature::Edu, Feature::NoIommu]) {
        return;
    }
    let edu = edu_address();
    let err = gmem_dma_iommu::Type1Backend::open(&edu).unwrap_err();
    assert!(
        matches!(
            err,
            gmem_dma_iommu::OpenError::Device(gmem_dma_iommu::DeviceError::WrongMode { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("no-IOMMU group noiommu-"), "{err}");
    let err = gmem_dma_iommu::IommufdBackend::open(&edu).unwrap_err();
    assert!(matches!(err, gmem_dma_iommu::OpenError::Device(_)), "{err}");
    eprintln!("IOMMUFD refuses: {err}");

    let report = gmem_dma_iommu::HostPaths::default().probe_host();
    eprintln!("{report:?}");
    assert_eq!(report.noiommu_mode, Some(true));
    assert!(
        report.vfio.noiommu,
        "VFIO_CHECK_EXTENSION(VFIO_NOIOMMU_IOMMU)"
    );
    let info = gmem_dma_iommu::HostPaths::default().inspect(&edu).unwrap();
    assert!(info.noiommu_group);
}
