//! A small VMM built on gmem-dma: how a VMM embeds the library.
//!
//! It creates a KVM VM with private memory (`KVM_X86_SW_PROTECTED_VM`) and one 1 MiB RAM region
//! in the classic model (memfd for shared pages, guest_memfd for private ones), attaches QEMU's
//! `edu` PCI device through VFIO type1 or IOMMUFD, and runs a tiny real-mode guest that plays
//! firmware. For each of N transactions the guest shares a bounce page (`KVM_HC_MAP_GPA_RANGE`),
//! fills it, asks the VMM (port I/O) to have the device DMA it into the device and back out
//! into a second shared page, compares the two, and makes the bounce page private again. Last,
//! it shares a page, writes a canary into it, makes it private and asks for a DMA into it,
//! which the IOMMU must block. Every conversion exit goes to the library; the guest gets the
//! library's verdict.
//!
//! Usage: see [`USAGE`].
//! The device defaults to `GMEM_DMA_EDU`, else the edu device bound to vfio-pci. The blocked DMA
//! is looked for in `/dev/kmsg`, where intel-iommu logs `DMAR: [DMA Write ...] fault addr`;
//! `--no-fault-log` skips that for IOMMUs that report faults elsewhere.
//!
//! Exit codes (as the dma-map tool's): 0 every check passed; 1 a check failed; 2 bad
//! arguments; 3 this host lacks what the example needs (each missing piece is named); 4 a
//! system call failed unexpectedly.

use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use discard_manager::{Attribute, GpaRange};
use gmem_dma::KVM_HC_MAP_GPA_RANGE;
use gmem_dma::{ConversionQueue, ExitHandler, MemoryFaultAction, VmPlatform};
use gmem_dma::{DeviceConfig, DiscardPolicy, GuestRam, KvmAttributes, KvmSupport, ModelChoice};
use gmem_dma::{RegionBacking, RegionSpec};
use iommu::{DmaBackend, Edu, HostPaths, PciAddress, VfioMode};
use iommu::{IommufdBackend, Type1Backend};
use kvm_bindings::kvm_regs;
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use vm_memory::{Bytes, MemoryRegionAddress};

const USAGE: &str = "usage: firmware_vmm [--backend type1|iommufd] [--device 0000:00:03.0] \
                     [--transactions 1..=255] [--no-fault-log]";

// Guest physical layout, shared by the guest program and the VMM: below 1 MiB (real mode) and
// edu's 28-bit DMA mask. The device sees guest memory at IOVA = GPA.
const RAM_SIZE: u64 = 1 << 20;
const PAGE: u64 = 4096;
const CODE: u64 = 0x0; // the guest program; its stack grows down from the page's end
const BOUNCE: u64 = 0x10000; // shared and made private again in every transaction
const RESULT: u64 = 0x11000; // shared for the whole run: where the device writes back
const PROBE: u64 = 0x12000; // made private, then the target of a DMA that must fail
const DMA_LEN: u32 = 2048; // bytes per DMA (at most Edu::MAX_DMA)
const CANARY: u8 = 0x5a;
// Ports the guest writes to ask the VMM for something.
const PORT_DMA_TO_DEVICE: u16 = 0x10; // eax = GPA: the device reads DMA_LEN bytes there
const PORT_DMA_FROM_DEVICE: u16 = 0x11; // eax = GPA: the device writes DMA_LEN bytes there
const PORT_DMA_PRIVATE: u16 = 0x12; // as 0x11, to a page the guest made private
const PORT_DONE: u16 = 0x13; // al = number of the transaction that finished
const PORT_ERROR: u16 = 0x14; // al = 1: the DMA'd bytes differ, 2: a conversion was refused

