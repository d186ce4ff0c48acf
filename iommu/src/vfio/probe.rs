//! What this host offers for device DMA (VFIO container, IOMMUFD, no-IOMMU mode, limits): the
//! report behind the dma-map tool's `probe`.

use std::fs;
use std::path::Path;

use vfio_bindings::bindings::vfio::{
    VFIO_NOIOMMU_IOMMU, VFIO_TYPE1_IOMMU, VFIO_TYPE1v2_IOMMU, VFIO_UNMAP_ALL,
};

use super::HostPaths;
use super::sys;

/// Whether a node is there and usable, for [`HostReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(tag = "state", rename_all = "kebab-case"))]
pub enum NodeState {
    /// The node does not exist.
    Absent,
    /// It exists but could not be opened or queried.
    Unusable {
        /// Why.
        error: String,
    },
    /// It opens.
    Present,
}

/// What `/dev/vfio/vfio` says it supports.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct VfioContainerReport {
    /// Whether the container node opens.
    pub node: NodeState,
    /// `VFIO_GET_API_VERSION`.
    pub api_version: Option<i32>,
    /// `VFIO_CHECK_EXTENSION(VFIO_TYPE1_IOMMU)`.
    pub type1: bool,
    /// `VFIO_CHECK_EXTENSION(VFIO_TYPE1v2_IOMMU)`.
    pub type1v2: bool,
    /// `VFIO_CHECK_EXTENSION(VFIO_UNMAP_ALL)`.
    pub unmap_all: bool,
    /// `VFIO_CHECK_EXTENSION(VFIO_NOIOMMU_IOMMU)`: no-IOMMU mode is enabled.
    pub noiommu: bool,
}

/// `RLIMIT_MEMLOCK`, in bytes; `None` means unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct MemlockLimit {
    /// Soft limit.
    pub soft: Option<u64>,
    /// Hard limit.
    pub hard: Option<u64>,
}

/// What this host offers for device DMA, for the dma-map tool's `probe`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct HostReport {
    /// The VFIO container and the IOMMU types it supports.
    pub vfio: VfioContainerReport,
    /// `/dev/iommu` (IOMMUFD).
    pub iommufd: NodeState,
    /// `/sys/module/vfio/parameters/enable_unsafe_noiommu_mode`; `None` when absent.
    pub noiommu_mode: Option<bool>,
    /// `/sys/module/vfio_iommu_type1/parameters/dma_entry_limit`: type1 mappings per
    /// container; `None` when the module is not loaded.
    pub type1_dma_entry_limit: Option<u64>,
    /// This process's `RLIMIT_MEMLOCK` (`None` when it could not be read).
    pub memlock: Option<MemlockLimit>,
}

fn node_state(path: &Path) -> NodeState {
    if !path.exists() {
        return NodeState::Absent;
    }
    match fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => NodeState::Present,
        Err(e) => NodeState::Unusable {
            error: e.to_string(),
        },
    }
}

impl HostPaths {
    /// Probes VFIO, IOMMUFD, no-IOMMU mode, the type1 mapping limit and the memlock limit.
    /// Never fails: what cannot be read is reported as absent or unusable.
    pub fn probe_host(&self) -> HostReport {
        let container_path = self.dev.join("vfio/vfio");
        let mut vfio = VfioContainerReport {
            node: node_state(&container_path),
            api_version: None,
            type1: false,
            type1v2: false,
            unmap_all: false,
            noiommu: false,
        };
        if vfio.node == NodeState::Present {
            if let Ok(file) = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&container_path)
            {
                use std::os::fd::AsFd;
                let fd = file.as_fd();
                vfio.api_version = sys::vfio_get_api_version(fd).ok();
                let ext = |e| sys::vfio_check_extension(fd, e).unwrap_or(false);
                vfio.type1 = ext(VFIO_TYPE1_IOMMU);
                vfio.type1v2 = ext(VFIO_TYPE1v2_IOMMU);
                vfio.unmap_all = ext(VFIO_UNMAP_ALL);
                vfio.noiommu = ext(VFIO_NOIOMMU_IOMMU);
            }
        }
        let param = |p: &str| fs::read_to_string(self.sysfs.join(p)).ok();
        HostReport {
            vfio,
            iommufd: node_state(&self.dev.join("iommu")),
            noiommu_mode: param("module/vfio/parameters/enable_unsafe_noiommu_mode")
                .map(|v| matches!(v.trim(), "Y" | "1")),
            type1_dma_entry_limit: param("module/vfio_iommu_type1/parameters/dma_entry_limit")
                .and_then(|v| v.trim().parse().ok()),
            memlock: sys::memlock_limit()
                .ok()
                .map(|(soft, hard)| MemlockLimit { soft, hard }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::host::tests::FakeHost;

    #[test]
    fn probe_host_reads_module_parameters_and_missing_nodes() {
        let host = FakeHost::new("probe");
        let params = host.paths.sysfs.join("module/vfio/parameters");
        fs::create_dir_all(&params).unwrap();
        fs::write(params.join("enable_unsafe_noiommu_mode"), "Y\n").unwrap();
        let t1 = host.paths.sysfs.join("module/vfio_iommu_type1/parameters");
        fs::create_dir_all(&t1).unwrap();
        fs::write(t1.join("dma_entry_limit"), "65535\n").unwrap();
        let report = host.paths.probe_host();
        assert_eq!(report.noiommu_mode, Some(true));
        assert_eq!(report.type1_dma_entry_limit, Some(65535));
        assert_eq!(report.vfio.node, NodeState::Absent);
        assert_eq!(report.iommufd, NodeState::Absent);
        assert!(!report.vfio.type1v2);
        let (soft, _) = sys::memlock_limit().unwrap();
        assert_eq!(report.memlock.unwrap().soft, soft);
    }
}
