//! `dma-map run`: one workload through the library's conversion engine (`gmem_dma::GuestRam`)
//! on one region with one device and one discard policy; measured, then checked against the
//! invariants of DESIGN.md.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vm_memory::{Bytes as _, MemoryRegionAddress};

use discard_manager::{Attribute, GpaRange, View};
use gmem_dma::{
    BackingModel, DeviceConfig, DiscardPolicy, GuestRam, KvmAttributes, MemoryAttributes,
    RecordingAttributes, RegionSpec,
};

use crate::cli::{BackendChoice, PolicyChoice, SetupArgs, WorkloadArgs, WorkloadChoice};
use crate::exit::{Class, error};
use crate::instrument::{CountingAttributes, CountingBackend};
use crate::report::{Check, KernelCalls, RunSummary, Setup};
use crate::setup::{self, REGION_BASE};
use crate::stats::Latencies;
use crate::workload::{self, Target, Workload};
use crate::{trace, units::Bytes};

/// Builds the workload `args` asks for, for a region of `region_size` bytes, and saves it as a
/// trace when asked.
pub fn load_workload(args: &WorkloadArgs, region_size: u64) -> anyhow::Result<Workload> {
    let usage = |e: &dyn std::fmt::Display| error(Class::Usage, e.to_string());
    let w = match &args.trace {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                error(
                    Class::Usage,
                    format!("cannot read the trace file {}: {e}", path.display()),
                )
            })?;
            trace::parse(&text, region_size, &path.display().to_string())
                .map_err(|e| error(Class::Usage, format!("trace file {}: {e}", path.display())))?
        }
        None => match args.workload {
            WorkloadChoice::FirmwareBounce => {
                workload::firmware_bounce(region_size, args.count, args.seed)
            }
            WorkloadChoice::LinuxBoot => workload::linux_boot(region_size, args.chunk, args.seed),
            WorkloadChoice::RandomMixed => {
                workload::random_mixed(region_size, args.count, args.seed)
            }
        }
        .map_err(|e| usage(&e))?,
    };
    if let Some(path) = &args.save_trace {
        std::fs::write(path, trace::format(&w))
            .with_context(|| format!("writing the trace to {}", path.display()))?;
    }
    Ok(w)
}

fn policy(choice: PolicyChoice, setup: &SetupArgs) -> DiscardPolicy {
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

fn check(name: &str, passed: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.to_string(),
        passed,
        detail: detail.into(),
    }
}

