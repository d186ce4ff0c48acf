//! The guest kernels: built from Debian's kernel source packages with the options in
//! `tools/vm-rig/kernel.config`, and cached outside the source tree so only the first run pays.
//!
//! Two kernels: 6.12 (the installed `linux-source-6.12`) and 7.3 (`linux-source-7.3` from
//! trixie-backports, fetched into the cache without touching the machine's apt configuration:
//! [`host::fetch_kernel_source`]). Every configuration runs on each.
//!
//! Cache: `${XDG_CACHE_HOME:-$HOME/.cache}/gmem-dma/kernel-<key>/bzImage`, where the key hashes
//! the kernel's option list (order and comments do not matter), the source package and its
//! version and the build recipe's version. A build happens in a temporary directory next to the
//! cache entry and is renamed into place only when it succeeded, so an interrupted build never
//! leaves a bad entry. A fetched source lives in `gmem-dma/source-<package>/`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use vm_rig::Feature;

use crate::host;

/// Bump when the way the kernel is built changes in a way the option list does not show.
const RECIPE_VERSION: &str = "vm-rig kernel recipe 1: tinyconfig + options + olddefconfig";

/// The options file, relative to the vm-rig package directory.
pub const OPTIONS_FILE: &str = "kernel.config";

/// Where a kernel's source tarball comes from.
#[derive(Debug)]
pub enum Source {
    /// A Debian package the rig installs (`apt-get install`), tarball under /usr/src.
    Installed,
    /// Downloaded from this suite of the machine's Debian archive into the rig's cache.
    Archive {
        /// e.g. `trixie-backports`.
        suite: &'static str,
    },
}

/// One guest kernel the rig builds and runs every configuration on.
#[derive(Debug)]
pub struct Kernel {
    /// Its name on the command line, in `kernel.config` and in the report (`6.12`).
    pub name: &'static str,
    /// The Debian source package.
    pub package: &'static str,
    /// Where the package comes from.
    pub source: Source,
    /// The kernel-dependent features this kernel has (a configuration requires those of them
    /// its machine can offer: [`crate::configs::Config::require_on`]).
    pub features: &'static [Feature],
}

/// Every kernel, oldest first (the report's order).
pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "6.12",
        package: host::KERNEL_SOURCE_PACKAGE,
        source: Source::Installed,
        features: &[],
    },
    Kernel {
        name: "7.3",
        package: "linux-source-7.3",
        source: Source::Archive {
            suite: "trixie-backports",
        },
        features: &[
            Feature::GuestMemfdMmap,
            Feature::IommufdMapFile,
            Feature::IommufdNoIommu,
        ],
    },
];

/// The kernels named by `--kernel` (`all`, or one name), in [`KERNELS`] order.
pub fn select(name: &str) -> Result<Vec<&'static Kernel>> {
    if name == "all" {
        return Ok(KERNELS.iter().collect());
    }
    match KERNELS.iter().find(|k| k.name == name) {
        Some(kernel) => Ok(vec![kernel]),
        None => {
            let known: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
            bail!("no kernel named {name:?}; known: {}, all", known.join(", "))
        }
    }
}

/// Reads the option names for `kernel` from the options file's text: one per line, without
/// `CONFIG_`, `#` comments and blank lines ignored. A line `<kernel>: NAME` applies to that
/// kernel only (an option one kernel renamed or added); a plain `NAME` to every kernel.
pub fn parse_options(text: &str, kernel: &str) -> Result<Vec<String>> {
    let mut options = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        let (only, option) = match line.split_once(':') {
            Some((only, option)) => (Some(only.trim()), option.trim()),
            None => (None, line),
        };
        if option.is_empty() && only.is_none() {
            continue;
        }
        if let Some(only) = only
            && !KERNELS.iter().any(|k| k.name == only)
        {
            let known: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
            bail!(
                "{OPTIONS_FILE} line {}: {only:?} is not a kernel the rig builds ({})",
                number + 1,
                known.join(", ")
            );
        }
        let valid = !option.is_empty()
            && option
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !valid || option.starts_with("CONFIG_") {
            bail!(
                "{OPTIONS_FILE} line {}: {option:?} is not a Kconfig option name (write e.g. VFIO, without CONFIG_)",
                number + 1
            );
        }
        if only.is_none_or(|only| only == kernel) {
            options.push(option.to_string());
        }
    }
    Ok(options)
}

