//! Packing the guest's initramfs and booting it in QEMU under a watchdog.
//!
//! The watchdog is what keeps a hung guest from hanging CI: the guest must reach `/init` within
//! the boot limit, and then report progress on its result port at least once per idle limit
//! (each plan item has its own, shorter, limit inside the guest). Either way, QEMU is killed and
//! the report shows the console.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::configs::Config;
use crate::cpio::Archive;
use crate::kernel::Kernel;
use crate::results::{GuestLog, parse_log};

/// The guest's `/init`, kept as a shell script beside this crate.
pub const INIT_SCRIPT: &str = include_str!("../../../init.sh");

/// What goes into one initramfs.
pub struct Payload<'a> {
    /// The static busybox on the host.
    pub busybox: &'a Path,
    /// `/etc/rig/env`: shell assignments sourced by `/init`.
    pub env: String,
    /// `/etc/rig/plan`: what `/init` runs.
    pub plan: String,
    /// Guest path (absolute) and host file of every executable to include.
    pub files: &'a [(String, PathBuf)],
}

/// Writes the initramfs; returns its size in bytes.
pub fn write_initramfs(path: &Path, payload: &Payload<'_>) -> Result<u64> {
    let mut archive =
        Archive::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut dirs: Vec<String> = ["bin", "dev", "etc", "etc/rig", "proc", "sys", "tmp"]
        .map(String::from)
        .to_vec();
    // The kernel's unpacker creates no missing parents: list every ancestor, outermost first.
    for (guest, _) in payload.files {
        let mut ancestors: Vec<String> = Path::new(guest.trim_start_matches('/'))
            .ancestors()
            .skip(1)
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|p| !p.is_empty())
            .collect();
        ancestors.reverse();
        for dir in ancestors {
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    for dir in &dirs {
        archive.dir(dir)?;
    }
    let busybox = fs::read(payload.busybox)
        .with_context(|| format!("reading {}", payload.busybox.display()))?;
    archive.file("bin/busybox", 0o755, &busybox)?;
    archive.symlink("bin/sh", "busybox")?;
    archive.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
    archive.file("etc/rig/env", 0o644, payload.env.as_bytes())?;
    archive.file("etc/rig/plan", 0o644, payload.plan.as_bytes())?;
    for (guest, host) in payload.files {
        let bytes = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        archive.file(guest.trim_start_matches('/'), 0o755, &bytes)?;
    }
    Ok(archive.finish()?)
}

/// `/etc/rig/env` for a configuration on a kernel.
pub fn env_file(config: &Config, kernel: &Kernel, mode: &str) -> String {
    format!(
        "RIG_CONFIG={}\nRIG_KERNEL={}\nGMEM_DMA_REQUIRE={}\nRIG_MODE={mode}\nRIG_IOMMU={}\n",
        config.name,
        kernel.name,
        config.require_env(kernel),
        if config.translated { "yes" } else { "no" }
    )
}

/// How to boot.
#[derive(Clone, Debug)]
pub struct BootOptions {
    /// Guest RAM (QEMU `-m`).
    pub memory: String,
    /// Limit from QEMU's start to `/init`'s first marker.
    pub boot_limit: Duration,
    /// Limit between two reports on the result port.
    pub idle_limit: Duration,
    /// Echo the console live, each line prefixed with the configuration's name.
    pub echo: bool,
}

/// QEMU's arguments. `interactive` puts the console and monitor on the terminal.
pub fn qemu_args(
    config: &Config,
    kernel: &Path,
    initrd: &Path,
    results: &Path,
    memory: &str,
    interactive: bool,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "-machine",
        "q35,kernel-irqchip=split",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-m",
        memory,
        "-display",
        "none",
        "-no-reboot",
    ]
    .map(String::from)
    .to_vec();
    if interactive {
        args.extend(["-serial", "mon:stdio"].map(String::from));
    } else {
        args.extend(["-monitor", "none", "-serial", "stdio"].map(String::from));
    }
    args.push("-serial".into());
    args.push(format!("file:{}", results.display()));
    for device in config.iommu_devices {
        args.push("-device".into());
        args.push(device.to_string());
    }
    // Two edu devices: the first is the one every test uses (GMEM_DMA_EDU); the second lets
    // tests attach a second device to an address space that already has mappings.
    args.extend(["-device", "edu", "-device", "edu"].map(String::from));
    args.push("-kernel".into());
    args.push(kernel.display().to_string());
    args.push("-initrd".into());
    args.push(initrd.display().to_string());
    args.push("-append".into());
    args.push(
        format!("{KERNEL_CMDLINE} {}", config.cmdline)
            .trim()
            .to_string(),
    );
    args
}

