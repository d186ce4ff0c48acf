//! A small VMM built on gmem-dma: the way a VMM embeds the library.
//!
//! It creates a KVM VM with private memory (`KVM_X86_SW_PROTECTED_VM`) and one 1 MiB RAM region
//! in the classic model (memfd for shared pages, guest_memfd for private ones), attaches the
//! `edu` PCI device through VFIO type1 or IOMMUFD, and runs a tiny real-mode guest that plays
//! firmware. For each of N transactions the guest shares a bounce page (`KVM_HC_MAP_GPA_RANGE`),
//! fills it, asks the VMM (port I/O) to have the device DMA it into the device and back out
//! into a second shared page, compares the two, and makes the bounce page private again.
//! Finally it shares a page, writes a canary into it, makes it private and asks for one DMA
//! into it: the IOMMU must block that DMA. Every conversion exit goes to the library, and the
//! guest gets the library's verdict.
//!
//! ```text
//! firmware_vmm [--backend type1|iommufd] [--device 0000:00:03.0] [--transactions N] [--no-fault-log]
//! ```
//! The device defaults to `GMEM_DMA_EDU`, else the edu device bound to vfio-pci. The DMA fault
//! is looked for in `/dev/kmsg` as intel-iommu logs it (`DMAR: [DMA Write ...] fault addr`);
//! `--no-fault-log` skips that check for IOMMUs that log elsewhere.
//!
//! Exit codes (those of the dma-map tool): 0 every check passed; 1 a check failed (the message
//! names it); 2 bad arguments; 3 this host lacks what the example needs (KVM private memory,
//! a device bound to vfio-pci; the message lists each); 4 a system call failed unexpectedly.

use std::error::Error;
use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use discard_manager::{Attribute, GpaRange};
use gmem_dma::{
    DeviceConfig, DiscardPolicy, GuestRam, KvmAttributes, KvmSupport, ModelChoice, RegionBacking,
    RegionSpec, sys::KVM_HC_MAP_GPA_RANGE,
};
use iommu::{DmaBackend, Edu, HostPaths, IommufdBackend, PciAddress, Type1Backend, VfioMode};
use kvm_bindings::{
    KVM_CAP_EXIT_HYPERCALL, kvm_enable_cap, kvm_regs, kvm_userspace_memory_region2,
};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use vm_memory::{Bytes, MemoryRegionAddress};

// Guest physical layout, shared by the guest program and the VMM. Everything sits below 1 MiB
// (real mode) and below edu's 28-bit DMA mask; IOVA = GPA.
const RAM_SIZE: u64 = 1 << 20;
const PAGE: u64 = 4096;
const CODE: u64 = 0x0000; // the guest program; its stack grows down from the page's end
const BOUNCE: u64 = 0x10000; // flips shared/private once per transaction
const RESULT: u64 = 0x11000; // shared for the whole run: where the device writes back
const PROBE: u64 = 0x12000; // made private, then targeted by a DMA that must fail
const DMA_LEN: u32 = 2048; // bytes per DMA (at most Edu::MAX_DMA)
const CANARY: u8 = 0x5a;
// Ports the guest writes to ask the VMM for something.
const PORT_DMA_TO_DEVICE: u16 = 0x10; // eax = GPA: the device reads DMA_LEN bytes there
const PORT_DMA_FROM_DEVICE: u16 = 0x11; // eax = GPA: the device writes DMA_LEN bytes there
const PORT_DMA_PRIVATE: u16 = 0x12; // eax = GPA of a private page: as 0x11, must be blocked
const PORT_DONE: u16 = 0x13; // al = number of the transaction that finished
const PORT_ERROR: u16 = 0x14; // al = 1: DMA result differs, 2: a conversion was refused

