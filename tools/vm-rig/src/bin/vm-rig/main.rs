//! `vm-rig`: runs the workspace's real-kernel (`kernel_`) tests inside QEMU guests whose kernel
//! has what this machine's lacks (VFIO type1, IOMMUFD, VFIO no-IOMMU, KVM private memory, an
//! emulated IOMMU in front of a DMA-capable device). See tools/vm-rig/README.md.
mod binaries;
mod configs;
mod cpio;
mod guest;
mod host;
mod kernel;
mod manifest;
mod report;
mod results;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use binaries::{Built, Workspace};
use configs::Config;
use kernel::Kernel;
use report::{ConfigRun, HostProblem};
use results::{ItemKind, PlanItem};

/// The prefix of real-kernel test names (of the function name, the last `::` segment).
const KERNEL_TEST_FILTER: &str = "kernel_";

/// Whether a libtest name is a real-kernel test: its function name starts with `kernel_`.
/// (libtest's own filter matches anywhere, e.g. `tests::refusals_say_what_the_kernel_lacks`.)
fn is_kernel_test(name: &str) -> bool {
    name.rsplit("::")
        .next()
        .is_some_and(|f| f.starts_with(KERNEL_TEST_FILTER))
}

#[derive(Parser)]
#[command(
    about = "Runs the workspace's kernel_ tests in QEMU guests with VFIO, IOMMUFD, no-IOMMU and KVM private memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing, build the kernel and the static tests, run them in every
    /// configuration, print the summary; exits non-zero if anything failed or did not run.
    Run(RunArgs),
    /// Only build (or find in the cache) the guest kernels, and print their paths.
    Kernel {
        /// Which kernel: 6.12, 7.3 or all.
        #[arg(long, default_value = "all")]
        kernel: String,
    },
    /// Boot one configuration with a shell on this terminal (tests are in /t, plan in /etc/rig/plan).
    Shell {
        /// The configuration to boot.
        #[arg(long, default_value = "intel-type1")]
        config: String,
        /// The kernel to boot (6.12 or 7.3).
        #[arg(long, default_value = "7.3")]
        kernel: String,
        /// Guest RAM.
        #[arg(long, default_value = "1G")]
        memory: String,
    },
    /// List the configurations.
    Configs,
    /// Probe this machine's kernel features (the guest runs this too); with --strict, exit 1 when a
    /// feature GMEM_DMA_REQUIRE names is missing.
    Probe {
        /// Fail when a required feature is missing.
        #[arg(long)]
        strict: bool,
    },
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Run only this configuration (repeatable; default: all).
    #[arg(long = "config")]
    configs: Vec<String>,
    /// Run on this kernel: 6.12, 7.3 or all (every configuration boots on each).
    #[arg(long, default_value = "all")]
    kernel: String,
    /// Run only the tests and commands whose report name contains this.
    #[arg(long)]
    filter: Option<String>,
    /// Print the guests' consoles live.
    #[arg(long)]
    console: bool,
    /// Time limit for each test inside the guest, in seconds.
    #[arg(long, default_value_t = 300)]
    test_timeout: u64,
    /// Time limit from starting QEMU to the guest's /init, in seconds.
    #[arg(long, default_value_t = 180)]
    boot_timeout: u64,
    /// Guests booted at once (default: CPUs, at most the number of configurations).
    #[arg(long)]
    jobs: Option<usize>,
    /// Guest RAM.
    #[arg(long, default_value = "1G")]
    memory: String,
}

fn main() {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Cmd::Run(args) => run(&args),
        Cmd::Kernel { kernel } => host::ensure_packages()
            .and_then(|()| kernel::select(&kernel))
            .and_then(|kernels| {
                for kernel in kernels {
                    let image = kernel::ensure(&rig_dir(), kernel)?;
                    println!("{} {}", kernel.name, image.display());
                }
                Ok(true)
            }),
        Cmd::Shell {
            config,
            kernel,
            memory,
        } => shell(&config, &kernel, &memory).map(|()| true),
        Cmd::Configs => {
            for config in configs::CONFIGS {
                println!("{:<14} {}", config.name, config.summary);
                for kernel in kernel::KERNELS {
                    println!(
                        "{:<14} on {}: GMEM_DMA_REQUIRE={}",
                        "",
                        kernel.name,
                        config.require_env(kernel)
                    );
                }
            }
            Ok(true)
        }
        Cmd::Probe { strict } => Ok(probe(strict)),
    };
    match outcome {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(error) => {
            eprintln!("vm-rig: error: {error:#}");
            std::process::exit(2);
        }
    }
}

