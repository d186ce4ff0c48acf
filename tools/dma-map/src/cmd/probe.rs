//! `dma-map probe`: what this host offers, from the libraries' own probes (`gmem_dma::host` for
//! KVM, `iommu::HostPaths` for VFIO/IOMMUFD/limits/PCI), turned into findings that each say what
//! a missing piece blocks and how to get it.

use kvm_ioctls::Kvm;
use serde::Serialize;

use gmem_dma::host::{BackingModel, KvmSupport, ModelChoice};
use iommu::{HostPaths, HostReport, NodeState, PciDeviceInfo, VfioMode};

use crate::report::{Table, indent};
use crate::units::Bytes;

/// The name of a KVM VM type (`KVM_CAP_VM_TYPES` bit number).
fn vm_type_name(t: u64) -> &'static str {
    match t {
        0 => "default",
        1 => "sw-protected",
        2 => "sev",
        3 => "sev-es",
        4 => "sev-snp",
        5 => "tdx",
        _ => "unknown",
    }
}

/// What KVM supports for one VM type.
#[derive(Clone, Debug, Serialize)]
pub struct VmTypeSupport {
    /// The type number.
    pub vm_type: u64,
    /// Its name.
    pub name: &'static str,
    /// The library's probe of a VM of this type, or why none could be created.
    pub support: Result<KvmSupport, String>,
}

/// KVM as probed.
#[derive(Clone, Debug, Serialize)]
pub struct KvmProbe {
    /// Why /dev/kvm could not be used; `None` when it opens.
    pub unavailable: Option<String>,
    /// Every VM type KVM lists (type 0 alone where `KVM_CAP_VM_TYPES` is absent).
    pub vm_types: Vec<VmTypeSupport>,
}

impl KvmProbe {
    /// The default VM type's support, when KVM is there.
    pub fn default_vm(&self) -> Option<&KvmSupport> {
        self.vm_types
            .iter()
            .find(|t| t.vm_type == 0)
            .and_then(|t| t.support.as_ref().ok())
    }

    /// The first VM type whose VMs have private memory attributes.
    pub fn private_vm_type(&self) -> Option<u64> {
        self.vm_types
            .iter()
            .find(|t| {
                t.support
                    .as_ref()
                    .is_ok_and(KvmSupport::has_private_attribute)
            })
            .map(|t| t.vm_type)
    }
}

/// Probes KVM through the library, once per VM type the kernel lists.
pub fn probe_kvm() -> KvmProbe {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            return KvmProbe {
                unavailable: Some(format!("/dev/kvm cannot be opened: {e}")),
                vm_types: Vec::new(),
            };
        }
    };
    let probe_type = |vm_type: u64| VmTypeSupport {
        vm_type,
        name: vm_type_name(vm_type),
        support: kvm
            .create_vm_with_type(vm_type)
            .map(|vm| KvmSupport::probe(&kvm, &vm))
            .map_err(|e| format!("creating a VM of this type failed: {e}")),
    };
    let first = probe_type(0);
    let listed = first.support.as_ref().map_or(0, |s| s.vm_types);
    let mut vm_types = vec![first];
    vm_types.extend((1..64).filter(|t| listed & (1 << t) != 0).map(probe_type));
    KvmProbe {
        unavailable: None,
        vm_types,
    }
}

/// One line of the probe: a fact, and for a missing piece what it blocks and how to get it.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// KVM, VFIO, IOMMUFD, limits.
    pub area: &'static str,
    /// What was looked at.
    pub item: &'static str,
    /// `yes`, `no` or `info`.
    pub status: &'static str,
    /// What was found.
    pub value: String,
    /// What its absence blocks.
    pub blocks: Option<String>,
    /// How to get it.
    pub fix: Option<String>,
}

fn yes(area: &'static str, item: &'static str, value: impl Into<String>) -> Finding {
    Finding {
        area,
        item,
        status: "yes",
        value: value.into(),
        blocks: None,
        fix: None,
    }
}

fn info(area: &'static str, item: &'static str, value: impl Into<String>) -> Finding {
    Finding {
        status: "info",
        ..yes(area, item, value)
    }
}

fn no(
    area: &'static str,
    item: &'static str,
    value: impl Into<String>,
    blocks: &str,
    fix: &str,
) -> Finding {
    Finding {
        area,
        item,
        status: "no",
        value: value.into(),
        blocks: Some(blocks.to_string()),
        fix: Some(fix.to_string()),
    }
}

