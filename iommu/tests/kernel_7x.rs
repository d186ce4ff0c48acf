//! Real-kernel tests of what Linux 7.x has and 6.12 lacks: `IOMMU_IOAS_MAP_FILE` of a memfd by
//! offset, and iommufd's own no-IOMMU mode (`IOMMU_IOAS_NOIOMMU_GET_PA`). Each runs where the
//! rig's kernel offers the feature (required there) and skips with the reason elsewhere.

mod kernel_support;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use gmem_dma_iommu::{
    DeviceRegions, DmaBackend, DmaError, DmaProt, Edu, FdAccess, FileMapSupport, IommufdBackend,
    IommufdNoIommuBackend, Ledger, LedgerError, PagemapEntry,
};
use kernel_support::*;
use vm_rig::Feature;

/// edu's default DMA mask: the device wraps addresses above 256 MiB.
const EDU_LIMIT: u64 = 1 << 28;

/// The errno of a refused `map_file`, or a panic naming what came back instead.
fn map_file_errno(result: Result<(), DmaError>, what: &str) -> i32 {
    match result {
        Err(DmaError::MapFile { source, .. }) => source.errno(),
        other => panic!("{what}: expected the kernel to refuse MAP_FILE, got {other:?}"),
    }
}

/// `path` reopened read-only (a second open file description of the same memfd).
fn reopen_read_only(fd: std::os::fd::BorrowedFd<'_>) -> OwnedFd {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    std::fs::File::open(path)
        .expect("reopen the memfd read-only")
        .into()
}

