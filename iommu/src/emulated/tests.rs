//! Unit tests of the emulated IOMMU: page-table rules, call log, injection, device access.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;

use super::device::FileWindow;
use super::test_support::{HostMem, memfd};
use super::*;
use crate::backend::{DmaBackend, DmaError};

const PAGE: u64 = 4096;

fn map(iommu: &EmulatedIommu, mem: &HostMem, iova: u64, len: u64) -> Result<(), i32> {
    // SAFETY: `mem` outlives every mapping in these tests: each test drops the IOMMU (or
    // unmaps) before `mem`, and only the emulator touches it while mapped.
    unsafe { iommu.map_va(iova, len, mem.at(iova), DmaProt::READ_WRITE) }.map_err(|e| errno_of(&e))
}

fn errno_of(e: &DmaError) -> i32 {
    match e {
        DmaError::MapVa { source, .. }
        | DmaError::MapFile { source, .. }
        | DmaError::Unmap { source, .. } => source.errno(),
        other => panic!("unexpected error {other:?}"),
    }
}

fn unmap(iommu: &EmulatedIommu, iova: u64, len: u64) -> Result<u64, i32> {
    iommu.unmap(iova, len).map_err(|e| errno_of(&e))
}

fn starts(iommu: &EmulatedIommu) -> Vec<(u64, u64)> {
    iommu.page_table().iter().map(|e| (e.iova, e.len)).collect()
}

#[test]
fn overlapping_map_is_refused_with_eexist_and_changes_nothing() {
    let mem = HostMem::new(16 * PAGE as usize);
    let iommu = EmulatedIommu::new();
    map(&iommu, &mem, 2 * PAGE, 2 * PAGE).unwrap();
    assert_eq!(map(&iommu, &mem, 3 * PAGE, 2 * PAGE), Err(libc::EEXIST));
    assert_eq!(map(&iommu, &mem, PAGE, 2 * PAGE), Err(libc::EEXIST));
    assert_eq!(map(&iommu, &mem, 0, 8 * PAGE), Err(libc::EEXIST));
    assert_eq!(starts(&iommu), [(2 * PAGE, 2 * PAGE)]);
    map(&iommu, &mem, 4 * PAGE, PAGE).unwrap(); // adjacent is fine
    map(&iommu, &mem, PAGE, PAGE).unwrap();
    assert_eq!(iommu.mapping_count(), 3);
}

#[test]
fn misaligned_empty_wrapping_or_no_access_maps_are_einval() {
    let mem = HostMem::new(4 * PAGE as usize);
    let iommu = EmulatedIommu::new();
    assert_eq!(map(&iommu, &mem, 0x800, PAGE), Err(libc::EINVAL));
    assert_eq!(map(&iommu, &mem, 0, PAGE + 1), Err(libc::EINVAL));
    assert_eq!(map(&iommu, &mem, 0, 0), Err(libc::EINVAL));
    // SAFETY: refused before the pointer is recorded.
    let r = unsafe { iommu.map_va(0, PAGE, mem.at(0x10), DmaProt::READ_WRITE) };
    assert_eq!(errno_of(&r.unwrap_err()), libc::EINVAL);
    let none = DmaProt {
        read: false,
        write: false,
    };
    // SAFETY: refused before the pointer is recorded.
    let r = unsafe { iommu.map_va(0, PAGE, mem.at(0), none) };
    assert_eq!(errno_of(&r.unwrap_err()), libc::EINVAL);
    let wide = EmulatedIommu::builder()
        .iova_ranges(vec![IovaRange {
            start: 0,
            last: u64::MAX,
        }])
        .build();
    assert_eq!(
        map(&wide, &mem, u64::MAX - PAGE + 1, 2 * PAGE),
        Err(libc::EINVAL)
    );
    assert!(iommu.page_table().is_empty());
    assert!(
        iommu
            .calls()
            .iter()
            .all(|c| c.result == Err(libc::EINVAL) && !c.injected)
    );
}

#[test]
fn larger_page_size_is_the_alignment() {
    let mem = HostMem::new(1 << 22);
    let iommu = EmulatedIommu::builder().page_sizes(0x20_0000).build();
    assert_eq!(iommu.page_size(), 0x20_0000);
    assert_eq!(map(&iommu, &mem, 0x1000, 0x20_0000), Err(libc::EINVAL));
    assert_eq!(map(&iommu, &mem, 0x20_0000, 0x1000), Err(libc::EINVAL));
}

