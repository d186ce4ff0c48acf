//! Opening what the commands work on, through the libraries: a guest RAM region (in-place,
//! classic or memfd-only backing) and a DMA backend (emulated, or a kernel backend for a device).
//! Every fallback is returned as a sentence so the reports can say what was used instead.

use std::sync::Arc;

use anyhow::Context as _;
use kvm_ioctls::{Kvm, VmFd};

use gmem_dma::backing::RegionBacking;
use gmem_dma::host::{BackingModel, KvmSupport, ModelChoice};
use iommu::emulated::UnmapStyle;
use iommu::{
    DmaBackend, EmulatedIommu, IommufdBackend, NoIommuBackend, NoIommuDevice, OpenError,
    PciAddress, Type1Backend, VfioPciDevice, WithoutCutting,
};

use crate::cli::{BackendChoice, MappingChoice, RegionChoice};
use crate::exit::{Class, error};

/// Guest-physical base of every region the tool creates (4 GiB, above the PCI hole, as a VMM
/// would place high RAM).
pub const REGION_BASE: u64 = 0x1_0000_0000;

/// `KVM_X86_SW_PROTECTED_VM`: the VM type with private memory attributes and no hardware.
const SW_PROTECTED_VM: u64 = kvm_bindings::KVM_X86_SW_PROTECTED_VM as u64;

/// KVM as the tool found it: the VM regions are created on, and what it supports.
pub struct Kvm0 {
    /// The VM regions are created on.
    pub vm: Arc<VmFd>,
    /// Its type (0 default, 1 sw-protected).
    pub vm_type: u64,
    /// The library's probe of it.
    pub support: KvmSupport,
}

/// Opens KVM and a VM: the sw-protected type when KVM lists it and gives it private memory
/// attributes (so conversions reach KVM), else the default type. `Err` says why there is none.
pub fn open_kvm() -> Result<Kvm0, String> {
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm cannot be opened ({e})"))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("KVM refused to create a VM ({e})"))?;
    let support = KvmSupport::probe(&kvm, &vm);
    if !support.has_private_attribute() && support.vm_types & (1 << SW_PROTECTED_VM) != 0 {
        if let Ok(private_vm) = kvm.create_vm_with_type(SW_PROTECTED_VM) {
            let private_support = KvmSupport::probe(&kvm, &private_vm);
            if private_support.has_private_attribute() {
                return Ok(Kvm0 {
                    vm: Arc::new(private_vm),
                    vm_type: SW_PROTECTED_VM,
                    support: private_support,
                });
            }
        }
    }
    Ok(Kvm0 {
        vm: Arc::new(vm),
        vm_type: 0,
        support,
    })
}

/// A region's backing with the VM it belongs to and the fallbacks taken to get it.
pub struct Region {
    /// The files and host mapping.
    pub backing: RegionBacking,
    /// The VM (dropped after the backing).
    pub kvm: Option<Kvm0>,
    /// What was asked for and not available.
    pub fallbacks: Vec<String>,
    /// A short name of what it is.
    pub name: String,
}

/// Creates a region of `size` bytes at [`REGION_BASE`] with the backing `choice` asks for.
///
/// `Auto` takes the best this host offers and records every step down; an explicit choice the
/// host cannot give is an error of class [`Class::HostLacks`].
pub fn region(choice: RegionChoice, size: u64) -> anyhow::Result<Region> {
    let mut fallbacks = Vec::new();
    if choice == RegionChoice::MemfdOnly {
        return software(size, None, fallbacks);
    }
    let kvm = match open_kvm() {
        Ok(kvm) => kvm,
        Err(why) if choice == RegionChoice::Auto => {
            fallbacks.push(format!(
                "no KVM: {why}; the region is a plain memfd (private pages are only discarded)"
            ));
            return software(size, None, fallbacks);
        }
        Err(why) => {
            return Err(error(
                Class::HostLacks,
                format!(
                    "{why}: guest_memfd regions need KVM; load kvm_intel or kvm_amd, or run with \
                     --region memfd-only"
                ),
            ));
        }
    };
    let model = match choice {
        RegionChoice::InPlace => ModelChoice::InPlace,
        RegionChoice::Classic => ModelChoice::Classic,
        _ => ModelChoice::Auto,
    };
    let model = match kvm.support.choose_model(model) {
        Ok(model) => model,
        Err(why) if choice == RegionChoice::Auto => {
            fallbacks.push(format!("{why}; the region is a plain memfd"));
            return software(size, Some(kvm), fallbacks);
        }
        Err(why) => {
            return Err(error(
                Class::HostLacks,
                format!("this host cannot give a {choice:?} region: {why}"),
            ));
        }
    };
    if choice == RegionChoice::Auto && model == BackingModel::Classic {
        fallbacks.push(
            "guest_memfd is not mmap-able here (needs Linux 6.18 MMAP|INIT_SHARED): classic \
             memfd + guest_memfd backing"
                .to_string(),
        );
    }
    let backing = match model {
        BackingModel::InPlace => RegionBacking::in_place(&kvm.vm, REGION_BASE, size),
        BackingModel::Classic => RegionBacking::classic(&kvm.vm, REGION_BASE, size),
    }
    .with_context(|| format!("creating a {model} region of {size:#x} bytes"))?;
    backing
        .bind(&kvm.vm, 0)
        .with_context(|| format!("binding the {model} region to KVM memslot 0"))?;
    let name = format!("{model}, VM type {}", kvm.vm_type);
    Ok(Region {
        backing,
        kvm: Some(kvm),
        fallbacks,
        name,
    })
}