// The guest: 16-bit real-mode firmware, assembled by rustc's own assembler into bytes the VMM
// copies to GPA 0. It starts with BP = the number of transactions.
std::arch::global_asm!(
    r#"
    .pushsection .rodata.firmware_vmm_guest, "a"
    .globl firmware_vmm_guest_start, firmware_vmm_guest_end
firmware_vmm_guest_start:
    .code16
    xor ax, ax; mov ss, ax; mov sp, {page}  # stack at the top of the code page
    mov ax, {bounce} >> 4; mov ds, ax; mov es, ax  # DS = ES = BOUNCE; RESULT, PROBE follow
    mov ebx, {result}; xor edx, edx; call .Lconvert  # RESULT: shared for good
.Ltransaction:
    mov ebx, {bounce}; xor edx, edx; call .Lconvert  # 1. share the bounce page
    xor di, di; mov ax, bp                # 2. fill it: byte i = transaction number + i
.Lfill:
    stosb; inc al; cmp di, {len}; jb .Lfill
    mov eax, {bounce}; out {to_device}, eax  # 3. device: bounce -> its buffer -> RESULT
    mov eax, {result}; out {from_device}, eax
    xor si, si; mov di, {result} - {bounce}; mov cx, {len}  # 4. compare bounce, RESULT
    repe cmpsb; je 2f
    mov al, 1; out {error}, al
2:  mov ebx, {bounce}; mov edx, 0x10; call .Lconvert  # 5. back to private (attrs bit 4)
    mov ax, bp; out {done}, al
    dec bp; jnz .Ltransaction
    mov ebx, {probe}; xor edx, edx; call .Lconvert  # the probe: share PROBE, fill it with
    mov di, {probe} - {bounce}; mov cx, {len}; mov al, {canary}; rep stosb  # a canary,
    mov ebx, {probe}; mov edx, 0x10; call .Lconvert  # make it private, and ask for a DMA
    mov eax, {probe}; out {dma_private}, eax  # into it: the IOMMU must block that
    hlt
.Lconvert:                                # KVM_HC_MAP_GPA_RANGE(gpa ebx, 1 page, attrs edx)
    mov eax, {map_gpa_range}; mov ecx, 1
    vmmcall                               # AMD's hypercall: kvm_amd runs the rig's guests
    test eax, eax; jz 3f                  # the verdict: 0, or -errno
    mov al, 2; out {error}, al
3:  ret
firmware_vmm_guest_end:
    .code64
    .popsection
    "#,
    page = const PAGE, bounce = const BOUNCE, result = const RESULT, probe = const PROBE,
    len = const DMA_LEN, canary = const CANARY, map_gpa_range = const KVM_HC_MAP_GPA_RANGE,
    to_device = const PORT_DMA_TO_DEVICE, from_device = const PORT_DMA_FROM_DEVICE,
    dma_private = const PORT_DMA_PRIVATE, done = const PORT_DONE, error = const PORT_ERROR,
);

fn guest_program() -> &'static [u8] {
    unsafe extern "C" {
        static firmware_vmm_guest_start: u8;
        static firmware_vmm_guest_end: u8;
    }
    let start = &raw const firmware_vmm_guest_start;
    let len = &raw const firmware_vmm_guest_end as usize - start as usize;
    // SAFETY: the two symbols delimit, in order and in one section, the read-only bytes
    // `global_asm!` emitted above; nothing writes them.
    unsafe { std::slice::from_raw_parts(start, len) }
}

/// How the example ends; each kind has its exit code.
enum Failure {
    Check(String),
    Usage(String),
    HostLacks(Vec<String>),
    System(String),
}

/// The library's errors name the step that failed; print them with all their causes.
impl<E: Error> From<E> for Failure {
    fn from(e: E) -> Self {
        let (mut text, mut cause) = (e.to_string(), e.source());
        while let Some(c) = cause {
            (text, cause) = (format!("{text}: {c}"), c.source());
        }
        Failure::System(text)
    }
}

/// For kvm-ioctls' bare errnos: says which call failed.
fn ioctl(call: &'static str) -> impl Fn(kvm_ioctls::Error) -> Failure {
    move |e| Failure::System(format!("{call}: {e}"))
}

struct Args {
    mode: VfioMode,
    device: Option<String>,
    transactions: u8,
    fault_log: bool,
}