#[test]
fn map_outside_the_iova_ranges_is_einval() {
    let mem = HostMem::new(16 * PAGE as usize);
    let iommu = EmulatedIommu::builder()
        .iova_ranges(vec![
            IovaRange {
                start: 0,
                last: 4 * PAGE - 1,
            },
            IovaRange {
                start: 8 * PAGE,
                last: 12 * PAGE - 1,
            },
        ])
        .build();
    assert_eq!(map(&iommu, &mem, 3 * PAGE, 2 * PAGE), Err(libc::EINVAL));
    assert_eq!(map(&iommu, &mem, 4 * PAGE, PAGE), Err(libc::EINVAL));
    assert_eq!(map(&iommu, &mem, 11 * PAGE, 2 * PAGE), Err(libc::EINVAL));
    map(&iommu, &mem, 8 * PAGE, 4 * PAGE).unwrap();
    map(&iommu, &mem, 0, 4 * PAGE).unwrap();
    assert_eq!(iommu.mapping_count(), 2);
    let unrestricted = EmulatedIommu::builder().iova_ranges(vec![]).build();
    // SAFETY: never accessed; `mem` outlives `unrestricted` anyway.
    unsafe { unrestricted.map_va(1 << 60, PAGE, mem.at(0), DmaProt::READ_WRITE) }.unwrap();
}

#[test]
fn exhausted_budget_is_enospc_and_unmap_gives_it_back() {
    let mem = HostMem::new(8 * PAGE as usize);
    let iommu = EmulatedIommu::builder().mapping_budget(Some(2)).build();
    assert_eq!(iommu.capabilities().unwrap().mapping_budget, Some(2));
    map(&iommu, &mem, 0, PAGE).unwrap();
    map(&iommu, &mem, PAGE, PAGE).unwrap();
    assert_eq!(iommu.capabilities().unwrap().mapping_budget, Some(0));
    assert_eq!(map(&iommu, &mem, 2 * PAGE, PAGE), Err(libc::ENOSPC));
    // Overlap is checked before the budget, as in vfio_dma_do_map().
    assert_eq!(map(&iommu, &mem, 0, PAGE), Err(libc::EEXIST));
    assert_eq!(unmap(&iommu, 0, 2 * PAGE), Ok(2 * PAGE));
    assert_eq!(iommu.capabilities().unwrap().mapping_budget, Some(2));
    map(&iommu, &mem, 2 * PAGE, PAGE).unwrap();
}

#[test]
fn type1_unmap_refuses_bisection_atomically_and_allows_gaps() {
    let mem = HostMem::new(16 * PAGE as usize);
    let iommu = EmulatedIommu::new();
    map(&iommu, &mem, 0, PAGE).unwrap();
    map(&iommu, &mem, 2 * PAGE, 2 * PAGE).unwrap();
    map(&iommu, &mem, 6 * PAGE, PAGE).unwrap();
    let before = starts(&iommu);
    // Bisects [2, 4) at its end, and [2, 4) at its start.
    assert_eq!(unmap(&iommu, 0, 3 * PAGE), Err(libc::EINVAL));
    assert_eq!(unmap(&iommu, 3 * PAGE, 4 * PAGE), Err(libc::EINVAL));
    assert_eq!(unmap(&iommu, 0, 0x800), Err(libc::EINVAL));
    assert_eq!(starts(&iommu), before);
    // Nothing there: success, zero bytes.
    assert_eq!(unmap(&iommu, 8 * PAGE, 4 * PAGE), Ok(0));
    // Several whole mappings with gaps between them, in one call.
    assert_eq!(unmap(&iommu, 0, 7 * PAGE), Ok(4 * PAGE));
    assert!(iommu.page_table().is_empty());
}

