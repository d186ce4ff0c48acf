//! Command line: what each command accepts (clap derive). No behaviour lives here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::units::parse_size;

/// Exit codes, listed in `--help` and the README.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  a workload, device test or invariant check failed
  2  usage error: bad arguments or a bad trace file
  3  this host lacks a required feature or device (the message says how to get it)
  4  a system call failed unexpectedly (the message names it)";

/// Probe a host for guest_memfd and device-DMA support, map memory for a device, and run and
/// measure guest_memfd shared/private conversion workloads with their IOMMU mappings.
///
/// Without a command: probe this host, then run the default workload on the best region it
/// offers (guest_memfd when /dev/kvm has it) with the emulated IOMMU, and compare the discard
/// policies.
#[derive(Debug, Parser)]
#[command(name = "dma-map", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Log what the library does (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    /// The command; none runs the main job (probe + default run + policy compare).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what this host supports (KVM, guest_memfd, VFIO, IOMMUFD, no-IOMMU, budgets, PCI
    /// devices) and, for each missing piece, what it blocks and how to get it.
    #[command(after_help = EXIT_CODES)]
    Probe,
    /// Map a guest-RAM-like region for a device, optionally verify it with a device DMA test,
    /// and unmap it again. Without --device the emulated IOMMU is used.
    #[command(after_help = EXIT_CODES)]
    Map(MapArgs),
    /// Run a conversion workload on a region and print its summary.
    #[command(after_help = EXIT_CODES)]
    Run(RunArgs),
    /// Run the same workload under several policies or backends and show them side by side.
    #[command(after_help = EXIT_CODES)]
    Compare(CompareArgs),
}

/// Which DMA backend maps the shared pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendChoice {
    /// The in-process emulated IOMMU (works everywhere).
    Emulated,
    /// A VFIO type1v2 container (needs --device).
    Type1,
    /// IOMMUFD with the device's vfio cdev (needs --device).
    Iommufd,
    /// VFIO no-IOMMU mode (needs --device; no isolation).
    Noiommu,
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.to_possible_value().map(|v| v.get_name().to_string());
        f.write_str(name.as_deref().unwrap_or("?"))
    }
}

/// Which backing holds the region's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegionChoice {
    /// The best this host offers: in-place guest_memfd, else classic, else memfd only.
    Auto,
    /// One mmap-able guest_memfd (MMAP|INIT_SHARED, Linux 6.18+).
    InPlace,
    /// A memfd for shared pages plus a guest_memfd for private ones.
    Classic,
    /// A memfd only (no KVM): private pages are simply discarded.
    MemfdOnly,
}

/// When the shared backing of a page that became private is discarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyChoice {
    /// Punch the hole at once (what QEMU does).
    Eager,
    /// Hold freed pages back up to --lazy-budget bytes, punching only beyond it.
    Lazy,
    /// Collect holes and punch them --batch at a time.
    Batched,
}

/// How IOMMU mappings are cut from the shared runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MappingChoice {
    /// What the library does with the backend: one mapping per run where its address space
    /// cuts mappings (IOMMUFD with type1 (v1) semantics), else one per granule. The emulated
    /// IOMMU stands in for type1 (per granule).
    Auto,
    /// One mapping per granule, as on a type1 container (works everywhere).
    PerGranule,
    /// One mapping per run, cut later (IOMMUFD with type1 (v1) semantics, or the emulated
    /// IOMMU in its cutting style).
    PerRun,
}

/// Built-in workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WorkloadChoice {
    /// OVMF-style DMA: 1-2 pages flipped shared and back per transaction at random places.
    FirmwareBounce,
    /// A Linux CoCo boot: the SWIOTLB pool (6 % of RAM, 64 MiB..1 GiB) converted to shared once.
    LinuxBoot,
    /// Random directions, places and lengths (1 page .. 2 MiB).
    RandomMixed,
    /// A virtio-mem device: 2 MiB blocks plugged and unplugged while the guest converts pages
    /// of the plugged ones (half the region plugged at the start), with a few conversions of
    /// unplugged memory that must be refused.
    VirtioMem,
}

