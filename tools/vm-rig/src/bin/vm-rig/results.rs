//! Reading what the guest reported, and judging it against what was planned.
//!
//! The guest's `/init` writes marker lines on its second serial port (see `init.sh`); the host
//! knows the plan (every `kernel_` test it listed, every command from the manifest), so a test
//! that crashed its binary, hung, or never started is a failure, never a silent absence.

use std::collections::BTreeMap;
use std::fmt;

/// What became of one planned item in one configuration.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Passed.
    Ok,
    /// Returned early through `vm_rig::need`: the reason it printed.
    Skipped(String),
    /// Marked `#[ignore]`.
    Ignored,
    /// Failed: a short reason (panic message, exit status).
    Failed(String),
    /// Killed after running out of its time limit.
    TimedOut,
    /// Never reported a result: why.
    NotRun(String),
}

impl Outcome {
    /// Whether this outcome makes the run fail.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Outcome::Failed(_) | Outcome::TimedOut | Outcome::NotRun(_)
        )
    }

    /// The short word used in the table.
    pub fn word(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Skipped(_) => "skipped",
            Outcome::Ignored => "ignored",
            Outcome::Failed(_) => "FAILED",
            Outcome::TimedOut => "TIMEOUT",
            Outcome::NotRun(_) => "NOT RUN",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Skipped(why) | Outcome::Failed(why) | Outcome::NotRun(why) => {
                write!(f, "{} ({why})", self.word())
            }
            _ => f.write_str(self.word()),
        }
    }
}

/// One item's record from the guest.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Finished {
    /// Exit status as the guest shell saw it (128 + N for signal N).
    pub exit: i32,
    /// Run time in hundredths of a second.
    pub centis: u64,
    /// Everything it printed (stdout and stderr).
    pub output: String,
}

/// Everything the guest reported on its result port.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GuestLog {
    /// When `/init` started, in hundredths of a second since the kernel booted.
    pub boot_centis: Option<u64>,
    /// `FACT` lines: what this guest offers.
    pub facts: Vec<(String, String)>,
    /// Items that ended, by id.
    pub finished: BTreeMap<String, Finished>,
    /// An item that started but never ended (the guest died or was killed): id and output so far.
    pub unfinished: Option<(String, String)>,
    /// `/init` got through the whole plan.
    pub done: bool,
}

const MARK: &str = "@@RIG ";

/// Parses the result port's text. Markers are found anywhere in a line (output without a final
/// newline may run into them); carriage returns from the tty are dropped.
pub fn parse_log(text: &str) -> GuestLog {
    let mut log = GuestLog::default();
    let mut current: Option<(String, String)> = None;
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r');
        let Some(at) = line.find(MARK) else {
            if let Some((_, output)) = current.as_mut() {
                output.push_str(line);
                output.push('\n');
            }
            continue;
        };
        if let Some((_, output)) = current.as_mut()
            && at > 0
        {
            output.push_str(&line[..at]);
            output.push('\n');
        }
        let mut words = line[at + MARK.len()..].split_whitespace();
        match words.next() {
            Some("BOOT") => log.boot_centis = words.next().and_then(|w| w.parse().ok()),
            Some("FACT") => {
                let key = words.next().unwrap_or_default().to_string();
                log.facts.push((key, words.collect::<Vec<_>>().join(" ")));
            }
            Some("START") => {
                current = Some((words.next().unwrap_or_default().to_string(), String::new()))
            }
            Some("END") => {
                let (id, exit, centis) = (words.next(), words.next(), words.next());
                let (Some(id), Some(exit), Some(centis)) = (id, exit, centis) else {
                    continue;
                };
                let output = match current.take() {
                    Some((started, output)) if started == id => output,
                    other => {
                        current = other;
                        String::new()
                    }
                };
                let finished = Finished {
                    exit: exit.parse().unwrap_or(-1),
                    centis: centis.parse().unwrap_or(0),
                    output: output.trim_end().to_string(),
                };
                log.finished.insert(id.to_string(), finished);
            }
            Some("DONE") => log.done = true,
            _ => {}
        }
    }
    log.unfinished = current;
    log
}

/// What a planned item is.
#[derive(Clone, Debug, PartialEq)]
pub enum ItemKind {
    /// One libtest test, run alone by its exact name.
    Test {
        /// Its full libtest name.
        name: String,
    },
    /// A manifest command.
    Command {
        /// The exit status that means success.
        expect: i32,
    },
}

/// One thing the guest is to run.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanItem {
    /// Short id used on the wire (`t3`, `c1`).
    pub id: String,
    /// The report's row name.
    pub label: String,
    /// Test or command.
    pub kind: ItemKind,
    /// Time limit inside the guest, seconds.
    pub limit_secs: u64,
}

/// One planned item's result.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemResult {
    /// The report's row name.
    pub label: String,
    /// What happened.
    pub outcome: Outcome,
    /// Run time in seconds where it ran.
    pub seconds: Option<f64>,
    /// Its output (for failure details).
    pub output: String,
}