#[test]
fn iommufd_unmap_is_enoent_for_bisection_after_removing_earlier_areas() {
    let mem = HostMem::new(16 * PAGE as usize);
    let iommu = EmulatedIommu::builder()
        .unmap_style(UnmapStyle::Iommufd)
        .build();
    map(&iommu, &mem, 0, PAGE).unwrap();
    map(&iommu, &mem, 2 * PAGE, 2 * PAGE).unwrap();
    map(&iommu, &mem, 6 * PAGE, PAGE).unwrap();
    // [0, 1) is wholly inside and goes; [2, 4) is bisected: ENOENT, and it stays.
    assert_eq!(unmap(&iommu, 0, 3 * PAGE), Err(libc::ENOENT));
    assert_eq!(starts(&iommu), [(2 * PAGE, 2 * PAGE), (6 * PAGE, PAGE)]);
    // Nothing there: ENOENT, unlike type1.
    assert_eq!(unmap(&iommu, 8 * PAGE, PAGE), Err(libc::ENOENT));
    assert_eq!(unmap(&iommu, 0, 0), Err(libc::EINVAL));
    assert_eq!(unmap(&iommu, PAGE, u64::MAX), Err(libc::EOVERFLOW));
    // The whole address space always succeeds.
    assert_eq!(unmap(&iommu, 0, u64::MAX), Ok(3 * PAGE));
    assert_eq!(unmap(&iommu, 0, u64::MAX), Ok(0));
}

#[test]
fn injected_failure_changes_nothing_and_is_logged() {
    let mem = HostMem::new(8 * PAGE as usize);
    let iommu = EmulatedIommu::builder().mapping_budget(Some(8)).build();
    map(&iommu, &mem, 0, PAGE).unwrap();
    iommu.inject_failures(|kind, iova, _| {
        (iova == PAGE || *kind == CallKind::Unmap).then_some(libc::ENOMEM)
    });
    assert_eq!(map(&iommu, &mem, PAGE, PAGE), Err(libc::ENOMEM));
    assert_eq!(unmap(&iommu, 0, PAGE), Err(libc::ENOMEM));
    map(&iommu, &mem, 2 * PAGE, PAGE).unwrap();
    assert_eq!(starts(&iommu), [(0, PAGE), (2 * PAGE, PAGE)]);
    assert_eq!(iommu.capabilities().unwrap().mapping_budget, Some(6));
    let calls = iommu.take_calls();
    assert_eq!(calls.len(), 4);
    assert!(calls[1].injected && calls[1].result == Err(libc::ENOMEM));
    assert!(calls[2].injected && calls[2].kind == CallKind::Unmap);
    assert!(!calls[3].injected && calls[3].result == Ok(PAGE));
    assert!(iommu.calls().is_empty());
    iommu.clear_failures();
    assert_eq!(unmap(&iommu, 0, PAGE), Ok(PAGE));
}

#[test]
fn device_access_translates_through_host_mappings() {
    let mem = HostMem::new(4 * PAGE as usize);
    let iommu = EmulatedIommu::new();
    // IOVA 0x10000 -> host pages 0..2, IOVA 0x12000 -> host page 3 (not contiguous on host).
    // SAFETY: `mem` outlives `iommu`'s mappings (unmapped below before it drops).
    unsafe {
        iommu
            .map_va(0x10000, 2 * PAGE, mem.at(0), DmaProt::READ_WRITE)
            .unwrap();
        iommu
            .map_va(0x12000, PAGE, mem.at(3 * PAGE), DmaProt::READ_WRITE)
            .unwrap();
    }
    let data: Vec<u8> = (0..3 * PAGE).map(|i| (i * 7 % 251) as u8).collect();
    iommu
        .dma_write(0x10000 + 100, &data[..(3 * PAGE - 100) as usize])
        .unwrap();
    let mut back = vec![0u8; (3 * PAGE - 100) as usize];
    iommu.dma_read(0x10000 + 100, &mut back).unwrap();
    assert_eq!(back, data[..back.len()]);
    // The third IOVA page landed in host page 3, and host page 2 was never touched.
    let mut page3 = vec![0u8; 16];
    let mut page2 = vec![0xffu8; 16];
    // SAFETY: reading our own buffer through its pointer; the emulator is idle.
    unsafe {
        std::ptr::copy_nonoverlapping(mem.at(3 * PAGE), page3.as_mut_ptr(), 16);
        std::ptr::copy_nonoverlapping(mem.at(2 * PAGE), page2.as_mut_ptr(), 16);
    }
    let off = (2 * PAGE - 100) as usize;
    assert_eq!(page3, data[off..off + 16]);
    assert_eq!(page2, [0u8; 16]);
    assert!(iommu.faults().is_empty());
    assert_eq!(unmap(&iommu, 0x10000, 3 * PAGE), Ok(3 * PAGE));
}