/// The cache key for a kernel built with `options` from source package `package` at
/// `source_version`.
pub fn cache_key(options: &[String], package: &str, source_version: &str) -> String {
    let mut sorted: Vec<&str> = options.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut text = format!("{RECIPE_VERSION}\n{package}\n{source_version}\n");
    for option in sorted {
        text.push_str(option);
        text.push('\n');
    }
    format!("{:016x}", fnv1a64(text.as_bytes()))
}

/// FNV-1a, 64 bit: a fixed, dependency-free hash (std's `DefaultHasher` may change between Rust
/// releases, which would silently invalidate every cache).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Where cached kernels live.
pub fn cache_root() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(
            std::env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?,
        )
        .join(".cache"),
    };
    Ok(base.join("gmem-dma"))
}

/// Returns the cached bzImage of `kernel` for the options in `rig_dir`, building it first (and
/// fetching its source) if needed.
pub fn ensure(rig_dir: &Path, kernel: &Kernel) -> Result<PathBuf> {
    let options_path = rig_dir.join(OPTIONS_FILE);
    let text = fs::read_to_string(&options_path)
        .with_context(|| format!("reading {}", options_path.display()))?;
    let options = parse_options(&text, kernel.name)?;
    let root = cache_root()?;
    let (tarball, version) = match kernel.source {
        Source::Installed => {
            let tarball = host::kernel_tarball(kernel.package).with_context(|| {
                format!("no /usr/src/{}.tar.* (apt-get install {0})", kernel.package)
            })?;
            (tarball, host::package_version(kernel.package)?)
        }
        Source::Archive { suite } => {
            fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
            let dir = root.join(format!("source-{}", kernel.package));
            let fetched = host::fetch_kernel_source(kernel.package, suite, &dir)?;
            (fetched.tarball, fetched.version)
        }
    };
    let entry = root.join(format!(
        "kernel-{}",
        cache_key(&options, kernel.package, &version)
    ));
    let image = entry.join("bzImage");
    let cleanup_root = root.clone();
    std::thread::spawn(move || remove_abandoned(&cleanup_root)); // IO-bound; overlaps the rest
    if image.is_file() {
        eprintln!(
            "vm-rig: kernel {} (cached): {}",
            kernel.name,
            image.display()
        );
        return Ok(image);
    }
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let started = Instant::now();
    eprintln!(
        "vm-rig: building the {} guest kernel from {} ({version}) into {} (takes minutes; later runs reuse it)",
        kernel.name,
        tarball.display(),
        entry.display()
    );
    let scratch = TempDir::new(root.join(format!(".build-{}", std::process::id())))?;
    let log_path = root.join(format!("build-{}.log", std::process::id()));
    let built = build(&tarball, kernel, &options, &scratch.0, &log_path);
    if let Err(error) = built {
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("--- last lines of {}:", log_path.display());
        for line in tail.into_iter().rev() {
            eprintln!("{line}");
        }
        return Err(error.context(format!(
            "kernel build failed; full log: {}",
            log_path.display()
        )));
    }
    // Assemble the entry beside its final name, then rename: readers see all of it or nothing.
    let staging = TempDir::new(root.join(format!(".kernel-{}", std::process::id())))?;
    let source = scratch.0.join("src");
    fs::copy(
        source.join("arch/x86/boot/bzImage"),
        staging.0.join("bzImage"),
    )?;
    fs::copy(source.join(".config"), staging.0.join("config"))?;
    fs::write(
        staging.0.join("source"),
        format!("{} {version}\n", tarball.display()),
    )?;
    match fs::rename(&staging.0, &entry) {
        Ok(()) => std::mem::forget(staging),
        Err(_) if image.is_file() => {} // a concurrent run won the race; its kernel is the same
        Err(e) => {
            return Err(e).with_context(|| format!("moving the kernel into {}", entry.display()));
        }
    }
    fs::remove_file(&log_path).ok();
    // Deleting the ~1.5 GB source tree takes minutes on slow disks: do it while the caller
    // goes on. If the process exits first, the next build's `remove_abandoned` finishes it.
    let tree = scratch.0.clone();
    std::mem::forget(scratch);
    std::thread::spawn(move || fs::remove_dir_all(tree));
    eprintln!(
        "vm-rig: kernel {} built in {:.0?}: {}",
        kernel.name,
        started.elapsed(),
        image.display()
    );
    Ok(image)
}

