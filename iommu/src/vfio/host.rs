//! Finding a PCI device in sysfs, deciding whether VFIO can use it, and saying exactly why not.
//!
//! Everything here reads sysfs and `/dev` below a [`HostPaths`] root, so tests run against a
//! fake tree in a temporary directory. Opening the device is left to the backends
//! ([`Type1Backend`](crate::Type1Backend), [`IommufdBackend`](crate::IommufdBackend),
//! [`NoIommuBackend`](crate::NoIommuBackend)); they call [`HostPaths::check`] first so that a
//! device that cannot work is refused with a [`DeviceError`] that names the fix, not with a bare
//! errno from deep inside VFIO.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::PciAddress;

/// Which VFIO path a device is to be opened through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum VfioMode {
    /// The group `/dev/vfio/N` in a type1 container.
    Type1,
    /// The cdev `/dev/vfio/devices/vfioN` bound to `/dev/iommu`.
    Iommufd,
    /// The no-IOMMU group `/dev/vfio/noiommu-N`.
    NoIommu,
}

impl fmt::Display for VfioMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VfioMode::Type1 => "VFIO type1",
            VfioMode::Iommufd => "IOMMUFD",
            VfioMode::NoIommu => "VFIO no-IOMMU",
        })
    }
}

/// Another device in the same IOMMU group, with its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct GroupMember {
    /// Its PCI address (or sysfs name).
    pub address: String,
    /// Its driver, `None` when unbound.
    pub driver: Option<String>,
}

