//! The invariant checks a run ends with (DESIGN.md's invariants, seen from outside the
//! library): each compares two independent records of the same fact.

use anyhow::Context as _;

use discard_manager::{GpaRange, View};
use gmem_dma::{BackingModel, DiscardPolicy};

use crate::bench::{Bench, Driven};
use crate::report::Check;
use crate::setup::REGION_BASE;
use crate::units::Bytes;
use workloads::Workload;

fn check(name: &str, passed: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.to_string(),
        passed,
        detail: detail.into(),
    }
}

fn extents(runs: &[GpaRange]) -> Vec<(u64, u64)> {
    runs.iter().map(|r| (r.start(), r.end())).collect()
}

/// Checks the state after `d` drove `w` through `bench`, changing nothing.
pub fn state(bench: &Bench, w: &Workload, d: &Driven) -> anyhow::Result<Vec<Check>> {
    let mut checks = Vec::new();
    let whole = bench.region.range();
    let manager = bench.region.state();
    let mappings = bench.ram.device_mappings(bench.device).unwrap_or_default();
    let shared_runs = manager
        .view_runs(View::Shared, whole)
        .context("reading the shared view")?;
    if d.failure.is_none() {
        let expected: Vec<(u64, u64)> = workloads::final_shared(w)
            .into_iter()
            .map(|(s, e)| (REGION_BASE + s, REGION_BASE + e))
            .collect();
        let got = extents(&shared_runs);
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
    // Per granule: every mapping is one granule. Per run: mappings are whole granules, and
    // never more of them than granules (the runs, and what cuts left of them).
    let odd = mappings
        .iter()
        .filter(|m| match bench.per_run {
            false => m.len != bench.granule,
            true => m.len % bench.granule != 0 || m.iova % bench.granule != 0,
        })
        .count();
    let (name, unit) = match bench.per_run {
        false => (
            "every shared page mapped, one mapping per granule",
            "not one granule",
        ),
        true => (
            "every shared page mapped, mappings of whole granules",
            "not whole granules",
        ),
    };
    checks.push(check(
        name,
        mapped_bytes == shared_bytes && odd == 0,
        format!(
            "{} mapped, {} shared, {} mappings, {odd} {unit}",
            Bytes(mapped_bytes),
            Bytes(shared_bytes),
            mappings.len()
        ),
    ));
    let live = bench.dma.counts().live_bytes;
    checks.push(check(
        "ledger equals what the backend holds",
        live == mapped_bytes,
        format!(
            "ledger {}, backend calls leave {}",
            Bytes(mapped_bytes),
            Bytes(live)
        ),
    ));
    if let Some(emu) = &bench.emulated {
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
    if let Some(recorded) = &bench.recorded {
        let private: Vec<(u64, u64)> = recorded
            .private_ranges()
            .into_iter()
            .filter(|&(s, e)| s < whole.end() && e > whole.start())
            .collect();
        let expected = extents(
            &manager
                .view_runs(View::Private, whole)
                .context("reading the private view")?,
        );
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
    let stale = bench.region.stale_mappings();
    checks.push(check(
        "no stale mappings (failed unmaps)",
        stale.is_empty(),
        format!("{} devices with stale mappings", stale.len()),
    ));
    let (bound_ok, bound) = match bench.policy {
        DiscardPolicy::Eager => (
            d.peak_held == 0,
            "nothing held after a conversion".to_string(),
        ),
        DiscardPolicy::Lazy { budget_bytes } => (
            d.peak_held <= budget_bytes,
            format!("at most {}", Bytes(budget_bytes)),
        ),
        DiscardPolicy::Batched { max_bytes, .. } => (
            d.peak_held < max_bytes,
            format!("below {}", Bytes(max_bytes)),
        ),
    };
    checks.push(check(
        "held-back backing within the policy's bound",
        bound_ok,
        format!("peak {}, bound: {bound}", Bytes(d.peak_held)),
    ));
    if bench.model == BackingModel::Classic {
        let allocated = bench
            .region
            .backing()
            .allocated_bytes(View::Shared)
            .context("reading the shared backing's allocation")?;
        let allowed = shared_bytes + bench.ram.held_back().shared_bytes;
        checks.push(check(
            "no double allocation: shared backing holds only shared or held-back pages",
            allocated <= allowed,
            format!("{} allocated, {} allowed", Bytes(allocated), Bytes(allowed)),
        ));
    }
    Ok(checks)
}

/// Flushes what is held back and detaches the device, checking that both leave nothing.
pub fn teardown(bench: &Bench) -> Vec<Check> {
    let flush = bench.ram.flush_discards();
    let flushed = check(
        "a flush frees everything held back",
        bench.ram.held_back().total() == 0 && flush.failed_ranges == 0,
        format!(
            "{} ranges freed ({}), {} failed",
            flush.punched_ranges,
            Bytes(flush.punched_bytes),
            flush.failed_ranges
        ),
    );
    let detached = bench.ram.detach_device(bench.device);
    let left = bench.dma.counts().live_bytes;
    let unmapped = check(
        "teardown unmaps every mapping",
        detached.is_ok() && left == 0,
        match &detached {
            Ok(r) => format!(
                "{} mappings in {} unmap calls, {} left",
                r.mappings,
                r.calls,
                Bytes(left)
            ),
            Err(e) => format!("{:#}", anyhow::Error::msg(e.to_string())),
        },
    );
    vec![flushed, unmapped]
}
