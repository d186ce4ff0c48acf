//! The contract between real-kernel tests and the machines they run on.
//!
//! A test that needs a kernel feature asks [`need`] first. Where the feature is present the test
//! runs; where it is missing the test prints `SKIPPED <test>: <what is missing>` and returns, unless
//! the environment says the feature is *required*, in which case the test fails. CI requires what
//! the host offers (`/dev/kvm`, mmap-able guest_memfd), and the VM rig's guest requires what each
//! of its configurations offers (VFIO type1, IOMMUFD, no-IOMMU, KVM private memory, the `edu`
//! device), so nothing CI is supposed to exercise can silently skip.
//!
//! Environment, set by `.ci/run` and by the rig's guest `/init`:
//! - `GMEM_DMA_REQUIRE`: comma-separated [`Feature`] names that must be present (`all` = every one).
//! - `GMEM_DMA_EDU`: PCI address (`0000:00:03.0`) of the `edu` device bound to vfio-pci. Without
//!   it, [`edu_device`] scans sysfs for vendor 1234 device 11e8.
//!
//! Real-kernel tests are named with the prefix `kernel_` so the rig can select them inside the
//! guest with libtest's name filter (the rest of the suite runs on the host, where it is faster).
use std::fmt;
use std::fs::{self, File};
use std::io::{self, ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_X86_SW_PROTECTED_VM;
use kvm_ioctls::{Cap, Kvm};

/// Name of the environment variable listing required features.
pub const REQUIRE_ENV: &str = "GMEM_DMA_REQUIRE";
/// Name of the environment variable naming the `edu` device's PCI address.
pub const EDU_ENV: &str = "GMEM_DMA_EDU";
/// PCI vendor and device id of QEMU's `edu` device.
pub const EDU_VENDOR_DEVICE: (u16, u16) = (0x1234, 0x11e8);

/// `KVM_CAP_GUEST_MEMFD_FLAGS` (Linux 6.18); kvm-ioctls 0.25 has no `Cap` for it.
const KVM_CAP_GUEST_MEMFD_FLAGS: libc::c_ulong = 244;
/// `GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED`.
const GUEST_MEMFD_MMAP_SHARED: i32 = 0b11;

/// A kernel feature a test may need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// `/dev/kvm` opens.
    Kvm,
    /// guest_memfd can be created with `MMAP | INIT_SHARED` (Linux 6.18+).
    GuestMemfdMmap,
    /// `KVM_X86_SW_PROTECTED_VM` can be created and supports `KVM_MEMORY_ATTRIBUTE_PRIVATE`.
    KvmPrivateMemory,
    /// The `edu` device is bound to vfio-pci.
    Edu,
    /// VFIO type1 container (`/dev/vfio/vfio`) and the `edu` device's group.
    VfioType1,
    /// IOMMUFD (`/dev/iommu`) and the `edu` device's vfio cdev.
    Iommufd,
    /// VFIO no-IOMMU mode (`/dev/vfio/noiommu-N` for the `edu` device).
    NoIommu,
    /// `IOMMU_IOAS_MAP_FILE` (Linux 6.13+): an IOAS maps a memfd by file and offset.
    IommufdMapFile,
    /// iommufd's own no-IOMMU mode (Linux 7.x, `CONFIG_IOMMUFD_NOIOMMU`): the `edu` device's
    /// vfio cdev is a no-IOMMU one (`/dev/vfio/devices/noiommu-vfioN`) that binds to
    /// `/dev/iommu`, and `IOMMU_IOAS_NOIOMMU_GET_PA` tells the physical address behind an IOVA.
    IommufdNoIommu,
}

impl Feature {
    /// Every feature, in the order they are documented.
    pub const ALL: [Feature; 9] = [
        Feature::Kvm,
        Feature::GuestMemfdMmap,
        Feature::KvmPrivateMemory,
        Feature::Edu,
        Feature::VfioType1,
        Feature::Iommufd,
        Feature::NoIommu,
        Feature::IommufdMapFile,
        Feature::IommufdNoIommu,
    ];

