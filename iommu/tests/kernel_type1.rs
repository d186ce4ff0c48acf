//! VFIO type1v2 against a real kernel, with QEMU's edu device doing real DMA (run by the VM rig).

mod kernel_support;

use gmem_dma_iommu::{DmaBackend, DmaError, DmaProt, Edu, FileMapSupport, Type1Backend};
use kernel_support::*;
use vm_rig::Feature;

fn open() -> (
    Type1Backend,
    Edu<std::sync::Arc<gmem_dma_iommu::VfioPciDevice>>,
) {
    let (backend, device) = Type1Backend::open(&edu_address()).expect("open edu through type1");
    let edu = Edu::new(device).expect("edu answers with its id");
    (backend, edu)
}

#[test]
fn kernel_type1_dma_reaches_mapped_memfd_both_ways() {
    if !vm_rig::need(
        "kernel_type1_dma_reaches_mapped_memfd_both_ways",
        &[Feature::Edu, Feature::VfioType1],
    ) {
        return;
    }
    let (backend, edu) = open();
    dma_reaches_mapped_memory_both_ways(&backend, &edu, DmaProt::READ_WRITE);
}

#[test]
fn kernel_type1_unmapped_memory_is_not_reached() {
    if !vm_rig::need(
        "kernel_type1_unmapped_memory_is_not_reached",
        &[Feature::Edu, Feature::VfioType1],
    ) {
        return;
    }
    let (backend, edu) = open();
    dma_does_not_reach_unmapped_memory(&backend, &edu);
}

#[test]
fn kernel_type1_budget_is_dma_entry_limit_minus_live_mappings() {
    let name = "kernel_type1_budget_is_dma_entry_limit_minus_live_mappings";
    if !vm_rig::need(name, &[Feature::Edu, Feature::VfioType1]) {
        return;
    }
    let limit: u64 =
        std::fs::read_to_string("/sys/module/vfio_iommu_type1/parameters/dma_entry_limit")
            .expect("vfio_iommu_type1 is loaded")
            .trim()
            .parse()
            .expect("dma_entry_limit is a number");
    let (backend, _edu) = open();
    let budget = || backend.capabilities().unwrap().mapping_budget;
    assert_eq!(
        budget(),
        Some(limit),
        "a fresh container has the whole limit"
    );
    let info = backend.info().unwrap();
    assert_eq!(info.dma_avail.map(u64::from), Some(limit));

    let buf = MemfdBuf::new(8 * PAGE as usize);
    let base = 0x40_0000;
    // Three single-page mappings and one four-page mapping.
    // SAFETY: `buf` outlives every mapping (all unmapped below) and is not referenced.
    unsafe {
        for i in 0..3 {
            backend
                .map_va(
                    base + i * PAGE,
                    PAGE,
                    buf.addr((i * PAGE) as usize),
                    DmaProt::READ_WRITE,
                )
                .unwrap();
        }
        backend
            .map_va(
                base + 4 * PAGE,
                4 * PAGE,
                buf.addr(4 * PAGE as usize),
                DmaProt::READ_WRITE,
            )
            .unwrap();
    }
    assert_eq!(
        budget(),
        Some(limit - 4),
        "one entry per mapping, whatever its size"
    );

    // Type1v2 refuses to bisect the four-page mapping, and nothing changes.
    match backend.unmap(base + 5 * PAGE, PAGE) {
        Err(DmaError::Unmap { source, .. }) => assert_eq!(source.errno(), libc::EINVAL),
        other => panic!("bisecting unmap answered {other:?}"),
    }
    assert_eq!(budget(), Some(limit - 4));

    // Mapping over a live mapping: EEXIST.
    // SAFETY: refused by the kernel; nothing new is mapped.
    let overlap = unsafe { backend.map_va(base, PAGE, buf.addr(0), DmaProt::READ_WRITE) };
    assert!(
        matches!(overlap, Err(DmaError::MapVa { source, .. }) if source.errno() == libc::EEXIST)
    );

    assert_eq!(backend.unmap(base, PAGE).unwrap(), PAGE);
    assert_eq!(budget(), Some(limit - 3));
    // One call over a hole (page 3) and three mappings: the kernel reports the mapped bytes.
    assert_eq!(backend.unmap(base + PAGE, 7 * PAGE).unwrap(), 6 * PAGE);
    assert_eq!(budget(), Some(limit));
}

