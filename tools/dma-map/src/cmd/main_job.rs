//! What `dma-map` does without a command: probe this host, run the default workload on the
//! best region it offers with the emulated IOMMU, and compare the discard policies where they
//! matter (a classic memfd + guest_memfd region, whose conversions free backing memory).

use serde::Serialize;

use crate::cli::{
    BackendChoice, MappingChoice, PolicyChoice, RegionChoice, SetupArgs, WorkloadArgs,
    WorkloadChoice,
};
use crate::report::{RunSummary, render_run};

use super::compare::{self, Comparison};
use super::probe::{self, Probe};
use super::run;

/// Firmware-bounce transactions of the main run (about a second on a 2-core machine).
const MAIN_TRANSACTIONS: u64 = 20_000;
/// Transactions of each run of the policy comparison.
const COMPARE_TRANSACTIONS: u64 = 5_000;

/// The main job's results.
#[derive(Debug, Serialize)]
pub struct MainJob {
    /// The host probe.
    pub probe: Probe,
    /// The default workload's run.
    pub run: RunSummary,
    /// The policy comparison.
    pub compare: Comparison,
}

fn setup(region: RegionChoice) -> SetupArgs {
    SetupArgs {
        backend: BackendChoice::Emulated,
        device: None,
        region,
        region_size: 1 << 30,
        granule: 4096,
        lazy_budget: 16 << 20,
        batch: 64,
        mapping: MappingChoice::Auto,
        mapping_budget: None,
    }
}

fn workload(count: u64) -> WorkloadArgs {
    WorkloadArgs {
        workload: WorkloadChoice::FirmwareBounce,
        trace: None,
        count,
        bounce_slots: None,
        chunk: 2 << 20,
        freed_pages: 0,
        seed: 1,
        save_trace: None,
    }
}

/// Runs the main job.
pub fn run(progress: bool) -> anyhow::Result<MainJob> {
    let probe = probe::probe();
    let main = setup(RegionChoice::Auto);
    let w = run::load_workload(&workload(MAIN_TRANSACTIONS), main.region_size)?;
    let summary = run::run_workload(
        &w,
        &main,
        BackendChoice::Emulated,
        PolicyChoice::Lazy,
        progress,
    )?;
    // Discard policies only differ where a conversion frees backing: the classic model. Without
    // guest_memfd, the memfd-only region has the same two-file shape.
    let has_guest_memfd = probe.kvm.default_vm().is_some_and(|s| s.guest_memfd);
    let classic = setup(if has_guest_memfd {
        RegionChoice::Classic
    } else {
        RegionChoice::MemfdOnly
    });
    let w = run::load_workload(&workload(COMPARE_TRANSACTIONS), classic.region_size)?;
    let compare = compare::compare(
        &w,
        &classic,
        &[BackendChoice::Emulated],
        &[
            PolicyChoice::Eager,
            PolicyChoice::Lazy,
            PolicyChoice::Batched,
        ],
        progress,
    )?;
    Ok(MainJob {
        probe,
        run: summary,
        compare,
    })
}

/// The main job as text.
pub fn render(job: &MainJob) -> String {
    let mut out = probe::render(&job.probe);
    out.push('\n');
    out.push_str(&render_run(&job.run));
    out.push_str(
        "\nDiscard policies side by side (classic backing, where a conversion frees memory):\n",
    );
    out.push_str(&compare::render(&job.compare));
    out
}