/// Judges every planned item against the guest's log. `stopped` says why the guest ended early
/// when it did not report `DONE` (e.g. "guest timed out", "kernel panic").
pub fn compare(plan: &[PlanItem], log: &GuestLog, stopped: &str) -> Vec<ItemResult> {
    plan.iter()
        .map(|item| {
            let (outcome, seconds, output) = match log.finished.get(&item.id) {
                Some(done) => (
                    judge(item, done),
                    Some(done.centis as f64 / 100.0),
                    done.output.clone(),
                ),
                None => match &log.unfinished {
                    Some((id, output)) if *id == item.id => (
                        Outcome::Failed(format!("did not finish: {stopped}")),
                        None,
                        output.clone(),
                    ),
                    _ if log.done => (
                        Outcome::NotRun("the guest never started it".into()),
                        None,
                        String::new(),
                    ),
                    _ => (
                        Outcome::NotRun(format!("the guest stopped before it: {stopped}")),
                        None,
                        String::new(),
                    ),
                },
            };
            ItemResult {
                label: item.label.clone(),
                outcome,
                seconds,
                output,
            }
        })
        .collect()
}

/// Judges one finished item.
pub fn judge(item: &PlanItem, done: &Finished) -> Outcome {
    const SIGKILL_STATUS: i32 = 128 + 9;
    if done.exit == SIGKILL_STATUS && done.centis + 100 >= item.limit_secs * 100 {
        return Outcome::TimedOut;
    }
    match &item.kind {
        ItemKind::Command { expect } if done.exit == *expect => Outcome::Ok,
        ItemKind::Command { expect } => Outcome::Failed(format!(
            "{}, expected {expect}",
            exit_description(done.exit)
        )),
        ItemKind::Test { name } => judge_test(name, done),
    }
}

fn judge_test(name: &str, done: &Finished) -> Outcome {
    const LIBTEST_FAILED: i32 = 101;
    match done.exit {
        0 => {
            let Some((passed, ignored)) = summary_counts(&done.output) else {
                return Outcome::Failed("exited 0 without a libtest summary".into());
            };
            if passed == 1 {
                // With --nocapture, need()'s line lands after libtest's `test <name> ... `.
                let skipped = done
                    .output
                    .lines()
                    .find_map(|l| Some(&l[l.find("SKIPPED ")? + 8..]));
                match skipped {
                    Some(rest) => Outcome::Skipped(
                        rest.split_once(": ")
                            .map_or(rest, |(_, why)| why)
                            .to_string(),
                    ),
                    None => Outcome::Ok,
                }
            } else if ignored == 1 {
                Outcome::Ignored
            } else {
                Outcome::NotRun(format!(
                    "the test binary has no test named exactly {name:?}"
                ))
            }
        }
        LIBTEST_FAILED => {
            Outcome::Failed(panic_message(&done.output).unwrap_or_else(|| "test failed".into()))
        }
        other => Outcome::Failed(exit_description(other)),
    }
}