    /// The name used in `GMEM_DMA_REQUIRE`.
    pub fn name(self) -> &'static str {
        match self {
            Feature::Kvm => "kvm",
            Feature::GuestMemfdMmap => "guest-memfd-mmap",
            Feature::KvmPrivateMemory => "kvm-private",
            Feature::Edu => "edu",
            Feature::VfioType1 => "vfio-type1",
            Feature::Iommufd => "iommufd",
            Feature::NoIommu => "noiommu",
            Feature::IommufdMapFile => "iommufd-map-file",
            Feature::IommufdNoIommu => "iommufd-noiommu",
        }
    }

    /// Looks for the feature on this machine; `Err` says what is missing.
    pub fn probe(self) -> Result<(), String> {
        match self {
            Feature::Kvm => Kvm::new().map(drop).map_err(|e| format!("/dev/kvm: {e}")),
            Feature::GuestMemfdMmap => probe_guest_memfd_mmap(),
            Feature::KvmPrivateMemory => probe_private_memory(),
            Feature::Edu => edu_device().map(drop).ok_or_else(|| {
                "no edu device (PCI 1234:11e8) bound to vfio-pci; set GMEM_DMA_EDU or bind one"
                    .to_string()
            }),
            Feature::VfioType1 => {
                let dev = edu_or_missing()?;
                exists("/dev/vfio/vfio")?;
                match iommu_group(&dev) {
                    Some(group) if !Path::new(&format!("/dev/vfio/noiommu-{group}")).exists() => {
                        exists(&format!("/dev/vfio/{group}"))
                    }
                    Some(_) => Err(format!("{dev} is in a no-IOMMU group, not a type1 one")),
                    None => Err(format!("{dev} has no IOMMU group")),
                }
            }
            Feature::Iommufd => {
                let dev = edu_or_missing()?;
                exists("/dev/iommu")?;
                let cdev = vfio_cdev(&dev)
                    .ok_or_else(|| format!("{dev} has no vfio cdev under /dev/vfio/devices"))?;
                if is_noiommu_cdev(&cdev) {
                    return Err(format!(
                        "{dev}'s cdev {} is a no-IOMMU one (no translation; that is {})",
                        cdev.display(),
                        Feature::IommufdNoIommu
                    ));
                }
                Ok(())
            }
            Feature::IommufdMapFile => probe_map_file(),
            Feature::IommufdNoIommu => {
                let dev = edu_or_missing()?;
                exists("/dev/iommu")?;
                match vfio_cdev(&dev) {
                    Some(cdev) if is_noiommu_cdev(&cdev) => Ok(()),
                    Some(cdev) => Err(format!(
                        "{dev}'s cdev {} is translated by an IOMMU, not a no-IOMMU one",
                        cdev.display()
                    )),
                    None => Err(format!(
                        "{dev} has no vfio cdev under /dev/vfio/devices (a no-IOMMU cdev needs Linux 7.x with CONFIG_IOMMUFD_NOIOMMU and vfio.enable_unsafe_noiommu_mode=1)"
                    )),
                }
            }
            Feature::NoIommu => {
                let dev = edu_or_missing()?;
                match iommu_group(&dev) {
                    Some(group) => exists(&format!("/dev/vfio/noiommu-{group}")),
                    None => Err(format!("{dev} has no IOMMU group")),
                }
            }
        }
    }

    /// True when `GMEM_DMA_REQUIRE` lists this feature (or says `all`).
    pub fn required(self) -> bool {
        std::env::var(REQUIRE_ENV).is_ok_and(|list| {
            list.split(',')
                .map(str::trim)
                .any(|name| name == "all" || name == self.name())
        })
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Decides whether `test` can run: `true` when every feature in `features` is present.
///
/// A missing feature prints `SKIPPED <test>: <feature>: <reason>` to stderr and returns `false`,
/// unless the feature is required by `GMEM_DMA_REQUIRE`.
///
/// # Panics
/// When a required feature is missing: that is the test failing, which is the point.
pub fn need(test: &str, features: &[Feature]) -> bool {
    for &feature in features {
        if let Err(reason) = feature.probe() {
            if feature.required() {
                panic!("{test}: {REQUIRE_ENV} requires {feature}, but it is missing: {reason}");
            }
            eprintln!("SKIPPED {test}: {feature}: {reason}");
            return false;
        }
    }
    true
}

/// The kernel log (`/dev/kmsg`) from the moment it was opened: where an IOMMU driver reports
/// the DMA faults it sees, so a test can prove a device was (or was not) stopped.
#[derive(Debug)]
pub struct KernelLog {
    kmsg: File,
}

impl KernelLog {
    /// Opens `/dev/kmsg` at its end: only records logged from now on are read.
    pub fn from_now() -> io::Result<Self> {
        let mut kmsg = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")?;
        kmsg.seek(SeekFrom::End(0))?;
        Ok(Self { kmsg })
    }

    /// The text of every record logged since the last read.
    pub fn read_new(&mut self) -> io::Result<Vec<String>> {
        let (mut texts, mut record) = (Vec::new(), [0u8; 8192]);
        loop {
            // One record per read: "priority,sequence,time,flags;text\n".
            let n = match self.kmsg.read(&mut record) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(texts),
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue, // overwritten
                n => n?,
            };
            if n == 0 {
                return Ok(texts);
            }
            let record = String::from_utf8_lossy(&record[..n]);
            let text = record.split_once(';').map_or("", |(_, text)| text);
            texts.push(text.trim_end().to_string());
        }
    }

    /// The records matching `wanted` logged since the last read, waiting up to `timeout` for the
    /// first one: IOMMU drivers report faults from an interrupt, a moment after the DMA.
    pub fn wait_for(
        &mut self,
        wanted: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> io::Result<Vec<String>> {
        let (start, mut found) = (Instant::now(), Vec::new());
        loop {
            found.extend(self.read_new()?.into_iter().filter(|t| wanted(t)));
            if !found.is_empty() || start.elapsed() >= timeout {
                return Ok(found);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// True for intel-iommu's record of one DMA fault (`DMAR: [DMA Write NO_PASID] Request device
/// [00:03.0] fault addr 0x12000 [fault reason 0x05] ...`).
pub fn is_dmar_fault(text: &str) -> bool {
    text.starts_with("DMAR:") && text.contains("fault addr")
}

/// Waits until the Intel IOMMU driver will print the next DMA fault.
///
/// `dmar_fault()` prints fault records through a rate limit of 10 fault interrupts per 5 s per
/// boot (`DEFAULT_RATELIMIT_INTERVAL`/`BURST`), and a fault the limit swallows leaves no line in
/// the log at all. Earlier tests in the same boot can use the window up, so a test that asserts a
/// fault line calls this right before causing the fault: once 5 s have passed since the window
/// began, the kernel opens a fresh one at the next fault.
pub fn wait_for_dmar_fault_log_window() {
    std::thread::sleep(std::time::Duration::from_millis(5_100));
}

/// The PCI address of the `edu` device bound to vfio-pci, from `GMEM_DMA_EDU` or from sysfs.
pub fn edu_device() -> Option<String> {
    if let Ok(addr) = std::env::var(EDU_ENV) {
        return Some(addr);
    }
    edu_devices().into_iter().next()
}

/// A second `edu` device bound to vfio-pci, other than [`edu_device`] (every rig configuration
/// boots two, for tests that put two devices in one address space).
pub fn second_edu_device() -> Option<String> {
    let first = edu_device()?;
    edu_devices().into_iter().find(|a| *a != first)
}

/// Every `edu` device bound to vfio-pci, by PCI address, in sysfs order.
fn edu_devices() -> Vec<String> {
    let Ok(entries) = fs::read_dir("/sys/bus/pci/devices") else {
        return Vec::new();
    };
    let mut found: Vec<String> = entries
        .flatten()
        .filter_map(|entry| {
            let dir = entry.path();
            let id = |file: &str| {
                let text = fs::read_to_string(dir.join(file)).ok()?;
                u16::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
            };
            let bound_to_vfio = fs::read_link(dir.join("driver"))
                .is_ok_and(|d| d.file_name().is_some_and(|n| n == "vfio-pci"));
            (bound_to_vfio && (id("vendor")?, id("device")?) == EDU_VENDOR_DEVICE)
                .then(|| entry.file_name().to_string_lossy().into_owned())
        })
        .collect();
    found.sort();
    found
}

/// The sysfs directory of a PCI device.
pub fn sysfs_path(pci_address: &str) -> PathBuf {
    Path::new("/sys/bus/pci/devices").join(pci_address)
}

fn edu_or_missing() -> Result<String, String> {
    edu_device().ok_or_else(|| "no edu device bound to vfio-pci".to_string())
}

fn iommu_group(pci_address: &str) -> Option<String> {
    let link = fs::read_link(sysfs_path(pci_address).join("iommu_group")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

fn vfio_cdev(pci_address: &str) -> Option<PathBuf> {
    let mut entries = fs::read_dir(sysfs_path(pci_address).join("vfio-dev")).ok()?;
    let name = entries.next()?.ok()?.file_name();
    let node = Path::new("/dev/vfio/devices").join(name);
    node.exists().then_some(node)
}

/// vfio names a no-IOMMU device's cdev `noiommu-vfioN` (`vfio_device_set_noiommu_and_name()`).
fn is_noiommu_cdev(cdev: &Path) -> bool {
    cdev.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("noiommu-"))
}

/// `_IO(';', 0x80 + n)`: every iommufd command is an argument-less ioctl number whose struct
/// starts with its own size.
const fn iommufd_ioctl(command: u8) -> libc::c_ulong {
    ((b';' as libc::c_ulong) << 8) | command as libc::c_ulong
}

/// `IOMMUFD_CMD_IOAS_MAP_FILE`.
const IOMMU_IOAS_MAP_FILE: libc::c_ulong = iommufd_ioctl(0x8f);

/// Whether `/dev/iommu` knows `IOMMU_IOAS_MAP_FILE`, without mapping anything: sent with
/// `size = 0`, a kernel that knows the command refuses the too-small struct with `EINVAL`; one
/// that does not answers `ENOTTY`.
fn probe_map_file() -> Result<(), String> {
    let iommufd = File::options()
        .read(true)
        .write(true)
        .open("/dev/iommu")
        .map_err(|e| format!("/dev/iommu: {e}"))?;
    let mut size: u32 = 0;
    // SAFETY: the fd is open; the kernel reads the leading u32 `size` (0) and stops there,
    // because every iommufd command needs more than 0 bytes.
    let ret = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&iommufd),
            IOMMU_IOAS_MAP_FILE,
            &mut size,
        )
    };
    match io::Error::last_os_error().raw_os_error() {
        _ if ret == 0 => Ok(()),
        Some(libc::EINVAL) => Ok(()),
        Some(libc::ENOTTY) => {
            Err("/dev/iommu answers ENOTTY to IOMMU_IOAS_MAP_FILE (needs Linux 6.13+)".into())
        }
        _ => Err(format!(
            "IOMMU_IOAS_MAP_FILE probe: {}",
            io::Error::last_os_error()
        )),
    }
}

fn exists(path: &str) -> Result<(), String> {
    if Path::new(path).exists() {
        Ok(())
    } else {
        Err(format!("{path} does not exist"))
    }
}

fn probe_guest_memfd_mmap() -> Result<(), String> {
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    if !kvm.check_extension(Cap::GuestMemfd) {
        return Err("KVM lacks KVM_CAP_GUEST_MEMFD".into());
    }
    let flags = kvm.check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS);
    if flags & GUEST_MEMFD_MMAP_SHARED != GUEST_MEMFD_MMAP_SHARED {
        return Err(format!(
            "KVM_CAP_GUEST_MEMFD_FLAGS = {flags:#x}, lacks MMAP|INIT_SHARED (needs Linux 6.18+)"
        ));
    }
    Ok(())
}

fn probe_private_memory() -> Result<(), String> {
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    let types = kvm.check_extension_raw(kvm_bindings::KVM_CAP_VM_TYPES.into());
    if types & (1 << KVM_X86_SW_PROTECTED_VM) == 0 {
        return Err(format!(
            "KVM_CAP_VM_TYPES = {types:#x} lacks KVM_X86_SW_PROTECTED_VM (needs CONFIG_KVM_SW_PROTECTED_VM)"
        ));
    }
    let vm = kvm
        .create_vm_with_type(KVM_X86_SW_PROTECTED_VM.into())
        .map_err(|e| format!("KVM_CREATE_VM(SW_PROTECTED): {e}"))?;
    let attributes = vm.check_extension_raw(kvm_bindings::KVM_CAP_MEMORY_ATTRIBUTES.into());
    if attributes as u32 & kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE == 0 {
        return Err(format!(
            "KVM_CAP_MEMORY_ATTRIBUTES = {attributes:#x} lacks KVM_MEMORY_ATTRIBUTE_PRIVATE"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_names_are_distinct() {
        let mut names: Vec<_> = Feature::ALL.iter().map(|f| f.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Feature::ALL.len());
    }

    #[test]
    fn iommufd_ioctl_numbers_match_the_uapi() {
        // include/uapi/linux/iommufd.h: IOMMUFD_TYPE ';' (0x3b), _IO(type, nr) = type << 8 | nr.
        assert_eq!(IOMMU_IOAS_MAP_FILE, 0x3b8f);
        assert!(is_noiommu_cdev(Path::new(
            "/dev/vfio/devices/noiommu-vfio0"
        )));
        assert!(!is_noiommu_cdev(Path::new("/dev/vfio/devices/vfio0")));
    }

    #[test]
    fn kvm_probe_agrees_with_dev_kvm() {
        let opens = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        assert_eq!(Feature::Kvm.probe().is_ok(), opens);
    }
}
