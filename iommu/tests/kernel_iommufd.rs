//! IOMMUFD (IOAS + vfio cdev) against a real kernel, with QEMU's edu device doing real DMA.

mod kernel_support;

use gmem_dma_iommu::{DmaBackend, DmaError, DmaProt, Edu, FileMapSupport, IommufdBackend};
use kernel_support::*;
use vm_rig::Feature;

fn open() -> (
    IommufdBackend,
    Edu<std::sync::Arc<gmem_dma_iommu::VfioPciDevice>>,
) {
    let (backend, device) = IommufdBackend::open(&edu_address()).expect("open edu through IOMMUFD");
    let edu = Edu::new(device).expect("edu answers with its id");
    (backend, edu)
}

#[test]
fn kernel_iommufd_dma_reaches_mapped_memfd_both_ways() {
    if !vm_rig::need(
        "kernel_iommufd_dma_reaches_mapped_memfd_both_ways",
        &[Feature::Edu, Feature::Iommufd],
    ) {
        return;
    }
    let (backend, edu) = open();
    // The source is mapped read-only: IOMMUFD honours that, and the device only reads it.
    dma_reaches_mapped_memory_both_ways(&backend, &edu, DmaProt::READ_ONLY);
}

#[test]
fn kernel_iommufd_unmapped_memory_is_not_reached() {
    if !vm_rig::need(
        "kernel_iommufd_unmapped_memory_is_not_reached",
        &[Feature::Edu, Feature::Iommufd],
    ) {
        return;
    }
    let (backend, edu) = open();
    dma_does_not_reach_unmapped_memory(&backend, &edu);
}

#[test]
fn kernel_iommufd_read_only_mapping_blocks_device_writes() {
    if !vm_rig::need(
        "kernel_iommufd_read_only_mapping_blocks_device_writes",
        &[Feature::Edu, Feature::Iommufd],
    ) {
        return;
    }
    let (backend, edu) = open();
    let src = MemfdBuf::new(PAGE as usize);
    let dst = MemfdBuf::new(PAGE as usize);
    src.write(0, &pattern(0x44, DMA_LEN));
    dst.fill(0x77);
    // SAFETY: both buffers outlive their mappings (unmapped below).
    unsafe {
        backend
            .map_va(SRC_IOVA, PAGE, src.addr(0), DmaProt::READ_WRITE)
            .unwrap();
        backend
            .map_va(DST_IOVA, PAGE, dst.addr(0), DmaProt::READ_ONLY)
            .unwrap();
    }
    edu.copy_to_device(SRC_IOVA, DMA_LEN as u32).unwrap();
    let outcome = edu.copy_from_device(DST_IOVA, DMA_LEN as u32);
    eprintln!("DMA write into a read-only mapping returned {outcome:?}");
    assert!(
        dst.read(0, PAGE as usize).iter().all(|&b| b == 0x77),
        "a read-only mapping was written"
    );
    assert_eq!(backend.unmap(0, 1 << 32).unwrap(), 2 * PAGE);
}

#[test]
fn kernel_iommufd_reports_ranges_alignment_and_file_map_support() {
    if !vm_rig::need(
        "kernel_iommufd_reports_ranges_alignment_and_file_map_support",
        &[Feature::Edu, Feature::Iommufd],
    ) {
        return;
    }
    let (backend, _edu) = open();
    let caps = backend.capabilities().unwrap();
    eprintln!("IOMMUFD capabilities: {caps:?}");
    assert_eq!(caps.mapping_budget, None);
    assert!(caps.translates);
    assert_eq!(caps.min_page_size(), PAGE);
    assert!(!caps.iova_ranges.is_empty());
    // MAP_FILE exists from Linux 6.13; the answer must match the running kernel.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    let expected = if version >= (6, 13) {
        FileMapSupport::Memfd
    } else {
        FileMapSupport::None
    };
    assert_eq!(caps.map_file, expected, "kernel {}", release.trim());
}

#[test]
fn kernel_iommufd_map_file_of_a_memfd_is_reached_by_dma() {
    if !vm_rig::need(
        "kernel_iommufd_map_file_of_a_memfd_is_reached_by_dma",
        &[Feature::Edu, Feature::Iommufd],
    ) {
        return;
    }
    let (backend, edu) = open();
    let src = MemfdBuf::new(PAGE as usize);
    let dst = MemfdBuf::new(2 * PAGE as usize);
    dst.fill(0);
    if backend.capabilities().unwrap().map_file == FileMapSupport::None {
        // Before Linux 6.13: refused as unsupported, not as a kernel failure.
        match backend.map_file(DST_IOVA, PAGE, dst.fd(), PAGE, DmaProt::READ_WRITE) {
            Err(DmaError::Unsupported { .. }) => {}
            other => panic!("MAP_FILE on a kernel without it answered {other:?}"),
        }
        eprintln!(
            "kernel_iommufd_map_file_of_a_memfd_is_reached_by_dma: no IOMMU_IOAS_MAP_FILE on this kernel; checked the refusal only"
        );
        return;
    }
    // The second page of the file, by fd + offset.
    backend
        .map_file(DST_IOVA, PAGE, dst.fd(), PAGE, DmaProt::READ_WRITE)
        .expect("MAP_FILE");
    // SAFETY: `src` outlives its mapping (unmapped below).
    unsafe {
        backend
            .map_va(SRC_IOVA, PAGE, src.addr(0), DmaProt::READ_ONLY)
            .unwrap()
    };
    let data = pattern(0x55, DMA_LEN);
    src.write(0, &data);
    edu.copy_to_device(SRC_IOVA, DMA_LEN as u32).unwrap();
    edu.copy_from_device(DST_IOVA, DMA_LEN as u32).unwrap();
    assert_eq!(
        dst.read(PAGE as usize, DMA_LEN),
        data,
        "DMA did not reach the file page"
    );
    assert!(
        dst.read(0, PAGE as usize).iter().all(|&b| b == 0),
        "the wrong file page was written"
    );
    assert_eq!(backend.unmap(DST_IOVA, PAGE).unwrap(), PAGE);
    assert_eq!(backend.unmap(SRC_IOVA, PAGE).unwrap(), PAGE);
}

