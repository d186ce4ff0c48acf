//! `dma-map`: probe a host for guest_memfd and device-DMA support, map memory for a device, and
//! run and measure guest_memfd shared/private conversion workloads with their IOMMU mappings.
//!
//! The tool is a thin layer over the workspace's libraries (`gmem-dma`, `iommu`,
//! `discard-manager`): the modules here parse arguments ([`cli`]), generate and parse workloads
//! ([`workload`], [`trace`]), measure ([`stats`]) and print ([`report`]); the commands ([`cmd`])
//! only call the libraries. Errors are `anyhow` sentences classified into exit codes ([`exit`]).
mod bench;
mod checks;
mod cli;
mod cmd;
mod exit;
mod report;
mod setup;
mod stats;
mod units;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_micros()
        .init();
}

fn dispatch(cli: &Cli) -> anyhow::Result<bool> {
    match &cli.command {
        Some(Command::Probe) => {
            let p = cmd::probe::probe();
            if cli.json {
                println!("{}", report::json(&p));
            } else {
                print!("{}", cmd::probe::render(&p));
            }
            Ok(true)
        }
        Some(Command::Map(args)) => {
            let s = cmd::map::run(args)?;
            if cli.json {
                println!("{}", report::json(&s));
            } else {
                print!("{}", cmd::map::render(&s));
            }
            if !s.ok() {
                return Err(exit::error(
                    exit::Class::Failed,
                    "the device test failed: the mapping does not behave as the IOMMU should (see the FAIL lines)",
                ));
            }
            Ok(true)
        }
        Some(Command::Run(args)) => {
            let w = cmd::run::load_workload(&args.workload, args.setup.region_size)?;
            let s = cmd::run::run_workload(
                &w,
                &args.setup,
                args.setup.backend,
                args.policy,
                !args.no_progress && !cli.json,
            )?;
            if cli.json {
                println!("{}", report::json(&s));
            } else {
                print!("{}", report::render_run(&s));
            }
            finished(&s)
        }
        Some(Command::Compare(args)) => {
            let w = cmd::run::load_workload(&args.workload, args.setup.region_size)?;
            let backends = if args.backends.is_empty() {
                vec![args.setup.backend]
            } else {
                args.backends.clone()
            };
            let c = cmd::compare::compare(
                &w,
                &args.setup,
                &backends,
                &args.policies,
                !args.no_progress && !cli.json,
            )?;
            if cli.json {
                println!("{}", report::json(&c));
            } else {
                print!("{}", cmd::compare::render(&c));
            }
            for r in &c.runs {
                finished(r)?;
            }
            Ok(true)
        }
        None => {
            let job = cmd::main_job::run(!cli.json)?;
            if cli.json {
                println!("{}", report::json(&job));
            } else {
                print!("{}", cmd::main_job::render(&job));
            }
            finished(&job.run)?;
            for r in &job.compare.runs {
                finished(r)?;
            }
            Ok(true)
        }
    }
}

/// A finished run: exit 1 with a sentence when it stopped early or a check failed.
fn finished(s: &report::RunSummary) -> anyhow::Result<bool> {
    if let Some(f) = &s.failure {
        return Err(exit::error(
            exit::Class::Failed,
            format!("the workload stopped: {f}"),
        ));
    }
    if !s.ok() {
        return Err(exit::error(
            exit::Class::Failed,
            "an invariant check failed (see the FAIL lines above); rerun with -vv for the library's log",
        ));
    }
    Ok(true)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match dispatch(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(exit::Class::Failed.code()),
        Err(e) => {
            log::debug!("{e:?}");
            eprintln!("dma-map: error: {e:#}");
            ExitCode::from(exit::code_of(&e))
        }
    }
}
