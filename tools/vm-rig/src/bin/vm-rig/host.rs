//! The host tools the rig needs, and installing the missing ones from Debian's packages.
//!
//! CI machines start with nothing but the Rust toolchain, so the rig installs what it lacks
//! (`apt-get update` once, then one non-interactive `apt-get install`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The Debian package whose tarball the guest kernel is built from.
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
        present: || kernel_tarball().is_some(),
        package: KERNEL_SOURCE_PACKAGE,
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

/// The kernel source tarball that [`KERNEL_SOURCE_PACKAGE`] installs under /usr/src.
pub fn kernel_tarball() -> Option<PathBuf> {
    let prefix = format!("{KERNEL_SOURCE_PACKAGE}.tar.");
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/src")
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
    fn this_test_binary_is_static_exactly_when_built_with_crt_static() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(is_static_elf(&me), cfg!(target_feature = "crt-static"));
    }
}
