//! What a worker does with a batch: merge, convert chunk by chunk, answer each request.

use std::sync::atomic::Ordering;

use discard_manager::{Attribute, GpaRange};

use super::ticket::{Completed, QueueError, Slot};
use super::{Lane, Shared};
use crate::conversion::ConversionError;
use crate::policy::HeldBack;
use crate::ram::GuestRam;

type Job = std::sync::Arc<Slot>;

/// Why a chunked conversion stopped early.
enum Stop {
    Failed(Box<ConversionError>),
    Cancelled,
    Paused,
}

/// Runs one batch: consecutive same-direction requests are merged where they overlap or touch.
pub(super) fn run_batch(shared: &Shared, lane: &Lane, batch: Vec<Job>) {
    let mut rest = batch.into_iter().filter(|j| j.claim()).peekable();
    while let Some(first) = rest.next() {
        let to = first.request.to;
        let mut group = vec![first];
        while let Some(job) = rest.next_if(|j| j.request.to == to) {
            group.push(job);
        }
        group.sort_by_key(|j| j.request.range.start());
        let mut merged: Vec<(GpaRange, Vec<Job>)> = Vec::new();
        for job in group {
            let r = job.request.range;
            match merged.last_mut() {
                Some((span, jobs)) if r.start() <= span.end() => {
                    let end = span.end().max(r.end());
                    if let Some(grown) = GpaRange::new(span.start(), end - span.start()) {
                        *span = grown;
                    }
                    jobs.push(job);
                }
                _ => merged.push((r, vec![job])),
            }
        }
        for (span, jobs) in merged {
            run_merged(shared, lane, span, to, jobs);
        }
    }
}

/// What the chunks of one group changed so far, and the held-back backing after the last.
#[derive(Default)]
struct Progress {
    changed: Vec<GpaRange>,
    held: HeldBack,
}

fn run_merged(shared: &Shared, lane: &Lane, span: GpaRange, to: Attribute, jobs: Vec<Job>) {
    let mut progress = Progress::default();
    let stop = || stop_reason(shared, &jobs);
    let outcome = convert_chunked(shared, lane, span, to, &mut progress, stop);
    let (merged_at, why) = match outcome {
        Ok(()) => {
            for job in &jobs {
                answer(shared, job, Ok(completed(job, &progress)));
            }
            return;
        }
        Err(stopped) => stopped,
    };
    match why {
        Stop::Paused => {
            for job in &jobs {
                let converted = prefix(job.request.range, merged_at);
                answer(shared, job, Err(QueueError::Paused { converted }));
            }
            return;
        }
        why if jobs.len() == 1 => {
            let job = &jobs[0];
            let converted = prefix(job.request.range, merged_at);
            answer(shared, job, Err(stopped(job, converted, why)));
            return;
        }
        Stop::Failed(e) => {
            log::debug!(
                "merged conversion of {span} failed ({e}); running its requests one by one"
            );
        }
        Stop::Cancelled => {}
    }
    // One by one: chunks the merged attempt converted ([span start, merged_at)) are converted
    // again at no cost (they already have the attribute), and count in each request's prefix.
    for job in &jobs {
        let range = job.request.range;
        let own = || stop_reason(shared, std::slice::from_ref(job));
        let result = match convert_chunked(shared, lane, range, to, &mut progress, own) {
            Ok(()) => Ok(completed(job, &progress)),
            Err((at, why)) => {
                let converted = prefix(range, at).max(prefix(range, merged_at));
                Err(stopped(job, converted, why))
            }
        };
        answer(shared, job, result);
    }
}

/// Why `jobs` must stop before their next chunk, if they must: a pause, or a cancel of one.
fn stop_reason(shared: &Shared, jobs: &[Job]) -> Option<Stop> {
    if shared.paused.load(Ordering::Acquire) {
        Some(Stop::Paused)
    } else if jobs.iter().any(|j| j.stop_requested()) {
        Some(Stop::Cancelled)
    } else {
        None
    }
}

/// Converts `range` chunk by chunk (each all or nothing, the region's lock released between
/// them), checking `stop` before each. On an early stop, returns where it stopped (every byte
/// of `range` below it converted) and why.
fn convert_chunked(
    shared: &Shared,
    lane: &Lane,
    range: GpaRange,
    to: Attribute,
    progress: &mut Progress,
    stop: impl Fn() -> Option<Stop>,
) -> Result<(), (u64, Stop)> {
    let ram: &GuestRam = &shared.ram;
    if !lane.region.contains(&range) {
        // Not inside this lane's region: one unchunked call, which names the problem.
        shared.transactions.fetch_add(1, Ordering::Relaxed);
        return ram
            .convert(range, to)
            .map(|c| record(progress, &c))
            .map_err(|e| (range.start(), Stop::Failed(Box::new(e))));
    }
    let mut at = range.start();
    while at < range.end() {
        if let Some(why) = stop() {
            return Err((at, why));
        }
        let boundary = (at / lane.chunk)
            .checked_add(1)
            .and_then(|n| n.checked_mul(lane.chunk))
            .unwrap_or(range.end());
        let end = boundary.min(range.end());
        let Some(chunk) = GpaRange::new(at, end - at) else {
            break;
        };
        shared.transactions.fetch_add(1, Ordering::Relaxed);
        match ram.convert(chunk, to) {
            Ok(c) => record(progress, &c),
            Err(e) => return Err((at, Stop::Failed(Box::new(e)))),
        }
        at = end;
    }
    Ok(())
}

fn record(progress: &mut Progress, c: &crate::conversion::Conversion) {
    progress.changed.extend_from_slice(c.runs());
    progress.held = c.held;
}

/// Bytes of `range` below `at`.
fn prefix(range: GpaRange, at: u64) -> u64 {
    at.clamp(range.start(), range.end()) - range.start()
}

/// The runs `progress` changed inside the job's range, sorted and merged where they touch.
fn completed(job: &Job, progress: &Progress) -> Completed {
    let range = job.request.range;
    let mut runs: Vec<GpaRange> = progress
        .changed
        .iter()
        .filter_map(|r| r.intersect(&range))
        .collect();
    runs.sort_by_key(GpaRange::start);
    let mut merged: Vec<GpaRange> = Vec::with_capacity(runs.len());
    for r in runs {
        match merged.last_mut() {
            Some(last) if r.start() <= last.end() => {
                let end = last.end().max(r.end());
                if let Some(grown) = GpaRange::new(last.start(), end - last.start()) {
                    *last = grown;
                }
            }
            _ => merged.push(r),
        }
    }
    Completed {
        request: job.request,
        runs: merged,
        held: progress.held,
    }
}

fn stopped(job: &Job, converted: u64, why: Stop) -> QueueError {
    match why {
        Stop::Cancelled => QueueError::Cancelled { converted },
        Stop::Paused => QueueError::Paused { converted },
        Stop::Failed(source) => QueueError::Conversion {
            request: job.request,
            converted,
            source,
        },
    }
}

fn answer(shared: &Shared, job: &Job, answer: super::Answer) {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    // A job cancelled while running was answered by nobody yet: this is its answer.
    job.answer(answer);
}
