//! Conversion workloads, their trace format and QEMU's model of the same conversions, in one
//! place: `dma-map` runs these workloads and the benchmarks measure them, so a figure from one
//! and a figure from the other describe the same workload.
//!
//! A workload is what a guest asks of its VMM: a list of timestamped requests to make a range of
//! guest RAM shared or private, over a region whose pages all start private; a virtio-mem
//! workload also plugs and unplugs blocks of the region, part of which starts unplugged.
//! Everything here is pure and deterministic: the same parameters and seed give the same
//! requests on every machine.
//!
//! - the generators ([`firmware_bounce`], [`linux_boot`], [`random_mixed`], [`bounce_in_flight`],
//!   [`virtio_mem`]);
//! - [`Replay`], the model of what the requests do (which are refused, what ends shared and
//!   unplugged), and [`final_shared`], the oracle of a run's final state;
//! - [`trace`]: the text format `dma-map --trace` reads and `--save-trace` writes;
//! - [`RamBlockAttributes`]: QEMU's per-granule bitmap of the same conversions, the baseline the
//!   benchmarks compare the project with;
//! - [`Rng`], the one random number generator the generators draw from.
//!
//! The crate depends on nothing, so every crate of the workspace can use it in its benchmarks.
#![forbid(unsafe_code)]

mod generate;
mod qemu;
mod replay;
mod rng;
pub mod trace;

use std::fmt;

pub use generate::{
    BounceArea, BounceInFlight, FirmwareBounce, GenError, LinuxBoot, VIRTIO_MEM_BLOCK, VirtioMem,
    bounce_in_flight, firmware_bounce, linux_boot, random_mixed, swiotlb_pool_size, virtio_mem,
};
pub use qemu::{ModelError, RamBlockAttributes};
pub use replay::{Extents, Outcome, Replay, final_shared};
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

/// What a request asks the VMM to do with its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// The guest converts the range to this attribute (a memory fault or a MAP_GPA_RANGE
    /// hypercall). Refused when the range holds unplugged memory: the guest was not given it.
    Convert(Target),
    /// The VMM plugs the unplugged memory of the range (virtio-mem), which takes this attribute;
    /// memory already plugged keeps its own.
    Plug(Target),
    /// The VMM unplugs the range (virtio-mem): its memory is no longer the guest's.
    Unplug,
}

impl fmt::Display for Action {
    /// The request's word in the trace format.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Convert(to) => write!(f, "{to}"),
            Action::Plug(to) => write!(f, "plug-{to}"),
            Action::Unplug => f.write_str("unplug"),
        }
    }
}

/// One request: at `time_ns`, do `action` to `[gpa, gpa + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// When the guest asked, in nanoseconds from the start of the workload (informational: runs
    /// go as fast as the engine allows).
    pub time_ns: u64,
    /// What is asked.
    pub action: Action,
    /// First guest-physical address, relative to the region base.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Request {
    /// The attribute a conversion asks for; `None` for a plug or an unplug.
    pub fn conversion(&self) -> Option<Target> {
        match self.action {
            Action::Convert(to) => Some(to),
            Action::Plug(_) | Action::Unplug => None,
        }
    }
}

/// A named list of requests over a region whose pages all start private, and plugged but for
/// `unplugged_at_start`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// What produced it (generator name and parameters, or the trace file).
    pub name: String,
    /// Bytes of guest RAM the requests address; every request lies inside `[0, region_size)`.
    pub region_size: u64,
    /// Extents `[start, end)` of the region that start unplugged (a virtio-mem device's memory
    /// not yet given to the guest), in address order; empty for ordinary RAM.
    pub unplugged_at_start: Vec<(u64, u64)>,
    /// The requests, in time order.
    pub requests: Vec<Request>,
}

impl Workload {
    /// The extents `[start, end)` plugged at the start: the region but `unplugged_at_start`.
    pub fn plugged_at_start(&self) -> Vec<(u64, u64)> {
        let mut plugged = Extents::default();
        plugged.insert(0, self.region_size);
        for &(start, end) in &self.unplugged_at_start {
            plugged.remove(start, end);
        }
        plugged.to_vec()
    }

    /// True when the workload plugs or unplugs memory, or starts with some unplugged.
    pub fn plugs(&self) -> bool {
        !self.unplugged_at_start.is_empty()
            || self.requests.iter().any(|r| r.conversion().is_none())
    }
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
