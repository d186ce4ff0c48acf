//! What the commands print: the run summary's shape, a plain-text table, and JSON.

use std::fmt::Write as _;

use serde::Serialize;

use crate::stats::Percentiles;
use crate::units::Bytes;

/// Kernel (or emulated-kernel) calls a run made, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelCalls {
    /// `KVM_SET_MEMORY_ATTRIBUTES` calls (sent to KVM, or recorded where KVM lacks them).
    pub attribute_sets: u64,
    /// IOMMU map calls.
    pub iommu_maps: u64,
    /// IOMMU unmap calls.
    pub iommu_unmaps: u64,
    /// `fallocate(PUNCH_HOLE)` calls on the backings.
    pub hole_punches: u64,
}

impl KernelCalls {
    /// The calls made since `before` was read.
    pub fn since(&self, before: &KernelCalls) -> KernelCalls {
        KernelCalls {
            attribute_sets: self.attribute_sets - before.attribute_sets,
            iommu_maps: self.iommu_maps - before.iommu_maps,
            iommu_unmaps: self.iommu_unmaps - before.iommu_unmaps,
            hole_punches: self.hole_punches - before.hole_punches,
        }
    }

    /// Adds `more` to these counts.
    pub fn add(&mut self, more: &KernelCalls) {
        self.attribute_sets += more.attribute_sets;
        self.iommu_maps += more.iommu_maps;
        self.iommu_unmaps += more.iommu_unmaps;
        self.hole_punches += more.hole_punches;
    }
}

/// What the plugs and unplugs of a virtio-mem workload did, apart from its conversions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PlugSummary {
    /// `GuestRam::plug` calls.
    pub plugs: u64,
    /// `GuestRam::unplug` calls.
    pub unplugs: u64,
    /// Bytes the plugs made plugged.
    pub plugged_bytes: u64,
    /// Bytes the unplugs made unplugged.
    pub unplugged_bytes: u64,
    /// Conversions of unplugged memory, refused with `ConversionError::Unplugged` as the
    /// workload's model expects.
    pub refused_unplugged: u64,
    /// Kernel calls the plugs made.
    pub plug_calls: KernelCalls,
    /// Kernel calls the unplugs made.
    pub unplug_calls: KernelCalls,
}

/// One invariant checked after a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Which invariant.
    pub name: String,
    /// Whether it held.
    pub passed: bool,
    /// What was compared, or what differed.
    pub detail: String,
}

/// How a run was set up, including every fallback taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Setup {
    /// Region backing actually used.
    pub region: String,
    /// DMA backend actually used.
    pub backend: String,
    /// Discard policy.
    pub policy: String,
    /// Sentences saying what was not available and what was done instead.
    pub fallbacks: Vec<String>,
}

/// Everything a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    /// The workload's name.
    pub workload: String,
    /// The setup.
    pub setup: Setup,
    /// Requests in the workload.
    pub requests: u64,
    /// Requests the engine completed as the workload's model expects (equals `requests` on
    /// success): conversions, plugs, unplugs, and conversions of unplugged memory refused.
    pub conversions_done: u64,
    /// Bytes whose attribute really changed.
    pub bytes_changed: u64,
    /// Wall time of the conversions, seconds.
    pub elapsed_s: f64,
    /// Completed requests per second of time spent inside the engine's convert calls.
    pub conversions_per_s: f64,
    /// Latency of one request.
    pub latency: Percentiles,
    /// Calls by kind (of the whole workload: conversions, plugs and unplugs).
    pub kernel_calls: KernelCalls,
    /// Plugs and unplugs, for a workload that has them.
    pub plugging: Option<PlugSummary>,
    /// Most IOMMU mappings alive at once (the device ledger's count).
    pub peak_mappings: u64,
    /// Mappings alive at the end.
    pub final_mappings: u64,
    /// Most bytes the lazy policy held back (not yet hole-punched) at once.
    pub peak_held_back_bytes: u64,
    /// Bytes still held back at the end.
    pub final_held_back_bytes: u64,
    /// Invariant checks made after the run.
    pub checks: Vec<Check>,
    /// Why the run stopped early, when a conversion failed.
    pub failure: Option<String>,
}