fn parse_args() -> Result<Args, String> {
    let (mode, device, transactions) = (VfioMode::Type1, vm_rig::edu_device(), 8);
    let mut args = Args {
        mode,
        device,
        transactions,
        fault_log: true,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        if flag == "--no-fault-log" {
            args.fault_log = false;
            continue;
        }
        let value = argv.next().unwrap_or_default();
        match flag.as_str() {
            "--backend" if value == "type1" => args.mode = VfioMode::Type1,
            "--backend" if value == "iommufd" => args.mode = VfioMode::Iommufd,
            "--device" => args.device = Some(value),
            "--transactions" => match value.parse() {
                Ok(n) if n > 0 => args.transactions = n,
                _ => return Err(format!("--transactions takes 1..=255, not {value:?}")),
            },
            _ => return Err(format!("bad argument: {flag} {value}")),
        }
    }
    Ok(args)
}

/// A VM with private memory whose conversion hypercalls exit to the VMM, or what KVM lacks.
fn private_memory_vm(kvm: &Kvm) -> Result<VmFd, String> {
    const KVM_X86_SW_PROTECTED_VM: u64 = kvm_bindings::KVM_X86_SW_PROTECTED_VM as u64;
    let needs = "needs Linux 6.8+ built with CONFIG_KVM_SW_PROTECTED_VM";
    let vm = kvm.create_vm_with_type(KVM_X86_SW_PROTECTED_VM);
    let vm = vm.map_err(|e| format!("KVM_X86_SW_PROTECTED_VM ({e}): {needs}"))?;
    let support = KvmSupport::probe(kvm, &vm);
    support
        .choose_model(ModelChoice::Classic)
        .map_err(|e| e.to_string())?;
    if !support.has_private_attribute() {
        return Err(format!("no private memory attribute: {support:?}"));
    }
    // Without it KVM_HC_MAP_GPA_RANGE never exits to the VMM.
    gmem_dma::enable_map_gpa_range_exits(&vm).map_err(|e| e.to_string())?;
    Ok(vm)
}