fn guest_memfd_flags(flags: u64) -> String {
    let mut names = Vec::new();
    if flags & 1 != 0 {
        names.push("MMAP");
    }
    if flags & 2 != 0 {
        names.push("INIT_SHARED");
    }
    if names.is_empty() {
        format!("none ({flags:#x})")
    } else {
        format!("{} ({flags:#x})", names.join("|"))
    }
}

fn kvm_findings(kvm: &KvmProbe, out: &mut Vec<Finding>) {
    if let Some(why) = &kvm.unavailable {
        out.push(no(
            "KVM",
            "/dev/kvm",
            why.clone(),
            "guest_memfd regions: runs fall back to a plain memfd",
            "load kvm_intel or kvm_amd (modprobe) and give this user read/write access to \
             /dev/kvm (group kvm)",
        ));
        return;
    }
    out.push(yes("KVM", "/dev/kvm", "opens"));
    let types: Vec<String> = kvm
        .vm_types
        .iter()
        .map(|t| match &t.support {
            Ok(_) => format!("{} ({})", t.vm_type, t.name),
            Err(_) => format!("{} ({}, cannot be created here)", t.vm_type, t.name),
        })
        .collect();
    out.push(info("KVM", "VM types", types.join(", ")));
    let Some(base) = kvm.default_vm() else {
        out.push(no(
            "KVM",
            "default VM",
            "cannot be created",
            "every KVM-backed region",
            "check dmesg for why KVM refuses to create a VM",
        ));
        return;
    };
    if base.guest_memfd {
        out.push(yes("KVM", "guest_memfd", "KVM_CAP_GUEST_MEMFD"));
    } else {
        out.push(no(
            "KVM",
            "guest_memfd",
            "absent",
            "guest_memfd regions (classic and in-place): runs fall back to a plain memfd",
            "Linux 6.8+ with CONFIG_KVM_GUEST_MEMFD (selected by CONFIG_KVM_SW_PROTECTED_VM, \
             KVM_AMD_SEV or KVM_INTEL_TDX)",
        ));
    }
    if base.has_mmap_init_shared() {
        out.push(yes(
            "KVM",
            "guest_memfd flags",
            guest_memfd_flags(base.guest_memfd_flags),
        ));
    } else {
        out.push(no(
            "KVM",
            "guest_memfd flags",
            guest_memfd_flags(base.guest_memfd_flags),
            "in-place regions (one mmap-able guest_memfd); classic memfd + guest_memfd still works",
            "Linux 6.18+ (GUEST_MEMFD_FLAG_MMAP and INIT_SHARED)",
        ));
    }
    if base.user_memory2 {
        out.push(yes(
            "KVM",
            "memslots with guest_memfd",
            "KVM_SET_USER_MEMORY_REGION2",
        ));
    } else {
        out.push(no(
            "KVM",
            "memslots with guest_memfd",
            "absent",
            "binding a guest_memfd to a memslot",
            "Linux 6.8+",
        ));
    }
    let attrs: Vec<String> = kvm
        .vm_types
        .iter()
        .filter_map(|t| {
            let s = t.support.as_ref().ok()?;
            Some(format!("type {}: {:#x}", t.vm_type, s.memory_attributes))
        })
        .collect();
    match kvm.private_vm_type() {
        Some(t) => out.push(yes(
            "KVM",
            "private memory attributes",
            format!(
                "PRIVATE on VM type {t} ({}); {}",
                vm_type_name(t),
                attrs.join(", ")
            ),
        )),
        None => out.push(no(
            "KVM",
            "private memory attributes",
            format!("none ({})", attrs.join(", ")),
            "sending shared/private changes to KVM: runs record them instead",
            "a KVM with KVM_CAP_MEMORY_ATTRIBUTES: CONFIG_KVM_SW_PROTECTED_VM=y (VM type 1), or \
             SEV-SNP/TDX hardware",
        )),
    }
}

fn node(state: &NodeState) -> String {
    match state {
        NodeState::Absent => "absent".into(),
        NodeState::Present => "opens".into(),
        NodeState::Unusable { error } => format!("cannot be opened: {error}"),
    }
}