#[test]
fn kernel_7x_map_file_by_offset_is_reached_bad_offsets_are_refused_a_read_only_fd_by_the_ledger() {
    let name = "kernel_7x_map_file_by_offset_is_reached_bad_offsets_are_refused_a_read_only_fd_by_the_ledger";
    if !vm_rig::need(
        name,
        &[Feature::Edu, Feature::Iommufd, Feature::IommufdMapFile],
    ) {
        return;
    }
    let (backend, device) = IommufdBackend::open(&edu_address()).expect("open edu via IOMMUFD");
    let backend = Arc::new(backend);
    let edu = Edu::new(device).expect("edu answers with its id");
    assert_eq!(
        backend.capabilities().unwrap().map_file,
        FileMapSupport::Memfd
    );
    const PAGES: usize = 4;
    let src = MemfdBuf::new(PAGE as usize);
    let file = MemfdBuf::new(PAGES * PAGE as usize);
    file.fill(0x33);
    // The shared view's page 2, by memfd + offset.
    backend
        .map_file(DST_IOVA, PAGE, file.fd(), 2 * PAGE, DmaProt::READ_WRITE)
        .expect("MAP_FILE of page 2");
    // SAFETY: `src` outlives its mapping (unmapped below).
    unsafe { backend.map_va(SRC_IOVA, PAGE, src.addr(0), DmaProt::READ_ONLY) }.unwrap();
    let data = pattern(0x5d, DMA_LEN);
    src.write(0, &data);
    edu.copy_to_device(SRC_IOVA, DMA_LEN as u32).unwrap();
    edu.copy_from_device(DST_IOVA, DMA_LEN as u32).unwrap();
    assert_eq!(
        file.read(2 * PAGE as usize, DMA_LEN),
        data,
        "edu's DMA did not land in the memfd page at offset 2 pages"
    );
    for page in [0, 1, 3] {
        assert!(
            file.read(page * PAGE as usize, PAGE as usize)
                .iter()
                .all(|&b| b == 0x33),
            "memfd page {page} was written"
        );
    }
    // Offsets the kernel refuses: memfd_pin_folios() answers EINVAL for a range that reaches
    // the end of the file, and the IOAS is unchanged afterwards.
    let past_end = backend.map_file(
        DST_IOVA + PAGE,
        PAGE,
        file.fd(),
        PAGES as u64 * PAGE,
        DmaProt::READ_WRITE,
    );
    assert_eq!(map_file_errno(past_end, "offset at EOF"), libc::EINVAL);
    let straddling = backend.map_file(
        DST_IOVA + PAGE,
        2 * PAGE,
        file.fd(),
        (PAGES as u64 - 1) * PAGE,
        DmaProt::READ_WRITE,
    );
    assert_eq!(
        map_file_errno(straddling, "range crossing EOF"),
        libc::EINVAL
    );
    // A sub-page offset under a page-aligned IOVA: the area's page offset would not match.
    let misaligned = backend.map_file(
        DST_IOVA + PAGE,
        PAGE,
        file.fd(),
        PAGE + 8,
        DmaProt::READ_WRITE,
    );
    assert_eq!(map_file_errno(misaligned, "offset PAGE + 8"), libc::EINVAL);
    assert_eq!(
        backend.unmap(DST_IOVA + PAGE, 2 * PAGE).unwrap(),
        0,
        "a refused MAP_FILE left an area behind"
    );
    // A read-only open of the same memfd. Linux 7.3 does not refuse a device-writable mapping
    // of it: neither iopt_map_file_pages() nor memfd_pin_folios() looks at the fd's mode (only
    // `fget`), so a process holding only a read-only fd lets a device write the file. The
    // backend is one raw IOMMU_IOAS_MAP_FILE and passes the fd on as it is: this records what
    // the kernel does. The ledger, which every map by file goes through, refuses it (below).
    let read_only = reopen_read_only(file.fd());
    backend
        .map_file(
            DST_IOVA + PAGE,
            PAGE,
            read_only.as_fd(),
            PAGE,
            DmaProt::READ_WRITE,
        )
        .expect("Linux 7.3 maps an O_RDONLY memfd fd device-writable");
    edu.copy_from_device(DST_IOVA + PAGE, DMA_LEN as u32)
        .unwrap();
    assert_eq!(
        file.read(PAGE as usize, DMA_LEN),
        data,
        "the device wrote the file through a mapping of its read-only fd"
    );
    assert_eq!(backend.unmap(DST_IOVA + PAGE, PAGE).unwrap(), PAGE);
    assert_eq!(backend.unmap(DST_IOVA, PAGE).unwrap(), PAGE);
    assert_eq!(backend.unmap(SRC_IOVA, PAGE).unwrap(), PAGE);

    // Through the ledger: the same writable map of the read-only fd is refused, naming the
    // fd's mode and what was asked, before the kernel sees it; a read-only map of the same fd
    // works and edu reads the file through it.
    let ledger = Ledger::new(backend.clone()).expect("ledger over the IOAS");
    match ledger.map_file(
        DST_IOVA + PAGE,
        PAGE,
        read_only.as_fd(),
        PAGE,
        DmaProt::READ_WRITE,
    ) {
        Err(LedgerError::FileAccess {
            fd_access,
            requested,
            ..
        }) => assert_eq!(
            (fd_access, requested),
            (FdAccess::ReadOnly, DmaProt::READ_WRITE)
        ),
        other => panic!("a writable map of an O_RDONLY fd: expected FileAccess, got {other:?}"),
    }
    assert_eq!(ledger.mapping_count(), 0);
    assert_eq!(
        backend.unmap(DST_IOVA + PAGE, PAGE).unwrap(),
        0,
        "the refused map reached the kernel"
    );
    let readable = pattern(0x7a, DMA_LEN);
    file.write(PAGE as usize, &readable);
    let sink = MemfdBuf::new(PAGE as usize);
    ledger
        .map_file(
            DST_IOVA + PAGE,
            PAGE,
            read_only.as_fd(),
            PAGE,
            DmaProt::READ_ONLY,
        )
        .expect("a read-only map of the O_RDONLY fd");
    // SAFETY: `sink` outlives its mapping (the ledger is closed below, before it drops).
    unsafe { ledger.map_va(SRC_IOVA, PAGE, sink.addr(0), DmaProt::READ_WRITE) }.unwrap();
    edu.copy_to_device(DST_IOVA + PAGE, DMA_LEN as u32).unwrap();
    edu.copy_from_device(SRC_IOVA, DMA_LEN as u32).unwrap();
    assert_eq!(
        sink.read(0, DMA_LEN),
        readable,
        "edu did not read the file through the read-only mapping"
    );
    assert_eq!(ledger.close().unwrap().bytes, 2 * PAGE);
}