impl RunSummary {
    /// True when every request completed and every check held.
    pub fn ok(&self) -> bool {
        self.failure.is_none()
            && self.conversions_done == self.requests
            && self.checks.iter().all(|c| c.passed)
    }
}

/// A table of strings with a header row, printed with aligned columns.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    pub fn new<S: ToString>(header: impl IntoIterator<Item = S>) -> Self {
        Table {
            header: header.into_iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells print empty; extra cells are kept).
    pub fn row<S: ToString>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows
            .push(cells.into_iter().map(|s| s.to_string()).collect());
    }

    /// The table as text, columns separated by two spaces, header underlined.
    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.header.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in self.rows.iter().chain([&self.header]) {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[String]| {
            let mut text = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = cells.get(i).map_or("", String::as_str);
                let _ = write!(text, "{cell:<w$}  ");
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&self.header);
        line(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>());
        for row in &self.rows {
            line(row);
        }
        out
    }
}

/// A duration in nanoseconds with a readable unit.
pub fn nanos(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns} ns"),
        1_000..1_000_000 => format!("{:.1} µs", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

/// The human summary of one run.
pub fn render_run(s: &RunSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Run: {}", s.workload);
    let _ = writeln!(
        out,
        "  region {}, backend {}, policy {}",
        s.setup.region, s.setup.backend, s.setup.policy
    );
    for f in &s.setup.fallbacks {
        let _ = writeln!(out, "  fallback: {f}");
    }
    let mut t = Table::new(["measure", "value"]);
    t.row([
        "requests done".to_string(),
        format!("{} of {}", s.conversions_done, s.requests),
    ]);
    if let Some(f) = &s.failure {
        t.row(["stopped".to_string(), f.clone()]);
    }
    t.row([
        "bytes changed".to_string(),
        Bytes(s.bytes_changed).to_string(),
    ]);
    t.row(["elapsed".to_string(), format!("{:.3} s", s.elapsed_s)]);
    t.row([
        "conversions/s (time in convert)".to_string(),
        format!("{:.0}", s.conversions_per_s),
    ]);
    t.row([
        "latency p50 / p90 / p99 / max".to_string(),
        format!(
            "{} / {} / {} / {}",
            nanos(s.latency.p50_ns),
            nanos(s.latency.p90_ns),
            nanos(s.latency.p99_ns),
            nanos(s.latency.max_ns)
        ),
    ]);
    let k = &s.kernel_calls;
    t.row(["attribute sets".to_string(), k.attribute_sets.to_string()]);
    t.row(["IOMMU maps".to_string(), k.iommu_maps.to_string()]);
    t.row(["IOMMU unmaps".to_string(), k.iommu_unmaps.to_string()]);
    t.row(["hole punches".to_string(), k.hole_punches.to_string()]);
    if let Some(p) = &s.plugging {
        t.row([
            "conversions of unplugged memory refused".to_string(),
            p.refused_unplugged.to_string(),
        ]);
    }
    t.row([
        "mappings peak / at end".to_string(),
        format!("{} / {}", s.peak_mappings, s.final_mappings),
    ]);
    t.row([
        "held back by lazy discard peak / at end".to_string(),
        format!(
            "{} / {}",
            Bytes(s.peak_held_back_bytes),
            Bytes(s.final_held_back_bytes)
        ),
    ]);
    out.push_str(&indent(&t.render()));
    if let Some(p) = &s.plugging {
        out.push_str(&indent(&render_by_kind(s, p)));
    }
    let passed = s.checks.iter().filter(|c| c.passed).count();
    let _ = writeln!(
        out,
        "  invariant checks: {passed} of {} passed",
        s.checks.len()
    );
    for c in &s.checks {
        let mark = if c.passed { "ok  " } else { "FAIL" };
        let _ = writeln!(out, "    {mark} {}: {}", c.name, c.detail);
    }
    out
}

/// The kernel calls of a plugging run split by request kind: conversions, plugs, unplugs.
fn render_by_kind(s: &RunSummary, p: &PlugSummary) -> String {
    let mut t = Table::new([
        "request kind",
        "requests",
        "bytes changed",
        "attr sets",
        "IOMMU maps",
        "IOMMU unmaps",
        "hole punches",
    ]);
    let mut conversions = s.kernel_calls;
    let mut plugging = p.plug_calls;
    plugging.add(&p.unplug_calls);
    conversions = conversions.since(&plugging);
    let converted = s.conversions_done - p.plugs - p.unplugs - p.refused_unplugged;
    let rows = [
        ("conversions", converted, s.bytes_changed, conversions),
        ("plugs", p.plugs, p.plugged_bytes, p.plug_calls),
        ("unplugs", p.unplugs, p.unplugged_bytes, p.unplug_calls),
    ];
    for (kind, requests, bytes, k) in rows {
        t.row([
            kind.to_string(),
            requests.to_string(),
            Bytes(bytes).to_string(),
            k.attribute_sets.to_string(),
            k.iommu_maps.to_string(),
            k.iommu_unmaps.to_string(),
            k.hole_punches.to_string(),
        ]);
    }
    t.render()
}

/// Several runs of one workload side by side.
pub fn render_compare(runs: &[RunSummary]) -> String {
    let mut t = Table::new([
        "backend",
        "policy",
        "conv/s",
        "p50",
        "p99",
        "max",
        "attr sets",
        "maps",
        "unmaps",
        "punches",
        "peak maps",
        "peak held",
        "checks",
    ]);
    for s in runs {
        let passed = s.checks.iter().filter(|c| c.passed).count();
        t.row([
            s.setup.backend.clone(),
            s.setup.policy.clone(),
            format!("{:.0}", s.conversions_per_s),
            nanos(s.latency.p50_ns),
            nanos(s.latency.p99_ns),
            nanos(s.latency.max_ns),
            s.kernel_calls.attribute_sets.to_string(),
            s.kernel_calls.iommu_maps.to_string(),
            s.kernel_calls.iommu_unmaps.to_string(),
            s.kernel_calls.hole_punches.to_string(),
            s.peak_mappings.to_string(),
            Bytes(s.peak_held_back_bytes).to_string(),
            format!("{passed}/{}", s.checks.len()),
        ]);
    }
    t.render()
}

/// Indents every line by two spaces.
pub fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// Pretty JSON of anything serialisable (serialising these plain structs cannot fail; if it
/// ever did, the error text is printed instead of panicking).
pub fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_align_to_the_widest_cell() {
        let mut t = Table::new(["a", "bb"]);
        t.row(["longer", "x"]);
        t.row(["y"]);
        assert_eq!(t.render(), "a       bb\n------  --\nlonger  x\ny\n");
    }

    #[test]
    fn nanos_pick_a_readable_unit() {
        assert_eq!(nanos(999), "999 ns");
        assert_eq!(nanos(1_500), "1.5 µs");
        assert_eq!(nanos(2_500_000), "2.5 ms");
        assert_eq!(nanos(3_000_000_000), "3.00 s");
    }

    #[test]
    fn a_run_is_ok_only_when_complete_and_every_check_held() {
        let mut s = RunSummary {
            workload: "w".into(),
            setup: Setup {
                region: "r".into(),
                backend: "b".into(),
                policy: "p".into(),
                fallbacks: vec![],
            },
            requests: 2,
            conversions_done: 2,
            bytes_changed: 0,
            elapsed_s: 0.0,
            conversions_per_s: 0.0,
            latency: Percentiles::default(),
            kernel_calls: KernelCalls::default(),
            plugging: None,
            peak_mappings: 0,
            final_mappings: 0,
            peak_held_back_bytes: 0,
            final_held_back_bytes: 0,
            checks: vec![Check {
                name: "c".into(),
                passed: true,
                detail: String::new(),
            }],
            failure: None,
        };
        assert!(s.ok());
        s.failure = Some("EIO".into());
        assert!(!s.ok());
        s.failure = None;
        s.conversions_done = 1;
        assert!(!s.ok());
        s.conversions_done = 2;
        s.checks[0].passed = false;
        assert!(!s.ok());
        let text = render_run(&s);
        assert!(text.contains("FAIL c"), "{text}");
        assert!(text.contains("0 of 1 passed"), "{text}");
    }
}