/// Why a device cannot be used through VFIO, with what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// No such device in sysfs.
    #[error("PCI device {address} does not exist ({path} is missing)")]
    NotFound {
        /// The address asked for.
        address: PciAddress,
        /// The sysfs directory looked at.
        path: PathBuf,
    },
    /// Bound to another driver or to none.
    #[error("{}", not_bound_message(address, driver.as_deref(), *vendor, *device))]
    NotBoundToVfio {
        /// The device.
        address: PciAddress,
        /// Its current driver, `None` when unbound.
        driver: Option<String>,
        /// PCI vendor id.
        vendor: u16,
        /// PCI device id.
        device: u16,
    },
    /// Neither an IOMMU group nor a no-IOMMU group.
    #[error(
        "{address} has no IOMMU group: the kernel found no IOMMU for it (boot with intel_iommu=on \
         or amd_iommu=on, or give the VM an IOMMU) and VFIO no-IOMMU mode is off (unsafe: load vfio \
         with enable_unsafe_noiommu_mode=1)"
    )]
    NoIommuGroup {
        /// The device.
        address: PciAddress,
    },
    /// Another device in the group is bound to a driver that is not VFIO-safe.
    #[error("{}", not_viable_message(address, *group, blockers))]
    GroupNotViable {
        /// The device.
        address: PciAddress,
        /// Its IOMMU group.
        group: u32,
        /// The members that keep the group from being usable.
        blockers: Vec<GroupMember>,
    },
    /// The group is of the other kind than the backend asked for.
    #[error("{address} is in {found}, which {wanted} cannot use{hint}")]
    WrongMode {
        /// The device.
        address: PciAddress,
        /// The backend asked for.
        wanted: VfioMode,
        /// What the device is in ("no-IOMMU group noiommu-3", "IOMMU group 3").
        found: String,
        /// What to do instead.
        hint: &'static str,
    },
    /// A node under /dev that should exist does not.
    #[error("{path} does not exist: {hint}")]
    NodeMissing {
        /// The missing node.
        path: PathBuf,
        /// Why it may be missing.
        hint: &'static str,
    },
    /// The vfio cdev directory is missing.
    #[error(
        "{address} has no vfio cdev (sysfs vfio-dev/): the kernel lacks CONFIG_VFIO_DEVICE_CDEV \
         (Linux 6.6+), so IOMMUFD cannot open it; use VFIO type1"
    )]
    NoCdev {
        /// The device.
        address: PciAddress,
    },
    /// The process may not open a node.
    #[error("no permission to open {path}: run as root or chown/chmod it for this user")]
    NoPermission {
        /// The node.
        path: PathBuf,
        /// The error from open.
        #[source]
        source: io::Error,
    },
    /// no-IOMMU groups need `CAP_SYS_RAWIO`.
    #[error("opening {path} needs CAP_SYS_RAWIO (VFIO no-IOMMU mode gives raw DMA access)")]
    NeedsRawio {
        /// The node.
        path: PathBuf,
    },
    /// Opening a node failed for another reason.
    #[error("cannot open {path}")]
    Open {
        /// The node.
        path: PathBuf,
        /// The error from open.
        #[source]
        source: io::Error,
    },
    /// A sysfs file could not be read.
    #[error("cannot read {path}")]
    Sysfs {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A sysfs file held something unexpected.
    #[error("{path} holds {value:?}, expected {expected}")]
    SysfsValue {
        /// The file.
        path: PathBuf,
        /// What it held.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
}

fn not_bound_message(
    address: &PciAddress,
    driver: Option<&str>,
    vendor: u16,
    device: u16,
) -> String {
    let now = match driver {
        Some(d) => format!(
            "is bound to {d}, not vfio-pci; unbind it (echo {address} > /sys/bus/pci/devices/{address}/driver/unbind) and"
        ),
        None => "is not bound to any driver;".to_string(),
    };
    format!(
        "{address} {now} bind it to vfio-pci: echo {vendor:04x} {device:04x} > \
         /sys/bus/pci/drivers/vfio-pci/new_id (or: echo vfio-pci > \
         /sys/bus/pci/devices/{address}/driver_override && echo {address} > \
         /sys/bus/pci/drivers_probe)"
    )
}

fn not_viable_message(address: &PciAddress, group: u32, blockers: &[GroupMember]) -> String {
    let list: Vec<String> = blockers
        .iter()
        .map(|m| {
            format!(
                "{} (driver {})",
                m.address,
                m.driver.as_deref().unwrap_or("none")
            )
        })
        .collect();
    format!(
        "{address} shares IOMMU group {group} with {}; every device of a group must be bound to \
         vfio-pci (or be unbound) before VFIO can use any of them",
        list.join(", ")
    )
}

/// Drivers with which a group member does not block VFIO use of the group (the kernel lets
/// drivers that manage DMA themselves, or do none, share a group with VFIO).
const VFIO_SAFE_DRIVERS: [&str; 3] = ["vfio-pci", "pci-stub", "pcieport"];

fn vfio_safe(driver: Option<&str>) -> bool {
    driver.is_none_or(|d| VFIO_SAFE_DRIVERS.contains(&d) || d.starts_with("vfio"))
}

/// One PCI device as sysfs describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PciDeviceInfo {
    /// Its address.
    pub address: PciAddress,
    /// PCI vendor id.
    pub vendor: u16,
    /// PCI device id.
    pub device: u16,
    /// PCI class code (24 bits).
    pub class: u32,
    /// Bound driver, `None` when unbound.
    pub driver: Option<String>,
    /// IOMMU group number, `None` when the device has none.
    pub iommu_group: Option<u32>,
    /// True when the group is a no-IOMMU one (`/dev/vfio/noiommu-N` exists).
    pub noiommu_group: bool,
    /// Other devices in the same IOMMU group.
    pub group_peers: Vec<GroupMember>,
    /// Name of the vfio cdev (`vfio0`) when bound to vfio-pci on a kernel with cdevs.
    pub vfio_cdev: Option<String>,
}

/// A device that passed [`HostPaths::check`] for one [`VfioMode`], with the nodes to open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsableDevice {
    /// The device.
    pub address: PciAddress,
    /// Its sysfs directory (what vfio-ioctls' `VfioDevice::new` takes).
    pub sysfs_dir: PathBuf,
    /// Its IOMMU group number (for no-IOMMU, the N of `noiommu-N`).
    pub group: u32,
    /// The node to open: the group (`/dev/vfio/N`, `/dev/vfio/noiommu-N`) or the cdev.
    pub node: PathBuf,
}

/// Where sysfs and /dev are: `/sys` and `/dev` on a real host, a temporary tree in tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPaths {
    /// The sysfs mount (`/sys`).
    pub sysfs: PathBuf,
    /// The devtmpfs mount (`/dev`).
    pub dev: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            sysfs: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
        }
    }
}

fn read_trimmed(path: &Path) -> Result<String, DeviceError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| DeviceError::Sysfs {
            path: path.to_path_buf(),
            source,
        })
}

fn read_hex(path: &Path) -> Result<u32, DeviceError> {
    let text = read_trimmed(path)?;
    u32::from_str_radix(text.trim_start_matches("0x"), 16).map_err(|_| DeviceError::SysfsValue {
        path: path.to_path_buf(),
        value: text,
        expected: "a hex number",
    })
}