fn run(args: Args) -> Result<(), Failure> {
    // Name everything this host lacks at once, before creating anything.
    let mut lacks = Vec::new();
    let kvm = Kvm::new().map_err(|e| lacks.push(format!("/dev/kvm: {e}")));
    let vm = kvm
        .ok()
        .and_then(|kvm| private_memory_vm(&kvm).map_err(|e| lacks.push(e)).ok());
    let address: Option<PciAddress> = match &args.device {
        Some(text) => Some(text.parse().map_err(|e| Failure::Usage(format!("{e}")))?),
        None => {
            lacks.push("an edu device (1234:11e8) bound to vfio-pci (--device)".into());
            None
        }
    };
    let usable = address.map(|a| HostPaths::default().check(&a, args.mode));
    if let Some(Err(e)) = usable {
        lacks.push(format!("{}: {e}", args.mode));
    }
    let (Some(vm), Some(address), true) = (vm, address, lacks.is_empty()) else {
        return Err(Failure::HostLacks(lacks));
    };
    if args.fault_log {
        // The one fault this guest causes must not fall to the kernel's fault-message rate limit.
        vm_rig::wait_for_dmar_fault_log_window();
    }
    let kmsg = args.fault_log.then(vm_rig::KernelLog::from_now).transpose();
    let mut kmsg = kmsg.map_err(|e| Failure::System(format!("/dev/kmsg: {e}")))?;

    // Guest RAM: one region at GPA 0 in memslot 0, all private until the guest shares.
    let vm = Arc::new(vm);
    let backing = RegionBacking::classic(&vm, 0, RAM_SIZE)?;
    backing.bind(&vm, 0)?;
    let ram = Arc::new(GuestRam::new(Arc::new(KvmAttributes::new(Arc::clone(&vm)))));
    // Lazy discard: the bounce page, flipped every transaction, keeps both of its pages
    // instead of paying a hole punch and a refault per flip. It also keeps the probe page's
    // canary in its shared backing, which the isolation check reads.
    let (granularity, initial) = (PAGE, Attribute::Private);
    let policy = DiscardPolicy::Lazy {
        budget_bytes: 64 * PAGE,
    };
    let spec = RegionSpec {
        granularity,
        initial,
        policy,
        initially_plugged: true,
    };
    let region = ram.add_region(backing, spec)?;

    // The device: its IOMMU goes to the library, its registers to the edu driver.
    let (backend, device): (Arc<dyn DmaBackend>, _) = match args.mode {
        VfioMode::Type1 => Type1Backend::open(&address).map(|(b, d)| (Arc::new(b) as _, d))?,
        _ => IommufdBackend::open(&address).map(|(b, d)| (Arc::new(b) as _, d))?,
    };
    let edu_id = ram.attach_device("edu", backend, DeviceConfig::shared())?;
    let edu = Edu::new(device)?;

    // The firmware image goes to shared memory: private memory has no host mapping to write.
    let code_page = GpaRange::new(CODE, PAGE).expect("one page");
    ram.convert(code_page, Attribute::Shared)?;
    // Offsets in it are GPAs: the region starts at 0.
    let shared = region
        .backing()
        .mapping()
        .ok_or_else(|| Failure::System("the backing is not mapped by gmem-dma".into()))?;
    shared.write_slice(guest_program(), MemoryRegionAddress(CODE))?;
    let read_shared = |gpa| {
        let mut bytes = vec![0u8; DMA_LEN as usize];
        shared
            .read_slice(&mut bytes, MemoryRegionAddress(gpa))
            .map(|()| bytes)
    };

    let mut vcpu = vm.create_vcpu(0).map_err(ioctl("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    (sregs.cs.base, sregs.cs.selector) = (CODE, 0); // real mode, CS:IP = 0:0
    vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    let mut regs = kvm_regs::default();
    (regs.rflags, regs.rbp) = (2, args.transactions.into()); // BP: the guest's argument
    vcpu.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;

    let queue = Arc::new(ConversionQueue::start(Arc::clone(&ram))?);
    let mut conversions = Conversions::new(ExitHandler::new(queue, VmPlatform::SwProtected));
    let (mut guest_errors, mut done) = (Vec::new(), Vec::new());
    let mut dma_time = Duration::ZERO;
    let (mut isolated, started) = (None, Instant::now());
    loop {
        match vcpu.run() {
            // A conversion request: the queue converts it and the handler writes the verdict
            // (0 or -errno on SW_PROTECTED) where the guest reads it. A refused conversion
            // never stops the VM.
            Ok(VcpuExit::Hypercall(exit)) => conversions.hypercall(exit.nr, &exit.args, exit.ret),
            // An access whose kind disagrees with the attribute. SNP and TDX guests make
            // them; a SW_PROTECTED guest cannot (KVM takes the kind from the attribute).
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                conversions.memory_fault(flags, gpa, size)?;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let value = data.iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b));
                let t0 = Instant::now();
                match port {
                    PORT_DMA_TO_DEVICE => edu.copy_to_device(value, DMA_LEN)?,
                    PORT_DMA_FROM_DEVICE => edu.copy_from_device(value, DMA_LEN)?,
                    PORT_DMA_PRIVATE => {
                        // The page's shared backing still holds the guest's canary (lazy
                        // discard kept it): a DMA that got through would show there. The
                        // device itself cannot tell that the IOMMU dropped its write.
                        let before = read_shared(value)?;
                        edu.copy_from_device(value, DMA_LEN)?;
                        let canary = before.iter().all(|&b| b == CANARY);
                        isolated = Some(canary && read_shared(value)? == before);
                    }
                    PORT_DONE => done.push(Instant::now()),
                    PORT_ERROR => guest_errors.push(value),
                    _ => return Err(Failure::Check(format!("guest wrote to port {port:#x}"))),
                }
                if matches!(port, PORT_DMA_TO_DEVICE | PORT_DMA_FROM_DEVICE) {
                    dma_time += t0.elapsed();
                }
            }
            Ok(VcpuExit::Hlt) => break,
            Ok(exit) => return Err(Failure::Check(format!("unexpected exit {exit:?}"))),
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(ioctl("KVM_RUN")(e)),
        }
    }
    let mappings = ram.device_mappings(edu_id).unwrap_or_default();
    let mapped: Vec<u64> = mappings.iter().map(|m| m.iova).collect();
    let stats = ram.device_stats(edu_id).unwrap_or_default();
    let (maps, unmaps) = (stats.map_calls, stats.unmap_calls);
    let wait = Duration::from_secs(3); // intel-iommu reports faults from an interrupt
    let faults = kmsg
        .as_mut()
        .map(|log| log.wait_for(vm_rig::is_dmar_fault, wait));
    let faults = faults.transpose()?;

    // Teardown in the order GuestRam documents: devices, then memslots, then memory.
    let detached = ram.detach_device(edu_id)?;
    drop(vcpu);
    region.backing().unbind(&vm, 0)?;

    let n = u64::from(args.transactions);
    let per_txn = |d: Duration| d.as_secs_f64() * 1e3 / n as f64;
    let total = per_txn(done.last().map_or(Duration::ZERO, |&last| last - started));
    let dma = per_txn(dma_time);
    let Conversions {
        to_shared,
        to_private,
        refused,
        memory_faults,
        time: convert_time,
        ..
    } = conversions;
    let per_conversion = convert_time.as_secs_f64() * 1e6 / (to_shared + to_private) as f64;
    let (done, unmapped, mode) = (done.len() as u64, detached.calls, args.mode);
    println!("firmware_vmm: edu {address} through {mode}; 1 MiB of guest RAM, classic, lazy");
    println!("  transactions  {done} of {n}, errors the guest reported: {guest_errors:?}");
    println!(
        "  conversions   {to_shared} to shared + {to_private} to private (KVM_HC_MAP_GPA_RANGE)"
    );
    println!("                {memory_faults} by KVM_EXIT_MEMORY_FAULT, refused: {refused:?}");
    println!("  iommu calls   {maps} map + {unmaps} unmap running, {unmapped} unmap at detach");
    println!("  mapped        {mapped:x?} (IOVAs) when the guest stopped");
    println!("  private page  untouched by the DMA into it: {isolated:?}");
    match &faults {
        Some(faults) => println!("  dma faults    {}: {faults:#?}", faults.len()),
        None => println!("  dma faults    not looked for (--no-fault-log)"),
    }
    println!("  time          {total:.1} ms per transaction (device DMA: {dma:.1} ms)");
    println!("                {per_conversion:.0} us per conversion");

    // Each number above against what this guest must cause.
    let at_probe = format!("fault addr {PROBE:#x}");
    let one_fault = |f: &Vec<String>| f.len() == 1 && f[0].contains(&at_probe);
    let checks = [
        (done == n && guest_errors.is_empty(), "N equal transactions"),
        (refused.is_empty(), "no conversion refused"),
        // RESULT, PROBE and each bounce page to shared; each bounce page and PROBE back.
        (
            (to_shared, to_private) == (n + 2, n + 1),
            "(N+2, N+1) conversions",
        ),
        // A map per page made shared (code, RESULT, bounce, PROBE), an unmap per page made private.
        ((maps, unmaps) == (n + 3, n + 1), "N + 3 maps, N + 1 unmaps"),
        (mapped == [CODE, RESULT], "only the shared pages mapped"),
        (isolated == Some(true), "the private page untouched"),
        (faults.as_ref().is_none_or(one_fault), "one fault, at PROBE"),
        (detached.mappings == 2, "detach unmaps the rest"),
    ];
    let failed: Vec<&str> = checks.iter().filter(|c| !c.0).map(|c| c.1).collect();
    match failed.is_empty() {
        true => Ok(()),
        false => Err(Failure::Check(format!("expected {}", failed.join("; ")))),
    }
}

