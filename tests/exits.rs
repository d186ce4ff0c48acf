//! The vCPU exit path: [`ExitHandler`] answers each platform the way its kernel accepts, for
//! real failures of the engine; slices, pauses and memory faults; the exits capability on this
//! host's `/dev/kvm`; and, in the rig, two
//! regions of a SW_PROTECTED VM converting in parallel.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::gate::gated;
use common::{PAGE, Rig, range};
use crossbeam_channel::Sender;
use discard_manager::{Attribute, View};
use gmem_dma::KVM_HC_MAP_GPA_RANGE;
use gmem_dma::answer::map_gpa_range_exit_mask;
use gmem_dma::{
    ConversionQueue, ConversionRequest, DeviceConfig, DiscardPolicy, ExitCapError, ExitError,
    ExitHandler, HandlerConfig, MemoryFaultAction, QueueError, Ticket, VmPlatform,
    enable_map_gpa_range_exits,
};
use iommu::EmulatedIommu;
use iommu::emulated::CallKind;
use vm_rig::Feature;
use vmm_sys_util::eventfd::EventFd;

const BASE: u64 = 0x10_0000;
const ALL: [VmPlatform; 4] = [
    VmPlatform::Default,
    VmPlatform::SwProtected,
    VmPlatform::SevSnp,
    VmPlatform::Tdx,
];
const PRIVATE: u64 = 1 << 4; // attrs: encrypted

fn queue(rig: &Rig) -> Arc<ConversionQueue> {
    Arc::new(ConversionQueue::start(rig.ram.clone()).unwrap())
}

/// A handler that tells the guest at once (no retries by the VMM).
fn direct(queue: &Arc<ConversionQueue>, platform: VmPlatform) -> ExitHandler {
    let config = HandlerConfig {
        vmm_retries: 0,
        ..HandlerConfig::for_platform(platform)
    };
    ExitHandler::with_config(queue.clone(), platform, config)
}

/// `KVM_HC_MAP_GPA_RANGE(gpa, pages, attrs)` through `handler`: the value the guest reads.
fn map_gpa(handler: &ExitHandler, gpa: u64, pages: u64, attrs: u64) -> u64 {
    let mut ret = 0x5a5a;
    let _ = handler.hypercall_fields(
        KVM_HC_MAP_GPA_RANGE,
        &[gpa, pages, attrs, 0, 0, 0],
        &mut ret,
    );
    ret
}

fn minus(errno: i32) -> u64 {
    (-i64::from(errno)) as u64
}

fn eagain() -> u64 {
    libc::EAGAIN as u64
}

fn einval() -> u64 {
    libc::EINVAL as u64
}

/// Register platforms read `-register`; SNP and TDX read `restricted`.
fn expect(platform: VmPlatform, restricted: u64, register: i32) -> u64 {
    match platform {
        VmPlatform::SevSnp | VmPlatform::Tdx => restricted,
        VmPlatform::Default | VmPlatform::SwProtected => minus(register),
    }
}

#[test]
fn success_reads_zero_on_every_platform() {
    for platform in ALL {
        let rig = Rig::new(BASE, 16, DiscardPolicy::Eager);
        let q = queue(&rig);
        let h = direct(&q, platform);
        assert_eq!(map_gpa(&h, BASE, 2, 0), 0, "{platform:?}");
        assert_eq!(map_gpa(&h, BASE, 2, PRIVATE), 0, "{platform:?}");
    }
}

#[test]
fn a_full_mapping_budget_reads_eagain_on_snp_and_tdx_and_enospc_elsewhere() {
    for platform in ALL {
        let rig = Rig::new(BASE, 16, DiscardPolicy::Eager);
        let budget = EmulatedIommu::builder().mapping_budget(Some(2)).build();
        rig.attach("type1-nic", budget, DeviceConfig::shared());
        let q = queue(&rig);
        let ret = map_gpa(&direct(&q, platform), BASE, 4, 0);
        assert_eq!(
            ret,
            expect(platform, eagain(), libc::ENOSPC),
            "{platform:?}"
        );
    }
}