/// The last component of a symlink's target (`../../bus/pci/drivers/vfio-pci` -> `vfio-pci`).
fn link_name(path: &Path) -> Option<String> {
    let target = fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

impl HostPaths {
    /// The sysfs directory of `address`.
    pub fn device_dir(&self, address: &PciAddress) -> PathBuf {
        self.sysfs.join("bus/pci/devices").join(address.to_string())
    }

    /// Reads what sysfs says about `address`.
    ///
    /// # Errors
    /// [`DeviceError::NotFound`] when the device does not exist, [`DeviceError::Sysfs`] /
    /// [`DeviceError::SysfsValue`] when its attributes cannot be read.
    pub fn inspect(&self, address: &PciAddress) -> Result<PciDeviceInfo, DeviceError> {
        let dir = self.device_dir(address);
        if !dir.exists() {
            return Err(DeviceError::NotFound {
                address: *address,
                path: dir,
            });
        }
        let vendor = read_hex(&dir.join("vendor"))? as u16;
        let device = read_hex(&dir.join("device"))? as u16;
        let class = read_hex(&dir.join("class"))?;
        let driver = link_name(&dir.join("driver"));
        let group_link = dir.join("iommu_group");
        let iommu_group = match link_name(&group_link) {
            None => None,
            Some(name) => Some(name.parse::<u32>().map_err(|_| DeviceError::SysfsValue {
                path: group_link.clone(),
                value: name,
                expected: "a link to an IOMMU group number",
            })?),
        };
        let group_peers = match iommu_group {
            Some(group) => self
                .group_members(group)?
                .into_iter()
                .filter(|m| m.address != address.to_string())
                .collect(),
            None => Vec::new(),
        };
        let noiommu_group =
            iommu_group.is_some_and(|g| self.dev.join(format!("vfio/noiommu-{g}")).exists());
        let vfio_cdev = fs::read_dir(dir.join("vfio-dev"))
            .ok()
            .and_then(|mut entries| entries.next())
            .and_then(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned());
        Ok(PciDeviceInfo {
            address: *address,
            vendor,
            device,
            class,
            driver,
            iommu_group,
            noiommu_group,
            group_peers,
            vfio_cdev,
        })
    }

    fn group_members(&self, group: u32) -> Result<Vec<GroupMember>, DeviceError> {
        let dir = self
            .sysfs
            .join("kernel/iommu_groups")
            .join(group.to_string())
            .join("devices");
        let entries = fs::read_dir(&dir).map_err(|source| DeviceError::Sysfs {
            path: dir.clone(),
            source,
        })?;
        let mut members: Vec<GroupMember> = entries
            .flatten()
            .map(|e| GroupMember {
                address: e.file_name().to_string_lossy().into_owned(),
                driver: link_name(&e.path().join("driver")),
            })
            .collect();
        members.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(members)
    }

    /// Every PCI device sysfs lists, sorted by address. Devices whose attributes cannot be read
    /// are left out (a device can disappear between the listing and the read).
    ///
    /// # Errors
    /// When `bus/pci/devices` itself cannot be read.
    pub fn list_pci_devices(&self) -> Result<Vec<PciDeviceInfo>, DeviceError> {
        let dir = self.sysfs.join("bus/pci/devices");
        let entries = fs::read_dir(&dir).map_err(|source| DeviceError::Sysfs {
            path: dir.clone(),
            source,
        })?;
        let mut devices: Vec<PciDeviceInfo> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<PciAddress>().ok())
            .filter_map(|address| self.inspect(&address).ok())
            .collect();
        devices.sort_by_key(|d| d.address);
        Ok(devices)
    }

    /// Decides whether `address` can be opened through `mode`, and which node to open.
    ///
    /// Checks, in order: the device exists; it is bound to vfio-pci; it has an IOMMU group of
    /// the right kind; every other member of the group is VFIO-safe; the node exists and this
    /// process may open it.
    ///
    /// # Errors
    /// The first check that fails, as a [`DeviceError`] naming the fix.
    pub fn check(&self, address: &PciAddress, mode: VfioMode) -> Result<UsableDevice, DeviceError> {
        let info = self.inspect(address)?;
        if info.driver.as_deref() != Some("vfio-pci") {
            return Err(DeviceError::NotBoundToVfio {
                address: *address,
                driver: info.driver,
                vendor: info.vendor,
                device: info.device,
            });
        }
        let Some(group) = info.iommu_group else {
            return Err(DeviceError::NoIommuGroup { address: *address });
        };
        let blockers: Vec<GroupMember> = info
            .group_peers
            .iter()
            .filter(|m| !vfio_safe(m.driver.as_deref()))
            .cloned()
            .collect();
        if !blockers.is_empty() {
            return Err(DeviceError::GroupNotViable {
                address: *address,
                group,
                blockers,
            });
        }
        let sysfs_dir = self.device_dir(address);
        // The no-IOMMU mode needs a no-IOMMU group; type1 and IOMMUFD need a real one.
        match (mode == VfioMode::NoIommu, info.noiommu_group) {
            (false, true) => {
                return Err(DeviceError::WrongMode {
                    address: *address,
                    wanted: mode,
                    found: format!("no-IOMMU group noiommu-{group}"),
                    hint: "; it has no IOMMU, open it with the no-IOMMU backend",
                });
            }
            (true, false) => {
                return Err(DeviceError::WrongMode {
                    address: *address,
                    wanted: mode,
                    found: format!("IOMMU group {group}"),
                    hint: "; it is behind an IOMMU, open it with type1 or IOMMUFD",
                });
            }
            _ => {}
        }
        let node = match mode {
            VfioMode::Type1 => self.dev.join(format!("vfio/{group}")),
            VfioMode::NoIommu => self.dev.join(format!("vfio/noiommu-{group}")),
            VfioMode::Iommufd => {
                let iommu = self.dev.join("iommu");
                if !iommu.exists() {
                    return Err(DeviceError::NodeMissing {
                        path: iommu,
                        hint: "the kernel lacks CONFIG_IOMMUFD (or the iommufd module is not loaded)",
                    });
                }
                probe_open(&iommu, mode)?;
                let Some(cdev) = info.vfio_cdev else {
                    return Err(DeviceError::NoCdev { address: *address });
                };
                self.dev.join("vfio/devices").join(cdev)
            }
        };
        if !node.exists() {
            return Err(DeviceError::NodeMissing {
                path: node,
                hint: "the device is bound to vfio-pci but its VFIO node is missing; is devtmpfs \
                       mounted on /dev?",
            });
        }
        probe_open(&node, mode)?;
        Ok(UsableDevice {
            address: *address,
            sysfs_dir,
            group,
            node,
        })
    }
}