/// The vCPU's conversion exits, through the library's exit handler, counted for the report.
struct Conversions {
    handler: ExitHandler,
    to_shared: u64,
    to_private: u64,
    refused: Vec<String>,
    memory_faults: u64,
    time: Duration,
}

impl Conversions {
    fn new(handler: ExitHandler) -> Self {
        Self {
            handler,
            to_shared: 0,
            to_private: 0,
            refused: Vec::new(),
            memory_faults: 0,
            time: Duration::ZERO,
        }
    }

    /// A `KVM_EXIT_HYPERCALL`: converted through the queue, `ret` is what the guest reads.
    fn hypercall(&mut self, nr: u64, args: &[u64; 6], ret: &mut u64) {
        let t0 = Instant::now();
        let result = self.handler.hypercall_fields(nr, args, ret);
        self.time += t0.elapsed();
        match result {
            Ok(c) if c.request.to == Attribute::Shared => self.to_shared += 1,
            Ok(_) => self.to_private += 1,
            Err(e) => self.refused.push(format!("{:x?}: {e}", &args[..3])),
        }
    }

    /// A `KVM_EXIT_MEMORY_FAULT`: converted, or the vCPU cannot go on.
    fn memory_fault(&mut self, flags: u64, gpa: u64, size: u64) -> Result<(), Failure> {
        self.memory_faults += 1;
        let outcome = self.handler.memory_fault(flags, gpa, size);
        match (outcome.action, outcome.result) {
            (MemoryFaultAction::Fail, Err(e)) => Err(Failure::Check(format!(
                "memory fault at {gpa:#x} cannot be served: {e}"
            ))),
            _ => Ok(()),
        }
    }
}