#[test]
fn device_access_to_an_unmapped_page_faults_and_touches_nothing() {
    let mem = HostMem::new(4 * PAGE as usize);
    let iommu = EmulatedIommu::new();
    map(&iommu, &mem, 0, PAGE).unwrap();
    // SAFETY: as in `map`.
    unsafe {
        iommu
            .map_va(2 * PAGE, PAGE, mem.at(2 * PAGE), DmaProt::READ_ONLY)
            .unwrap();
    }
    let err = iommu.dma_write(PAGE - 8, &[0xaa; 16]).unwrap_err();
    let DmaAccessError::Fault(fault) = err else {
        panic!("expected a fault, got {err:?}");
    };
    assert_eq!(
        fault,
        DmaFault {
            iova: PAGE - 8,
            len: 16,
            write: true,
            fault_iova: PAGE,
            reason: FaultReason::NotMapped,
        }
    );
    let mut first = [0u8; 8];
    iommu.dma_read(PAGE - 8, &mut first).unwrap();
    assert_eq!(
        first, [0u8; 8],
        "the mapped half must not have been written"
    );
    // Read-only mapping: reads work, writes fault as Forbidden.
    let mut buf = [1u8; 8];
    iommu.dma_read(2 * PAGE, &mut buf).unwrap();
    let err = iommu.dma_write(2 * PAGE, &[1]).unwrap_err();
    assert!(matches!(
        err,
        DmaAccessError::Fault(DmaFault {
            reason: FaultReason::Forbidden,
            write: true,
            ..
        })
    ));
    let mut out = [0u8; 4];
    assert!(iommu.dma_read(5 * PAGE, &mut out).is_err());
    assert_eq!(iommu.faults().len(), 3);
    assert_eq!(iommu.take_faults()[2].fault_iova, 5 * PAGE);
    assert!(iommu.faults().is_empty());
}

#[test]
fn device_access_translates_through_file_mappings() {
    let fd = memfd(4 * PAGE);
    let iommu = EmulatedIommu::new();
    iommu
        .map_file(0x40000, 2 * PAGE, fd.as_fd(), PAGE, DmaProt::READ_WRITE)
        .unwrap();
    iommu.dma_write(0x40000 + PAGE - 2, b"abcd").unwrap();
    let mut back = [0u8; 4];
    File::from(fd.try_clone().unwrap())
        .read_exact_at(&mut back, 2 * PAGE - 2)
        .unwrap();
    assert_eq!(&back, b"abcd");
    assert_eq!(
        iommu.page_table()[0].target,
        TableTarget::File { offset: PAGE }
    );
    let calls = iommu.calls();
    assert_eq!(calls[0].kind, CallKind::MapFile);
    assert_eq!(calls[0].offset, Some(PAGE));
}

#[test]
fn file_window_reads_and_writes_what_pread_sees() {
    // The fallback for files without read/write methods (mmap-able guest_memfd).
    let file = File::from(memfd(2 * PAGE));
    FileWindow::new(&file, PAGE + 5, 3)
        .unwrap()
        .slice()
        .copy_from(b"xyz");
    let mut back = [0u8; 3];
    file.read_exact_at(&mut back, PAGE + 5).unwrap();
    assert_eq!(&back, b"xyz");
    let mut via_window = [0u8; 3];
    FileWindow::new(&file, PAGE + 5, 3)
        .unwrap()
        .slice()
        .copy_to(&mut via_window);
    assert_eq!(&via_window, b"xyz");
}

