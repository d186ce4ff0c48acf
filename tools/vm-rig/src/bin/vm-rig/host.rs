//! The host tools the rig needs, and installing the missing ones from Debian's packages.
//!
//! CI machines start with nothing but the Rust toolchain, so the rig installs what it lacks
//! (`apt-get update` once, then one non-interactive `apt-get install`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The Debian package of the installed kernel source (the 6.12 guest kernel's); newer kernels
/// come from the archive without installing anything (see [`fetch_kernel_source`]).
pub const KERNEL_SOURCE_PACKAGE: &str = "linux-source-6.12";

/// One thing the rig uses and the Debian package that provides it.
struct Need {
    what: &'static str,
    present: fn() -> bool,
    package: &'static str,
}

const NEEDS: &[Need] = &[
    Need {
        what: "qemu-system-x86_64",
        present: || on_path("qemu-system-x86_64"),
        package: "qemu-system-x86",
    },
    Need {
        what: "static busybox",
        present: || static_busybox().is_some(),
        package: "busybox-static",
    },
    Need {
        what: "kernel source tarball",
        present: || kernel_tarball(KERNEL_SOURCE_PACKAGE).is_some(),
        package: KERNEL_SOURCE_PACKAGE,
    },
    Need {
        what: "dpkg-deb (to unpack a downloaded kernel source package)",
        present: || on_path("dpkg-deb"),
        package: "dpkg",
    },
    Need {
        what: "make",
        present: || on_path("make"),
        package: "make",
    },
    Need {
        what: "gcc",
        present: || on_path("gcc"),
        package: "gcc",
    },
    Need {
        what: "bc",
        present: || on_path("bc"),
        package: "bc",
    },
    Need {
        what: "bison",
        present: || on_path("bison"),
        package: "bison",
    },
    Need {
        what: "flex",
        present: || on_path("flex"),
        package: "flex",
    },
    Need {
        what: "xz",
        present: || on_path("xz"),
        package: "xz-utils",
    },
    Need {
        what: "strip",
        present: || on_path("strip"),
        package: "binutils",
    },
    Need {
        what: "perl",
        present: || on_path("perl"),
        package: "perl",
    },
    Need {
        what: "libelf headers",
        present: || Path::new("/usr/include/libelf.h").exists(),
        package: "libelf-dev",
    },
    Need {
        what: "openssl headers",
        present: || Path::new("/usr/include/openssl/ssl.h").exists(),
        package: "libssl-dev",
    },
    Need {
        what: "static glibc (for +crt-static test binaries)",
        present: || Path::new("/usr/lib/x86_64-linux-gnu/libc.a").exists(),
        package: "libc6-dev",
    },
];

/// Installs every missing tool's package; does nothing when all are present.
pub fn ensure_packages() -> Result<()> {
    let missing: Vec<&Need> = NEEDS.iter().filter(|need| !(need.present)()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|need| need.package).collect();
    packages.dedup();
    let what: Vec<&str> = missing.iter().map(|need| need.what).collect();
    eprintln!(
        "vm-rig: missing {}; installing {}",
        what.join(", "),
        packages.join(" ")
    );
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            sudo("apt-get")
        };
        let status = cmd
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get (is this a Debian machine?)")?;
        if !status.success() {
            bail!("apt-get {} failed: {status}", args.join(" "));
        }
        Ok(())
    };
    apt(&["update"])?;
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(&packages);
    apt(&install)?;
    let still: Vec<&str> = NEEDS
        .iter()
        .filter(|n| !(n.present)())
        .map(|n| n.what)
        .collect();
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(", "));
    }
    Ok(())
}

fn sudo(program: &str) -> Command {
    let mut cmd = Command::new("sudo");
    cmd.arg(program);
    cmd
}

fn on_path(program: &str) -> bool {
    find_on_path(program).is_some()
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The statically linked busybox (Debian's `busybox-static`; plain `busybox` is dynamic and would
/// not run in a guest without a C library).
pub fn static_busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| std::fs::read(path).is_ok_and(|bytes| is_static_elf(&bytes)))
}

