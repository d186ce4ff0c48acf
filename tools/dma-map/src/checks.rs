//! The invariant checks a run ends with (DESIGN.md's invariants, seen from outside the
//! library): each compares two independent records of the same fact.

use std::collections::BTreeMap;

use anyhow::Context as _;

use discard_manager::{Attribute, GpaRange, View};
use gmem_dma::{BackingModel, DiscardPolicy};

use crate::bench::{Bench, Driven};
use crate::report::Check;
use crate::setup::REGION_BASE;
use crate::units::Bytes;
use workloads::{Extents, Replay, Workload};

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
        // KVM's attribute is the manager's attribute of every granule, plugged or not (an
        // unplugged granule keeps its attribute until it is plugged again).
        let mut private_attribute = Extents::default();
        for run in manager
            .runs(whole)
            .context("reading the state manager's runs")?
        {
            if run.attribute == Attribute::Private {
                private_attribute.insert(run.range.start(), run.range.end());
            }
        }
        let expected = private_attribute.to_vec();
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

/// The plugged-state invariants, checked against the workload's model ([`Replay`]) after every
/// plug, unplug and refused conversion and once at the end of a run that plugs. Each is
/// reported once, with the number of check points and the first failure.
///
/// For every granule: unplugged means no IOMMU mapping of any device (in the ledger, and in the
/// emulated IOMMU's page table), the VMM's `page_state` saying unplugged, and no backing memory
/// on either side (where the backing can answer); plugged and shared means mapped in the
/// shared view; plugged and private means not mapped there.
#[derive(Debug, Default)]
pub struct PlugChecks {
    points: u64,
    /// Per check, in the order they are made: failed check points and the first failure.
    failures: Vec<(&'static str, u64, String)>,
    /// Sides of the backing that could not say what they hold, with why.
    unanswered: BTreeMap<&'static str, String>,
}

const UNPLUGGED_STATE: &str = "plugged state equals the workload replayed";
const PAGE_STATE: &str = "page_state agrees with the workload, granule by granule";
const NO_MAPPING: &str = "no IOMMU mapping of unplugged memory, in any device's view";
const SHARED_VIEW: &str =
    "plugged shared memory mapped, plugged private and unplugged memory not (shared view)";
const NO_BACKING: &str = "unplugged memory has no backing on either side";
const PAGE_TABLE: &str = "the emulated IOMMU's page table";

/// Something that holds IOMMU mappings: a device's ledger, or the emulated IOMMU's page table.
struct Holder {
    /// What it is, for the report.
    name: String,
    /// The view it maps.
    view: View,
    /// What it maps, merged into extents.
    mapped: Vec<(u64, u64)>,
}

/// The extents `[start, end)` of `ranges`, merged where they overlap or touch, in address
/// order. Linear for sorted input (ledgers and page tables are), as it runs at every check point.
fn merged(ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = ranges.into_iter().collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (s, e) in all {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// True when some extent of `x` (sorted, disjoint) overlaps one of `y` (sorted, disjoint).
fn any_overlap(x: &[(u64, u64)], y: &[(u64, u64)]) -> Option<(u64, u64)> {
    let (mut i, mut j) = (0, 0);
    while i < x.len() && j < y.len() {
        if x[i].0 < y[j].1 && y[j].0 < x[i].1 {
            return Some(x[i]);
        }
        if x[i].1 <= y[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    None
}

/// `x` moved from offsets in the region to guest-physical addresses.
fn at_base(x: &Extents) -> Vec<(u64, u64)> {
    x.to_vec()
        .into_iter()
        .map(|(s, e)| (REGION_BASE + s, REGION_BASE + e))
        .collect()
}

fn first_difference(got: &[(u64, u64)], expected: &[(u64, u64)]) -> String {
    let i = got
        .iter()
        .zip(expected)
        .position(|(g, e)| g != e)
        .unwrap_or(got.len().min(expected.len()));
    format!(
        "{} extents, {} expected; first difference at extent {i}: {:x?} vs {:x?}",
        got.len(),
        expected.len(),
        got.get(i),
        expected.get(i)
    )
}

impl PlugChecks {
    fn record(&mut self, name: &'static str, failure: Option<String>) {
        let i = match self.failures.iter().position(|(n, _, _)| *n == name) {
            Some(i) => i,
            None => {
                self.failures.push((name, 0, String::new()));
                self.failures.len() - 1
            }
        };
        let (_, failed, first) = &mut self.failures[i];
        if let Some(why) = failure {
            if *failed == 0 {
                *first = format!("at check point {}: {why}", self.points);
            }
            *failed += 1;
        }
    }

    /// Checks the whole region against `replay`, and `scope` granule by granule (the VMM's
    /// `page_state`) and for backing memory: the range a step changed, or the whole region at
    /// the end.
    pub fn check(&mut self, bench: &Bench, replay: &Replay, scope: GpaRange) {
        self.points += 1;
        let whole = bench.region.range();
        let unplugged = at_base(replay.unplugged());
        let shared = at_base(replay.shared());
        // The state manager's plugged state.
        let failure = match bench.region.state().runs(whole) {
            Ok(runs) => {
                let got = merged(
                    runs.iter()
                        .filter(|r| !r.plugged)
                        .map(|r| (r.range.start(), r.range.end())),
                );
                (got != unplugged).then(|| first_difference(&got, &unplugged))
            }
            Err(e) => Some(format!("reading the state manager: {e}")),
        };
        self.record(UNPLUGGED_STATE, failure);
        self.record(PAGE_STATE, page_state_disagrees(bench, replay, scope));
        // Every device's ledger, with its view, and what the emulated IOMMU (the bench device's
        // backend, shared view) really holds.
        let mut holders: Vec<Holder> = bench
            .ram
            .devices()
            .into_iter()
            .map(|(id, name, config)| {
                let maps = bench.ram.device_mappings(id).unwrap_or_default();
                Holder {
                    name: format!("{name} ({:?} view)", config.view()),
                    view: config.view(),
                    mapped: merged(maps.iter().map(|m| (m.iova, m.iova + m.len))),
                }
            })
            .collect();
        if let Some(emu) = &bench.emulated {
            let table = merged(emu.page_table().iter().map(|e| (e.iova, e.iova + e.len)));
            holders.push(Holder {
                name: PAGE_TABLE.to_string(),
                view: View::Shared,
                mapped: table,
            });
        }
        let over_unplugged: Vec<String> = holders
            .iter()
            .filter_map(|h| {
                let (s, e) = any_overlap(&h.mapped, &unplugged)?;
                Some(format!("{} maps {s:#x}..{e:#x}", h.name))
            })
            .collect();
        self.record(
            NO_MAPPING,
            (!over_unplugged.is_empty()).then(|| over_unplugged.join("; ")),
        );
        // The shared view maps exactly the plugged shared memory.
        let wrong: Vec<String> = holders
            .iter()
            .filter(|h| h.view == View::Shared && h.mapped != shared)
            .map(|h| format!("{}: {}", h.name, first_difference(&h.mapped, &shared)))
            .collect();
        self.record(SHARED_VIEW, (!wrong.is_empty()).then(|| wrong.join("; ")));
        let failure = self.backing_disagrees(bench, replay.unplugged(), scope);
        self.record(NO_BACKING, failure);
    }

    /// Backing memory inside unplugged memory of `scope`, on each side that can say.
    fn backing_disagrees(
        &mut self,
        bench: &Bench,
        unplugged: &Extents,
        scope: GpaRange,
    ) -> Option<String> {
        let backing = bench.region.backing();
        let sides: &[(&'static str, View)] = match bench.model {
            BackingModel::InPlace => &[("guest_memfd", View::Shared)],
            BackingModel::Classic => &[
                ("shared side", View::Shared),
                ("private side", View::Private),
            ],
        };
        let mut held = Vec::new();
        let (start, end) = (scope.start() - REGION_BASE, scope.end() - REGION_BASE);
        for (s, e) in unplugged.within(start, end) {
            let Some(range) = GpaRange::new(REGION_BASE + s, e - s) else {
                continue;
            };
            for &(side_name, side) in sides {
                if self.unanswered.contains_key(side_name) {
                    continue;
                }
                match backing.backed_ranges(side, range) {
                    Ok(backed) if backed.is_empty() => {}
                    Ok(backed) => held.push(format!("{side_name} holds {}", backed[0])),
                    Err(e) => {
                        self.unanswered.insert(side_name, e.to_string());
                    }
                }
            }
        }
        (!held.is_empty()).then(|| held.join("; "))
    }

    /// One check per invariant: passed when no check point failed.
    pub fn into_checks(self) -> Vec<Check> {
        let points = self.points;
        let unanswered: Vec<String> = self
            .unanswered
            .iter()
            .map(|(side, why)| format!("{side} cannot say ({why})"))
            .collect();
        self.failures
            .into_iter()
            .map(|(name, failed, first)| {
                let mut detail = match failed {
                    0 => format!("{points} check points"),
                    n => format!("{n} of {points} check points failed, first {first}"),
                };
                if name == NO_BACKING && !unanswered.is_empty() {
                    detail.push_str(&format!("; {}", unanswered.join(", ")));
                }
                check(name, failed == 0, detail)
            })
            .collect()
    }
}

/// Where the VMM's `page_state` of a granule of `scope` differs from the workload's model.
fn page_state_disagrees(bench: &Bench, replay: &Replay, scope: GpaRange) -> Option<String> {
    let mut gpa = scope.start();
    while gpa < scope.end() {
        let offset = gpa - REGION_BASE;
        let plugged = !replay.unplugged().contains(offset);
        let expected = plugged.then(|| match replay.shared().contains(offset) {
            true => Attribute::Shared,
            false => Attribute::Private,
        });
        let got = bench
            .ram
            .page_state(gpa)
            .map(|run| run.plugged.then_some(run.attribute));
        if got != Some(expected) {
            return Some(format!(
                "{gpa:#x}: page_state says {got:?}, the workload {expected:?} (None: unplugged)"
            ));
        }
        gpa += bench.granule;
    }
    None
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