#[test]
fn map_file_checks_range_access_mode_and_file_type() {
    let fd = memfd(2 * PAGE);
    let iommu = EmulatedIommu::new();
    let map_file = |iommu: &EmulatedIommu, file: BorrowedFd<'_>, offset, prot| {
        iommu
            .map_file(0, PAGE, file, offset, prot)
            .map_err(|e| errno_of(&e))
    };
    assert_eq!(
        map_file(&iommu, fd.as_fd(), 2 * PAGE, DmaProt::READ_WRITE),
        Err(libc::EINVAL)
    );
    assert_eq!(
        map_file(&iommu, fd.as_fd(), 0x10, DmaProt::READ_WRITE),
        Err(libc::EINVAL)
    );
    let exe = File::open("/proc/self/exe").unwrap();
    assert_eq!(
        map_file(&iommu, exe.as_fd(), 0, DmaProt::READ_WRITE),
        Err(libc::EPERM)
    );
    // Any file is accepted read-only by the default (trusted-IO) emulator...
    map_file(&iommu, exe.as_fd(), 0, DmaProt::READ_ONLY).unwrap();
    // ...but mainline MAP_FILE takes only memfd/hugetlbfs.
    let mainline = EmulatedIommu::builder()
        .map_file(FileMapSupport::Memfd)
        .build();
    assert_eq!(
        map_file(&mainline, exe.as_fd(), 0, DmaProt::READ_ONLY),
        Err(libc::EINVAL)
    );
    map_file(&mainline, fd.as_fd(), 0, DmaProt::READ_WRITE).unwrap();
    let type1 = EmulatedIommu::builder()
        .map_file(FileMapSupport::None)
        .build();
    assert!(matches!(
        type1.map_file(0, PAGE, fd.as_fd(), 0, DmaProt::READ_WRITE),
        Err(DmaError::Unsupported { .. })
    ));
    assert!(type1.calls().is_empty());
}

#[test]
fn disabled_call_log_records_nothing() {
    let mem = HostMem::new(PAGE as usize);
    let iommu = EmulatedIommu::builder().record_calls(false).build();
    map(&iommu, &mem, 0, PAGE).unwrap();
    assert_eq!(unmap(&iommu, 0, PAGE), Ok(PAGE));
    assert!(iommu.calls().is_empty());
}

/// Open fds of this process (other tests of this binary run in parallel, so compare with a
/// margin far below the number of mappings).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn file_mappings_share_one_fd_per_file_not_one_per_mapping() {
    // A trusted-IO device over 4 GiB maps a million granules; one fd each ran out at ~20,000.
    const PIECES: u64 = 3000;
    let fd = memfd(PIECES * PAGE);
    let iommu = EmulatedIommu::builder().record_calls(false).build();
    let before = open_fds();
    for i in 0..PIECES {
        iommu
            .map_file(i * PAGE, PAGE, fd.as_fd(), i * PAGE, DmaProt::READ_WRITE)
            .unwrap();
    }
    let grown = open_fds().saturating_sub(before);
    assert!(grown < 100, "{PIECES} file mappings hold {grown} more fds");
    // Device access still reaches the file through the shared fd, at each mapping's offset.
    iommu.dma_write(7 * PAGE + 3, b"xyz").unwrap();
    let mut back = [0u8; 3];
    File::from(fd.try_clone().unwrap())
        .read_exact_at(&mut back, 7 * PAGE + 3)
        .unwrap();
    assert_eq!(&back, b"xyz");
    assert_eq!(unmap(&iommu, 0, PIECES * PAGE), Ok(PIECES * PAGE));
    assert!(open_fds() <= before + 100);
}