fn vfio_findings(host: &HostReport, out: &mut Vec<Finding>) {
    if host.vfio.node == NodeState::Present {
        out.push(yes(
            "VFIO",
            "/dev/vfio/vfio",
            format!("API version {}", host.vfio.api_version.unwrap_or(-1)),
        ));
        let types: Vec<&str> = [
            (host.vfio.type1, "type1"),
            (host.vfio.type1v2, "type1v2"),
            (host.vfio.unmap_all, "unmap-all"),
            (host.vfio.noiommu, "noiommu"),
        ]
        .into_iter()
        .filter_map(|(ok, name)| ok.then_some(name))
        .collect();
        if host.vfio.type1v2 {
            out.push(yes("VFIO", "IOMMU types", types.join(", ")));
        } else {
            out.push(no(
                "VFIO",
                "IOMMU types",
                if types.is_empty() {
                    "none".to_string()
                } else {
                    types.join(", ")
                },
                "the type1 backend",
                "CONFIG_VFIO_IOMMU_TYPE1 (modprobe vfio_iommu_type1) and an IOMMU enabled at \
                 boot (intel_iommu=on / amd_iommu=on)",
            ));
        }
    } else {
        out.push(no(
            "VFIO",
            "/dev/vfio/vfio",
            node(&host.vfio.node),
            "the type1 and no-IOMMU backends: runs use the emulated IOMMU",
            "CONFIG_VFIO and CONFIG_VFIO_PCI (modprobe vfio-pci), then bind the device to \
             vfio-pci",
        ));
    }
    match host.type1_dma_entry_limit {
        Some(limit) => out.push(info(
            "VFIO",
            "type1 mapping budget",
            format!(
                "dma_entry_limit {limit} mappings = {} of shared memory at 4 KiB",
                Bytes(limit * 4096)
            ),
        )),
        None => out.push(info(
            "VFIO",
            "type1 mapping budget",
            "unknown: vfio_iommu_type1 is not loaded (default 65535 mappings = 256 MiB at 4 KiB; \
             raise with vfio_iommu_type1.dma_entry_limit=N)",
        )),
    }
    match host.noiommu_mode {
        Some(true) => out.push(yes("VFIO", "no-IOMMU mode", "enabled (no DMA isolation!)")),
        Some(false) => out.push(no(
            "VFIO",
            "no-IOMMU mode",
            "disabled",
            "the noiommu backend (devices without an IOMMU)",
            "load vfio with enable_unsafe_noiommu_mode=1 (needs CONFIG_VFIO_NOIOMMU; unsafe: \
             the device can reach all memory)",
        )),
        None => out.push(no(
            "VFIO",
            "no-IOMMU mode",
            "vfio module absent",
            "the noiommu backend",
            "CONFIG_VFIO_NOIOMMU, then vfio.enable_unsafe_noiommu_mode=1 on the kernel command \
             line or modprobe vfio enable_unsafe_noiommu_mode=1",
        )),
    }
    if host.iommufd == NodeState::Present {
        out.push(yes("IOMMUFD", "/dev/iommu", "opens"));
    } else {
        out.push(no(
            "IOMMUFD",
            "/dev/iommu",
            node(&host.iommufd),
            "the iommufd backend (no 65535-mapping limit, MAP_FILE)",
            "CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV (Linux 6.6+; modprobe iommufd)",
        ));
        out.push(no(
            "IOMMUFD",
            "MAP_FILE",
            "unavailable without /dev/iommu",
            "mapping shared memory by memfd + offset",
            "IOMMUFD on Linux 6.13+",
        ));
    }
    match host.memlock {
        Some(m) => {
            let show = |v: Option<u64>| v.map_or("unlimited".to_string(), |b| Bytes(b).to_string());
            let mut f = info(
                "limits",
                "RLIMIT_MEMLOCK",
                format!("soft {}, hard {}", show(m.soft), show(m.hard)),
            );
            if m.soft.is_some_and(|s| s < (1 << 30)) {
                f.value.push_str(
                    "; VFIO/IOMMUFD pin shared memory against it unless the process has \
                     CAP_IPC_LOCK (root does): raise it with ulimit -l or limits.conf",
                );
            }
            out.push(f);
        }
        None => out.push(info("limits", "RLIMIT_MEMLOCK", "could not be read")),
    }
}

/// What `/dev/iommu` answers to the commands newer kernels added (`None` where it does not
/// open): `IOMMU_IOAS_MAP_FILE` (6.13) and iommufd's own no-IOMMU mode (7.x).
#[derive(Clone, Debug)]
pub struct IommufdCommands {
    /// `IOMMU_IOAS_MAP_FILE` is known, or the errno of the probe.
    pub map_file: Result<bool, String>,
    /// `IOMMU_IOAS_NOIOMMU_GET_PA` works (`CONFIG_IOMMUFD_NOIOMMU`), or the errno of the probe.
    pub noiommu: Result<bool, String>,
}

