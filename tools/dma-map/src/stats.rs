//! Latency samples and their percentiles.
//!
//! Workloads are at most a few million requests, so every sample is kept (8 bytes each) and the
//! percentiles are exact (nearest rank), not estimated from buckets.

use std::time::Duration;

use serde::Serialize;

/// Latencies of individual conversions, in nanoseconds.
#[derive(Clone, Debug, Default)]
pub struct Latencies {
    samples_ns: Vec<u64>,
}

/// Percentiles of a set of latencies, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50_ns: u64,
    /// 90th percentile.
    pub p90_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// Slowest.
    pub max_ns: u64,
    /// Arithmetic mean.
    pub mean_ns: u64,
}

impl Latencies {
    /// Room for `n` samples.
    pub fn with_capacity(n: usize) -> Self {
        Latencies {
            samples_ns: Vec::with_capacity(n),
        }
    }

    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        self.samples_ns
            .push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Nearest-rank percentiles (all zero without samples).
    pub fn percentiles(&self) -> Percentiles {
        let mut sorted = self.samples_ns.clone();
        sorted.sort_unstable();
        let Some(&max_ns) = sorted.last() else {
            return Percentiles::default();
        };
        let n = sorted.len();
        // Nearest rank: the smallest sample with at least p % of the samples at or below it.
        let rank = |p: usize| sorted[(n * p).div_ceil(100).max(1) - 1];
        let sum: u128 = sorted.iter().map(|&s| u128::from(s)).sum();
        Percentiles {
            count: n as u64,
            p50_ns: rank(50),
            p90_ns: rank(90),
            p99_ns: rank(99),
            max_ns,
            mean_ns: u64::try_from(sum / n as u128).unwrap_or(u64::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(ns: impl IntoIterator<Item = u64>) -> Percentiles {
        let mut l = Latencies::default();
        for n in ns {
            l.record(Duration::from_nanos(n));
        }
        l.percentiles()
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let p = of((1..=100).rev());
        assert_eq!(
            (p.count, p.p50_ns, p.p90_ns, p.p99_ns, p.max_ns, p.mean_ns),
            (100, 50, 90, 99, 100, 50)
        );
        let p = of([10, 1000]);
        assert_eq!(
            (p.p50_ns, p.p90_ns, p.p99_ns, p.max_ns),
            (10, 1000, 1000, 1000)
        );
    }

    #[test]
    fn one_slow_outlier_shows_in_max_and_p99_only_when_frequent_enough() {
        let p = of(std::iter::repeat_n(100, 999).chain([1_000_000]));
        assert_eq!((p.p50_ns, p.p99_ns, p.max_ns), (100, 100, 1_000_000));
    }

    #[test]
    fn no_samples_gives_zeros() {
        assert_eq!(of([]), Percentiles::default());
    }
}