fn main() -> ExitCode {
    let (code, text) = match parse_args().map_err(Failure::Usage).and_then(run) {
        Ok(()) => return ExitCode::SUCCESS,
        Err(Failure::Check(text)) => (1, format!("FAILED: {text}")),
        Err(Failure::Usage(text)) => (2, format!("{text}\n{USAGE}")),
        Err(Failure::HostLacks(l)) => (3, format!("this host lacks:\n  - {}", l.join("\n  - "))),
        Err(Failure::System(text)) => (4, format!("error: {text}")),
    };
    eprintln!("firmware_vmm: {text}");
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gmem_dma::RecordingAttributes;

    /// The example's RAM (1 MiB at GPA 0, private, 4 KiB granules) on a software backing, and
    /// the conversion counter over a queue, as the vCPU loop uses them.
    fn conversions() -> (Arc<GuestRam>, Conversions) {
        let ram = Arc::new(GuestRam::new(Arc::new(RecordingAttributes::new())));
        let spec = RegionSpec {
            granularity: PAGE,
            initial: Attribute::Private,
            policy: DiscardPolicy::Eager,
            initially_plugged: true,
        };
        let backing = RegionBacking::software(0, RAM_SIZE).unwrap();
        ram.add_region(backing, spec).unwrap();
        let queue = Arc::new(ConversionQueue::start(Arc::clone(&ram)).unwrap());
        let handler = ExitHandler::new(queue, VmPlatform::SwProtected);
        (ram, Conversions::new(handler))
    }

    #[test]
    fn the_guests_hypercalls_are_converted_and_answered_zero() {
        let (ram, mut c) = conversions();
        let mut ret = u64::MAX;
        // The guest's .Lconvert: ebx = GPA, ecx = 1 page, edx = attrs (0x10: private).
        c.hypercall(KVM_HC_MAP_GPA_RANGE, &[BOUNCE, 1, 0, 0, 0, 0], &mut ret);
        assert_eq!(ret, 0);
        c.hypercall(KVM_HC_MAP_GPA_RANGE, &[BOUNCE, 1, 0x10, 0, 0, 0], &mut ret);
        assert_eq!(ret, 0);
        assert_eq!((c.to_shared, c.to_private), (1, 1));
        assert!(c.refused.is_empty());
        let region = &ram.regions()[0];
        assert_eq!(region.state().counts().unwrap().shared_bytes, 0);
    }

    #[test]
    fn a_refused_hypercall_reads_minus_errno_and_is_reported() {
        let (_ram, mut c) = conversions();
        let mut ret = 0;
        // Past the end of guest RAM: the guest's `test eax, eax` sees -EINVAL.
        c.hypercall(KVM_HC_MAP_GPA_RANGE, &[RAM_SIZE, 1, 0, 0, 0, 0], &mut ret);
        assert_eq!(ret as i64, -i64::from(libc::EINVAL));
        assert_eq!(c.refused.len(), 1);
        assert_eq!((c.to_shared, c.to_private), (0, 0));
    }

    #[test]
    fn a_memory_fault_converts_or_fails_the_vcpu() {
        let (ram, mut c) = conversions();
        // A shared access to a private page: it becomes shared.
        assert!(c.memory_fault(0, PROBE, PAGE).is_ok());
        let region = &ram.regions()[0];
        assert_eq!(region.state().counts().unwrap().shared_bytes, PAGE);
        // Outside guest RAM it can never be served.
        assert!(matches!(
            c.memory_fault(0, RAM_SIZE, PAGE),
            Err(Failure::Check(_))
        ));
        assert_eq!(c.memory_faults, 2);
    }
}