#[test]
fn a_failed_unmap_reads_eagain_on_snp_and_tdx_and_ebusy_elsewhere() {
    for platform in ALL {
        let rig = Rig::new(BASE, 16, DiscardPolicy::Eager);
        let dev = rig.attach("nic", EmulatedIommu::new(), DeviceConfig::shared());
        let q = queue(&rig);
        let h = direct(&q, platform);
        assert_eq!(map_gpa(&h, BASE, 4, 0), 0);
        dev.iommu
            .inject_failures(|kind, _, _| (*kind == CallKind::Unmap).then_some(libc::EIO));
        let ret = map_gpa(&h, BASE, 4, PRIVATE);
        assert_eq!(ret, expect(platform, eagain(), libc::EBUSY), "{platform:?}");
    }
}

#[test]
fn a_refused_kvm_attribute_reads_einval_on_snp_and_tdx_and_its_errno_elsewhere() {
    for platform in ALL {
        let rig = Rig::new(BASE, 16, DiscardPolicy::Eager);
        let q = queue(&rig);
        rig.attrs.inject_failures(|_, _| true); // RecordingAttributes fails with EIO
        let ret = map_gpa(&direct(&q, platform), BASE, 1, 0);
        assert_eq!(ret, expect(platform, einval(), libc::EIO), "{platform:?}");
    }
}

#[test]
fn requests_that_can_never_succeed_read_einval_everywhere() {
    for platform in ALL {
        let rig = Rig::new(BASE, 16, DiscardPolicy::Eager);
        let q = queue(&rig);
        let h = direct(&q, platform);
        let want = expect(platform, einval(), libc::EINVAL);
        assert_eq!(map_gpa(&h, 0x8000_0000, 1, 0), want, "outside guest RAM");
        assert_eq!(map_gpa(&h, BASE, 1, 3), want, "reserved page size");
        assert_eq!(map_gpa(&h, BASE, 0, 0), want, "no pages");
        let mut ret = 0;
        let r = h.hypercall_fields(11, &[BASE, 1, 0, 0, 0, 0], &mut ret);
        assert!(matches!(r, Err(ExitError::Request(_))));
        assert_eq!(ret, want, "another hypercall");
    }
}

#[test]
fn on_snp_the_handler_retries_a_transient_failure_before_the_guest_sees_it() {
    let rig = Rig::new(BASE, 16, DiscardPolicy::Eager);
    let dev = rig.attach("nic", EmulatedIommu::new(), DeviceConfig::shared());
    let q = queue(&rig);
    let snp = ExitHandler::new(q.clone(), VmPlatform::SevSnp);
    // The first map fails, later ones succeed: the guest (which would terminate on any PSC
    // error) reads 0.
    let failed = Arc::new(AtomicUsize::new(0));
    let f = failed.clone();
    dev.iommu.inject_failures(move |kind, _, _| {
        (*kind == CallKind::MapVa && f.fetch_add(1, Ordering::Relaxed) == 0).then_some(libc::ENOMEM)
    });
    assert_eq!(map_gpa(&snp, BASE, 1, 0), 0);
    assert_eq!(q.stats().transactions, 2, "one failed attempt, one retry");
    // A failure that stays is answered after the configured retries: 1 + 2 attempts.
    let rig = Rig::new(BASE, 16, DiscardPolicy::Eager);
    let budget = EmulatedIommu::builder().mapping_budget(Some(1)).build();
    rig.attach("type1-nic", budget, DeviceConfig::shared());
    let q = queue(&rig);
    let snp = ExitHandler::new(q.clone(), VmPlatform::SevSnp);
    assert_eq!(map_gpa(&snp, BASE, 2, 0), eagain());
    assert_eq!(q.stats().transactions, 3);
    // Invalid requests are not retried.
    let before = q.stats().transactions;
    assert_eq!(map_gpa(&snp, BASE + 1, 1, 0), einval());
    assert_eq!(q.stats().transactions, before + 1);
}