fn probe_iommufd_commands() -> Option<IommufdCommands> {
    let iommufd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/iommu")
        .ok()?;
    let fd = std::os::fd::AsFd::as_fd(&iommufd);
    Some(IommufdCommands {
        map_file: iommu::vfio::map_file_known(fd).map_err(|e| e.to_string()),
        noiommu: iommu::vfio::noiommu_mode_built(fd).map_err(|e| e.to_string()),
    })
}

fn iommufd_command_findings(commands: Option<&IommufdCommands>, out: &mut Vec<Finding>) {
    let Some(commands) = commands else {
        return; // /dev/iommu is absent or unusable: vfio_findings said so
    };
    out.push(match &commands.map_file {
        Ok(true) => yes(
            "IOMMUFD",
            "MAP_FILE",
            "IOMMU_IOAS_MAP_FILE: memfd and hugetlbfs by fd + offset (mainline refuses guest_memfd)",
        ),
        Ok(false) => no(
            "IOMMUFD",
            "MAP_FILE",
            "IOMMU_IOAS_MAP_FILE unknown to this kernel",
            "mapping shared memory by memfd + offset",
            "Linux 6.13+",
        ),
        Err(e) => info("IOMMUFD", "MAP_FILE", format!("probe failed: {e}")),
    });
    out.push(match &commands.noiommu {
        Ok(true) => yes(
            "IOMMUFD",
            "no-IOMMU cdevs",
            "built (IOMMU_IOAS_NOIOMMU_GET_PA answers): with vfio.enable_unsafe_noiommu_mode=1, \
             no-IOMMU vfio cdevs bind to iommufd and their maps pin pages",
        ),
        Ok(false) => no(
            "IOMMUFD",
            "no-IOMMU cdevs",
            "absent",
            "the iommufd no-IOMMU backend (pinned memory, physical addresses from the kernel)",
            "Linux 7.x with CONFIG_VFIO_NOIOMMU and CONFIG_VFIO_DEVICE_CDEV \
             (selects CONFIG_IOMMUFD_NOIOMMU)",
        ),
        Err(e) => info("IOMMUFD", "no-IOMMU cdevs", format!("probe failed: {e}")),
    });
}

/// The device table's "usable through" column: every mode that passes the library's check,
/// or the first mode's refusal.
fn usable(paths: &HostPaths, d: &PciDeviceInfo) -> String {
    let modes = [VfioMode::Type1, VfioMode::Iommufd, VfioMode::NoIommu];
    let ok: Vec<String> = modes
        .iter()
        .filter(|m| paths.check(&d.address, **m).is_ok())
        .map(|m| m.to_string())
        .collect();
    if !ok.is_empty() {
        return ok.join(", ");
    }
    if d.iommu_group.is_none() {
        return "no: no IOMMU group (enable an IOMMU or VFIO no-IOMMU mode)".to_string();
    }
    match d.driver.as_deref() {
        Some("vfio-pci") => paths
            .check(&d.address, VfioMode::Type1)
            .err()
            .map_or_else(String::new, |e| format!("no: {e}")),
        Some(other) => format!("no: bound to {other}, not vfio-pci"),
        None => "no: no driver; bind it to vfio-pci".to_string(),
    }
}

/// A PCI device with what the probe says about it.
#[derive(Clone, Debug, Serialize)]
pub struct Device {
    /// The library's description.
    #[serde(flatten)]
    pub info: PciDeviceInfo,
    /// Which VFIO paths can open it, or why none can.
    pub usable: String,
}

/// Everything `probe` found.
#[derive(Clone, Debug, Serialize)]
pub struct Probe {
    /// KVM, per VM type.
    pub kvm: KvmProbe,
    /// VFIO, IOMMUFD, no-IOMMU, limits (the iommu crate's report).
    pub host: HostReport,
    /// PCI devices, or why they could not be listed.
    pub pci: Result<Vec<Device>, String>,
    /// The findings, one per line of the table.
    pub findings: Vec<Finding>,
    /// The region backing `--region auto` picks here.
    pub auto_region: String,
    /// The DMA backends that can run here without further setup.
    pub backends: Vec<String>,
}