fn build(
    tarball: &Path,
    kernel: &Kernel,
    options: &[String],
    dir: &Path,
    log_path: &Path,
) -> Result<()> {
    let log = fs::File::create(log_path)?;
    let run = |what: &str, cmd: &mut Command| -> Result<()> {
        writeln!(&log, "$ {what}")?;
        let status = cmd
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?)
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("starting {what}"))?;
        if !status.success() {
            bail!("{what} failed: {status}");
        }
        Ok(())
    };
    let src = dir.join("src");
    fs::create_dir_all(&src)?;
    run(
        "tar -x",
        Command::new("tar")
            .arg("-xf")
            .arg(tarball)
            .arg("-C")
            .arg(&src)
            .arg("--strip-components=1"),
    )?;
    let make = |args: &[&str]| {
        let mut cmd = Command::new("make");
        cmd.current_dir(&src).args(args);
        cmd
    };
    run("make tinyconfig", &mut make(&["tinyconfig"]))?;
    let mut config = Command::new("./scripts/config");
    config.current_dir(&src);
    for option in options {
        config.arg("-e").arg(option);
    }
    run("scripts/config -e ...", &mut config)?;
    run("make olddefconfig", &mut make(&["olddefconfig"]))?;
    let dot_config = fs::read_to_string(src.join(".config"))?;
    let lost = options_not_enabled(options, &dot_config);
    if !lost.is_empty() {
        bail!(
            "kernel {}: these options did not survive `make olddefconfig` (misspelt, renamed or gone in this kernel, or a dependency is missing from {OPTIONS_FILE}; a line `<kernel>: NAME` limits an option to one kernel): {}",
            kernel.name,
            lost.join(" ")
        );
    }
    let jobs = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .to_string();
    run("make bzImage", &mut make(&["-j", &jobs, "bzImage"]))
}

/// Removes what killed builds left behind (`.build-<pid>`, `.kernel-<pid>`, `.fetch-<pid>`,
/// `build-<pid>.log`
/// of processes that no longer exist).
fn remove_abandoned(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = abandoned_pid(&name) else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let path = entry.path();
            let _ = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
        }
    }
}

/// The pid in the name of a temporary the build makes, if `name` is one.
fn abandoned_pid(name: &str) -> Option<u32> {
    let pid = name
        .strip_prefix(".build-")
        .or_else(|| name.strip_prefix(".kernel-"))
        .or_else(|| name.strip_prefix(".fetch-"))
        .or_else(|| name.strip_prefix("build-")?.strip_suffix(".log"))?;
    pid.parse().ok()
}

/// The options that are not `=y` in a generated `.config`.
pub fn options_not_enabled(options: &[String], dot_config: &str) -> Vec<String> {
    options
        .iter()
        .filter(|option| {
            !dot_config
                .lines()
                .any(|line| line == format!("CONFIG_{option}=y"))
        })
        .cloned()
        .collect()
}