// The guest: 16-bit real-mode "firmware", assembled by rustc's own assembler into a byte blob
// that the VMM copies to GPA 0. It starts with BP = number of transactions.
std::arch::global_asm!(
    ".pushsection .rodata.firmware_vmm_guest, \"a\"",
    ".globl firmware_vmm_guest_start, firmware_vmm_guest_end",
    "firmware_vmm_guest_start:",
    ".code16",
    "    xor ax, ax",
    "    mov ss, ax",
    "    mov sp, {page}",           // stack: top of the code page
    "    mov ax, {bounce} >> 4",    // DS = ES = segment of BOUNCE; RESULT and PROBE follow it
    "    mov ds, ax",
    "    mov es, ax",
    "    mov ebx, {result}",        // RESULT becomes shared for the whole run
    "    xor edx, edx",
    "    call .Lconvert",
    ".Ltransaction:",
    "    mov ebx, {bounce}",        // 1. share the bounce page
    "    xor edx, edx",
    "    call .Lconvert",
    "    xor di, di",               // 2. fill it: byte i = transaction number + i
    "    mov ax, bp",
    ".Lfill:",
    "    stosb",
    "    inc al",
    "    cmp di, {len}",
    "    jb .Lfill",
    "    mov eax, {bounce}",        // 3. device: bounce page -> its buffer -> RESULT
    "    out {to_device}, eax",
    "    mov eax, {result}",
    "    out {from_device}, eax",
    "    xor si, si",               // 4. compare bounce [DS:SI] with RESULT [ES:DI]
    "    mov di, {result} - {bounce}",
    "    mov cx, {len}",
    "    repe cmpsb",
    "    je 2f",
    "    mov al, 1",
    "    out {error}, al",
    "2:  mov ebx, {bounce}",        // 5. the bounce page goes back to private
    "    mov edx, 0x10",            //    attrs bit 4: encrypted, i.e. private
    "    call .Lconvert",
    "    mov ax, bp",
    "    out {done}, al",
    "    dec bp",
    "    jnz .Ltransaction",
    "    mov ebx, {probe}",         // the probe: share PROBE, put a canary in it ...
    "    xor edx, edx",
    "    call .Lconvert",
    "    mov di, {probe} - {bounce}",
    "    mov cx, {len}",
    "    mov al, {canary}",
    "    rep stosb",
    "    mov ebx, {probe}",         // ... make it private ...
    "    mov edx, 0x10",
    "    call .Lconvert",
    "    mov eax, {probe}",         // ... and ask for a DMA into it, which the IOMMU must block
    "    out {dma_private}, eax",
    "    hlt",
    ".Lconvert:",                  // KVM_HC_MAP_GPA_RANGE(gpa = ebx, 1 page, attrs = edx)
    "    mov eax, {map_gpa_range}",
    "    mov ecx, 1",
    "    vmmcall",                  // AMD's hypercall: kvm_amd runs the rig's guests
    "    test eax, eax",            // the VMM's verdict: 0 or -errno
    "    jz 3f",
    "    mov al, 2",
    "    out {error}, al",
    "3:  ret",
    "firmware_vmm_guest_end:",
    ".code64",
    ".popsection",
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
    let len = (&raw const firmware_vmm_guest_end as usize) - start as usize;
    // SAFETY: both symbols delimit the read-only bytes `global_asm!` emitted above, in order,
    // in one section; nothing ever writes them.
    unsafe { std::slice::from_raw_parts(start, len) }
}

/// How the example ends; each kind has its exit code.
enum Failure {
    Check(String),
    Usage(String),
    HostLacks(Vec<String>),
    System(String),
}

/// Any library or kernel error, with its whole chain of causes.
fn sys<E: Error>(what: &str) -> impl FnOnce(E) -> Failure {
    move |e| {
        let mut text = format!("{what}: {e}");
        let mut cause = e.source();
        while let Some(c) = cause {
            text += &format!(": {c}");
            cause = c.source();
        }
        Failure::System(text)
    }
}

struct Args {
    mode: VfioMode,
    device: Option<String>,
    transactions: u8,
    fault_log: bool,
}

fn parse_args() -> Result<Args, Failure> {
    let mut args = Args {
        mode: VfioMode::Type1,
        device: vm_rig::edu_device(),
        transactions: 8,
        fault_log: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| Failure::Usage(format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--backend" => match value()?.as_str() {
                "type1" => args.mode = VfioMode::Type1,
                "iommufd" => args.mode = VfioMode::Iommufd,
                other => {
                    return Err(Failure::Usage(format!(
                        "--backend {other}: type1 or iommufd"
                    )));
                }
            },
            "--device" => args.device = Some(value()?),
            "--transactions" => {
                args.transactions = value()?
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| Failure::Usage("--transactions takes 1..=255".into()))?
            }
            "--no-fault-log" => args.fault_log = false,
            other => return Err(Failure::Usage(format!("unknown argument {other}"))),
        }
    }
    Ok(args)
}