/// Probes this host.
pub fn probe() -> Probe {
    let kvm = probe_kvm();
    let paths = HostPaths::default();
    let host = paths.probe_host();
    let pci = paths
        .list_pci_devices()
        .map(|list| {
            list.into_iter()
                .map(|info| Device {
                    usable: usable(&paths, &info),
                    info,
                })
                .collect::<Vec<_>>()
        })
        .map_err(|e| e.to_string());
    let mut findings = Vec::new();
    kvm_findings(&kvm, &mut findings);
    vfio_findings(&host, &mut findings);
    let iommufd_commands = probe_iommufd_commands();
    iommufd_command_findings(iommufd_commands.as_ref(), &mut findings);
    let auto_region = match kvm.default_vm().map(|s| s.choose_model(ModelChoice::Auto)) {
        Some(Ok(BackingModel::InPlace)) => "in-place (mmap-able guest_memfd)".to_string(),
        Some(Ok(BackingModel::Classic)) => "classic (memfd + guest_memfd)".to_string(),
        Some(Err(e)) => format!("memfd only ({e})"),
        None => "memfd only (no KVM)".to_string(),
    };
    let mut backends = vec!["emulated".to_string()];
    if let Ok(devices) = &pci {
        for (mode, name) in [
            (VfioMode::Type1, "type1"),
            (VfioMode::Iommufd, "iommufd"),
            (VfioMode::NoIommu, "noiommu"),
        ] {
            if let Some(d) = devices
                .iter()
                .find(|d| paths.check(&d.info.address, mode).is_ok())
            {
                backends.push(format!("{name} (--device {})", d.info.address));
            }
        }
    }
    Probe {
        kvm,
        host,
        pci,
        findings,
        auto_region,
        backends,
    }
}