/// The kernel command line every configuration starts with. `no_timer_check`: under TCG on a
/// busy host the IO-APIC timer check can miss its ticks and panic the boot ("timer doesn't work
/// through Interrupt-remapped IO-APIC"); seen on this project's 2-core machine under load.
const KERNEL_CMDLINE: &str = "console=ttyS0 quiet panic=-1 no_timer_check";

/// What a boot produced.
pub struct Boot {
    /// The result port, parsed.
    pub log: GuestLog,
    /// Why the guest stopped before finishing its plan (`None` when it finished).
    pub stopped: Option<String>,
    /// From QEMU's start to its exit.
    pub wall: Duration,
    /// The console (and QEMU's own messages).
    pub console: PathBuf,
}

/// Boots `config` and runs its plan, under the watchdog; `column` names the run (kernel and
/// configuration) in echoed console lines.
pub fn boot(
    config: &Config,
    column: &str,
    kernel: &Path,
    initrd: &Path,
    workdir: &Path,
    opts: &BootOptions,
) -> Result<Boot> {
    let results = workdir.join("results.log");
    let console_path = workdir.join("console.log");
    fs::write(&results, "")?;
    let console = Arc::new(Mutex::new(File::create(&console_path)?));
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(qemu_args(
            config,
            kernel,
            initrd,
            &results,
            &opts.memory,
            false,
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let prefix = opts.echo.then(|| format!("[{column}] "));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(copy_lines(out, Arc::clone(&console), prefix.clone()));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(copy_lines(err, Arc::clone(&console), prefix));
    }
    let stopped = watch(&mut child, &results, started, opts);
    let wall = started.elapsed();
    for reader in readers {
        let _ = reader.join();
    }
    let log = parse_log(&String::from_utf8_lossy(&fs::read(&results)?));
    let stopped = match stopped {
        Some(why) => Some(why),
        None if log.done => None,
        None if log.boot_centis.is_none() => Some("QEMU exited before /init started (kernel panic? see console)".into()),
        None => Some("QEMU exited before the guest finished its plan (kernel panic or guest crash? see console)".into()),
    };
    Ok(Boot {
        log,
        stopped,
        wall,
        console: console_path,
    })
}

/// Waits for QEMU to exit; kills it when a limit passes and says which.
fn watch(
    child: &mut Child,
    results: &Path,
    started: Instant,
    opts: &BootOptions,
) -> Option<String> {
    let mut seen = 0;
    let mut booted = false;
    let mut last_progress = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return None,
            Ok(None) => {}
            Err(e) => return Some(format!("cannot wait for QEMU: {e}")),
        }
        let size = fs::metadata(results).map_or(0, |m| m.len());
        if size != seen {
            seen = size;
            last_progress = Instant::now();
            booted = booted
                || fs::read(results)
                    .is_ok_and(|t| String::from_utf8_lossy(&t).contains("@@RIG BOOT"));
        }
        let why = if !booted && started.elapsed() > opts.boot_limit {
            Some(format!(
                "no /init within {:?} of starting QEMU (hung boot?)",
                opts.boot_limit
            ))
        } else if booted && last_progress.elapsed() > opts.idle_limit {
            Some(format!(
                "the guest reported nothing for {:?} (hung guest?)",
                opts.idle_limit
            ))
        } else {
            None
        };
        if let Some(why) = why {
            let _ = child.kill();
            let _ = child.wait();
            return Some(format!("killed: {why}"));
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn copy_lines(
    from: impl Read + Send + 'static,
    to: Arc<Mutex<File>>,
    echo: Option<String>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            if let Ok(mut file) = to.lock() {
                let _ = file.write_all(&line);
            }
            if let Some(prefix) = &echo {
                let text = String::from_utf8_lossy(&line);
                eprint!(
                    "{prefix}{}",
                    text.trim_end_matches(['\r', '\n']).to_owned() + "\n"
                );
            }
            line.clear();
        }
    })
}

