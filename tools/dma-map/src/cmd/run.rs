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
use crate::report::RunSummary;
use crate::units::Bytes;
use workloads::{BounceArea, FirmwareBounce, LinuxBoot, Request, VirtioMem, Workload, trace};

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
            WorkloadChoice::VirtioMem => {
                let params = VirtioMem { steps: args.count };
                workloads::virtio_mem(region_size, params, args.seed)
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

/// Runs `w` with `backend` and `policy` as `setup` says. A request that fails (or a conversion
/// of unplugged memory that is not refused) stops the run; the summary says how far it got and
/// why (and [`RunSummary::ok`] is false).
pub fn run_workload(
    w: &Workload,
    setup: &SetupArgs,
    backend: BackendChoice,
    policy: PolicyChoice,
    show_progress: bool,
) -> anyhow::Result<RunSummary> {
    run_tampered(w, setup, backend, policy, show_progress, &mut |_, _| {})
}

/// [`run_workload`], with `tamper` called after every plug, unplug and refused conversion,
/// before that step's checks: the tests break an invariant there to see the checks catch it.
fn run_tampered(
    w: &Workload,
    setup: &SetupArgs,
    backend: BackendChoice,
    policy: PolicyChoice,
    show_progress: bool,
    tamper: &mut dyn FnMut(&Bench, &Request),
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
    let bench = Bench::open(setup, backend, bench::policy(policy, setup), w)?;
    // Counts from here on are the workload's own.
    let before = bench.calls();
    let bar = progress_bar(w.requests.len() as u64, show_progress);
    bar.set_message(format!("{} / {}", backend, bench.setup.policy));
    let mut plug_checks = checks::PlugChecks::default();
    let driven = bench::drive(&bench, w, &bar, &mut |bench, r, replay| {
        tamper(bench, r);
        match bench::request_range(r) {
            Ok(scope) => plug_checks.check(bench, replay, scope),
            Err(e) => log::error!("{e}"),
        }
    })?;
    bar.finish_and_clear();
    log::info!(
        "{} requests in {:.3} s ({:.3} s converting)",
        driven.done,
        driven.elapsed.as_secs_f64(),
        driven.converting.as_secs_f64()
    );
    let kernel_calls = bench.calls().since(&before);
    let final_held = bench.ram.held_back().total();
    let ledger = bench
        .ram
        .device_stats(bench.device)
        .context("the device is attached")?;
    let mut checks = checks::state(&bench, w, &driven)?;
    if w.plugs() {
        plug_checks.check(&bench, &driven.replay, bench.region.range());
        checks.extend(plug_checks.into_checks());
    }
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
            driven.converted as f64 / secs
        } else {
            0.0
        },
        latency: driven.latencies.percentiles(),
        kernel_calls,
        plugging: w.plugs().then_some(driven.plugging),
        peak_mappings: ledger.peak_mappings,
        final_mappings: ledger.mappings,
        peak_held_back_bytes: driven.peak_held,
        final_held_back_bytes: final_held,
        checks,
        failure: driven.failure,
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use iommu::{DmaBackend as _, DmaProt};
    use vm_memory::{Bytes as _, MemoryRegionAddress};
    use workloads::Action;

    use super::*;
    use crate::cli::{MappingChoice, RegionChoice};

    /// A memfd-only region (no KVM needed) with the emulated IOMMU.
    fn setup(region_size: u64) -> SetupArgs {
        SetupArgs {
            backend: BackendChoice::Emulated,
            device: None,
            region: RegionChoice::MemfdOnly,
            region_size,
            granule: 4096,
            lazy_budget: 1 << 20,
            batch: 64,
            mapping: MappingChoice::Auto,
            mapping_budget: None,
        }
    }

    fn virtio_mem(steps: u64) -> Workload {
        workloads::virtio_mem(32 << 20, VirtioMem { steps }, 3).unwrap()
    }

    /// Runs `w` with `tamper`, returning the summary.
    fn run(w: &Workload, tamper: &mut dyn FnMut(&Bench, &Request)) -> RunSummary {
        let setup = setup(w.region_size);
        run_tampered(
            w,
            &setup,
            BackendChoice::Emulated,
            PolicyChoice::Lazy,
            false,
            tamper,
        )
        .unwrap()
    }

    fn check<'a>(s: &'a RunSummary, name: &str) -> &'a crate::report::Check {
        s.checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name} in {:#?}", s.checks))
    }

    const NO_MAPPING: &str = "no IOMMU mapping of unplugged memory, in any device's view";
    const NO_BACKING: &str = "unplugged memory has no backing on either side";
    const SHARED_VIEW: &str =
        "plugged shared memory mapped, plugged private and unplugged memory not (shared view)";

    #[test]
    fn a_virtio_mem_run_plugs_unplugs_refuses_unplugged_conversions_and_passes_every_check() {
        let w = virtio_mem(1500);
        let s = run(&w, &mut |_, _| {});
        assert!(s.ok(), "{}", crate::report::render_run(&s));
        let p = s.plugging.expect("a plugging workload reports its plugs");
        let count = |f: fn(&Action) -> bool| w.requests.iter().filter(|r| f(&r.action)).count();
        assert_eq!(p.plugs as usize, count(|a| matches!(a, Action::Plug(_))));
        assert_eq!(p.unplugs as usize, count(|a| matches!(a, Action::Unplug)));
        assert!(p.refused_unplugged > 0);
        // Every plug and unplug moves whole blocks; an unplug frees memory, a shared plug maps.
        assert_eq!(p.plugged_bytes, p.plugs * workloads::VIRTIO_MEM_BLOCK);
        assert_eq!(p.unplugged_bytes, p.unplugs * workloads::VIRTIO_MEM_BLOCK);
        assert!(p.unplug_calls.hole_punches >= p.unplugs);
        assert!(p.unplug_calls.iommu_unmaps > 0 && p.plug_calls.iommu_maps > 0);
        // The plugged-state checks ran after every plug, unplug and refusal, and at the end.
        let points = p.plugs + p.unplugs + p.refused_unplugged + 1;
        let detail = &check(&s, NO_MAPPING).detail;
        assert_eq!(detail, &format!("{points} check points"));
        assert!(check(&s, NO_BACKING).passed);
        // A workload without plugs has none of this.
        let bounce = workloads::random_mixed(32 << 20, 200, 1).unwrap();
        let s = run(&bounce, &mut |_, _| {});
        assert!(s.ok() && s.plugging.is_none());
        assert!(s.checks.iter().all(|c| c.name != NO_MAPPING));
    }

    #[test]
    fn a_mapping_left_over_an_unplugged_block_fails_the_check() {
        let w = virtio_mem(600);
        // After the first unplug, map the block's first page behind the library's back: what an
        // unplug that forgot one unmap would leave in the IOMMU.
        let mut left = None;
        let s = run(&w, &mut |bench, r| {
            if r.action != Action::Unplug || left.is_some() {
                return;
            }
            let iova = crate::setup::REGION_BASE + r.gpa;
            let backing = bench.region.backing();
            let emu = bench.emulated.as_ref().expect("the emulated IOMMU");
            emu.map_file(
                iova,
                4096,
                backing.shared_file().as_fd(),
                backing.file_offset(iova),
                DmaProt::READ_WRITE,
            )
            .unwrap();
            left = Some(iova);
        });
        let iova = left.expect("the workload unplugs");
        assert!(!s.ok());
        let c = check(&s, NO_MAPPING);
        assert!(!c.passed, "{c:?}");
        let needle = format!("the emulated IOMMU's page table maps {iova:#x}..");
        assert!(c.detail.contains(&needle), "{c:?}");
        assert!(!check(&s, SHARED_VIEW).passed);
        assert!(check(&s, NO_BACKING).passed, "the backing was not touched");
    }

    #[test]
    fn memory_written_into_an_unplugged_block_fails_the_check() {
        let w = virtio_mem(600);
        // After the first unplug, the host writes into the block: backing the unplug freed.
        let mut written = false;
        let s = run(&w, &mut |bench, r| {
            if r.action != Action::Unplug || written {
                return;
            }
            let mem = bench.region.backing().mapping().expect("a mapped backing");
            mem.write_slice(&[7], MemoryRegionAddress(r.gpa)).unwrap();
            written = true;
        });
        assert!(written);
        let c = check(&s, NO_BACKING);
        assert!(!c.passed, "{c:?}");
        assert!(c.detail.contains("shared side holds"), "{c:?}");
        assert!(check(&s, NO_MAPPING).passed, "no mapping was left");
    }
}
