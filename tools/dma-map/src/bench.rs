//! A run's test bench: a region in `gmem_dma::GuestRam` with one device, wrapped in counters,
//! and the loop that drives a workload through it. Everything here calls the library; the tool
//! only counts and times.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::ProgressBar;
use vm_memory::{Bytes as _, MemoryRegionAddress};

use discard_manager::{Attribute, GpaRange};
use gmem_dma::{
    BackingModel, DeviceConfig, DeviceId, DiscardPolicy, GuestRam, KvmAttributes, MemoryAttributes,
    RecordingAttributes, Region, RegionSpec,
};
use iommu::{DmaBackend, EmulatedIommu};

use crate::cli::{BackendChoice, SetupArgs};
use crate::report::{KernelCalls, Setup};
use crate::setup::{self, Kvm0, REGION_BASE};
use crate::stats::Latencies;
use crate::units::Bytes;
use gmem_dma::instrument::{CountingAttributes, CountingBackend};
use workloads::{Target, Workload};

/// One region with one device, as a run uses it.
pub struct Bench {
    // Drop order: guest RAM (ledgers, then backings) before the VM.
    /// The library's guest RAM.
    pub ram: GuestRam,
    /// The one region.
    pub region: Arc<Region>,
    /// The one device.
    pub device: DeviceId,
    /// Its backing model.
    pub model: BackingModel,
    /// The discard policy.
    pub policy: DiscardPolicy,
    /// Granularity of state, and of every mapping unless `per_run`.
    pub granule: u64,
    /// The device's address space cuts mappings, so the library maps one mapping per run.
    pub per_run: bool,
    /// The attribute table, counted.
    pub attributes: Arc<CountingAttributes>,
    /// The in-memory table, when KVM lacks attributes and they are recorded instead.
    pub recorded: Option<Arc<RecordingAttributes>>,
    /// The device's DMA backend, counted.
    pub dma: Arc<CountingBackend>,
    /// The emulated IOMMU, when that is the backend.
    pub emulated: Option<Arc<EmulatedIommu>>,
    /// What was set up, with every fallback.
    pub setup: Setup,
    _kvm: Option<Kvm0>,
}

/// The policy the command line asks for.
pub fn policy(choice: crate::cli::PolicyChoice, setup: &SetupArgs) -> DiscardPolicy {
    use crate::cli::PolicyChoice;
    match choice {
        PolicyChoice::Eager => DiscardPolicy::Eager,
        PolicyChoice::Lazy => DiscardPolicy::Lazy {
            budget_bytes: setup.lazy_budget,
        },
        PolicyChoice::Batched => DiscardPolicy::Batched {
            max_ranges: usize::try_from(setup.batch).unwrap_or(usize::MAX),
            max_bytes: setup.lazy_budget,
        },
    }
}

fn policy_name(p: DiscardPolicy) -> String {
    match p {
        DiscardPolicy::Eager => "eager".to_string(),
        DiscardPolicy::Lazy { budget_bytes } => format!("lazy ({} budget)", Bytes(budget_bytes)),
        DiscardPolicy::Batched {
            max_ranges,
            max_bytes,
        } => format!("batched ({max_ranges} ranges / {})", Bytes(max_bytes)),
    }
}