/// Boots `config` with the console and QEMU monitor on this terminal (`/init` gives a shell).
pub fn interactive(
    config: &Config,
    kernel: &Path,
    initrd: &Path,
    workdir: &Path,
    memory: &str,
) -> Result<()> {
    let results = workdir.join("results.log");
    eprintln!(
        "vm-rig: booting {} interactively; Ctrl-A X quits QEMU",
        config.name
    );
    let status = Command::new("qemu-system-x86_64")
        .args(qemu_args(config, kernel, initrd, &results, memory, true))
        .status()
        .context("starting qemu-system-x86_64")?;
    eprintln!("vm-rig: QEMU exited: {status}");
    Ok(())
}

/// The last `n` lines of a file, for showing a console after a failure.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configs::{CONFIGS, by_name};

    #[test]
    fn initramfs_lists_every_ancestor_directory_before_its_files() {
        let dir = std::env::temp_dir().join(format!("vm-rig-initramfs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (busybox, exe) = (dir.join("busybox"), dir.join("exe"));
        fs::write(&busybox, b"bb").unwrap();
        fs::write(&exe, b"exe").unwrap();
        let files = [
            ("/w/x/debug/tool".to_string(), exe),
            ("/t/0".to_string(), busybox.clone()),
        ];
        let payload = Payload {
            busybox: &busybox,
            env: "A=1\n".into(),
            plan: String::new(),
            files: &files,
        };
        let image = dir.join("initramfs");
        write_initramfs(&image, &payload).unwrap();
        let bytes = fs::read(&image).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        let at = |name: &str| {
            text.find(&format!("{name}\0"))
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        assert!(
            at("w") < at("w/x")
                && at("w/x") < at("w/x/debug")
                && at("w/x/debug") < at("w/x/debug/tool")
        );
        assert!(at("t") < at("t/0") && at("bin/sh") > at("bin"));
        assert!(at("init") > 0 && at("etc/rig/env") > at("etc/rig"));
    }

    #[test]
    fn qemu_gets_the_iommu_before_edu_and_the_config_cmdline() {
        let config = by_name("intel-type1").unwrap();
        let args = qemu_args(
            config,
            Path::new("/k"),
            Path::new("/i"),
            Path::new("/r"),
            "1G",
            false,
        );
        let at = |s: &str| {
            args.iter()
                .position(|a| a == s)
                .unwrap_or_else(|| panic!("{s} missing in {args:?}"))
        };
        assert!(at("intel-iommu,intremap=on,caching-mode=on") < at("edu"));
        assert_eq!(
            args[at("-append") + 1],
            "console=ttyS0 quiet panic=-1 no_timer_check intel_iommu=on"
        );
        assert_eq!(args[at("file:/r") - 1], "-serial");
        assert!(args.contains(&"-no-reboot".to_string()));
    }

    #[test]
    fn only_the_noiommu_config_boots_without_an_iommu_device() {
        for config in CONFIGS {
            let args = qemu_args(
                config,
                Path::new("/k"),
                Path::new("/i"),
                Path::new("/r"),
                "1G",
                false,
            );
            let devices: Vec<&String> = args
                .windows(2)
                .filter(|pair| pair[0] == "-device")
                .map(|pair| &pair[1])
                .collect();
            assert_eq!(devices.iter().filter(|d| **d == "edu").count(), 2);
            assert_eq!(
                devices.len() == 2,
                config.name == "noiommu",
                "{}: {args:?}",
                config.name
            );
            assert_eq!(config.translated, config.name != "noiommu");
        }
    }

    #[test]
    fn env_file_exports_the_promises() {
        let env = env_file(
            by_name("noiommu").unwrap(),
            &crate::kernel::KERNELS[0],
            "run",
        );
        assert!(
            env.contains("GMEM_DMA_REQUIRE=kvm,kvm-private,edu,noiommu\n"),
            "{env}"
        );
        assert!(env.contains("RIG_KERNEL=6.12\n"), "{env}");
        assert!(env.contains("RIG_IOMMU=no\n"));
    }
}