/// Opens and closes `path` to turn "cannot open" into a precise error before VFIO tries.
///
/// A group node answers `EBUSY` while another fd holds it open (possibly our own container
/// with another device of the group): that is not a reason to refuse here, so it passes.
fn probe_open(path: &Path, mode: VfioMode) -> Result<(), DeviceError> {
    match fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) && mode == VfioMode::NoIommu => {
            Err(DeviceError::NeedsRawio {
                path: path.to_path_buf(),
            })
        }
        Err(source) if matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => {
            Err(DeviceError::NoPermission {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(DeviceError::Open {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::vfio::pci::tests::addr;
    use std::os::unix::fs::symlink;

    /// A fake `/sys` + `/dev` in a fresh temporary directory, removed on drop.
    pub(crate) struct FakeHost {
        pub(crate) root: PathBuf,
        pub(crate) paths: HostPaths,
    }

    impl FakeHost {
        pub(crate) fn new(name: &str) -> FakeHost {
            let root = std::env::temp_dir().join(format!(
                "iommu-fakehost-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("sys/bus/pci/devices")).unwrap();
            fs::create_dir_all(root.join("sys/bus/pci/drivers")).unwrap();
            fs::create_dir_all(root.join("dev/vfio/devices")).unwrap();
            let paths = HostPaths {
                sysfs: root.join("sys"),
                dev: root.join("dev"),
            };
            FakeHost { root, paths }
        }

        /// Adds a device; `group` links it into /sys/kernel/iommu_groups/N.
        pub(crate) fn device(
            &self,
            addr: &str,
            ids: (u16, u16),
            driver: Option<&str>,
            group: Option<u32>,
        ) {
            let dir = self.paths.sysfs.join("bus/pci/devices").join(addr);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("vendor"), format!("0x{:04x}\n", ids.0)).unwrap();
            fs::write(dir.join("device"), format!("0x{:04x}\n", ids.1)).unwrap();
            fs::write(dir.join("class"), "0x00ff00\n").unwrap();
            if let Some(d) = driver {
                let drv = self.paths.sysfs.join("bus/pci/drivers").join(d);
                fs::create_dir_all(&drv).unwrap();
                symlink(&drv, dir.join("driver")).unwrap();
            }
            if let Some(g) = group {
                let gdir = self.paths.sysfs.join(format!("kernel/iommu_groups/{g}"));
                fs::create_dir_all(gdir.join("devices")).unwrap();
                symlink(&gdir, dir.join("iommu_group")).unwrap();
                symlink(&dir, gdir.join("devices").join(addr)).unwrap();
            }
        }

        pub(crate) fn node(&self, rel: &str) {
            let p = self.paths.dev.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, "").unwrap();
        }

        pub(crate) fn cdev(&self, addr: &str, name: &str) {
            let dir = self.paths.sysfs.join("bus/pci/devices").join(addr);
            fs::create_dir_all(dir.join("vfio-dev").join(name)).unwrap();
            self.node(&format!("vfio/devices/{name}"));
        }
    }

    impl Drop for FakeHost {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn inspect_reads_ids_driver_group_peers_and_cdev() {
        let host = FakeHost::new("inspect");
        host.device("0000:00:03.0", (0x1234, 0x11e8), Some("vfio-pci"), Some(7));
        host.device("0000:00:03.1", (0x1234, 0x0001), None, Some(7));
        host.cdev("0000:00:03.0", "vfio3");
        let info = host.paths.inspect(&addr("0000:00:03.0")).unwrap();
        assert_eq!((info.vendor, info.device), (0x1234, 0x11e8));
        assert_eq!(info.class, 0xff00);
        assert_eq!(info.driver.as_deref(), Some("vfio-pci"));
        assert_eq!(info.iommu_group, Some(7));
        assert!(!info.noiommu_group);
        assert_eq!(
            info.group_peers,
            vec![GroupMember {
                address: "0000:00:03.1".into(),
                driver: None
            }]
        );
        assert_eq!(info.vfio_cdev.as_deref(), Some("vfio3"));
    }

    #[test]
    fn list_pci_devices_is_sorted_and_skips_non_devices() {
        let host = FakeHost::new("list");
        host.device("0000:00:1f.0", (0x8086, 0x2918), Some("lpc_ich"), None);
        host.device("0000:00:03.0", (0x1234, 0x11e8), Some("vfio-pci"), Some(3));
        fs::create_dir_all(host.paths.sysfs.join("bus/pci/devices/not-a-device")).unwrap();
        let list = host.paths.list_pci_devices().unwrap();
        let addrs: Vec<String> = list.iter().map(|d| d.address.to_string()).collect();
        assert_eq!(addrs, ["0000:00:03.0", "0000:00:1f.0"]);
        assert_eq!(list[1].iommu_group, None);
    }

    #[test]
    fn check_passes_a_vfio_bound_device_for_each_mode() {
        let host = FakeHost::new("ok");
        host.device("0000:00:03.0", (0x1234, 0x11e8), Some("vfio-pci"), Some(3));
        host.node("vfio/3");
        host.node("iommu");
        host.cdev("0000:00:03.0", "vfio0");
        let a = addr("0000:00:03.0");
        let t1 = host.paths.check(&a, VfioMode::Type1).unwrap();
        assert_eq!(t1.node, host.paths.dev.join("vfio/3"));
        assert_eq!(t1.group, 3);
        assert_eq!(
            t1.sysfs_dir,
            host.paths.sysfs.join("bus/pci/devices/0000:00:03.0")
        );
        let fd = host.paths.check(&a, VfioMode::Iommufd).unwrap();
        assert_eq!(fd.node, host.paths.dev.join("vfio/devices/vfio0"));
        let err = host.paths.check(&a, VfioMode::NoIommu).unwrap_err();
        assert!(matches!(err, DeviceError::WrongMode { .. }), "{err}");
    }

    #[test]
    fn check_names_the_driver_and_the_bind_command() {
        let host = FakeHost::new("driver");
        host.device("0000:00:03.0", (0x1234, 0x11e8), Some("edu_drv"), Some(3));
        let err = host
            .paths
            .check(&addr("0000:00:03.0"), VfioMode::Type1)
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("is bound to edu_drv"), "{msg}");
        assert!(
            msg.contains("echo 1234 11e8 > /sys/bus/pci/drivers/vfio-pci/new_id"),
            "{msg}"
        );
        assert!(msg.contains("driver_override"), "{msg}");

        let host = FakeHost::new("nodriver");
        host.device("0000:00:04.0", (0x1af4, 0x1000), None, Some(4));
        let msg = host
            .paths
            .check(&addr("0000:00:04.0"), VfioMode::Type1)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not bound to any driver"), "{msg}");
        assert!(msg.contains("echo 1af4 1000 >"), "{msg}");
    }

    #[test]
    fn check_refuses_a_group_shared_with_a_device_on_another_driver() {
        let host = FakeHost::new("shared");
        host.device("0000:00:03.0", (0x1234, 0x11e8), Some("vfio-pci"), Some(5));
        host.device("0000:00:03.1", (0x8086, 0x10d3), Some("e1000e"), Some(5));
        host.device("0000:00:03.2", (0x8086, 0x10d3), Some("pcieport"), Some(5));
        host.node("vfio/5");
        let err = host
            .paths
            .check(&addr("0000:00:03.0"), VfioMode::Type1)
            .unwrap_err();
        match &err {
            DeviceError::GroupNotViable {
                group, blockers, ..
            } => {
                assert_eq!(*group, 5);
                assert_eq!(blockers.len(), 1);
                assert_eq!(blockers[0].address, "0000:00:03.1");
            }
            other => panic!("wrong error {other}"),
        }
        assert!(err.to_string().contains("0000:00:03.1 (driver e1000e)"));
    }

    #[test]
    fn check_reports_missing_device_group_nodes_and_cdev() {
        let host = FakeHost::new("missing");
        let err = host
            .paths
            .check(&addr("0000:00:09.0"), VfioMode::Type1)
            .unwrap_err();
        assert!(matches!(err, DeviceError::NotFound { .. }));
        assert!(err.to_string().contains("does not exist"));

        host.device("0000:00:03.0", (0x1234, 0x11e8), Some("vfio-pci"), None);
        let err = host
            .paths
            .check(&addr("0000:00:03.0"), VfioMode::Type1)
            .unwrap_err();
        assert!(matches!(err, DeviceError::NoIommuGroup { .. }));
        assert!(err.to_string().contains("enable_unsafe_noiommu_mode=1"));

        host.device("0000:00:04.0", (0x1234, 0x11e8), Some("vfio-pci"), Some(4));
        let err = host
            .paths
            .check(&addr("0000:00:04.0"), VfioMode::Type1)
            .unwrap_err();
        assert!(
            matches!(&err, DeviceError::NodeMissing { path, .. } if path.ends_with("vfio/4")),
            "{err}"
        );
        let err = host
            .paths
            .check(&addr("0000:00:04.0"), VfioMode::Iommufd)
            .unwrap_err();
        assert!(
            matches!(&err, DeviceError::NodeMissing { path, .. } if path.ends_with("iommu")),
            "{err}"
        );
        host.node("iommu");
        let err = host
            .paths
            .check(&addr("0000:00:04.0"), VfioMode::Iommufd)
            .unwrap_err();
        assert!(matches!(err, DeviceError::NoCdev { .. }), "{err}");
    }

    #[test]
    fn check_routes_noiommu_groups_to_the_noiommu_backend_only() {
        let host = FakeHost::new("noiommu");
        host.device("0000:00:03.0", (0x1234, 0x11e8), Some("vfio-pci"), Some(0));
        host.node("vfio/noiommu-0");
        let a = addr("0000:00:03.0");
        let ok = host.paths.check(&a, VfioMode::NoIommu).unwrap();
        assert_eq!(ok.node, host.paths.dev.join("vfio/noiommu-0"));
        let err = host.paths.check(&a, VfioMode::Type1).unwrap_err();
        assert!(
            err.to_string().contains("no-IOMMU group noiommu-0"),
            "{err}"
        );
        assert!(host.paths.inspect(&a).unwrap().noiommu_group);
    }

    #[test]
    fn check_reports_permission_on_the_group_node() {
        use std::os::unix::fs::PermissionsExt;
        let host = FakeHost::new("perm");
        host.device("0000:00:03.0", (0x1234, 0x11e8), Some("vfio-pci"), Some(3));
        host.node("vfio/3");
        let node = host.paths.dev.join("vfio/3");
        fs::set_permissions(&node, fs::Permissions::from_mode(0o000)).unwrap();
        // Root (CAP_DAC_OVERRIDE) ignores file modes: nothing to test then.
        if fs::OpenOptions::new().read(true).open(&node).is_ok() {
            eprintln!("check_reports_permission_on_the_group_node: privileged, mode not enforced");
            return;
        }
        let err = host
            .paths
            .check(&addr("0000:00:03.0"), VfioMode::Type1)
            .unwrap_err();
        assert!(matches!(err, DeviceError::NoPermission { .. }), "{err}");
    }
}