#[test]
fn cutting_unmap_removes_an_aligned_sub_range_and_keeps_the_rest_mapped() {
    let mem = HostMem::new(16 * PAGE as usize);
    let iommu = EmulatedIommu::builder()
        .unmap_style(UnmapStyle::Cutting)
        .mapping_budget(Some(1))
        .build();
    let caps = iommu.capabilities().unwrap();
    assert!(caps.cuts_mappings);
    assert_eq!(caps.mapping_budget, None, "IOMMUFD has no mapping budget");
    map(&iommu, &mem, 0, 16 * PAGE).unwrap();
    iommu.dma_write(0, &[0x11; 16 * PAGE as usize]).unwrap();
    // One page out of the middle: exactly its bytes, the areas on both sides stay.
    assert_eq!(unmap(&iommu, 5 * PAGE, PAGE), Ok(PAGE));
    assert_eq!(starts(&iommu), [(0, 5 * PAGE), (6 * PAGE, 10 * PAGE)]);
    assert_eq!(
        iommu.page_table()[1].target,
        TableTarget::HostVa {
            addr: mem.at(6 * PAGE) as usize
        }
    );
    let mut page = [0u8; PAGE as usize];
    iommu.dma_read(4 * PAGE, &mut page).unwrap();
    iommu.dma_read(6 * PAGE, &mut page).unwrap();
    assert_eq!(page, [0x11; PAGE as usize]);
    assert!(iommu.dma_read(5 * PAGE, &mut page).is_err());
    // The first page (no cut before IOVA 0) and the last page (no cut after the area's end).
    assert_eq!(unmap(&iommu, 0, PAGE), Ok(PAGE));
    assert_eq!(unmap(&iommu, 15 * PAGE, PAGE), Ok(PAGE));
    assert_eq!(starts(&iommu), [(PAGE, 4 * PAGE), (6 * PAGE, 9 * PAGE)]);
    // Nothing there: ENOENT, like every IOMMUFD unmap.
    assert_eq!(unmap(&iommu, 5 * PAGE, PAGE), Err(libc::ENOENT));
    assert_eq!(unmap(&iommu, 6 * PAGE, 0), Err(libc::EINVAL));
    // A range spanning a hole and cutting both neighbours.
    assert_eq!(unmap(&iommu, 4 * PAGE, 3 * PAGE), Ok(2 * PAGE));
    assert_eq!(starts(&iommu), [(PAGE, 3 * PAGE), (7 * PAGE, 8 * PAGE)]);
}

#[test]
fn cutting_unmap_refuses_misaligned_cut_points_as_the_kernel_does() {
    let mem = HostMem::new(16 * PAGE as usize);
    let iommu = EmulatedIommu::builder()
        .unmap_style(UnmapStyle::Cutting)
        .build();
    map(&iommu, &mem, 0, 16 * PAGE).unwrap();
    // The end cut comes first and is misaligned: EINVAL, nothing split.
    assert_eq!(unmap(&iommu, 8 * PAGE + 0x800, PAGE), Err(libc::EINVAL));
    assert_eq!(starts(&iommu), [(0, 16 * PAGE)]);
    // The end cut (at 12) succeeds, the start cut is misaligned: EINVAL, the split stays, every
    // page stays mapped.
    assert_eq!(
        unmap(&iommu, 10 * PAGE + 0x800, 2 * PAGE - 0x800),
        Err(libc::EINVAL)
    );
    assert_eq!(starts(&iommu), [(0, 12 * PAGE), (12 * PAGE, 4 * PAGE)]);
    // A cut point at an area's first byte is no cut: the area then straddles the range's start,
    // and the unmap fails with ENOENT having removed nothing.
    assert_eq!(
        unmap(&iommu, 12 * PAGE + 1, 4 * PAGE - 1),
        Err(libc::ENOENT)
    );
    assert_eq!(starts(&iommu), [(0, 12 * PAGE), (12 * PAGE, 4 * PAGE)]);
    let mut all = vec![0u8; 16 * PAGE as usize];
    iommu.dma_read(0, &mut all).unwrap();
    assert_eq!(unmap(&iommu, 0, 16 * PAGE), Ok(16 * PAGE));
}

#[test]
fn cutting_a_file_mapping_keeps_each_half_at_its_file_offset() {
    let fd = memfd(8 * PAGE);
    let iommu = EmulatedIommu::builder()
        .unmap_style(UnmapStyle::Cutting)
        .build();
    iommu
        .map_file(
            0x10_0000,
            4 * PAGE,
            fd.as_fd(),
            4 * PAGE,
            DmaProt::READ_WRITE,
        )
        .unwrap();
    assert_eq!(unmap(&iommu, 0x10_0000 + PAGE, PAGE), Ok(PAGE));
    let table = iommu.page_table();
    assert_eq!(table[1].iova, 0x10_0000 + 2 * PAGE);
    assert_eq!(table[1].target, TableTarget::File { offset: 6 * PAGE });
    iommu.dma_write(0x10_0000 + 2 * PAGE, b"cut").unwrap();
    let mut back = [0u8; 3];
    File::from(fd.try_clone().unwrap())
        .read_exact_at(&mut back, 6 * PAGE)
        .unwrap();
    assert_eq!(&back, b"cut");
}
