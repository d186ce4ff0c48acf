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
    Plugging, RecordingAttributes, Region, RegionSpec,
};
use iommu::{DmaBackend, EmulatedIommu};

use crate::cli::{BackendChoice, SetupArgs};
use crate::report::{KernelCalls, PlugSummary, Setup};
use crate::setup::{self, Kvm0, REGION_BASE};
use crate::stats::Latencies;
use crate::units::Bytes;
use gmem_dma::instrument::{CountingAttributes, CountingBackend};
use workloads::{Action, Outcome, Replay, Request, Target, Workload};

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
    /// Opens the backend and a region of `w`'s size (all private, plugged but for what `w`
    /// says starts unplugged), adds the region to guest RAM and attaches the device to its
    /// shared view.
    pub fn open(
        args: &SetupArgs,
        backend: BackendChoice,
        policy: DiscardPolicy,
        w: &Workload,
    ) -> anyhow::Result<Bench> {
        let region_size = w.region_size;
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
                    // A virtio-mem device's region starts unplugged; what the workload says is
                    // plugged at the start is plugged before the device attaches.
                    initially_plugged: w.unplugged_at_start.is_empty(),
                },
            )
            .context("adding the region to guest RAM")?;
        if !w.unplugged_at_start.is_empty() {
            for (start, end) in w.plugged_at_start() {
                let range = GpaRange::new(REGION_BASE + start, end - start)
                    .context("the workload's plugged extents are inside the region")?;
                ram.plug(range, Some(Attribute::Private))
                    .with_context(|| format!("plugging {range} at the start"))?;
            }
        }
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
    /// Requests completed as the workload's model expects.
    pub done: u64,
    /// Conversions that succeeded (the others done were refused, or plugs and unplugs).
    pub converted: u64,
    /// Bytes whose attribute changed.
    pub bytes_changed: u64,
    /// Most bytes held back after any conversion, plug or unplug.
    pub peak_held: u64,
    /// The failed request, if one failed (the run stops there).
    pub failure: Option<String>,
    /// Latency of each successful conversion.
    pub latencies: Latencies,
    /// Wall time of the whole loop.
    pub elapsed: Duration,
    /// Time inside the engine's convert calls.
    pub converting: Duration,
    /// Plugs, unplugs and refusals of unplugged memory.
    pub plugging: PlugSummary,
    /// The workload's model after the last request done.
    pub replay: Replay,
}

/// The library's attribute for a workload's.
fn attribute(to: Target) -> Attribute {
    match to {
        Target::Shared => Attribute::Shared,
        Target::Private => Attribute::Private,
    }
}

/// The region's range a request names.
pub fn request_range(r: &Request) -> anyhow::Result<GpaRange> {
    GpaRange::new(REGION_BASE + r.gpa, r.len)
        .context("a workload request has an empty or overflowing range")
}

/// The guest fills what it shares (a bounce buffer is written before the DMA): one byte per
/// page, so the backing really holds the pages a discard or an unplug must free.
fn fill(mem: &vm_memory::GuestRegionMmap, r: &Request) -> anyhow::Result<()> {
    for off in (r.gpa..r.gpa + r.len).step_by(4096) {
        mem.write_slice(&[1], MemoryRegionAddress(off))
            .context("writing a shared page")?;
    }
    Ok(())
}

/// Sends every request of `w` through the engine in order, timing each conversion; stops at
/// the first whose outcome is not what the workload's model ([`Replay`]) expects: a failure,
/// or a conversion of unplugged memory that was not refused with
/// [`gmem_dma::ConversionError::Unplugged`]. After every plug, unplug and refusal, `after_step`
/// sees the bench and the model (the plugged-state checks).
pub fn drive(
    bench: &Bench,
    w: &Workload,
    bar: &ProgressBar,
    after_step: &mut dyn FnMut(&Bench, &Request, &Replay),
) -> anyhow::Result<Driven> {
    let mut d = Driven {
        latencies: Latencies::with_capacity(w.requests.len()),
        replay: Replay::new(w),
        ..Driven::default()
    };
    let mem = bench
        .region
        .backing()
        .mapping()
        .context("the bench's backing is mapped by gmem-dma")?;
    let started = Instant::now();
    for r in &w.requests {
        let range = request_range(r)?;
        let outcome = d.replay.outcome(r);
        let before = bench.calls();
        let failed = |e: gmem_dma::ConversionError| format!("failed: {:#}", anyhow::Error::new(e));
        let step: Result<Option<Plugging>, String> = match r.action {
            Action::Convert(target) => {
                let to = attribute(target);
                let t = Instant::now();
                let result = bench.ram.convert(range, to);
                let took = t.elapsed();
                d.converting += took;
                match (result, outcome) {
                    (Ok(c), Outcome::Applied) => {
                        d.latencies.record(took);
                        d.bytes_changed += c.bytes();
                        d.peak_held = d.peak_held.max(c.held.total());
                        d.converted += 1;
                        if to == Attribute::Shared {
                            fill(mem, r)?;
                        }
                        Ok(None)
                    }
                    (
                        Err(gmem_dma::ConversionError::Unplugged { .. }),
                        Outcome::RefusedUnplugged,
                    ) => {
                        d.plugging.refused_unplugged += 1;
                        Ok(None)
                    }
                    (Ok(_), Outcome::RefusedUnplugged) => {
                        Err("converted unplugged memory: it must be refused".to_string())
                    }
                    (Err(e), _) => Err(failed(e)),
                }
            }
            Action::Plug(target) => bench
                .ram
                .plug(range, Some(attribute(target)))
                .map(Some)
                .map_err(failed),
            Action::Unplug => bench.ram.unplug(range).map(Some).map_err(failed),
        };
        let plugging = match step {
            Ok(plugging) => plugging,
            Err(why) => {
                d.failure = Some(format!(
                    "request {} ({} {range}) {why}",
                    d.done + 1,
                    r.action
                ));
                break;
            }
        };
        if let Some(p) = plugging {
            let calls = bench.calls().since(&before);
            let s = &mut d.plugging;
            let (count, bytes, kernel) = match r.action {
                Action::Unplug => (&mut s.unplugs, &mut s.unplugged_bytes, &mut s.unplug_calls),
                _ => (&mut s.plugs, &mut s.plugged_bytes, &mut s.plug_calls),
            };
            *count += 1;
            *bytes += p.bytes();
            kernel.add(&calls);
            d.peak_held = d.peak_held.max(p.held.total());
        }
        if r.action == Action::Plug(Target::Shared) {
            fill(mem, r)?;
        }
        d.replay.apply(r);
        d.done += 1;
        if r.conversion().is_none() || outcome == Outcome::RefusedUnplugged {
            after_step(bench, r, &d.replay);
        }
        if d.done % 256 == 0 {
            bar.set_position(d.done);
        }
    }
    d.elapsed = started.elapsed();
    Ok(d)
}