/// The vm-rig package directory (kernel.config, commands.txt, init.sh live there).
/// The vm-rig package directory of the checkout being tested. `cargo run` names it at run time;
/// the path compiled in is only the fallback for a binary started by hand. (One target
/// directory shared by two checkouts keeps one `vm-rig` binary: with the compiled-in path, a
/// `cargo run` in one checkout would build and test the other one's sources.)
fn rig_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.join("src/bin/vm-rig/main.rs").is_file())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn probe(strict: bool) -> bool {
    let mut ok = true;
    for feature in vm_rig::Feature::ALL {
        let required = if feature.required() {
            " (required)"
        } else {
            ""
        };
        match feature.probe() {
            Ok(()) => println!("{feature}: present{required}"),
            Err(why) => {
                println!("{feature}: missing{required}: {why}");
                ok &= !(strict && feature.required());
            }
        }
    }
    ok
}

/// Everything a guest runs: plan items with the host files they need.
struct Plan {
    items: Vec<(PlanItem, String)>,
    files: Vec<(String, PathBuf)>,
    /// Manifest commands with their plan item and the binary's path in the guest.
    commands: Vec<(manifest::CommandSpec, PlanItem, String)>,
}

impl Plan {
    /// `/etc/rig/plan` for one configuration.
    fn text_for(&self, config: &Config) -> String {
        let mut text = String::new();
        for (item, binary) in &self.items {
            if let ItemKind::Test { name } = &item.kind {
                text.push_str(&format!(
                    "test {} {} {binary} {name}\n",
                    item.id, item.limit_secs
                ));
            }
        }
        for (spec, item, binary) in self
            .commands
            .iter()
            .filter(|(s, _, _)| s.applies_to(config.name))
        {
            text.push_str(&format!(
                "cmd {} {} {binary} {}\n",
                item.id,
                item.limit_secs,
                spec.args.join(" ")
            ));
        }
        text
    }

    fn items_for(&self, config: &Config) -> Vec<PlanItem> {
        let tests = self.items.iter().map(|(item, _)| item.clone());
        let commands = self
            .commands
            .iter()
            .filter(|(s, _, _)| s.applies_to(config.name))
            .map(|(_, item, _)| item.clone());
        tests.chain(commands).collect()
    }
}

/// Lists the `kernel_` tests of every built binary and resolves the manifest's commands.
fn make_plan(
    built: &Built,
    filter: Option<&str>,
    limit_secs: u64,
    problems: &mut Vec<HostProblem>,
) -> Result<Plan> {
    let selected = |label: &str| filter.is_none_or(|f| label.contains(f));
    let mut plan = Plan {
        items: Vec::new(),
        files: Vec::new(),
        commands: Vec::new(),
    };
    for (index, binary) in built.tests.iter().enumerate() {
        let names = match binaries::list_tests(&binary.path, KERNEL_TEST_FILTER) {
            Ok(names) => names,
            Err(error) => {
                problems.push(HostProblem {
                    label: binary.label.clone(),
                    message: format!("{error:#}"),
                });
                continue;
            }
        };
        let guest_path = format!("/t/{index}");
        let mut any = false;
        for name in names.into_iter().filter(|n| is_kernel_test(n)) {
            let label = format!("{}::{name}", binary.label);
            if !selected(&label) {
                continue;
            }
            any = true;
            let id = format!("t{}", plan.items.len() + 1);
            plan.items.push((
                PlanItem {
                    id,
                    label,
                    kind: ItemKind::Test { name },
                    limit_secs,
                },
                guest_path.clone(),
            ));
        }
        if any {
            plan.files.push((guest_path, binary.path.clone()));
        }
    }
    // Every workspace binary goes in at its host path: tests find them through
    // env!("CARGO_BIN_EXE_<name>"), which is that absolute path.
    for path in built.bins.values() {
        plan.files.push((path.display().to_string(), path.clone()));
    }
    let names: Vec<&str> = configs::CONFIGS.iter().map(|c| c.name).collect();
    let manifest_path = rig_dir().join(manifest::FILE);
    let text = fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    for spec in manifest::parse(&text, &names)? {
        let label = format!("command {}", spec.name);
        if !selected(&label) {
            continue;
        }
        let Some(host_path) = built.bins.get(&spec.binary) else {
            let known: Vec<&str> = built.bins.keys().map(String::as_str).collect();
            problems.push(HostProblem {
                label,
                message: format!(
                    "{}: no workspace binary or example named {:?} was built (built: {})",
                    manifest::FILE,
                    spec.binary,
                    known.join(", ")
                ),
            });
            continue;
        };
        let id = format!("c{}", plan.commands.len() + 1);
        let item = PlanItem {
            id,
            label,
            kind: ItemKind::Command {
                expect: spec.expect,
            },
            limit_secs,
        };
        plan.commands
            .push((spec, item, host_path.display().to_string()));
    }
    Ok(plan)
}