/// The probe as text: findings, devices, and what can run here.
pub fn render(p: &Probe) -> String {
    let mut out = String::from("Host probe\n");
    let mut t = Table::new(["area", "item", "ok", "found"]);
    for f in &p.findings {
        t.row([f.area, f.item, f.status, f.value.as_str()]);
    }
    out.push_str(&indent(&t.render()));
    let missing: Vec<&Finding> = p.findings.iter().filter(|f| f.status == "no").collect();
    if !missing.is_empty() {
        out.push_str("\nMissing, what it blocks, and how to get it:\n");
        for f in missing {
            out.push_str(&format!(
                "  - {} {}: blocks {}.\n      get it: {}.\n",
                f.area,
                f.item,
                f.blocks.as_deref().unwrap_or("?"),
                f.fix.as_deref().unwrap_or("?")
            ));
        }
    }
    out.push_str("\nPCI devices\n");
    match &p.pci {
        Ok(devices) if devices.is_empty() => out.push_str("  none\n"),
        Ok(devices) => {
            let mut t = Table::new([
                "address",
                "id",
                "class",
                "driver",
                "group",
                "usable through",
            ]);
            for d in devices {
                let i = &d.info;
                t.row([
                    i.address.to_string(),
                    format!("{:04x}:{:04x}", i.vendor, i.device),
                    format!("{:06x}", i.class),
                    i.driver.clone().unwrap_or_else(|| "-".into()),
                    match i.iommu_group {
                        Some(g) if i.noiommu_group => format!("noiommu-{g}"),
                        Some(g) => g.to_string(),
                        None => "-".into(),
                    },
                    d.usable.clone(),
                ]);
            }
            out.push_str(&indent(&t.render()));
        }
        Err(e) => out.push_str(&format!("  cannot be listed: {e}\n")),
    }
    out.push_str(&format!(
        "\nRuns here use: region {}; backends: {}\n",
        p.auto_region,
        p.backends.join(", ")
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use iommu::{MemlockLimit, VfioContainerReport};

    fn kvm(flags: u64, attributes: u64) -> KvmProbe {
        KvmProbe {
            unavailable: None,
            vm_types: vec![VmTypeSupport {
                vm_type: 0,
                name: "default",
                support: Ok(KvmSupport {
                    vm_types: 1,
                    guest_memfd: true,
                    guest_memfd_flags: flags,
                    user_memory2: true,
                    memory_attributes: attributes,
                }),
            }],
        }
    }

    fn host(vfio: bool, iommufd: bool, noiommu: Option<bool>) -> HostReport {
        HostReport {
            vfio: VfioContainerReport {
                node: if vfio {
                    NodeState::Present
                } else {
                    NodeState::Absent
                },
                api_version: vfio.then_some(0),
                type1: vfio,
                type1v2: vfio,
                unmap_all: vfio,
                noiommu: false,
            },
            iommufd: if iommufd {
                NodeState::Present
            } else {
                NodeState::Absent
            },
            noiommu_mode: noiommu,
            type1_dma_entry_limit: vfio.then_some(65535),
            memlock: Some(MemlockLimit {
                soft: Some(8 << 20),
                hard: None,
            }),
        }
    }

    fn status(findings: &[Finding], item: &str) -> &'static str {
        findings
            .iter()
            .find(|f| f.item == item)
            .unwrap_or_else(|| panic!("no finding {item}"))
            .status
    }

    #[test]
    fn a_6_18_host_without_private_memory_is_described_as_such() {
        let mut f = Vec::new();
        kvm_findings(&kvm(3, 0), &mut f);
        assert_eq!(status(&f, "guest_memfd"), "yes");
        assert_eq!(status(&f, "guest_memfd flags"), "yes");
        assert_eq!(status(&f, "private memory attributes"), "no");
        let attrs = f
            .iter()
            .find(|f| f.item == "private memory attributes")
            .unwrap();
        assert!(
            attrs
                .fix
                .as_deref()
                .unwrap()
                .contains("KVM_SW_PROTECTED_VM")
        );
    }

    #[test]
    fn missing_mmap_flags_block_only_the_in_place_model() {
        let mut f = Vec::new();
        kvm_findings(&kvm(0, 8), &mut f);
        let flags = f.iter().find(|f| f.item == "guest_memfd flags").unwrap();
        assert_eq!(flags.status, "no");
        assert!(flags.blocks.as_deref().unwrap().contains("in-place"));
        assert!(flags.fix.as_deref().unwrap().contains("6.18"));
        assert_eq!(status(&f, "private memory attributes"), "yes");
    }

    #[test]
    fn no_kvm_says_how_to_get_it_and_nothing_else() {
        let mut f = Vec::new();
        let none = KvmProbe {
            unavailable: Some("/dev/kvm cannot be opened".into()),
            vm_types: vec![],
        };
        kvm_findings(&none, &mut f);
        assert_eq!(f.len(), 1);
        assert!(f[0].fix.as_deref().unwrap().contains("modprobe"));
    }

    #[test]
    fn iommufd_commands_are_yes_where_known_and_no_with_a_fix_elsewhere() {
        let mut f = Vec::new();
        iommufd_command_findings(None, &mut f);
        assert!(f.is_empty(), "no /dev/iommu: vfio_findings reports it");
        let commands = |map_file, noiommu| IommufdCommands {
            map_file: Ok(map_file),
            noiommu: Ok(noiommu),
        };
        iommufd_command_findings(Some(&commands(true, true)), &mut f);
        assert_eq!(status(&f, "MAP_FILE"), "yes");
        assert_eq!(status(&f, "no-IOMMU cdevs"), "yes");
        let mut f = Vec::new();
        iommufd_command_findings(Some(&commands(true, false)), &mut f);
        assert_eq!(status(&f, "MAP_FILE"), "yes");
        let missing = f.iter().find(|f| f.item == "no-IOMMU cdevs").unwrap();
        assert_eq!(missing.status, "no");
        assert!(missing.fix.as_deref().unwrap().contains("7.x"));
    }

    #[test]
    fn vfio_and_iommufd_present_are_yes_and_absent_are_no_with_a_fix() {
        let mut f = Vec::new();
        vfio_findings(&host(true, true, Some(true)), &mut f);
        for item in [
            "/dev/vfio/vfio",
            "IOMMU types",
            "no-IOMMU mode",
            "/dev/iommu",
        ] {
            assert_eq!(status(&f, item), "yes", "{item}");
        }
        let budget = f.iter().find(|f| f.item == "type1 mapping budget").unwrap();
        assert!(budget.value.contains("65535") && budget.value.contains("256.0 MiB"));
        let memlock = f.iter().find(|f| f.item == "RLIMIT_MEMLOCK").unwrap();
        assert!(
            memlock.value.contains("soft 8 MiB, hard unlimited"),
            "{}",
            memlock.value
        );

        let mut f = Vec::new();
        vfio_findings(&host(false, false, None), &mut f);
        for item in ["/dev/vfio/vfio", "no-IOMMU mode", "/dev/iommu", "MAP_FILE"] {
            assert_eq!(status(&f, item), "no", "{item}");
        }
        for missing in f.iter().filter(|f| f.status == "no") {
            assert!(
                missing.blocks.is_some() && missing.fix.is_some(),
                "{}",
                missing.item
            );
        }
    }
}