#[test]
fn kernel_7x_iommufd_noiommu_dma_reaches_the_physical_address_it_reports() {
    let name = "kernel_7x_iommufd_noiommu_dma_reaches_the_physical_address_it_reports";
    if !vm_rig::need(name, &[Feature::Edu, Feature::IommufdNoIommu]) {
        return;
    }
    let (backend, device) =
        IommufdNoIommuBackend::open(&edu_address()).expect("open edu's no-IOMMU cdev");
    assert!(device.region(0).is_some(), "BAR0 region info");
    assert!(!backend.capabilities().unwrap().translates);
    let edu = Edu::new(device).expect("edu answers with its id");
    // Map 16 MiB chunks until two pages sit below edu's DMA mask (placement is the kernel's).
    const CHUNK: u64 = 16 << 20;
    let pagemap = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
    let mut chunks = Vec::new();
    let mut usable: Vec<(usize, u64, u64)> = Vec::new(); // (chunk, page, phys)
    for c in 0..16usize {
        let buf = MemfdBuf::new(CHUNK as usize);
        let iova = c as u64 * CHUNK;
        // SAFETY: `buf` is kept in `chunks` until after the unmap below.
        unsafe { backend.map_va(iova, CHUNK, buf.addr(0), DmaProt::READ_WRITE) }
            .expect("IOMMU_IOAS_MAP on the no-IOMMU IOAS");
        for page in 0..CHUNK / PAGE {
            let at = iova + page * PAGE;
            let run = backend
                .physical_address(at + 8, 2 * PAGE)
                .expect("IOMMU_IOAS_NOIOMMU_GET_PA");
            assert!(run.len >= 1 && run.len <= 2 * PAGE, "{run:?}");
            let phys = run.phys - 8;
            assert_eq!(phys % PAGE, 0, "{run:?} is not 8 bytes into a page");
            // The kernel's answer is the page the process's own page table holds (it is
            // pinned, so it cannot move between the two reads).
            let mut raw = [0u8; 8];
            std::os::unix::fs::FileExt::read_exact_at(
                &pagemap,
                &mut raw,
                (buf.addr((page * PAGE) as usize) as u64 / PAGE) * 8,
            )
            .unwrap();
            let entry = PagemapEntry::decode(u64::from_le_bytes(raw));
            assert_eq!(entry.pfn * PAGE, phys, "GET_PA vs pagemap for page {page}");
            if phys + PAGE <= EDU_LIMIT && usable.len() < 2 {
                usable.push((c, page, phys));
            }
        }
        chunks.push(buf);
        if usable.len() == 2 {
            break;
        }
    }
    assert_eq!(usable.len(), 2, "no two pinned pages below 256 MiB");
    let [(sc, sp, src_phys), (dc, dp, dst_phys)] = [usable[0], usable[1]];
    eprintln!("DMA between physical pages {src_phys:#x} and {dst_phys:#x}");
    let data = pattern(0x6e, DMA_LEN);
    chunks[sc].write((sp * PAGE) as usize, &data);
    chunks[dc].write((dp * PAGE) as usize, &vec![0; PAGE as usize]);
    edu.copy_to_device(src_phys, DMA_LEN as u32).unwrap();
    edu.copy_from_device(dst_phys, DMA_LEN as u32).unwrap();
    assert_eq!(
        chunks[dc].read((dp * PAGE) as usize, DMA_LEN),
        data,
        "DMA to the physical address GET_PA reported did not arrive"
    );
    let total = chunks.len() as u64 * CHUNK;
    assert_eq!(backend.unmap(0, total).unwrap(), total);
    match backend.physical_address(0, PAGE) {
        Err(DmaError::Query { source, .. }) => assert_eq!(source.errno(), libc::ENOENT),
        other => panic!("GET_PA of an unmapped IOVA answered {other:?}"),
    }
    // Zero length is refused by the uAPI's rule ("length must be non-zero").
    assert!(backend.physical_address(0, 0).is_err());
}

#[test]
fn kernel_7x_iommufd_command_probes_agree_with_the_contract() {
    let name = "kernel_7x_iommufd_command_probes_agree_with_the_contract";
    if !vm_rig::need(name, &[Feature::Edu]) {
        return;
    }
    let Ok(iommufd) = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/iommu")
    else {
        eprintln!("SKIPPED {name}: iommufd: /dev/iommu does not open");
        return;
    };
    let built = gmem_dma_iommu::vfio::noiommu_mode_built(iommufd.as_fd()).unwrap();
    let map_file = gmem_dma_iommu::vfio::map_file_known(iommufd.as_fd()).unwrap();
    eprintln!("iommufd no-IOMMU mode built: {built}; MAP_FILE known: {map_file}");
    // The contract's probes and the library's agree, on either kernel.
    assert_eq!(map_file, Feature::IommufdMapFile.probe().is_ok());
    if Feature::IommufdNoIommu.probe().is_ok() {
        assert!(
            built,
            "a no-IOMMU cdev exists but GET_PA says the mode is not built"
        );
    }
    if !map_file {
        assert!(!built, "GET_PA (7.x) on a kernel without MAP_FILE (6.13)");
    }
}
