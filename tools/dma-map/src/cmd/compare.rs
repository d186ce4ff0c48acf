//! `dma-map compare`: one workload, several policies and backends, one table.

use serde::Serialize;

use crate::cli::{BackendChoice, MappingChoice, PolicyChoice, SetupArgs};
use crate::report::{RunSummary, render_compare};
use workloads::Workload;

/// Every run of a comparison.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// The workload all runs ran.
    pub workload: String,
    /// The runs, backend-major.
    pub runs: Vec<RunSummary>,
}

/// Runs `w` once per (backend, mapping mode, policy): both mapping modes (per run, per
/// granule) where the backend offers them and `--mapping` is `auto`, else the one asked for.
pub fn compare(
    w: &Workload,
    setup: &SetupArgs,
    backends: &[BackendChoice],
    policies: &[PolicyChoice],
    progress: bool,
) -> anyhow::Result<Comparison> {
    let mut runs = Vec::new();
    for &backend in backends {
        let mappings = match setup.mapping {
            MappingChoice::Auto if crate::setup::offers_per_run(backend) => {
                vec![MappingChoice::PerRun, MappingChoice::PerGranule]
            }
            asked => vec![asked],
        };
        for mapping in mappings {
            let setup = SetupArgs {
                mapping,
                ..setup.clone()
            };
            for &policy in policies {
                runs.push(super::run::run_workload(
                    w, &setup, backend, policy, progress,
                )?);
            }
        }
    }
    Ok(Comparison {
        workload: w.name.clone(),
        runs,
    })
}

/// The comparison as text: the table, then the setup notes and any failure, once each.
pub fn render(c: &Comparison) -> String {
    let mut out = format!("Compare: {}\n", c.workload);
    if let Some(first) = c.runs.first() {
        out.push_str(&format!("  region {}\n", first.setup.region));
    }
    out.push_str(&crate::report::indent(&render_compare(&c.runs)));
    let mut notes: Vec<&String> = c.runs.iter().flat_map(|r| &r.setup.fallbacks).collect();
    notes.sort();
    notes.dedup();
    for n in notes {
        out.push_str(&format!("  fallback: {n}\n"));
    }
    for r in &c.runs {
        if let Some(f) = &r.failure {
            out.push_str(&format!(
                "  {} / {}: stopped: {f}\n",
                r.setup.backend, r.setup.policy
            ));
        }
        for chk in r.checks.iter().filter(|c| !c.passed) {
            out.push_str(&format!(
                "  {} / {}: FAIL {}: {}\n",
                r.setup.backend, r.setup.policy, chk.name, chk.detail
            ));
        }
    }
    out
}