/// `passed` and `ignored` from libtest's `test result: ok. 1 passed; 0 failed; 0 ignored; ...`.
fn summary_counts(output: &str) -> Option<(u32, u32)> {
    let line = output
        .lines()
        .rev()
        .find(|l| l.starts_with("test result: "))?;
    let count = |what: &str| {
        line.split(';').find_map(|part| {
            part.trim()
                .strip_suffix(what)?
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
    };
    Some((count(" passed")?, count(" ignored")?))
}

/// The panic message of a failed test (the line after `panicked at <location>:`).
fn panic_message(output: &str) -> Option<String> {
    let mut lines = output.lines();
    lines.find(|l| l.contains("panicked at "))?;
    let message = lines.next()?.trim();
    let mut short: String = message.chars().take(200).collect();
    if short.len() < message.len() {
        short.push('…');
    }
    Some(format!("panicked: {short}"))
}

fn exit_description(exit: i32) -> String {
    match exit {
        129..=191 => {
            let signal = exit - 128;
            let name = match signal {
                4 => " SIGILL",
                6 => " SIGABRT",
                7 => " SIGBUS",
                9 => " SIGKILL",
                11 => " SIGSEGV",
                _ => "",
            };
            format!("killed by signal {signal}{name}")
        }
        127 => "exit status 127 (binary not found or not runnable in the guest)".into(),
        n => format!("exit status {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_item(id: &str, name: &str) -> PlanItem {
        PlanItem {
            id: id.into(),
            label: format!("pkg::{name}"),
            kind: ItemKind::Test { name: name.into() },
            limit_secs: 60,
        }
    }

    const PASS: &str = "running 1 test\ntest kernel_a ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 3 filtered out; finished in 0.01s";

    #[test]
    fn markers_are_parsed_even_when_output_runs_into_them() {
        let text = "junk before boot\r\n@@RIG BOOT 123\r\n@@RIG FACT edu 0000:00:03.0\r\n@@RIG FACT dev-vfio 0 devices vfio \r\n\
                    @@RIG START t1\r\nline one\r\nno newline@@RIG END t1 0 42\r\n@@RIG START t2\r\npartial\r\n";
        let log = parse_log(text);
        assert_eq!(log.boot_centis, Some(123));
        assert_eq!(
            log.facts,
            [
                ("edu".into(), "0000:00:03.0".into()),
                ("dev-vfio".into(), "0 devices vfio".into())
            ]
        );
        assert_eq!(
            log.finished["t1"],
            Finished {
                exit: 0,
                centis: 42,
                output: "line one\nno newline".into()
            }
        );
        assert_eq!(log.unfinished, Some(("t2".into(), "partial\n".into())));
        assert!(!log.done);
    }

    #[test]
    fn passing_skipping_and_ignored_tests_are_told_apart() {
        let item = test_item("t1", "kernel_a");
        let done = |output: &str| Finished {
            exit: 0,
            centis: 5,
            output: output.into(),
        };
        assert_eq!(judge(&item, &done(PASS)), Outcome::Ok);
        let skipped = format!(
            "running 1 test\ntest kernel_a ... SKIPPED kernel_a: iommufd: /dev/iommu does not exist\nok\n{PASS}"
        );
        assert_eq!(
            judge(&item, &done(&skipped)),
            Outcome::Skipped("iommufd: /dev/iommu does not exist".into())
        );
        let alone = format!("running 1 test\nSKIPPED kernel_a: edu: none\n{PASS}");
        assert_eq!(
            judge(&item, &done(&alone)),
            Outcome::Skipped("edu: none".into())
        );
        let ignored = "running 1 test\ntest kernel_a ... ignored\n\ntest result: ok. 0 passed; 0 failed; 1 ignored; 0 measured";
        assert_eq!(judge(&item, &done(ignored)), Outcome::Ignored);
        let none = "running 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 4 filtered out";
        assert!(matches!(judge(&item, &done(none)), Outcome::NotRun(_)));
        assert!(matches!(judge(&item, &done("")), Outcome::Failed(_)));
    }

    #[test]
    fn failures_crashes_and_timeouts_are_failures_with_reasons() {
        let item = test_item("t1", "kernel_a");
        let panicked = Finished {
            exit: 101,
            centis: 3,
            output: "running 1 test\n\nthread 'kernel_a' panicked at src/x.rs:1:2:\nGMEM_DMA_REQUIRE requires edu\nnote: ...".into(),
        };
        assert_eq!(
            judge(&item, &panicked),
            Outcome::Failed("panicked: GMEM_DMA_REQUIRE requires edu".into())
        );
        let segv = Finished {
            exit: 139,
            centis: 3,
            output: String::new(),
        };
        assert_eq!(
            judge(&item, &segv),
            Outcome::Failed("killed by signal 11 SIGSEGV".into())
        );
        let killed = Finished {
            exit: 137,
            centis: 6000,
            output: String::new(),
        };
        assert_eq!(judge(&item, &killed), Outcome::TimedOut);
        let oom_killed = Finished {
            exit: 137,
            centis: 100,
            output: String::new(),
        };
        assert!(
            matches!(judge(&item, &oom_killed), Outcome::Failed(_)),
            "a quick SIGKILL is no timeout"
        );
        for outcome in [
            judge(&item, &panicked),
            judge(&item, &segv),
            Outcome::TimedOut,
        ] {
            assert!(outcome.is_failure());
        }
    }

    #[test]
    fn commands_pass_only_with_their_expected_status() {
        let item = PlanItem {
            id: "c1".into(),
            label: "cmd".into(),
            kind: ItemKind::Command { expect: 2 },
            limit_secs: 9,
        };
        assert_eq!(
            judge(
                &item,
                &Finished {
                    exit: 2,
                    ..Finished::default()
                }
            ),
            Outcome::Ok
        );
        assert_eq!(
            judge(
                &item,
                &Finished {
                    exit: 0,
                    ..Finished::default()
                }
            ),
            Outcome::Failed("exit status 0, expected 2".into())
        );
    }

    #[test]
    fn planned_items_without_a_result_are_failures() {
        let plan = [
            test_item("t1", "a"),
            test_item("t2", "b"),
            test_item("t3", "c"),
        ];
        let text = format!(
            "@@RIG BOOT 1\n@@RIG START t1\n{PASS}\n@@RIG END t1 0 7\n@@RIG START t2\nhalf\n"
        );
        let results = compare(&plan, &parse_log(&text), "guest timed out");
        assert_eq!(results[0].outcome, Outcome::Ok);
        assert_eq!(results[0].seconds, Some(0.07));
        assert_eq!(
            results[1].outcome,
            Outcome::Failed("did not finish: guest timed out".into())
        );
        assert_eq!(results[1].output, "half\n");
        assert_eq!(
            results[2].outcome,
            Outcome::NotRun("the guest stopped before it: guest timed out".into())
        );
        assert!(results[1..].iter().all(|r| r.outcome.is_failure()));
    }

    #[test]
    fn a_guest_that_finished_but_skipped_an_item_is_still_a_failure() {
        let plan = [test_item("t1", "a")];
        let results = compare(&plan, &parse_log("@@RIG BOOT 1\n@@RIG DONE\n"), "");
        assert!(results[0].outcome.is_failure());
    }
}