/// The VM, or what this kernel lacks for it.
fn private_memory_vm(kvm: &Kvm) -> Result<VmFd, String> {
    const KVM_X86_SW_PROTECTED_VM: u64 = 1;
    let vm = kvm.create_vm_with_type(KVM_X86_SW_PROTECTED_VM).map_err(|e| {
        format!("KVM cannot create a KVM_X86_SW_PROTECTED_VM ({e}): needs CONFIG_KVM_SW_PROTECTED_VM")
    })?;
    let support = KvmSupport::probe(kvm, &vm);
    if !support.has_private_attribute() {
        return Err(format!(
            "KVM has no private memory attribute on this VM: {support:?}"
        ));
    }
    support
        .choose_model(ModelChoice::Classic)
        .map_err(|e| e.to_string())?;
    // Conversions reach the VMM as KVM_EXIT_HYPERCALL only where the VMM asks for them.
    let cap = kvm_enable_cap {
        cap: KVM_CAP_EXIT_HYPERCALL,
        args: [1 << KVM_HC_MAP_GPA_RANGE, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| format!("KVM_CAP_EXIT_HYPERCALL for KVM_HC_MAP_GPA_RANGE: {e}"))?;
    Ok(vm)
}

/// Counts the IOMMU calls the library makes. A workaround: `GuestRam` keeps each device's
/// `Ledger` (which has these numbers as `LedgerStats`) to itself.
#[derive(Debug)]
struct Counted {
    inner: Arc<dyn DmaBackend>,
    maps: AtomicU64,
    unmaps: AtomicU64,
}

impl DmaBackend for Counted {
    fn capabilities(&self) -> Result<iommu::Capabilities, iommu::DmaError> {
        self.inner.capabilities()
    }
    unsafe fn map_va(
        &self,
        iova: u64,
        len: u64,
        host: *mut u8,
        prot: iommu::DmaProt,
    ) -> Result<(), iommu::DmaError> {
        self.maps.fetch_add(1, Relaxed);
        // SAFETY: the caller's promise about `host` is passed on unchanged.
        unsafe { self.inner.map_va(iova, len, host, prot) }
    }
    fn map_file(
        &self,
        iova: u64,
        len: u64,
        file: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        prot: iommu::DmaProt,
    ) -> Result<(), iommu::DmaError> {
        self.maps.fetch_add(1, Relaxed);
        self.inner.map_file(iova, len, file, offset, prot)
    }
    fn unmap(&self, iova: u64, len: u64) -> Result<u64, iommu::DmaError> {
        self.unmaps.fetch_add(1, Relaxed);
        self.inner.unmap(iova, len)
    }
}

/// The guest kernel's log from now on: where intel-iommu reports the DMA faults it sees.
struct KernelLog(File);

impl KernelLog {
    fn open() -> std::io::Result<Self> {
        let mut f = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")?;
        f.seek(SeekFrom::End(0))?; // only what is logged from now on
        Ok(Self(f))
    }

    /// DMA fault lines logged since the last call, waiting up to `wait` for the first one.
    fn dma_faults(&mut self, wait: Duration) -> std::io::Result<Vec<String>> {
        let (mut faults, start, mut buf) = (Vec::new(), Instant::now(), [0u8; 4096]);
        loop {
            match self.0.read(&mut buf) {
                // One record per read: "prio,seq,time,flags;text".
                Ok(n) => {
                    let record = String::from_utf8_lossy(&buf[..n]);
                    let text = record
                        .split_once(';')
                        .map_or(&*record, |(_, t)| t)
                        .trim_end();
                    if text.starts_with("DMAR:") && text.contains("fault addr") {
                        faults.push(text.to_string());
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {} // records overwritten
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if !faults.is_empty() || start.elapsed() >= wait {
                        return Ok(faults);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// What the vCPU loop saw.
#[derive(Default)]
struct Tally {
    to_shared: u64,
    to_private: u64,
    memory_faults: u64,
    refused: Vec<String>,
    guest_errors: Vec<u32>,
    done: Vec<Instant>,
    convert_time: Duration,
    dma_time: Duration,
    probe_faults: Option<Vec<String>>,
}

fn run(args: Args) -> Result<(), Failure> {
    // Say everything this host lacks at once, before creating anything.
    let mut lacks = Vec::new();
    let kvm = Kvm::new()
        .map_err(|e| lacks.push(format!("/dev/kvm: {e}")))
        .ok();
    let vm = kvm.and_then(|kvm| private_memory_vm(&kvm).map_err(|e| lacks.push(e)).ok());
    let address = match &args.device {
        None => {
            lacks.push("no edu device (PCI 1234:11e8) bound to vfio-pci; bind one, then pass --device or set GMEM_DMA_EDU".into());
            None
        }
        Some(text) => {
            let address: PciAddress = text
                .parse()
                .map_err(|e| Failure::Usage(format!("--device {text}: {e}")))?;
            HostPaths::default()
                .check(&address, args.mode)
                .map_err(|e| lacks.push(format!("{}: {e}", args.mode)))
                .ok()
                .map(|_| address)
        }
    };
    let (Some(vm), Some(address)) = (vm, address) else {
        return Err(Failure::HostLacks(lacks));
    };
    let mut kmsg = match args.fault_log {
        true => Some(KernelLog::open().map_err(sys("opening /dev/kmsg"))?),
        false => None,
    };

    // Guest RAM: one region at GPA 0, bound to memslot 0, private until the guest shares.
    let vm = Arc::new(vm);
    let backing = RegionBacking::classic(&vm, 0, RAM_SIZE).map_err(sys("creating guest RAM"))?;
    backing
        .bind(&vm, 0)
        .map_err(sys("binding guest RAM to memslot 0"))?;
    let ram = GuestRam::new(Arc::new(KvmAttributes::new(Arc::clone(&vm))));
    // Lazy discard: a bounce page that flips every transaction keeps both its pages instead of
    // paying a hole punch and a refault per flip. It also leaves the probe page's canary in its
    // shared backing, which is what the isolation check below reads.
    let policy = DiscardPolicy::Lazy {
        budget_bytes: 64 * PAGE,
    };
    let spec = RegionSpec {
        granularity: PAGE,
        initial: Attribute::Private,
        policy,
    };
    let region = ram
        .add_region(backing, spec)
        .map_err(sys("adding guest RAM"))?;

    // The device: its IOMMU goes to the library, its registers to the edu driver.
    let (backend, device): (Arc<dyn DmaBackend>, _) = match args.mode {
        VfioMode::Type1 => Type1Backend::open(&address).map(|(b, d)| (Arc::new(b) as _, d)),
        _ => IommufdBackend::open(&address).map(|(b, d)| (Arc::new(b) as _, d)),
    }
    .map_err(sys("opening edu"))?;
    let iommu = Arc::new(Counted {
        inner: backend,
        maps: 0.into(),
        unmaps: 0.into(),
    });
    let edu_id = ram
        .attach_device("edu", iommu.clone(), DeviceConfig::shared())
        .map_err(sys("attaching edu"))?;
    let edu = Edu::new(device).map_err(sys("starting edu"))?;

    // The firmware image goes to shared memory: private memory has no host mapping to write.
    let page = |gpa| GpaRange::new(gpa, PAGE).expect("a page at a constant, aligned GPA");
    ram.convert(page(CODE), Attribute::Shared)
        .map_err(sys("sharing the code page"))?;
    let shared = region.backing().mapping(); // offset in it = GPA (the region starts at 0)
    shared
        .write_slice(guest_program(), MemoryRegionAddress(CODE))
        .map_err(sys("loading the guest"))?;

    let mut vcpu = vm.create_vcpu(0).map_err(sys("creating the vCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(sys("KVM_GET_SREGS"))?;
    (sregs.cs.base, sregs.cs.selector) = (CODE, 0); // real mode, CS:IP = 0:0
    vcpu.set_sregs(&sregs).map_err(sys("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: 0,
        rflags: 2,
        rbp: args.transactions.into(),
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(sys("KVM_SET_REGS"))?;

    let mut t = Tally::default();
    let started = Instant::now();
    loop {
        match vcpu.run() {
            // The guest's conversion requests: the library converts and writes the verdict
            // (0 or -errno) where the guest reads it; a refusal never stops the VM.
            Ok(VcpuExit::Hypercall(mut exit)) => {
                let t0 = Instant::now();
                let result = gmem_dma::handle_map_gpa_range(&ram, &mut exit);
                t.convert_time += t0.elapsed();
                match result {
                    Ok(c) if c.to == Attribute::Shared => t.to_shared += 1,
                    Ok(_) => t.to_private += 1,
                    Err(e) => t.refused.push(format!("{:x?}: {e}", &exit.args[..3])),
                }
            }
            // An access that disagrees with the attribute. A SW_PROTECTED guest cannot make
            // one (KVM takes the kind of access from the attribute), SNP and TDX guests do.
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                gmem_dma::handle_memory_fault(&ram, flags, gpa, size).map_err(|e| {
                    Failure::Check(format!("memory fault at {gpa:#x} not converted: {e}"))
                })?;
                t.memory_faults += 1;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut word = [0u8; 4];
                word[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                let value = u32::from_le_bytes(word);
                let t0 = Instant::now();
                match port {
                    PORT_DMA_TO_DEVICE => edu
                        .copy_to_device(value.into(), DMA_LEN)
                        .map_err(sys("DMA to edu"))?,
                    PORT_DMA_FROM_DEVICE => edu
                        .copy_from_device(value.into(), DMA_LEN)
                        .map_err(sys("DMA from edu"))?,
                    PORT_DONE => t.done.push(Instant::now()),
                    PORT_ERROR => t.guest_errors.push(value & 0xff),
                    PORT_DMA_PRIVATE => {
                        let log = kmsg.as_mut();
                        t.probe_faults = Some(probe(&edu, &region, value.into(), log)?);
                    }
                    _ => {
                        return Err(Failure::Check(format!(
                            "guest wrote {value:#x} to unknown port {port:#x}"
                        )));
                    }
                }
                if matches!(port, PORT_DMA_TO_DEVICE | PORT_DMA_FROM_DEVICE) {
                    t.dma_time += t0.elapsed();
                }
            }
            Ok(VcpuExit::Hlt) => break,
            Ok(exit) => return Err(Failure::Check(format!("unexpected vCPU exit {exit:?}"))),
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(sys("KVM_RUN")(e)),
        }
    }
    let mapped: Vec<u64> = ram
        .device_mappings(edu_id)
        .unwrap_or_default()
        .iter()
        .map(|m| m.iova)
        .collect();
    let (maps, unmaps) = (iommu.maps.load(Relaxed), iommu.unmaps.load(Relaxed));

    // Tear down in the order GuestRam documents: device, then memslot, then memory.
    let detached = ram.detach_device(edu_id).map_err(sys("detaching edu"))?;
    drop(vcpu);
    // SAFETY: a zero-sized region deletes memslot 0; KVM stops using its memory, nothing runs.
    unsafe {
        vm.set_user_memory_region2(kvm_userspace_memory_region2 {
            slot: 0,
            ..Default::default()
        })
    }
    .map_err(sys("deleting memslot 0"))?;

    let n = u64::from(args.transactions);
    let per_txn: Vec<Duration> = t
        .done
        .iter()
        .scan(started, |last, &at| Some(at - std::mem::replace(last, at)))
        .collect();
    let mean = per_txn.iter().sum::<Duration>() / per_txn.len().max(1) as u32;
    println!(
        "firmware_vmm: {} via {}, {} MiB classic region (memfd + guest_memfd), lazy discard",
        address,
        args.mode,
        RAM_SIZE >> 20
    );
    println!(
        "  transactions     {} of {n} done, guest-reported errors {:?}",
        t.done.len(),
        t.guest_errors
    );
    println!(
        "  conversions      {} to shared + {} to private by KVM_HC_MAP_GPA_RANGE, {} by KVM_EXIT_MEMORY_FAULT, {} refused, 1 by the VMM (code page)",
        t.to_shared,
        t.to_private,
        t.memory_faults,
        t.refused.len()
    );
    println!(
        "  iommu calls      {maps} map + {unmaps} unmap while running, {} unmap at detach; mapped at the end: {mapped:#x?}",
        detached.calls
    );
    let faults = t.probe_faults.clone().unwrap_or_default();
    println!(
        "  dma faults       {} (expected {}): {faults:?}",
        faults.len(),
        u8::from(kmsg.is_some())
    );
    println!(
        "  per transaction  {:.1} ms mean, {:.1} ms max; of it conversions {:.0} us, device DMA {:.1} ms",
        mean.as_secs_f64() * 1e3,
        per_txn
            .iter()
            .max()
            .unwrap_or(&Duration::ZERO)
            .as_secs_f64()
            * 1e3,
        t.convert_time.as_secs_f64() * 1e6 / n as f64,
        t.dma_time.as_secs_f64() * 1e3 / n as f64
    );

    // Every number above is checked against what this guest must have caused.
    let mut wrong = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            wrong.push(what)
        }
    };
    expect(
        t.done.len() as u64 == n && t.guest_errors.is_empty(),
        "the guest did not finish every transaction cleanly".into(),
    );
    expect(
        t.refused.is_empty(),
        format!("conversions refused: {:?}", t.refused),
    );
    // RESULT, PROBE and each transaction's bounce page to shared; each bounce page and PROBE back.
    expect(
        (t.to_shared, t.to_private) == (n + 2, n + 1),
        format!("expected {} + {} conversions", n + 2, n + 1),
    );
    // One mapping per page that became shared (code, RESULT, bounce pages, PROBE), one unmap per page that became private.
    expect(
        (maps, unmaps) == (n + 3, n + 1),
        format!("expected {} maps and {} unmaps", n + 3, n + 1),
    );
    expect(
        mapped == [CODE, RESULT],
        "at the end the device must map exactly the shared pages, code and RESULT".into(),
    );
    expect(
        t.probe_faults.is_some(),
        "the guest never asked for the DMA to a private page".into(),
    );
    if kmsg.is_some() {
        let named = format!("fault addr {PROBE:#x}");
        expect(
            faults.len() == 1 && faults[0].contains(&named),
            format!("expected one DMA fault line with '{named}'"),
        );
    }
    match wrong.is_empty() {
        true => Ok(()),
        false => Err(Failure::Check(wrong.join("; "))),
    }
}

/// The guest made `gpa` private and asks for a DMA into it: the IOMMU must block it.
fn probe(
    edu: &Edu<Arc<iommu::VfioPciDevice>>,
    region: &gmem_dma::Region,
    gpa: u64,
    log: Option<&mut KernelLog>,
) -> Result<Vec<String>, Failure> {
    let shared = region.backing().mapping();
    let read = || {
        let mut bytes = vec![0u8; DMA_LEN as usize];
        shared
            .read_slice(&mut bytes, MemoryRegionAddress(gpa))
            .map(|()| bytes)
            .map_err(sys("reading guest RAM"))
    };
    let mut log = log;
    let before = match log.as_mut() {
        Some(log) => log
            .dma_faults(Duration::ZERO)
            .map_err(sys("reading /dev/kmsg"))?,
        None => Vec::new(),
    };
    if !before.is_empty() {
        return Err(Failure::Check(format!(
            "DMA faults before the probe: {before:?}"
        )));
    }
    // The shared page the device could have reached still holds the guest's canary (lazy
    // discard kept it), so a DMA that got through would show.
    let canary = read()?;
    if canary.iter().any(|&b| b != CANARY) {
        return Err(Failure::Check(
            "the probe page's shared backing lost its canary before the DMA".into(),
        ));
    }
    // The device cannot tell that the IOMMU dropped its write: the DMA "completes".
    edu.copy_from_device(gpa, DMA_LEN)
        .map_err(sys("DMA from edu to the private page"))?;
    if read()? != canary {
        return Err(Failure::Check(format!(
            "isolation: the device wrote into private page {gpa:#x}"
        )));
    }
    match log {
        Some(log) => log
            .dma_faults(Duration::from_secs(3))
            .map_err(sys("reading /dev/kmsg")),
        None => Ok(Vec::new()),
    }
}

fn main() -> ExitCode {
    match parse_args().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let (code, text) = match failure {
                Failure::Check(t) => (1, format!("FAILED: {t}")),
                Failure::Usage(t) => (
                    2,
                    format!(
                        "{t}\nusage: firmware_vmm [--backend type1|iommufd] [--device PCI-ADDRESS] [--transactions N] [--no-fault-log]"
                    ),
                ),
                Failure::HostLacks(l) => (
                    3,
                    format!(
                        "this host cannot run the example:\n  - {}",
                        l.join("\n  - ")
                    ),
                ),
                Failure::System(t) => (4, format!("error: {t}")),
            };
            eprintln!("firmware_vmm: {text}");
            ExitCode::from(code)
        }
    }
}
