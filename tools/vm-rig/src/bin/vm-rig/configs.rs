//! The guest configurations: each boots separately and promises (through `GMEM_DMA_REQUIRE`) the
//! kernel features its machine offers, so a test needing one of them fails there instead of
//! skipping.

use anyhow::{Result, bail};
use vm_rig::Feature;

/// One way to boot the guest.
#[derive(Debug)]
pub struct Config {
    /// Name used on the command line and in the report.
    pub name: &'static str,
    /// What it is, for `vm-rig configs` and the README.
    pub summary: &'static str,
    /// QEMU `-device` arguments placed before the edu device (the IOMMU).
    pub iommu_devices: &'static [&'static str],
    /// Extra kernel command line.
    pub cmdline: &'static str,
    /// The features a test may rely on here on every kernel (exported as `GMEM_DMA_REQUIRE`).
    pub require: &'static [Feature],
    /// Kernel-dependent features this machine offers when the kernel has them
    /// ([`Kernel::features`]): required there too.
    pub offers_when_the_kernel_has: &'static [Feature],
    /// Whether an IOMMU translates the edu device's DMA (the guest waits for its IOMMU group).
    pub translated: bool,
}

impl Config {
    /// What a test may rely on in this configuration on `kernel`.
    pub fn require_on(&self, kernel: &Kernel) -> Vec<Feature> {
        let extra = self
            .offers_when_the_kernel_has
            .iter()
            .filter(|f| kernel.features.contains(f));
        self.require.iter().chain(extra).copied().collect()
    }

    /// `GMEM_DMA_REQUIRE` for this configuration on `kernel`.
    pub fn require_env(&self, kernel: &Kernel) -> String {
        self.require_on(kernel)
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(",")
    }
}

use crate::kernel::Kernel;
use Feature::{
    Edu, GuestMemfdMmap, Iommufd, IommufdMapFile, IommufdNoIommu, Kvm, KvmPrivateMemory, NoIommu,
    VfioType1,
};

/// Every configuration, in the order they run and appear in the report.
pub const CONFIGS: &[Config] = &[
    Config {
        name: "intel-type1",
        summary: "Intel VT-d (intremap, caching-mode); edu through a VFIO type1 container",
        iommu_devices: &["intel-iommu,intremap=on,caching-mode=on"],
        cmdline: "intel_iommu=on",
        require: &[Kvm, KvmPrivateMemory, Edu, VfioType1],
        offers_when_the_kernel_has: &[GuestMemfdMmap],
        translated: true,
    },
    Config {
        name: "intel-iommufd",
        summary: "Intel VT-d (same machine); edu through IOMMUFD and its vfio cdev",
        iommu_devices: &["intel-iommu,intremap=on,caching-mode=on"],
        cmdline: "intel_iommu=on",
        require: &[Kvm, KvmPrivateMemory, Edu, Iommufd],
        offers_when_the_kernel_has: &[GuestMemfdMmap, IommufdMapFile],
        translated: true,
    },
    Config {
        name: "virtio-iommu",
        summary: "virtio-iommu (no interrupt remapping, so VFIO and IOMMUFD are told to allow unsafe interrupts); edu through type1 and IOMMUFD",
        iommu_devices: &["virtio-iommu-pci"],
        cmdline: "vfio_iommu_type1.allow_unsafe_interrupts=1 iommufd.allow_unsafe_interrupts=1",
        require: &[Kvm, KvmPrivateMemory, Edu, VfioType1, Iommufd],
        offers_when_the_kernel_has: &[GuestMemfdMmap, IommufdMapFile],
        translated: true,
    },
    Config {
        name: "noiommu",
        summary: "no IOMMU; edu through VFIO no-IOMMU mode (physical addresses)",
        iommu_devices: &[],
        cmdline: "vfio.enable_unsafe_noiommu_mode=1",
        require: &[Kvm, KvmPrivateMemory, Edu, NoIommu],
        offers_when_the_kernel_has: &[GuestMemfdMmap, IommufdNoIommu],
        translated: false,
    },
];

/// The configurations named in `names` (all of them when empty), in [`CONFIGS`] order.
pub fn select(names: &[String]) -> Result<Vec<&'static Config>> {
    for name in names {
        if !CONFIGS.iter().any(|c| c.name == name) {
            let known: Vec<_> = CONFIGS.iter().map(|c| c.name).collect();
            bail!(
                "no configuration named {name:?}; known: {}",
                known.join(", ")
            );
        }
    }
    Ok(CONFIGS
        .iter()
        .filter(|c| names.is_empty() || names.iter().any(|n| n == c.name))
        .collect())
}

/// Looks a configuration up by name.
pub fn by_name(name: &str) -> Option<&'static Config> {
    CONFIGS.iter().find(|c| c.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::KERNELS;

    #[test]
    fn every_configuration_requires_kvm_private_memory_and_edu() {
        for config in CONFIGS {
            for feature in [Kvm, KvmPrivateMemory, Edu] {
                assert!(
                    config.require.contains(&feature),
                    "{} lacks {feature}",
                    config.name
                );
            }
        }
    }

    #[test]
    fn selection_keeps_report_order_and_rejects_unknown_names() {
        let picked = select(&["noiommu".into(), "intel-type1".into()]).unwrap();
        assert_eq!(
            picked.iter().map(|c| c.name).collect::<Vec<_>>(),
            ["intel-type1", "noiommu"]
        );
        assert_eq!(select(&[]).unwrap().len(), CONFIGS.len());
        assert!(
            select(&["intel".into()])
                .unwrap_err()
                .to_string()
                .contains("intel-type1")
        );
    }

    #[test]
    fn require_env_round_trips_through_the_contract_names() {
        let [old, new] = [&KERNELS[0], &KERNELS[1]];
        assert_eq!(
            CONFIGS[0].require_env(old),
            "kvm,kvm-private,edu,vfio-type1"
        );
        assert_eq!(
            CONFIGS[0].require_env(new),
            "kvm,kvm-private,edu,vfio-type1,guest-memfd-mmap"
        );
        assert_eq!(
            by_name("noiommu").unwrap().require_env(new),
            "kvm,kvm-private,edu,noiommu,guest-memfd-mmap,iommufd-noiommu"
        );
    }

    #[test]
    fn every_kernel_feature_is_required_somewhere_and_only_on_kernels_that_have_it() {
        for kernel in KERNELS {
            for feature in kernel.features {
                assert!(
                    CONFIGS
                        .iter()
                        .any(|c| c.require_on(kernel).contains(feature)),
                    "{} has {feature}, but no configuration requires it",
                    kernel.name
                );
            }
            for config in CONFIGS {
                for feature in config.offers_when_the_kernel_has {
                    assert_eq!(
                        config.require_on(kernel).contains(feature),
                        kernel.features.contains(feature),
                        "{} on {}: {feature}",
                        config.name,
                        kernel.name
                    );
                }
            }
        }
    }
}
