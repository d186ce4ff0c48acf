//! `dma-map`: probe a host for guest_memfd and device-DMA support, map memory for a device, and
//! run and measure guest_memfd shared/private conversion workloads with their IOMMU mappings.
//!
//! The tool is a thin layer over the workspace's libraries (`gmem-dma`, `iommu`,
//! `discard-manager`): the modules here parse arguments ([`cli`]), generate and parse workloads
//! ([`workload`], [`trace`]), measure ([`stats`]) and print ([`report`]); the commands only call
//! the libraries. Errors are `anyhow` sentences classified into exit codes ([`exit`]).
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks, missing_docs)]

mod cli;
mod exit;
mod report;
mod stats;
mod trace;
mod units;
mod workload;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let _ = cli;
    ExitCode::SUCCESS
}