#[test]
fn kernel_type1_refuses_what_it_cannot_do_without_calling_the_kernel() {
    if !vm_rig::need(
        "kernel_type1_refuses_what_it_cannot_do_without_calling_the_kernel",
        &[Feature::Edu, Feature::VfioType1],
    ) {
        return;
    }
    let (backend, _edu) = open();
    let caps = backend.capabilities().unwrap();
    assert_eq!(caps.map_file, FileMapSupport::None);
    assert!(caps.translates);
    let buf = MemfdBuf::new(PAGE as usize);
    assert!(matches!(
        backend.map_file(SRC_IOVA, PAGE, buf.fd(), 0, DmaProt::READ_WRITE),
        Err(DmaError::Unsupported { .. })
    ));
    // SAFETY: refused before the kernel is asked.
    let read_only = unsafe { backend.map_va(SRC_IOVA, PAGE, buf.addr(0), DmaProt::READ_ONLY) };
    assert!(matches!(read_only, Err(DmaError::Unsupported { .. })));
    assert_eq!(
        backend.capabilities().unwrap().mapping_budget,
        caps.mapping_budget
    );
}

#[test]
fn kernel_type1_host_probe_and_device_list_describe_this_guest() {
    if !vm_rig::need(
        "kernel_type1_host_probe_and_device_list_describe_this_guest",
        &[Feature::Edu, Feature::VfioType1],
    ) {
        return;
    }
    let paths = gmem_dma_iommu::HostPaths::default();
    let report = paths.probe_host();
    eprintln!("{report:?}");
    assert_eq!(report.vfio.node, gmem_dma_iommu::NodeState::Present);
    assert_eq!(report.vfio.api_version, Some(0));
    assert!(report.vfio.type1v2 && report.vfio.type1);
    assert!(
        !report.vfio.noiommu,
        "no-IOMMU is not enabled in an IOMMU configuration"
    );
    let limit: u64 =
        std::fs::read_to_string("/sys/module/vfio_iommu_type1/parameters/dma_entry_limit")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    assert_eq!(report.type1_dma_entry_limit, Some(limit));
    let edu = edu_address();
    let devices = paths.list_pci_devices().unwrap();
    let found = devices
        .iter()
        .find(|d| d.address == edu)
        .expect("edu is listed");
    assert_eq!((found.vendor, found.device), (0x1234, 0x11e8));
    assert_eq!(found.driver.as_deref(), Some("vfio-pci"));
    assert!(found.iommu_group.is_some() && !found.noiommu_group);
    // The same device through the no-IOMMU backend is refused with the reason.
    let err = gmem_dma_iommu::NoIommuBackend::open(&edu).unwrap_err();
    assert!(
        err.to_string().contains("open it with type1 or IOMMUFD"),
        "{err}"
    );
}

#[test]
fn kernel_type1_second_device_joins_the_container_and_its_mappings() {
    let name = "kernel_type1_second_device_joins_the_container_and_its_mappings";
    if !vm_rig::need(name, &[Feature::Edu, Feature::VfioType1]) {
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
fn kernel_type1_one_unmap_spans_empty_gaps_but_never_a_mapping() {
    let name = "kernel_type1_one_unmap_spans_empty_gaps_but_never_a_mapping";
    if !vm_rig::need(name, &[Feature::Edu, Feature::VfioType1]) {
        return;
    }
    let (backend, edu) = open();
    one_unmap_spans_empty_gaps_but_never_a_mapping(std::sync::Arc::new(backend), &edu);
}