impl Bench {
    /// Opens the backend and a region of `region_size` bytes (all private), adds the region
    /// to guest RAM and attaches the device to its shared view.
    pub fn open(
        args: &SetupArgs,
        backend: BackendChoice,
        policy: DiscardPolicy,
        region_size: u64,
    ) -> anyhow::Result<Bench> {
        let backend = setup::backend(
            backend,
            args.device.as_deref(),
            args.mapping_budget,
            args.mapping,
        )?;
        let region = setup::region(args.region, region_size)?;
        let mut fallbacks = region.fallbacks;
        if backend.emulated.is_some() {
            fallbacks.push(
                "no device: the emulated IOMMU stands in (pass --device and --backend for VFIO)"
                    .to_string(),
            );
        }
        let (table, recorded): (Arc<dyn MemoryAttributes>, _) = match &region.kvm {
            Some(k) if k.support.has_private_attribute() => {
                (Arc::new(KvmAttributes::new(k.vm.clone())), None)
            }
            _ => {
                fallbacks.push(
                    "KVM lacks memory attributes (KVM_CAP_MEMORY_ATTRIBUTES): attribute changes \
                     are recorded, not sent to KVM"
                        .to_string(),
                );
                let recording = Arc::new(RecordingAttributes::new());
                (
                    recording.clone() as Arc<dyn MemoryAttributes>,
                    Some(recording),
                )
            }
        };
        let attributes = Arc::new(CountingAttributes::new(table));
        let dma = Arc::new(CountingBackend::new(backend.backend.clone()));
        let per_run = dma
            .capabilities()
            .with_context(|| format!("reading the capabilities of {}", backend.name))?
            .cuts_mappings;
        let model = region.backing.model();
        let ram = GuestRam::new(attributes.clone());
        let engine_region = ram
            .add_region(
                region.backing,
                RegionSpec {
                    granularity: args.granule,
                    initial: Attribute::Private,
                    policy,
                    initially_plugged: true,
                },
            )
            .context("adding the region to guest RAM")?;
        let device = ram
            .attach_device(&backend.name, dma.clone(), DeviceConfig::shared())
            .with_context(|| format!("attaching {}", backend.name))?;
        Ok(Bench {
            ram,
            region: engine_region,
            device,
            model,
            policy,
            granule: args.granule,
            per_run,
            attributes,
            recorded,
            dma,
            emulated: backend.emulated,
            setup: Setup {
                region: region.name,
                backend: backend.name,
                policy: policy_name(policy),
                fallbacks,
            },
            _kvm: region.kvm,
        })
    }

    /// Kernel calls so far.
    pub fn calls(&self) -> KernelCalls {
        let dma = self.dma.counts();
        KernelCalls {
            attribute_sets: self.attributes.sets(),
            iommu_maps: dma.maps,
            iommu_unmaps: dma.unmaps,
            hole_punches: self.region.backing().punch_stats().calls,
        }
    }
}

/// What driving a workload measured.
#[derive(Debug, Default)]
pub struct Driven {
    /// Requests completed.
    pub done: u64,
    /// Bytes whose attribute changed.
    pub bytes_changed: u64,
    /// Most bytes held back after any conversion.
    pub peak_held: u64,
    /// The failed request, if one failed (the run stops there).
    pub failure: Option<String>,
    /// Latency of each completed request.
    pub latencies: Latencies,
    /// Wall time of the whole loop.
    pub elapsed: Duration,
    /// Time inside the engine's convert calls.
    pub converting: Duration,
}

/// Sends every request of `w` through the engine in order, timing each; stops at the first
/// that fails.
pub fn drive(bench: &Bench, w: &Workload, bar: &ProgressBar) -> anyhow::Result<Driven> {
    let mut d = Driven {
        latencies: Latencies::with_capacity(w.requests.len()),
        ..Driven::default()
    };
    let mem = bench
        .region
        .backing()
        .mapping()
        .context("the bench's backing is mapped by gmem-dma")?;
    let started = Instant::now();
    for r in &w.requests {
        let range = GpaRange::new(REGION_BASE + r.gpa, r.len)
            .context("a workload request has an empty or overflowing range")?;
        let to = match r.to {
            Target::Shared => Attribute::Shared,
            Target::Private => Attribute::Private,
        };
        let t = Instant::now();
        let result = bench.ram.convert(range, to);
        let took = t.elapsed();
        d.converting += took;
        match result {
            Ok(c) => {
                d.latencies.record(took);
                d.bytes_changed += c.bytes();
                d.peak_held = d.peak_held.max(c.held.total());
                d.done += 1;
            }
            Err(e) => {
                d.failure = Some(format!(
                    "request {} ({} {range}) failed: {:#}",
                    d.done + 1,
                    r.to,
                    anyhow::Error::new(e)
                ));
                break;
            }
        }
        if to == Attribute::Shared {
            // The guest fills a buffer it shares (a bounce buffer is written before the DMA):
            // one byte per page, so the backing really holds the pages a discard must free.
            for off in (r.gpa..r.gpa + r.len).step_by(4096) {
                mem.write_slice(&[1], MemoryRegionAddress(off))
                    .context("writing a shared page")?;
            }
        }
        if d.done % 256 == 0 {
            bar.set_position(d.done);
        }
    }
    d.elapsed = started.elapsed();
    Ok(d)
}