/// A guest kernel ready to boot.
struct BuiltKernel {
    kernel: &'static Kernel,
    image: PathBuf,
}

fn prepare(
    kernels: &[&'static Kernel],
    filter: Option<&str>,
    limit_secs: u64,
) -> Result<(Vec<BuiltKernel>, Workspace, Plan, Vec<HostProblem>)> {
    host::ensure_packages()?;
    let workspace = Workspace::locate(&rig_dir())?;
    let mut built_kernels = Vec::new();
    for &kernel in kernels {
        let started = Instant::now();
        let image = kernel::ensure(&rig_dir(), kernel)?;
        eprintln!(
            "vm-rig: kernel {} ready after {:.0?}",
            kernel.name,
            started.elapsed()
        );
        built_kernels.push(BuiltKernel { kernel, image });
    }
    let started = Instant::now();
    let built = binaries::build(&workspace)?;
    eprintln!(
        "vm-rig: static binaries ready after {:.0?}",
        started.elapsed()
    );
    let mut problems: Vec<HostProblem> = built
        .failures
        .iter()
        .map(|f| HostProblem {
            label: format!("{} (did not compile)", f.label),
            message: f.message.clone(),
        })
        .collect();
    let mut plan = make_plan(&built, filter, limit_secs, &mut problems)?;
    strip_debug_info(
        &mut plan.files,
        &workspace.rig_target_dir().join("stripped"),
    )?;
    Ok((built_kernels, workspace, plan, problems))
}

/// Replaces each host file with a copy without debug information: the guest's initramfs shrinks
/// about tenfold (less to load and unpack under TCG), and panics still name file and line.
fn strip_debug_info(files: &mut [(String, PathBuf)], dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (index, (_, host_path)) in files.iter_mut().enumerate() {
        let name = host_path
            .file_name()
            .map_or("binary".into(), |n| n.to_string_lossy());
        let stripped = dir.join(format!("{index}-{name}"));
        let status = std::process::Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&stripped)
            .arg(&*host_path)
            .status()
            .context("running strip (binutils)")?;
        if !status.success() {
            bail!(
                "strip --strip-debug {} failed: {status}",
                host_path.display()
            );
        }
        *host_path = stripped;
    }
    Ok(())
}

fn run(args: &RunArgs) -> Result<bool> {
    let started = Instant::now();
    let configs = configs::select(&args.configs)?;
    let kernels = kernel::select(&args.kernel)?;
    let (kernels, workspace, plan, problems) =
        prepare(&kernels, args.filter.as_deref(), args.test_timeout)?;
    // Every configuration on every kernel, kernel by kernel (the report's column order).
    let selected: Vec<(&BuiltKernel, &Config)> = kernels
        .iter()
        .flat_map(|kernel| configs.iter().map(move |&config| (kernel, config)))
        .collect();
    if plan.items.is_empty() && plan.commands.is_empty() {
        bail!(
            "nothing to run: no `{KERNEL_TEST_FILTER}` test or command matches{}",
            args.filter
                .as_ref()
                .map_or(String::new(), |f| format!(" --filter {f:?}"))
        );
    }
    let busybox =
        host::static_busybox().context("no static busybox (apt-get install busybox-static)")?;
    let opts = guest::BootOptions {
        memory: args.memory.clone(),
        boot_limit: Duration::from_secs(args.boot_timeout),
        idle_limit: Duration::from_secs(args.test_timeout + 60),
        echo: args.console,
    };
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, selected.len());
    let next = AtomicUsize::new(0);
    let runs: Mutex<Vec<Option<ConfigRun>>> =
        Mutex::new((0..selected.len()).map(|_| None).collect());
    let errors: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&(kernel, config)) = selected.get(index) else {
                        break;
                    };
                    match run_config(config, kernel, &workspace, &plan, &busybox, &opts) {
                        Ok(run) => {
                            if let Ok(mut runs) = runs.lock() {
                                runs[index] = Some(run);
                            }
                        }
                        Err(error) => {
                            if let Ok(mut errors) = errors.lock() {
                                errors.push(format!(
                                    "{} {}: {error:#}",
                                    kernel.kernel.name, config.name
                                ));
                            }
                        }
                    }
                }
            });
        }
    });
    let mut problems = problems;
    for error in errors.into_inner().unwrap_or_default() {
        problems.push(HostProblem {
            label: "rig".into(),
            message: error,
        });
    }
    let runs: Vec<ConfigRun> = runs
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect();
    let (text, ok) = report::render(&problems, &runs);
    println!("{text}");
    println!("vm-rig: total {:.0?}", started.elapsed());
    Ok(ok)
}