/// The kernel source tarball that the Debian package `package` installs under /usr/src.
pub fn kernel_tarball(package: &str) -> Option<PathBuf> {
    tarball_in(Path::new("/usr/src"), package)
}

/// `<dir>/<package>.tar.*`, the name Debian's linux-source packages give their tarball.
fn tarball_in(dir: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}.tar.");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    found.sort();
    found.into_iter().next()
}

/// The installed version of a Debian package (`dpkg-query`).
pub fn package_version(package: &str) -> Result<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .output()
        .context("running dpkg-query")?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || version.is_empty() {
        bail!("dpkg-query cannot tell the version of {package}");
    }
    Ok(version)
}

/// A kernel source package fetched from the Debian archive into the rig's cache.
pub struct FetchedSource {
    /// The source tarball.
    pub tarball: PathBuf,
    /// The package's version (`7.3.4-1~bpo13+1`).
    pub version: String,
}

/// The kernel source tarball of `package` from `suite` (e.g. `trixie-backports`), fetched once
/// into `dir` and reused from there.
///
/// The machine's apt configuration is left alone: a private sources list with one line
/// (`deb [trusted=yes] <the machine's Debian archive> <suite> main`) and private package lists
/// go to a temporary directory, `apt-get update` and `apt-get download` read only those
/// (`Dir::Etc::SourceList`, `Dir::Etc::SourceParts=/dev/null`, `Dir::State::Lists`,
/// `Dir::Cache`), and `dpkg-deb -x` unpacks the .deb there. Only the tarball and the version
/// are kept; the entry is renamed into place when complete.
pub fn fetch_kernel_source(package: &str, suite: &str, dir: &Path) -> Result<FetchedSource> {
    let version_file = dir.join("version");
    if let (Ok(version), Some(tarball)) = (
        std::fs::read_to_string(&version_file),
        tarball_in(dir, package),
    ) {
        return Ok(FetchedSource {
            tarball,
            version: version.trim().to_string(),
        });
    }
    let archive = debian_archive_uri();
    eprintln!(
        "vm-rig: fetching {package} from {archive} {suite} (private apt lists; the machine's apt configuration is untouched)"
    );
    let parent = dir
        .parent()
        .context("a source cache directory has a parent")?;
    let work = parent.join(format!(".fetch-{}", std::process::id()));
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    for sub in [
        "lists/partial",
        "cache/archives/partial",
        "deb",
        "x",
        "entry",
    ] {
        std::fs::create_dir_all(work.join(sub))
            .with_context(|| format!("creating {}", work.join(sub).display()))?;
    }
    let result = (|| -> Result<FetchedSource> {
        let list = work.join("sources.list");
        std::fs::write(&list, format!("deb [trusted=yes] {archive} {suite} main\n"))?;
        let mut options = vec![
            format!("Dir::Etc::SourceList={}", list.display()),
            "Dir::Etc::SourceParts=/dev/null".to_string(),
            format!("Dir::State::Lists={}", work.join("lists").display()),
            format!("Dir::Cache={}", work.join("cache").display()),
        ];
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            // apt would drop to `_apt`, which cannot write into this root-owned directory.
            options.push("APT::Sandbox::User=root".to_string());
        }
        let apt = |args: &[&str]| -> Result<()> {
            let mut cmd = Command::new("apt-get");
            for option in &options {
                cmd.arg("-o").arg(option);
            }
            let status = cmd
                .args(args)
                .current_dir(work.join("deb"))
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .context("running apt-get (is this a Debian machine?)")?;
            if !status.success() {
                bail!(
                    "apt-get {} (private lists for {suite}) failed: {status}",
                    args.join(" ")
                );
            }
            Ok(())
        };
        apt(&["-q", "update"])?;
        apt(&["-q", "download", package])?;
        let deb = std::fs::read_dir(work.join("deb"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download {package} left no .deb"))?;
        let field = Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .arg("Version")
            .output()
            .context("running dpkg-deb -f")?;
        let version = String::from_utf8_lossy(&field.stdout).trim().to_string();
        if !field.status.success() || version.is_empty() {
            bail!("dpkg-deb cannot read the version of {}", deb.display());
        }
        let status = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(work.join("x"))
            .status()
            .context("running dpkg-deb -x")?;
        if !status.success() {
            bail!("dpkg-deb -x {} failed: {status}", deb.display());
        }
        let unpacked = tarball_in(&work.join("x/usr/src"), package)
            .with_context(|| format!("{} holds no usr/src/{package}.tar.*", deb.display()))?;
        let name = unpacked.file_name().context("a tarball has a name")?;
        std::fs::rename(&unpacked, work.join("entry").join(name))?;
        std::fs::write(work.join("entry/version"), format!("{version}\n"))?;
        if dir.exists() {
            std::fs::remove_dir_all(dir)?; // an incomplete entry (no version or no tarball)
        }
        std::fs::rename(work.join("entry"), dir)
            .with_context(|| format!("moving the source into {}", dir.display()))?;
        Ok(FetchedSource {
            tarball: dir.join(name),
            version,
        })
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The Debian archive this machine's apt sources use (deb822 `URIs:` in
/// /etc/apt/sources.list.d/*.sources, or `deb` lines of /etc/apt/sources.list), skipping the
/// security archive; Debian's own redirector when none is found.
fn debian_archive_uri() -> String {
    let mut texts = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "sources" || e == "list"))
            .collect();
        paths.sort();
        texts.extend(paths.iter().filter_map(|p| std::fs::read_to_string(p).ok()));
    }
    texts.extend(std::fs::read_to_string("/etc/apt/sources.list").ok());
    texts
        .iter()
        .find_map(|text| archive_uri_in(text))
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_string())
}

