//! The summary: failure details first (with output and, where the guest died, its console), then
//! a table of configuration x test, then what each guest offered and how long it took.

use std::fmt::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::results::{ItemResult, Outcome};

/// One configuration's run.
pub struct ConfigRun {
    /// Configuration name.
    pub name: String,
    /// Per planned item, in plan order.
    pub results: Vec<ItemResult>,
    /// Why the guest stopped early, if it did.
    pub stopped: Option<String>,
    /// QEMU's wall time.
    pub wall: Duration,
    /// When `/init` started (seconds after the kernel booted).
    pub boot_secs: Option<f64>,
    /// What the guest reported about itself.
    pub facts: Vec<(String, String)>,
    /// The console log, shown when the guest stopped early.
    pub console: Option<PathBuf>,
    /// Its last lines.
    pub console_tail: String,
}

/// Problems found before any guest ran (compile errors, unlisted binaries, unknown commands).
pub struct HostProblem {
    /// What it concerns.
    pub label: String,
    /// What went wrong.
    pub message: String,
}

/// Renders the report; returns it and whether everything passed.
pub fn render(problems: &[HostProblem], runs: &[ConfigRun]) -> (String, bool) {
    let mut out = String::new();
    let mut ok = problems.is_empty();
    for problem in problems {
        let _ = writeln!(
            out,
            "\n=== FAILED before booting: {}\n{}",
            problem.label,
            problem.message.trim_end()
        );
    }
    for run in runs {
        for result in run.results.iter().filter(|r| r.outcome.is_failure()) {
            ok = false;
            let _ = writeln!(
                out,
                "\n=== {} [{}]: {}",
                result.label, run.name, result.outcome
            );
            let lines: Vec<&str> = result.output.lines().collect();
            let shown = &lines[lines.len().saturating_sub(40)..];
            if shown.len() < lines.len() {
                let _ = writeln!(out, "    ... ({} earlier lines)", lines.len() - shown.len());
            }
            for line in shown {
                let _ = writeln!(out, "    {line}");
            }
        }
        if let Some(why) = &run.stopped {
            ok = false;
            let path = run
                .console
                .as_ref()
                .map_or(String::new(), |p| format!(" ({})", p.display()));
            let _ = writeln!(
                out,
                "\n=== guest [{}] stopped early: {why}\n--- console tail{path}:",
                run.name
            );
            let _ = writeln!(out, "{}", run.console_tail);
        }
    }
    out.push_str(&table(runs));
    let _ = writeln!(out);
    for run in runs {
        let boot = run
            .boot_secs
            .map_or("never".to_string(), |s| format!("{s:.1}s"));
        let _ = writeln!(
            out,
            "{}: QEMU {:.1}s, /init at {boot}",
            run.name,
            run.wall.as_secs_f64()
        );
        for (key, value) in &run.facts {
            let _ = writeln!(out, "    {key}: {value}");
        }
    }
    let count = |f: fn(&Outcome) -> bool| {
        runs.iter()
            .flat_map(|r| &r.results)
            .filter(|r| f(&r.outcome))
            .count()
    };
    let _ = writeln!(
        out,
        "\nvm-rig: {} ok, {} skipped, {} ignored, {} failed or not run, {} host problems: {}",
        count(|o| *o == Outcome::Ok),
        count(|o| matches!(o, Outcome::Skipped(_))),
        count(|o| *o == Outcome::Ignored),
        count(Outcome::is_failure),
        problems.len(),
        if ok { "PASS" } else { "FAIL" }
    );
    (out, ok)
}

/// Rows are items (union over configurations, first-seen order), columns configurations.
fn table(runs: &[ConfigRun]) -> String {
    let mut labels: Vec<&str> = Vec::new();
    for result in runs.iter().flat_map(|r| &r.results) {
        if !labels.contains(&result.label.as_str()) {
            labels.push(&result.label);
        }
    }
    let mut notes: Vec<String> = Vec::new();
    let rows: Vec<Vec<String>> = labels
        .iter()
        .map(|label| {
            let mut row = vec![label.to_string()];
            for run in runs {
                let cell = match run.results.iter().find(|r| r.label == *label) {
                    None => "-".to_string(),
                    Some(result) => {
                        let mut cell = result.outcome.word().to_string();
                        if let Outcome::Skipped(why) | Outcome::NotRun(why) = &result.outcome {
                            notes.push(format!("{label} [{}]: {why}", run.name));
                            let _ = write!(cell, "[{}]", notes.len());
                        }
                        if let Some(s) = result.seconds {
                            let _ = write!(cell, " {s:.2}s");
                        }
                        cell
                    }
                };
                row.push(cell);
            }
            row
        })
        .collect();
    let header: Vec<String> = std::iter::once("test".to_string())
        .chain(runs.iter().map(|r| r.name.clone()))
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .chain([&header])
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = String::from("\n");
    out.push_str(&line(&header));
    out.push_str(&line(
        &widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>(),
    ));
    for row in &rows {
        out.push_str(&line(row));
    }
    for (i, note) in notes.iter().enumerate() {
        let _ = writeln!(out, "[{}] {note}", i + 1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(label: &str, outcome: Outcome) -> ItemResult {
        ItemResult {
            label: label.into(),
            outcome,
            seconds: Some(1.5),
            output: "out".into(),
        }
    }

    fn run(name: &str, results: Vec<ItemResult>) -> ConfigRun {
        ConfigRun {
            name: name.into(),
            results,
            stopped: None,
            wall: Duration::from_secs(9),
            boot_secs: Some(2.0),
            facts: vec![],
            console: None,
            console_tail: String::new(),
        }
    }

    #[test]
    fn skips_pass_and_failures_fail_with_their_details() {
        let runs = [
            run(
                "a",
                vec![
                    result("x", Outcome::Ok),
                    result("y", Outcome::Skipped("no iommufd".into())),
                ],
            ),
            run("b", vec![result("x", Outcome::Ok)]),
        ];
        let (text, ok) = render(&[], &runs);
        assert!(ok, "{text}");
        assert!(
            text.contains("skipped[1] 1.50s") && text.contains("[1] y [a]: no iommufd"),
            "{text}"
        );
        let row_y: Vec<&str> = text
            .lines()
            .find(|l| l.starts_with("| y "))
            .unwrap()
            .split('|')
            .map(str::trim)
            .collect();
        assert_eq!(row_y[1..4], ["y", "skipped[1] 1.50s", "-"], "{text}");

        let runs = [run(
            "a",
            vec![result("x", Outcome::Failed("panicked: boom".into()))],
        )];
        let (text, ok) = render(&[], &runs);
        assert!(!ok);
        assert!(
            text.contains("=== x [a]: FAILED (panicked: boom)\n    out"),
            "{text}"
        );
    }

    #[test]
    fn a_guest_that_stopped_early_or_a_host_problem_fails_the_run() {
        let mut stopped = run("a", vec![]);
        stopped.stopped = Some("killed".into());
        stopped.console_tail = "Kernel panic".into();
        let (text, ok) = render(&[], &[stopped]);
        assert!(!ok && text.contains("Kernel panic"), "{text}");
        let problem = HostProblem {
            label: "iommu/tests/edu".into(),
            message: "error[E0425]".into(),
        };
        let (text, ok) = render(&[problem], &[run("a", vec![result("x", Outcome::Ok)])]);
        assert!(
            !ok && text.contains("FAILED before booting: iommu/tests/edu"),
            "{text}"
        );
    }
}