fn progress_bar(len: u64, show: bool) -> ProgressBar {
    if !show || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Runs `w` with `backend` and `policy` as `setup` says. A conversion that fails stops the run;
/// the summary says how far it got and why (and [`RunSummary::ok`] is false).
pub fn run_workload(
    w: &Workload,
    setup_args: &SetupArgs,
    backend_choice: BackendChoice,
    policy_choice: PolicyChoice,
    show_progress: bool,
) -> anyhow::Result<RunSummary> {
    let granule = setup_args.granule;
    if !granule.is_power_of_two() || granule < 4096 {
        return Err(error(
            Class::Usage,
            format!("--granule {granule:#x} must be a power of two of at least 4K"),
        ));
    }
    if let Some(r) = w
        .requests
        .iter()
        .find(|r| r.gpa % granule != 0 || r.len % granule != 0)
    {
        return Err(error(
            Class::Usage,
            format!(
                "request {:#x}+{:#x} is not aligned to the granule {}: use --granule 4K or align \
                 the workload",
                r.gpa,
                r.len,
                Bytes(granule)
            ),
        ));
    }
    let backend = setup::backend(
        backend_choice,
        setup_args.device.as_deref(),
        setup_args.mapping_budget,
    )?;
    let region = setup::region(setup_args.region, w.region_size)?;
    let mut fallbacks = region.fallbacks.clone();
    if backend.emulated.is_some() {
        fallbacks.push(
            "no device: the emulated IOMMU stands in (pass --device and --backend for VFIO)"
                .to_string(),
        );
    }
    let recording = Arc::new(RecordingAttributes::new());
    let table: Arc<dyn MemoryAttributes> = match &region.kvm {
        Some(k) if k.support.has_private_attribute() => Arc::new(KvmAttributes::new(k.vm.clone())),
        _ => {
            fallbacks.push(
                "KVM lacks memory attributes (KVM_CAP_MEMORY_ATTRIBUTES): attribute changes are \
                 recorded, not sent to KVM"
                    .to_string(),
            );
            recording.clone()
        }
    };
    let attributes = Arc::new(CountingAttributes::new(table));
    let counting = Arc::new(CountingBackend::new(backend.backend.clone()));
    let model = region.backing.model();
    let region_name = region.name.clone();
    let policy = policy(policy_choice, setup_args);
    let ram = GuestRam::new(attributes.clone());
    let engine_region = ram
        .add_region(
            region.backing,
            RegionSpec {
                granularity: granule,
                initial: Attribute::Private,
                policy,
            },
        )
        .context("adding the region to guest RAM")?;
    let device = ram
        .attach_device(&backend.name, counting.clone(), DeviceConfig::shared())
        .with_context(|| format!("attaching {}", backend.name))?;

    // Counts from here on are the workload's own.
    let sets_before = attributes.sets();
    let dma_before = counting.counts();
    let punches_before = engine_region.backing().punch_stats().calls;

    let bar = progress_bar(w.requests.len() as u64, show_progress);
    bar.set_message(format!("{} / {}", backend_choice, policy_name(policy)));
    let mut latencies = Latencies::with_capacity(w.requests.len());
    let mut done = 0u64;
    let mut bytes_changed = 0;
    let mut peak_held = 0;
    let mut failure = None;
    let mem = engine_region.backing().mapping();
    let started = Instant::now();
    let mut converting = std::time::Duration::ZERO;
    for r in &w.requests {
        let range = GpaRange::new(REGION_BASE + r.gpa, r.len)
            .context("a workload request has an empty or overflowing range")?;
        let to = match r.to {
            Target::Shared => Attribute::Shared,
            Target::Private => Attribute::Private,
        };
        let t = Instant::now();
        let result = ram.convert(range, to);
        let took = t.elapsed();
        converting += took;
        match result {
            Ok(c) => {
                latencies.record(took);
                bytes_changed += c.bytes();
                peak_held = peak_held.max(c.held.total());
                done += 1;
            }
            Err(e) => {
                failure = Some(format!(
                    "request {} ({} {range}) failed: {:#}",
                    done + 1,
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
        if done % 256 == 0 {
            bar.set_position(done);
        }
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    log::info!(
        "{done} conversions in {:.3} s ({:.3} s converting)",
        elapsed.as_secs_f64(),
        converting.as_secs_f64()
    );

    let dma = counting.counts();
    let kernel_calls = KernelCalls {
        attribute_sets: attributes.sets() - sets_before,
        iommu_maps: dma.maps - dma_before.maps,
        iommu_unmaps: dma.unmaps - dma_before.unmaps,
        hole_punches: engine_region.backing().punch_stats().calls - punches_before,
    };
    let final_held = ram.held_back().total();

    let mut checks = Vec::new();
    let whole = engine_region.range();
    let manager = engine_region.manager();
    let mappings = ram.device_mappings(device).unwrap_or_default();
    let shared_runs = manager
        .view_runs(View::Shared, whole)
        .context("reading the shared view")?;
    if failure.is_none() {
        let expected: Vec<(u64, u64)> = workload::final_shared(w)
            .into_iter()
            .map(|(s, e)| (REGION_BASE + s, REGION_BASE + e))
            .collect();
        let got: Vec<(u64, u64)> = shared_runs.iter().map(|r| (r.start(), r.end())).collect();
        checks.push(check(
            "final state equals the workload replayed",
            got == expected,
            format!("{} shared extents, {} expected", got.len(), expected.len()),
        ));
    }
    let over_private = mappings
        .iter()
        .filter(|m| {
            GpaRange::new(m.iova, m.len)
                .is_none_or(|r| !manager.is_populated(View::Shared, r).unwrap_or(false))
        })
        .count();
    checks.push(check(
        "isolation: no device mapping over a private page",
        over_private == 0,
        format!(
            "{} mappings, {over_private} over private pages",
            mappings.len()
        ),
    ));
    let shared_bytes: u64 = shared_runs.iter().map(GpaRange::len).sum();
    let mapped_bytes: u64 = mappings.iter().map(|m| m.len).sum();
    let odd = mappings.iter().filter(|m| m.len != granule).count();
    checks.push(check(
        "every shared page mapped, one mapping per granule",
        mapped_bytes == shared_bytes && odd == 0,
        format!(
            "{} mapped, {} shared, {odd} mappings not one granule",
            Bytes(mapped_bytes),
            Bytes(shared_bytes)
        ),
    ));
    checks.push(check(
        "ledger equals what the backend holds",
        dma.live_bytes == mapped_bytes,
        format!(
            "ledger {}, backend calls leave {}",
            Bytes(mapped_bytes),
            Bytes(dma.live_bytes)
        ),
    ));
    if let Some(emu) = &backend.emulated {
        let table: Vec<(u64, u64)> = emu.page_table().iter().map(|e| (e.iova, e.len)).collect();
        let ledger: Vec<(u64, u64)> = mappings.iter().map(|m| (m.iova, m.len)).collect();
        checks.push(check(
            "ledger equals the emulated IOMMU page table",
            table == ledger,
            format!(
                "{} ledger entries, {} page-table entries",
                ledger.len(),
                table.len()
            ),
        ));
    }
    if attributes_are_recorded(&region.kvm) {
        let private: Vec<(u64, u64)> = recording
            .private_ranges()
            .into_iter()
            .filter(|&(s, e)| s < whole.end() && e > whole.start())
            .collect();
        let expected: Vec<(u64, u64)> = manager
            .view_runs(View::Private, whole)
            .context("reading the private view")?
            .iter()
            .map(|r| (r.start(), r.end()))
            .collect();
        checks.push(check(
            "attribute table equals the state manager",
            private == expected,
            format!(
                "{} private extents recorded, {} in the manager",
                private.len(),
                expected.len()
            ),
        ));
    }
    let stale = engine_region.stale_mappings();
    checks.push(check(
        "no stale mappings (failed unmaps)",
        stale.is_empty(),
        format!("{} devices with stale mappings", stale.len()),
    ));
    let (bound_ok, bound) = match policy {
        DiscardPolicy::Eager => (
            peak_held == 0,
            "nothing held after a conversion".to_string(),
        ),
        DiscardPolicy::Lazy { budget_bytes } => (
            peak_held <= budget_bytes,
            format!("at most {}", Bytes(budget_bytes)),
        ),
        DiscardPolicy::Batched { max_bytes, .. } => {
            (peak_held < max_bytes, format!("below {}", Bytes(max_bytes)))
        }
    };
    checks.push(check(
        "held-back backing within the policy's bound",
        bound_ok,
        format!("peak {}, bound: {bound}", Bytes(peak_held)),
    ));
    if model == BackingModel::Classic {
        let allocated = engine_region
            .backing()
            .allocated_bytes(View::Shared)
            .context("reading the shared backing's allocation")?;
        let allowed = shared_bytes + ram.held_back().shared_bytes;
        checks.push(check(
            "no double allocation: shared backing holds only shared or held-back pages",
            allocated <= allowed,
            format!("{} allocated, {} allowed", Bytes(allocated), Bytes(allowed)),
        ));
    }
    let flush = ram.flush_discards();
    checks.push(check(
        "a flush frees everything held back",
        ram.held_back().total() == 0 && flush.failed_ranges == 0,
        format!(
            "{} ranges freed ({}), {} failed",
            flush.punched_ranges,
            Bytes(flush.punched_bytes),
            flush.failed_ranges
        ),
    ));
    let teardown = ram.detach_device(device);
    let left = counting.counts().live_bytes;
    checks.push(check(
        "teardown unmaps every mapping",
        teardown.is_ok() && left == 0,
        match &teardown {
            Ok(r) => format!(
                "{} mappings in {} unmap calls, {} left",
                r.mappings,
                r.calls,
                Bytes(left)
            ),
            Err(e) => format!("{:#}", anyhow::anyhow!("{e}")),
        },
    ));
    drop(ram);

    let secs = converting.as_secs_f64();
    Ok(RunSummary {
        workload: w.name.clone(),
        setup: Setup {
            region: region_name,
            backend: backend.name.clone(),
            policy: policy_name(policy),
            fallbacks,
        },
        requests: w.requests.len() as u64,
        conversions_done: done,
        bytes_changed,
        elapsed_s: elapsed.as_secs_f64(),
        conversions_per_s: if secs > 0.0 { done as f64 / secs } else { 0.0 },
        latency: latencies.percentiles(),
        kernel_calls,
        peak_mappings: dma.peak_bytes / granule,
        final_mappings: mappings.len() as u64,
        peak_held_back_bytes: peak_held,
        final_held_back_bytes: final_held,
        checks,
        failure,
    })
}

fn attributes_are_recorded(kvm: &Option<setup::Kvm0>) -> bool {
    !kvm.as_ref()
        .is_some_and(|k| k.support.has_private_attribute())
}