/// A queue whose region's worker is stuck inside the transaction of `blocker` (sharing the first
/// page) until `release` is sent.
fn blocked(rig: &Rig) -> (Arc<ConversionQueue>, Ticket, Sender<()>) {
    let (entered, release) = gated(&rig.region);
    let q = queue(rig);
    let blocker = q.submit(ConversionRequest {
        range: range(BASE, PAGE),
        to: Attribute::Shared,
    });
    entered.recv_timeout(Duration::from_secs(10)).unwrap();
    (q, blocker, release)
}

#[test]
fn a_slice_cuts_a_long_wait_and_the_guest_is_told_to_retry() {
    let rig = Rig::new(BASE, 16, DiscardPolicy::Eager);
    let (q, blocker, release) = blocked(&rig);
    for platform in [VmPlatform::Tdx, VmPlatform::Default] {
        let config = HandlerConfig {
            slice: Some(Duration::from_millis(20)),
            ..HandlerConfig::for_platform(platform)
        };
        let h = ExitHandler::with_config(q.clone(), platform, config);
        let mut ret = 0;
        let r = h.hypercall_fields(
            KVM_HC_MAP_GPA_RANGE,
            &[BASE + 4 * PAGE, 1, 0, 0, 0, 0],
            &mut ret,
        );
        assert!(
            matches!(
                r,
                Err(ExitError::Queue(QueueError::Cancelled { converted: 0 }))
            ),
            "{r:?}"
        );
        assert_eq!(ret, expect(platform, eagain(), libc::EAGAIN));
    }
    release.send(()).unwrap();
    blocker.wait().unwrap();
    let shared = rig.region.state().counts().unwrap().shared_bytes;
    assert_eq!(shared, PAGE, "the cut requests never ran");
}

#[test]
fn pausing_the_queue_answers_a_waiting_vcpu_eagain() {
    let rig = Rig::new(BASE, 16, DiscardPolicy::Eager);
    let (q, blocker, release) = blocked(&rig);
    let vcpu = {
        let h = direct(&q, VmPlatform::Tdx);
        std::thread::spawn(move || map_gpa(&h, BASE + 4 * PAGE, 1, 0))
    };
    // Queued behind the blocker when the pause comes, or submitted after it: either way the
    // vCPU is answered at once, while the blocker's chunk still runs.
    let pauser = {
        let q = q.clone();
        std::thread::spawn(move || q.pause())
    };
    assert_eq!(vcpu.join().unwrap(), eagain());
    release.send(()).unwrap();
    pauser.join().unwrap();
    blocker.wait().unwrap();
    // While paused, a memory fault asks for a retry, not for the vCPU to fail.
    let h = direct(&q, VmPlatform::SwProtected);
    let outcome = h.memory_fault(0, BASE + 8 * PAGE, PAGE);
    assert_eq!(outcome.action, MemoryFaultAction::Retry);
    q.resume();
    assert_eq!(
        map_gpa(&h, BASE + 4 * PAGE, 1, 0),
        0,
        "the guest's retry works"
    );
}

#[test]
fn a_memory_fault_resumes_after_converting_and_fails_what_can_never_be_served() {
    let rig = Rig::new(BASE, 16, DiscardPolicy::Eager);
    let q = queue(&rig);
    let h = direct(&q, VmPlatform::SevSnp);
    // A shared access to a private page: converted to shared.
    let outcome = h.memory_fault(0, BASE, PAGE);
    assert_eq!(outcome.action, MemoryFaultAction::Resume);
    assert_eq!(outcome.result.unwrap().runs(), [range(BASE, PAGE)]);
    let private = u64::from(kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE);
    let outcome = h.memory_fault(private, BASE, PAGE);
    assert_eq!(outcome.action, MemoryFaultAction::Resume);
    let view = rig
        .region
        .state()
        .view_runs(View::Shared, rig.region.range());
    assert!(view.unwrap().is_empty());
    // Outside guest RAM: resuming would fault forever.
    let outcome = h.memory_fault(0, 0x8000_0000, PAGE);
    assert_eq!(outcome.action, MemoryFaultAction::Fail);
}