/// The first Debian archive URI (not the security archive) in an apt sources text, in either
/// format.
fn archive_uri_in(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            if let Some(uris) = line.strip_prefix("URIs:") {
                return uris.split_whitespace().next();
            }
            let mut words = line.split_whitespace();
            (words.next()? == "deb").then_some(())?;
            words.find(|w| !w.starts_with('['))
        })
        .find(|uri| uri.contains("debian") && !uri.contains("security"))
        .map(|uri| uri.trim_end_matches('/').to_string())
}

/// True for a 64-bit little-endian ELF executable without a PT_INTERP program header, i.e. one
/// that needs no dynamic loader.
pub fn is_static_elf(bytes: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
    };
    let u64_at = |at: usize| {
        bytes
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    if bytes.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff as usize + i * usize::from(phentsize);
        u32_at(at).is_some_and(|kind| kind != PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header with the given program header types.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut bytes = vec![0u8; 64 + 56 * types.len()];
        bytes[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        bytes[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        bytes[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        bytes[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for (i, kind) in types.iter().enumerate() {
            bytes[64 + 56 * i..68 + 56 * i].copy_from_slice(&kind.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn an_interpreter_header_makes_an_elf_dynamic() {
        assert!(is_static_elf(&elf(&[1, 1, 4])));
        assert!(!is_static_elf(&elf(&[6, 3, 1])));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        let mut truncated = elf(&[1, 1]);
        truncated.truncate(100);
        assert!(
            !is_static_elf(&truncated),
            "headers past the end are not trusted"
        );
    }

    #[test]
    fn the_archive_uri_is_read_from_either_sources_format_skipping_security() {
        let deb822 = "Types: deb\n# http://snapshot.debian.org/archive/debian-security/x\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\nTypes: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n";
        assert_eq!(
            archive_uri_in(deb822).as_deref(),
            Some("http://mirror.example/debian")
        );
        let one_line = "# deb http://old.example/debian bookworm main\ndeb [arch=amd64] http://ftp.de.debian.org/debian bookworm main\n";
        assert_eq!(
            archive_uri_in(one_line).as_deref(),
            Some("http://ftp.de.debian.org/debian")
        );
        assert_eq!(
            archive_uri_in("deb http://example.org/ubuntu jammy main\n"),
            None
        );
    }

    #[test]
    fn this_test_binary_is_static_exactly_when_built_with_crt_static() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(is_static_elf(&me), cfg!(target_feature = "crt-static"));
    }
}
