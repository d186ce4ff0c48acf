//! `dma-map run`: one workload through the library's conversion engine (`gmem_dma::GuestRam`)
//! on one region with one device and one discard policy; measured, then checked against the
//! invariants of DESIGN.md.

use std::io::IsTerminal as _;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::bench::{self, Bench};
use crate::checks;
use crate::cli::{BackendChoice, PolicyChoice, SetupArgs, WorkloadArgs, WorkloadChoice};
use crate::exit::{Class, error};
use crate::report::{KernelCalls, RunSummary};
use crate::units::Bytes;
use workloads::{BounceArea, FirmwareBounce, LinuxBoot, Workload, trace};

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
                let area = args
                    .bounce_slots
                    .map_or(BounceArea::Anywhere, BounceArea::Slots);
                let params = FirmwareBounce {
                    transactions: args.count,
                    area,
                };
                workloads::firmware_bounce(region_size, params, args.seed)
            }
            WorkloadChoice::LinuxBoot => {
                let params = LinuxBoot {
                    chunk: args.chunk,
                    freed_pages: args.freed_pages,
                };
                workloads::linux_boot(region_size, params, args.seed)
            }
            WorkloadChoice::RandomMixed => {
                workloads::random_mixed(region_size, args.count, args.seed)
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
    setup: &SetupArgs,
    backend: BackendChoice,
    policy: PolicyChoice,
    show_progress: bool,
) -> anyhow::Result<RunSummary> {
    let granule = setup.granule;
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
    let bench = Bench::open(setup, backend, bench::policy(policy, setup), w.region_size)?;
    // Counts from here on are the workload's own.
    let before = bench.calls();
    let bar = progress_bar(w.requests.len() as u64, show_progress);
    bar.set_message(format!("{} / {}", backend, bench.setup.policy));
    let driven = bench::drive(&bench, w, &bar)?;
    bar.finish_and_clear();
    log::info!(
        "{} conversions in {:.3} s ({:.3} s converting)",
        driven.done,
        driven.elapsed.as_secs_f64(),
        driven.converting.as_secs_f64()
    );
    let after = bench.calls();
    let kernel_calls = KernelCalls {
        attribute_sets: after.attribute_sets - before.attribute_sets,
        iommu_maps: after.iommu_maps - before.iommu_maps,
        iommu_unmaps: after.iommu_unmaps - before.iommu_unmaps,
        hole_punches: after.hole_punches - before.hole_punches,
    };
    let final_held = bench.ram.held_back().total();
    let ledger = bench
        .ram
        .device_stats(bench.device)
        .context("the device is attached")?;
    let mut checks = checks::state(&bench, w, &driven)?;
    checks.extend(checks::teardown(&bench));
    let secs = driven.converting.as_secs_f64();
    Ok(RunSummary {
        workload: w.name.clone(),
        setup: bench.setup.clone(),
        requests: w.requests.len() as u64,
        conversions_done: driven.done,
        bytes_changed: driven.bytes_changed,
        elapsed_s: driven.elapsed.as_secs_f64(),
        conversions_per_s: if secs > 0.0 {
            driven.done as f64 / secs
        } else {
            0.0
        },
        latency: driven.latencies.percentiles(),
        kernel_calls,
        peak_mappings: ledger.peak_mappings,
        final_mappings: ledger.mappings,
        peak_held_back_bytes: driven.peak_held,
        final_held_back_bytes: final_held,
        checks,
        failure: driven.failure,
    })
}