fn software(size: u64, kvm: Option<Kvm0>, fallbacks: Vec<String>) -> anyhow::Result<Region> {
    let backing = RegionBacking::software(REGION_BASE, size)
        .with_context(|| format!("creating a memfd region of {size:#x} bytes"))?;
    Ok(Region {
        backing,
        kvm,
        fallbacks,
        name: "memfd only (no guest_memfd)".to_string(),
    })
}

/// The device a kernel backend opened.
pub enum Device {
    /// Opened through VFIO type1 or IOMMUFD.
    Vfio(Arc<VfioPciDevice>),
    /// Opened through a VFIO no-IOMMU group.
    NoIommu(Arc<NoIommuDevice>, Arc<NoIommuBackend>),
}

/// A DMA backend ready for a ledger, and the device it serves.
pub struct Backend {
    /// The backend.
    pub backend: Arc<dyn DmaBackend>,
    /// The emulated IOMMU, when that is the backend (for device-side accesses and its page table).
    pub emulated: Option<Arc<EmulatedIommu>>,
    /// The device, for kernel backends.
    pub device: Option<(PciAddress, Device)>,
    /// Its name for reports.
    pub name: String,
}

/// PCI vendor and device id of QEMU's `edu` test device.
const EDU_PCI_ID: (u16, u16) = (0x1234, 0x11e8);

/// Parses a `--device` PCI address (a usage error when malformed). `edu` names QEMU's edu
/// device: the address in `GMEM_DMA_EDU` (as the VM rig sets it), else the first PCI device with
/// its id, so a fixed command line works in any guest.
pub fn parse_device(text: &str) -> anyhow::Result<PciAddress> {
    if text == "edu" {
        if let Ok(address) = std::env::var("GMEM_DMA_EDU") {
            return parse_device(&address);
        }
        let devices = iommu::HostPaths::default()
            .list_pci_devices()
            .context("listing PCI devices to find the edu device")?;
        return devices
            .iter()
            .find(|d| (d.vendor, d.device) == EDU_PCI_ID)
            .map(|d| d.address)
            .ok_or_else(|| {
                error(
                    Class::HostLacks,
                    "--device edu: no edu device (PCI 1234:11e8) on this machine; start QEMU with                      -device edu and bind it to vfio-pci, or name a device by its PCI address",
                )
            });
    }
    text.parse::<PciAddress>().map_err(|e| {
        error(
            Class::Usage,
            format!("--device {text}: {e}; write a PCI address like 0000:00:03.0"),
        )
    })
}

fn open_error(address: PciAddress, backend: BackendChoice, e: OpenError) -> anyhow::Error {
    match e {
        // sysfs says the device cannot be used as it is: the host lacks it (or its setup).
        OpenError::Device(d) => error(
            Class::HostLacks,
            format!("cannot use {address} with the {backend} backend: {d}"),
        ),
        other => anyhow::Error::new(other)
            .context(format!("opening {address} with the {backend} backend")),
    }
}

/// The emulated IOMMU, in the shape of a kernel backend; `budget` limits its live mappings as
/// type1's `dma_entry_limit` does. `style` is how it unmaps: [`UnmapStyle::Cutting`] makes it an
/// address space that cuts mappings (the library then maps per run).
pub fn emulated(budget: Option<u64>, style: UnmapStyle) -> Backend {
    // No call log: a long run would keep every call in memory; the counters do the counting.
    let emu = Arc::new(
        EmulatedIommu::builder()
            .record_calls(false)
            .mapping_budget(budget)
            .unmap_style(style)
            .build(),
    );
    Backend {
        backend: emu.clone(),
        emulated: Some(emu),
        device: None,
        name: match budget {
            Some(n) => format!("emulated IOMMU ({n}-mapping budget)"),
            None => "emulated IOMMU".to_string(),
        },
    }
}