#[test]
fn a_submitted_hypercall_signals_the_loops_eventfd_and_gives_the_platforms_answer() {
    let rig = Rig::new(BASE, 16, DiscardPolicy::Eager);
    let budget = EmulatedIommu::builder().mapping_budget(Some(1)).build();
    rig.attach("type1-nic", budget, DeviceConfig::shared());
    let q = queue(&rig);
    let h = direct(&q, VmPlatform::Tdx);
    let fd = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let ok = h
        .submit_hypercall(KVM_HC_MAP_GPA_RANGE, &[BASE, 1, 0, 0, 0, 0], fd.clone())
        .unwrap();
    let full = h
        .submit_hypercall(
            KVM_HC_MAP_GPA_RANGE,
            &[BASE + 8 * PAGE, 1, 0, 0, 0, 0],
            fd.clone(),
        )
        .unwrap();
    let mut signalled = 0;
    while signalled < 2 {
        signalled += fd.read().unwrap_or(0); // nonblocking: EAGAIN until the worker answers
        std::thread::yield_now();
    }
    assert!(ok.is_answered() && full.is_answered());
    assert_eq!(ok.answer().0, 0);
    assert_eq!(full.answer().0, eagain());
    let bad = h.submit_hypercall(KVM_HC_MAP_GPA_RANGE, &[BASE, 1, 3, 0, 0, 0], fd);
    assert_eq!(bad.unwrap_err().0, einval());
}

#[test]
fn host_exits_capability_is_enabled_exactly_when_check_extension_offers_it() {
    let name = "host_exits_capability_is_enabled_exactly_when_check_extension_offers_it";
    if !vm_rig::need(name, &[Feature::Kvm]) {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let offered = map_gpa_range_exit_mask(&vm);
    let result = enable_map_gpa_range_exits(&vm);
    eprintln!("{name}: KVM_CAP_EXIT_HYPERCALL offers {offered:#x}: {result:?}");
    if offered & (1 << KVM_HC_MAP_GPA_RANGE) != 0 {
        result.unwrap();
    } else {
        match result {
            Err(ExitCapError::Unsupported { offered: o }) => assert_eq!(o, offered),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn kernel_two_regions_of_a_sw_protected_vm_convert_in_parallel() {
    let name = "kernel_two_regions_of_a_sw_protected_vm_convert_in_parallel";
    if !vm_rig::need(name, &[Feature::Kvm, Feature::KvmPrivateMemory]) {
        return;
    }
    const KVM_X86_SW_PROTECTED_VM: u64 = 1;
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm_with_type(KVM_X86_SW_PROTECTED_VM).unwrap());
    let ram = Arc::new(gmem_dma::GuestRam::new(Arc::new(
        gmem_dma::KvmAttributes::new(vm.clone()),
    )));
    let spec = gmem_dma::RegionSpec {
        granularity: PAGE,
        initial: Attribute::Private,
        policy: DiscardPolicy::Eager,
        initially_plugged: true,
    };
    let (a, b) = (0x1_0000_0000, 0x2_0000_0000);
    let mut regions = Vec::new();
    for (slot, base) in [(0, a), (1, b)] {
        let backing = gmem_dma::RegionBacking::classic(&vm, base, 1 << 20).unwrap();
        backing.bind(&vm, slot).unwrap();
        regions.push(ram.add_region(backing, spec).unwrap());
    }
    let q = Arc::new(ConversionQueue::start(ram.clone()).unwrap());
    let (entered, release) = gated(&regions[0]); // after the queue: dropped first on a panic
    let share = |gpa| {
        q.submit(ConversionRequest {
            range: range(gpa, PAGE),
            to: Attribute::Shared,
        })
    };
    let first = share(a);
    entered.recv_timeout(Duration::from_secs(10)).unwrap();
    let behind = share(a + 8 * PAGE);
    let other = share(b).wait_timeout(Duration::from_secs(10));
    let other = other.expect("region b converts while region a's worker is busy");
    assert_eq!(other.unwrap().runs(), [range(b, PAGE)]);
    assert!(!behind.is_answered());
    release.send(()).unwrap();
    first.wait().unwrap();
    behind.wait().unwrap();
    for (slot, region) in regions.iter().enumerate() {
        region.backing().unbind(&vm, slot as u32).unwrap();
    }
}