/// A directory removed (with its contents) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(path: PathBuf) -> Result<Self> {
        if path.exists() {
            fs::remove_dir_all(&path)?;
        }
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_parse_without_comments_and_blank_lines() {
        let text = "# header\n\nVFIO\n  IOMMUFD  # cdev path\nKVM\n";
        assert_eq!(
            parse_options(text, "6.12").unwrap(),
            opts(&["VFIO", "IOMMUFD", "KVM"])
        );
    }

    #[test]
    fn a_kernel_prefix_limits_an_option_to_that_kernel() {
        let text = "VFIO\n7.3: IOMMUFD_NOIOMMU # renamed\n6.12:KVM_PRIVATE_MEM\n";
        assert_eq!(
            parse_options(text, "6.12").unwrap(),
            opts(&["VFIO", "KVM_PRIVATE_MEM"])
        );
        assert_eq!(
            parse_options(text, "7.3").unwrap(),
            opts(&["VFIO", "IOMMUFD_NOIOMMU"])
        );
        let err = parse_options("6.1: VFIO\n", "6.12")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1") && err.contains("\"6.1\""), "{err}");
        assert!(parse_options("7.3:\n", "7.3").is_err());
    }

    #[test]
    fn kernels_are_selected_by_name_or_all() {
        assert_eq!(select("all").unwrap().len(), KERNELS.len());
        assert_eq!(select("7.3").unwrap()[0].package, "linux-source-7.3");
        assert!(select("7").unwrap_err().to_string().contains("6.12, 7.3"));
    }

    #[test]
    fn the_6_12_cache_key_did_not_move() {
        // Adding kernels must not rebuild the 6.12 kernel every machine has cached: the key of
        // the shipped option list with 6.12.117-1~deb12u1 is the one computed before there were two.
        let text =
            fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(OPTIONS_FILE)).unwrap();
        let options = parse_options(&text, "6.12").unwrap();
        assert_eq!(
            cache_key(&options, host::KERNEL_SOURCE_PACKAGE, "6.12.117-1~deb12u1"),
            "995e9ae4eefe8ea5"
        );
    }

    #[test]
    fn options_with_prefix_or_values_are_rejected_with_their_line() {
        let err = parse_options("VFIO\nCONFIG_KVM\n", "6.12")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && err.contains("CONFIG_KVM"),
            "{err}"
        );
        assert!(parse_options("KVM=y\n", "6.12").is_err());
        assert!(parse_options("kvm\n", "6.12").is_err());
    }

    #[test]
    fn cache_key_is_stable_under_reordering_and_duplicates() {
        let a = cache_key(&opts(&["VFIO", "KVM", "IOMMUFD"]), "p", "6.12.117-1");
        assert_eq!(
            a,
            cache_key(&opts(&["IOMMUFD", "VFIO", "KVM", "KVM"]), "p", "6.12.117-1")
        );
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn cache_key_changes_with_options_and_source_version() {
        let base = cache_key(&opts(&["VFIO", "KVM"]), "p", "6.12.117-1");
        assert_ne!(
            base,
            cache_key(&opts(&["VFIO", "KVM", "IOMMUFD"]), "p", "6.12.117-1")
        );
        assert_ne!(base, cache_key(&opts(&["VFIO"]), "p", "6.12.117-1"));
        assert_ne!(base, cache_key(&opts(&["VFIO", "KVM"]), "p", "6.12.118-1"));
        assert_ne!(base, cache_key(&opts(&["VFIO", "KVM"]), "q", "6.12.117-1"));
        assert_ne!(
            cache_key(&opts(&["AB", "C"]), "p", "v"),
            cache_key(&opts(&["A", "BC"]), "p", "v")
        );
    }

    #[test]
    fn only_the_build_temporaries_carry_a_pid() {
        assert_eq!(abandoned_pid(".build-42"), Some(42));
        assert_eq!(abandoned_pid(".kernel-7"), Some(7));
        assert_eq!(abandoned_pid(".fetch-8"), Some(8));
        assert_eq!(abandoned_pid("build-9.log"), Some(9));
        assert_eq!(abandoned_pid("kernel-995e9ae4eefe8ea5"), None);
        assert_eq!(abandoned_pid(".build-x"), None);
    }

    #[test]
    fn fnv1a64_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn options_that_olddefconfig_dropped_are_named() {
        let config =
            "CONFIG_VFIO=y\n# CONFIG_IOMMUFD is not set\nCONFIG_KVM=m\nCONFIG_KVM_AMD_SEV=y\n";
        assert_eq!(
            options_not_enabled(&opts(&["VFIO", "IOMMUFD", "KVM", "KVM_AMD"]), config),
            opts(&["IOMMUFD", "KVM", "KVM_AMD"])
        );
    }
}