#[test]
fn kernel_iommufd_second_device_joins_the_ioas_and_its_mappings() {
    let name = "kernel_iommufd_second_device_joins_the_ioas_and_its_mappings";
    if !vm_rig::need(name, &[Feature::Edu, Feature::Iommufd]) {
        return;
    }
    let Some(second) = second_edu() else {
        eprintln!("SKIPPED {name}: only one edu device (boot QEMU with two -device edu)");
        return;
    };
    let (backend, first) = open();
    let device = backend.attach(&second).expect("attach the second edu");
    let other = Edu::new(device).unwrap();
    both_devices_share_the_mappings(&backend, &first, &other);
}

#[test]
fn kernel_iommufd_one_unmap_spans_empty_gaps_but_never_a_mapping() {
    let name = "kernel_iommufd_one_unmap_spans_empty_gaps_but_never_a_mapping";
    if !vm_rig::need(name, &[Feature::Edu, Feature::Iommufd]) {
        return;
    }
    let (backend, edu) = open();
    one_unmap_spans_empty_gaps_but_never_a_mapping(std::sync::Arc::new(backend), &edu);
}

#[test]
fn kernel_iommufd_one_run_mapping_is_cut_page_by_page_without_a_window() {
    let name = "kernel_iommufd_one_run_mapping_is_cut_page_by_page_without_a_window";
    if !vm_rig::need(name, &[Feature::Edu, Feature::Iommufd]) {
        return;
    }
    const PAGES: u64 = 64;
    let (backend, edu) = open();
    // Linux 6.12 and 7.3 both accept type1 (v1) semantics on an iommufd (`iommufd_vfio_set_iommu()`).
    backend
        .cutting()
        .expect("the kernel accepts type1 (v1) semantics for the IOAS");
    assert!(backend.capabilities().unwrap().cuts_mappings);
    assert_usable_iova(&backend, DST_IOVA, PAGES * PAGE);
    let ledger = gmem_dma_iommu::Ledger::new(std::sync::Arc::new(backend)).expect("ledger");
    let src = MemfdBuf::new(PAGE as usize);
    let dst = MemfdBuf::new((PAGES * PAGE) as usize);
    let iova = |page: u64| DST_IOVA + page * PAGE;
    // SAFETY: `src` and `dst` outlive their mappings (the ledger unmaps everything below,
    // before they drop) and are touched only through raw pointers while mapped.
    unsafe {
        ledger
            .map_va(SRC_IOVA, PAGE, src.addr(0), DmaProt::READ_WRITE)
            .expect("map src");
        ledger
            .map_va(DST_IOVA, PAGES * PAGE, dst.addr(0), DmaProt::READ_WRITE)
            .expect("map 64 pages as one mapping");
    }
    assert_eq!(ledger.mapping_count(), 2);
    let data = pattern(0x6c, DMA_LEN);
    src.write(0, &data);
    edu.copy_to_device(SRC_IOVA, DMA_LEN as u32)
        .expect("DMA memory -> edu");
    let reached = |page: u64| dma_write_lands(&edu, &dst, page, iova(page), &data);
    assert!((0..PAGES).all(reached), "the whole run is reachable");
    let cuts = [10, 0, 63, 31, 32, 11];
    for (i, &page) in cuts.iter().enumerate() {
        let report = ledger.unmap(iova(page), PAGE).expect("cut one page");
        assert_eq!(
            (report.calls, report.bytes, report.mappings),
            (1, PAGE, 1),
            "cutting page {page}: the kernel's byte count"
        );
        assert!(!reached(page), "page {page} was cut but DMA landed");
        assert!(
            dst.read((page * PAGE) as usize, PAGE as usize)
                .iter()
                .all(|&b| b == 0x5a),
            "the cut page {page} was written"
        );
        let cut_so_far = &cuts[..=i];
        for neighbour in [page.wrapping_sub(1), page + 1] {
            if neighbour < PAGES && !cut_so_far.contains(&neighbour) {
                assert!(reached(neighbour), "page {neighbour} lost its mapping");
            }
        }
    }
    for page in (0..PAGES).filter(|p| !cuts.contains(p)) {
        assert!(
            reached(page),
            "page {page} stayed shared but DMA did not land"
        );
    }
    // [1, 10), [12, 31), [33, 63) and src: the ledger's count is the kernel's.
    assert_eq!(ledger.mapping_count(), 4);
    let report = ledger.close().expect("teardown");
    assert_eq!(report.bytes, (PAGES - cuts.len() as u64 + 1) * PAGE);
    assert_eq!(report.mappings, 4);
}

#[test]
fn kernel_iommufd_probe_and_backend_agree_on_cutting() {
    let name = "kernel_iommufd_probe_and_backend_agree_on_cutting";
    if !vm_rig::need(name, &[Feature::Edu, Feature::Iommufd]) {
        return;
    }
    let probed = gmem_dma_iommu::HostPaths::default().probe_iommufd_cutting();
    let (backend, _edu) = open();
    eprintln!("cutting: probe {probed:?}, backend {:?}", backend.cutting());
    assert_eq!(probed, backend.cutting());
    assert_eq!(
        backend.capabilities().unwrap().cuts_mappings,
        probed.is_ok()
    );
}
