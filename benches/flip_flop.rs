//! The firmware bounce-buffer pattern: one page flipped shared and back per DMA transaction,
//! with one assigned device (emulated IOMMU) and each discard policy. On a host with KVM the
//! region is classic (memfd + real guest_memfd); elsewhere the software backing.
//!
//! Run: `cargo bench -p gmem-dma --bench flip_flop`

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use discard_manager::{Attribute, GpaRange};
use gmem_dma::{
    DeviceConfig, DiscardPolicy, GuestRam, RecordingAttributes, RegionBacking, RegionSpec,
};
use iommu::EmulatedIommu;

const PAGE: u64 = 4096;
const BASE: u64 = 0x1_0000_0000;
const SIZE: u64 = 16 << 20;

fn setup(policy: DiscardPolicy, vm: Option<&kvm_ioctls::VmFd>) -> (GuestRam, GpaRange) {
    let ram = GuestRam::new(Arc::new(RecordingAttributes::new()));
    let backing = match vm {
        Some(vm) => RegionBacking::classic(vm, BASE, SIZE).unwrap(),
        None => RegionBacking::software(BASE, SIZE).unwrap(),
    };
    let spec = RegionSpec {
        granularity: PAGE,
        initial: Attribute::Private,
        policy,
        initially_plugged: true,
    };
    ram.add_region(backing, spec).unwrap();
    let iommu = Arc::new(EmulatedIommu::builder().record_calls(false).build());
    ram.attach_device("nic", iommu, DeviceConfig::shared())
        .unwrap();
    (ram, GpaRange::new(BASE + 0x8_0000, PAGE).unwrap())
}

fn flip_flop(c: &mut Criterion) {
    let kvm = kvm_ioctls::Kvm::new().ok();
    let vm = kvm.as_ref().and_then(|k| k.create_vm().ok());
    let backing = if vm.is_some() {
        "guest_memfd"
    } else {
        "software"
    };
    let mut group = c.benchmark_group(format!("bounce_page_flip/{backing}"));
    for (name, policy) in [
        ("eager", DiscardPolicy::Eager),
        (
            "lazy_1MiB",
            DiscardPolicy::Lazy {
                budget_bytes: 1 << 20,
            },
        ),
        (
            "batched_64",
            DiscardPolicy::Batched {
                max_ranges: 64,
                max_bytes: 1 << 20,
            },
        ),
    ] {
        let (ram, bounce) = setup(policy, vm.as_ref());
        let region = ram.region_of(bounce).unwrap();
        let host = region.backing().host_addr(bounce.start()).unwrap();
        group.bench_function(name, |b| {
            b.iter(|| {
                ram.convert(bounce, Attribute::Shared).unwrap();
                // The firmware fills the bounce buffer: refaults the shared page if it was freed.
                // SAFETY: inside the live shared mapping; raw-pointer access only.
                unsafe { host.write_volatile(1) };
                ram.convert(bounce, Attribute::Private).unwrap();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, flip_flop);
criterion_main!(benches);
