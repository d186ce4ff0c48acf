//! Conversion workloads, their trace format and QEMU's model of the same conversions, in one
//! place: `dma-map` runs these workloads and the benchmarks measure them, so a figure from one
//! and a figure from the other describe the same workload.
//!
//! A workload is what a guest asks of its VMM: a list of timestamped requests to make a range of
//! guest RAM shared or private, over a region whose pages all start private. Everything here is
//! pure and deterministic: the same parameters and seed give the same requests on every machine.
//!
//! - the generators ([`firmware_bounce`], [`linux_boot`], [`random_mixed`], [`bounce_in_flight`])
//!   and the oracle of their final state ([`final_shared`]);
//! - [`trace`]: the text format `dma-map --trace` reads and `--save-trace` writes;
//! - [`RamBlockAttributes`]: QEMU's per-granule bitmap of the same conversions, the baseline the
//!   benchmarks compare the project with;
//! - [`Rng`], the one random number generator the generators draw from.
//!
//! The crate depends on nothing, so every crate of the workspace can use it in its benchmarks.
#![forbid(unsafe_code)]

mod generate;
mod qemu;
mod rng;
pub mod trace;

use std::fmt;

pub use generate::{
    BounceArea, BounceInFlight, FirmwareBounce, GenError, LinuxBoot, bounce_in_flight,
    final_shared, firmware_bounce, linux_boot, random_mixed, swiotlb_pool_size,
};
pub use qemu::{ModelError, RamBlockAttributes};
pub use rng::Rng;

/// The base page size every request is a multiple of.
pub const PAGE: u64 = 4096;

/// The attribute a request asks a range to have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// Convert to shared (host-visible, device-DMA-able).
    Shared,
    /// Convert to private.
    Private,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Shared => "shared",
            Target::Private => "private",
        })
    }
}

/// One conversion request: at `time_ns`, make `[gpa, gpa + len)` `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// When the guest asked, in nanoseconds from the start of the workload (informational: runs
    /// go as fast as the engine allows).
    pub time_ns: u64,
    /// The attribute asked for.
    pub to: Target,
    /// First guest-physical address, relative to the region base.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A named list of requests over a region whose pages all start private.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// What produced it (generator name and parameters, or the trace file).
    pub name: String,
    /// Bytes of guest RAM the requests address; every request lies inside `[0, region_size)`.
    pub region_size: u64,
    /// The requests, in time order.
    pub requests: Vec<Request>,
}

/// A byte count that prints with a binary unit (`64 MiB`, `4 KiB`, `1.5 GiB`): how workload
/// names, errors and `dma-map`'s reports write sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut unit = 0;
        let mut whole = self.0;
        while whole >= 1024 && unit + 1 < UNITS.len() {
            whole /= 1024;
            unit += 1;
        }
        let scale = 1u64 << (10 * unit);
        if self.0 % scale == 0 {
            write!(f, "{} {}", self.0 / scale, UNITS[unit])
        } else {
            write!(f, "{:.1} {}", self.0 as f64 / scale as f64, UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_print_with_the_largest_whole_unit() {
        assert_eq!(Bytes(64 << 20).to_string(), "64 MiB");
        assert_eq!(Bytes(4096).to_string(), "4 KiB");
        assert_eq!(Bytes(1536 << 20).to_string(), "1.5 GiB");
        assert_eq!(Bytes(100).to_string(), "100 B");
    }
}