/// Whether `choice` offers both mapping modes here: the emulated IOMMU always (its cutting
/// style), IOMMUFD when this kernel accepts type1 (v1) semantics on an IOAS; type1 and no-IOMMU
/// never (their unit of unmap is the unit of map).
pub fn offers_per_run(choice: BackendChoice) -> bool {
    match choice {
        BackendChoice::Emulated => true,
        BackendChoice::Iommufd => iommu::HostPaths::default().probe_iommufd_cutting().is_ok(),
        BackendChoice::Type1 | BackendChoice::Noiommu => false,
    }
}

/// Opens `choice` for `device`, mapping as `mapping` asks, and names the mapping mode. Without a
/// device only the emulated IOMMU exists: a kernel backend without `--device` is a usage error,
/// and so is `budget` with a kernel backend (the kernel has its own).
pub fn backend(
    choice: BackendChoice,
    device: Option<&str>,
    budget: Option<u64>,
    mapping: MappingChoice,
) -> anyhow::Result<Backend> {
    let mut opened = open_backend(choice, device, budget, mapping)?;
    let cuts = opened
        .backend
        .capabilities()
        .with_context(|| format!("reading the capabilities of {}", opened.name))?
        .cuts_mappings;
    match mapping {
        MappingChoice::PerRun if !cuts => {
            return Err(error(
                Class::HostLacks,
                format!(
                    "--mapping per-run: {} cannot cut a mapping, so it must map per granule \
                     (IOMMUFD with type1 (v1) semantics can cut; see `dma-map probe`)",
                    opened.name
                ),
            ));
        }
        MappingChoice::PerGranule if cuts => {
            opened.backend = Arc::new(WithoutCutting(opened.backend));
        }
        _ => {}
    }
    let per_run = cuts && mapping != MappingChoice::PerGranule;
    opened.name = format!(
        "{}, per {}",
        opened.name,
        if per_run { "run" } else { "granule" }
    );
    Ok(opened)
}

fn open_backend(
    choice: BackendChoice,
    device: Option<&str>,
    budget: Option<u64>,
    mapping: MappingChoice,
) -> anyhow::Result<Backend> {
    if budget.is_some() && choice != BackendChoice::Emulated {
        return Err(error(
            Class::Usage,
            "--mapping-budget applies to the emulated IOMMU only; a kernel backend reports its own",
        ));
    }
    let address = device.map(parse_device).transpose()?;
    let Some(address) = address else {
        if choice != BackendChoice::Emulated {
            return Err(error(
                Class::Usage,
                format!(
                    "the {choice} backend maps for a device: pass --device <PCI address> of a \
                     device bound to vfio-pci (see `dma-map probe`), or use --backend emulated"
                ),
            ));
        }
        let style = match mapping {
            MappingChoice::PerRun => UnmapStyle::Cutting,
            MappingChoice::Auto | MappingChoice::PerGranule => UnmapStyle::Type1v2,
        };
        return Ok(emulated(budget, style));
    };
    let opened = match choice {
        BackendChoice::Emulated => {
            return Err(error(
                Class::Usage,
                "--device needs a kernel backend: --backend type1, iommufd or noiommu",
            ));
        }
        BackendChoice::Type1 => Type1Backend::open(&address).map(|(b, d)| {
            (
                Arc::new(b) as Arc<dyn DmaBackend>,
                Device::Vfio(d),
                "VFIO type1",
            )
        }),
        BackendChoice::Iommufd => IommufdBackend::open(&address).map(|(b, d)| {
            (
                Arc::new(b) as Arc<dyn DmaBackend>,
                Device::Vfio(d),
                "IOMMUFD",
            )
        }),
        BackendChoice::Noiommu => NoIommuBackend::open(&address).map(|(b, d)| {
            let b = Arc::new(b);
            (
                b.clone() as Arc<dyn DmaBackend>,
                Device::NoIommu(d, b),
                "VFIO no-IOMMU",
            )
        }),
    }
    .map_err(|e| open_error(address, choice, e))?;
    let (backend, device, kind) = opened;
    Ok(Backend {
        backend,
        emulated: None,
        device: Some((address, device)),
        name: format!("{kind} ({address})"),
    })
}