/// How the region and its engine are set up.
#[derive(Clone, Debug, Args)]
pub struct SetupArgs {
    /// DMA backend.
    #[arg(long, value_enum, default_value_t = BackendChoice::Emulated)]
    pub backend: BackendChoice,
    /// PCI address (0000:00:03.0) of the device bound to vfio-pci, for the kernel backends
    /// (`edu` finds QEMU's edu device).
    #[arg(long, value_name = "BDF")]
    pub device: Option<String>,
    /// Region backing.
    #[arg(long, value_enum, default_value_t = RegionChoice::Auto)]
    pub region: RegionChoice,
    /// Size of the guest RAM region (e.g. 1G, 256M).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub region_size: u64,
    /// Granularity of state and of every IOMMU mapping (power of two, at least 4K).
    #[arg(long, value_parser = parse_size, default_value = "4K")]
    pub granule: u64,
    /// Byte budget the lazy policy may hold back.
    #[arg(long, value_parser = parse_size, default_value = "16M")]
    pub lazy_budget: u64,
    /// Holes the batched policy collects before punching.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: u64,
    /// IOMMU mappings per granule or per run (`compare` runs both where the backend offers them).
    #[arg(long, value_enum, default_value_t = MappingChoice::Auto)]
    pub mapping: MappingChoice,
    /// Emulated IOMMU only: refuse more than N live mappings, as VFIO type1 does
    /// (dma_entry_limit, 65535 by default = 256 MiB of shared memory at 4 KiB).
    #[arg(long, value_name = "N")]
    pub mapping_budget: Option<u64>,
}

/// Which workload to run.
#[derive(Clone, Debug, Args)]
pub struct WorkloadArgs {
    /// Built-in workload (ignored with --trace).
    #[arg(long, value_enum, default_value_t = WorkloadChoice::FirmwareBounce)]
    pub workload: WorkloadChoice,
    /// Read the requests from a trace file instead (format: see the README, or
    /// `tools/workloads/src/trace.rs`).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Number of transactions (firmware-bounce), requests (random-mixed) or steps (virtio-mem).
    #[arg(long, default_value_t = 20_000)]
    pub count: u64,
    /// firmware-bounce: place the buffers in N two-page slots from 1 MiB (a reused pool, as
    /// OVMF's; the benchmarks use 8) instead of anywhere in the region.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub bounce_slots: Option<u64>,
    /// Request size of linux-boot's pool conversion.
    #[arg(long, value_parser = parse_size, default_value = "2M")]
    pub chunk: u64,
    /// linux-boot: single pages of the pool converted back to private afterwards, at random
    /// places (the benchmarks free 16).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub freed_pages: u64,
    /// Seed of the workload generators (same seed, same requests).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the generated requests to FILE in the trace format, then run them.
    #[arg(long, value_name = "FILE")]
    pub save_trace: Option<PathBuf>,
}

/// `dma-map map`.
#[derive(Clone, Debug, Args)]
pub struct MapArgs {
    /// PCI address (0000:00:03.0) of a device bound to vfio-pci (`edu` finds QEMU's edu
    /// device); without it, the emulated IOMMU.
    #[arg(long, value_name = "BDF")]
    pub device: Option<String>,
    /// DMA backend for --device.
    #[arg(long, value_enum, default_value_t = BackendChoice::Type1)]
    pub backend: BackendChoice,
    /// Bytes to map.
    #[arg(long, value_parser = parse_size, default_value = "2M")]
    pub size: u64,
    /// IOVA of the mapping (keep it below 256 MiB for QEMU's edu device).
    #[arg(long, value_parser = parse_size, default_value = "0x100000")]
    pub iova: u64,
    /// Prove the mapping works: DMA a pattern into and out of the device and compare.
    #[arg(long)]
    pub verify: bool,
}

/// `dma-map run`.
#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// Region and backend.
    #[command(flatten)]
    pub setup: SetupArgs,
    /// Workload.
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Discard policy.
    #[arg(long, value_enum, default_value_t = PolicyChoice::Lazy)]
    pub policy: PolicyChoice,
    /// Never draw a progress bar (it is drawn only on a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
}

/// `dma-map compare`.
#[derive(Clone, Debug, Args)]
pub struct CompareArgs {
    /// Region and the backend used when --backends is not given.
    #[command(flatten)]
    pub setup: SetupArgs,
    /// Workload.
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Policies to compare.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "eager,lazy,batched"
    )]
    pub policies: Vec<PolicyChoice>,
    /// Backends to compare (each with every policy); default: --backend.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub backends: Vec<BackendChoice>,
    /// Never draw a progress bar.
    #[arg(long)]
    pub no_progress: bool,
}