fn run_config(
    config: &Config,
    kernel: &BuiltKernel,
    workspace: &Workspace,
    plan: &Plan,
    busybox: &Path,
    opts: &guest::BootOptions,
) -> Result<ConfigRun> {
    let workdir = workspace
        .rig_target_dir()
        .join("runs")
        .join(kernel.kernel.name)
        .join(config.name);
    fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let initrd = workdir.join("initramfs.cpio");
    let payload = guest::Payload {
        busybox,
        env: guest::env_file(config, kernel.kernel, "run"),
        plan: plan.text_for(config),
        files: &plan.files,
    };
    let size = guest::write_initramfs(&initrd, &payload)?;
    let items = plan.items_for(config);
    let column = format!("{} {}", kernel.kernel.name, config.name);
    eprintln!(
        "vm-rig: [{column}] booting: {} items, initramfs {} MiB",
        items.len(),
        size >> 20
    );
    let boot = guest::boot(config, &column, &kernel.image, &initrd, &workdir, opts)?;
    let stopped_text = boot.stopped.clone().unwrap_or_default();
    let results = results::compare(&items, &boot.log, &stopped_text);
    let failed = results.iter().filter(|r| r.outcome.is_failure()).count();
    eprintln!(
        "vm-rig: [{column}] finished in {:.1}s: {} items, {failed} failed{}",
        boot.wall.as_secs_f64(),
        results.len(),
        boot.stopped
            .as_ref()
            .map_or(String::new(), |s| format!("; {s}"))
    );
    Ok(ConfigRun {
        name: column,
        results,
        console_tail: if boot.stopped.is_some() {
            guest::tail(&boot.console, 60)
        } else {
            String::new()
        },
        stopped: boot.stopped,
        wall: boot.wall,
        boot_secs: boot.log.boot_centis.map(|c| c as f64 / 100.0),
        facts: boot.log.facts,
        console: Some(boot.console),
    })
}

fn shell(name: &str, kernel: &str, memory: &str) -> Result<()> {
    let config =
        configs::by_name(name).with_context(|| format!("no configuration named {name:?}"))?;
    let kernels = kernel::select(kernel)?;
    let [kernel] = kernels[..] else {
        bail!("the shell boots one kernel; name it (--kernel 6.12 or 7.3)");
    };
    let (kernels, workspace, plan, problems) = prepare(&[kernel], None, 300)?;
    for problem in &problems {
        eprintln!(
            "vm-rig: warning: {}: {}",
            problem.label,
            problem.message.lines().next().unwrap_or("")
        );
    }
    let busybox =
        host::static_busybox().context("no static busybox (apt-get install busybox-static)")?;
    let workdir = workspace
        .rig_target_dir()
        .join("runs")
        .join(format!("{}-{name}-shell", kernel.name));
    fs::create_dir_all(&workdir)?;
    let initrd = workdir.join("initramfs.cpio");
    let payload = guest::Payload {
        busybox: &busybox,
        env: guest::env_file(config, kernel, "shell"),
        plan: plan.text_for(config),
        files: &plan.files,
    };
    guest::write_initramfs(&initrd, &payload)?;
    guest::interactive(config, &kernels[0].image, &initrd, &workdir, memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_functions_named_kernel_are_kernel_tests() {
        assert!(is_kernel_test("kernel_type1_dma"));
        assert!(is_kernel_test("tests::kernel_struct_layouts"));
        assert!(!is_kernel_test(
            "host::tests::refusals_say_what_the_kernel_lacks"
        ));
        assert!(!is_kernel_test("kernel_tests::plain_unit_test"));
        assert!(!is_kernel_test("a_kernel_backend_is_a_usage_error"));
    }
}
