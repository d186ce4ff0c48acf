//! The static executables that go into the guest: every workspace test binary, plus the
//! workspace's binaries and examples (for the commands in `commands.txt`).
//!
//! One `cargo build --workspace --tests --bins --examples --keep-going` with `+crt-static` on the
//! explicit gnu target (so build scripts and proc-macros stay dynamic host code) in the rig's own
//! target directory. `--keep-going` (which `cargo test --no-run` lacks) lets the crates that do
//! compile still be tested while the ones that do not are reported as failures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The target the guest binaries are built for.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The workspace being tested.
pub struct Workspace {
    /// Its root directory (with the top Cargo.toml).
    pub root: PathBuf,
    /// Cargo's target directory for it (honours `CARGO_TARGET_DIR`).
    pub target_dir: PathBuf,
}

impl Workspace {
    /// Asks `cargo metadata` where the workspace and its target directory are.
    pub fn locate(manifest_dir: &Path) -> Result<Self> {
        let out = Command::new(cargo())
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .current_dir(manifest_dir)
            .stderr(Stdio::inherit())
            .output()
            .context("running cargo metadata")?;
        if !out.status.success() {
            bail!("cargo metadata failed: {}", out.status);
        }
        let meta: Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
        let path = |key: &str| {
            meta[key]
                .as_str()
                .map(PathBuf::from)
                .with_context(|| format!("cargo metadata lacks {key}"))
        };
        Ok(Self {
            root: path("workspace_root")?,
            target_dir: path("target_directory")?,
        })
    }

    /// The rig's own target directory: static builds never disturb the host builds' artifacts.
    pub fn rig_target_dir(&self) -> PathBuf {
        self.target_dir.join("rig")
    }
}

/// A test executable and the name the report shows for it.
#[derive(Clone, Debug, PartialEq)]
pub struct TestBinary {
    /// `package` for unit tests, `package/tests/name` for integration tests.
    pub label: String,
    /// Where cargo put it.
    pub path: PathBuf,
}

/// A test target that did not compile.
#[derive(Clone, Debug, PartialEq)]
pub struct CompileFailure {
    /// The same kind of label as [`TestBinary::label`].
    pub label: String,
    /// The compiler's first error, rendered.
    pub message: String,
}

/// What the build produced.
#[derive(Debug, Default, PartialEq)]
pub struct Built {
    /// Test executables.
    pub tests: Vec<TestBinary>,
    /// Workspace binaries and examples by name.
    pub bins: BTreeMap<String, PathBuf>,
    /// Targets with compile errors.
    pub failures: Vec<CompileFailure>,
    /// Whether cargo reported success.
    pub success: bool,
}

/// Builds everything statically; compile errors are returned in [`Built::failures`], not as `Err`.
pub fn build(ws: &Workspace) -> Result<Built> {
    eprintln!(
        "vm-rig: building static test binaries (target dir {})",
        ws.rig_target_dir().display()
    );
    let out = Command::new(cargo())
        .args([
            "build",
            "--workspace",
            "--tests",
            "--bins",
            "--examples",
            "--keep-going",
        ])
        .args(["--message-format=json", "--target", TARGET])
        .arg("--target-dir")
        .arg(ws.rig_target_dir())
        .env(
            "RUSTFLAGS",
            static_rustflags(std::env::var("RUSTFLAGS").ok().as_deref()),
        )
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .current_dir(&ws.root)
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut built = parse_messages(&text);
    built.success &= out.status.success();
    if !built.success && built.failures.is_empty() {
        bail!(
            "cargo build of the static test binaries failed ({}) without a compile error to show; see above",
            out.status
        );
    }
    Ok(built)
}

/// The caller's RUSTFLAGS (e.g. CI's `-D warnings`) plus static linking.
fn static_rustflags(inherited: Option<&str>) -> String {
    let mut flags = inherited.unwrap_or_default().trim().to_string();
    if !flags.is_empty() {
        flags.push(' ');
    }
    flags.push_str("-C target-feature=+crt-static");
    flags
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

/// Reads cargo's `--message-format=json` lines.
pub fn parse_messages(stdout: &str) -> Built {
    let mut built = Built {
        success: true,
        ..Built::default()
    };
    for line in stdout.lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        match msg["reason"].as_str() {
            Some("compiler-artifact") => {
                let Some(exe) = msg["executable"].as_str() else {
                    continue;
                };
                let target = &msg["target"];
                let name = target["name"].as_str().unwrap_or_default().to_string();
                if msg["profile"]["test"].as_bool() == Some(true) {
                    built.tests.push(TestBinary {
                        label: label(&msg),
                        path: PathBuf::from(exe),
                    });
                } else {
                    built.bins.insert(name, PathBuf::from(exe));
                }
            }
            Some("compiler-message") if msg["message"]["level"].as_str() == Some("error") => {
                let label = label(&msg);
                if built.failures.iter().all(|f| f.label != label) {
                    let message = msg["message"]["rendered"]
                        .as_str()
                        .unwrap_or("(no message)");
                    built.failures.push(CompileFailure {
                        label,
                        message: message.to_string(),
                    });
                }
            }
            Some("build-finished") => built.success = msg["success"].as_bool() == Some(true),
            _ => {}
        }
    }
    built.tests.sort_by(|a, b| a.label.cmp(&b.label));
    built
}

/// The report's name for a target: `pkg` (unit tests), `pkg/tests/name`, `pkg/bin name`.
fn label(msg: &Value) -> String {
    let package = package_name(msg["package_id"].as_str().unwrap_or_default());
    let target = &msg["target"];
    let name = target["name"].as_str().unwrap_or_default();
    match target["kind"][0].as_str().unwrap_or_default() {
        "lib" | "rlib" | "proc-macro" => package,
        "test" => format!("{package}/tests/{name}"),
        kind => format!("{package}/{kind} {name}"),
    }
}

/// The package name in a cargo package id, old (`name 0.1.0 (path+file://...)`) or new
/// (`path+file:///dir/name#0.1.0`, `path+file:///dir/x#name@0.1.0`) format.
fn package_name(id: &str) -> String {
    if let Some((url, fragment)) = id.split_once('#') {
        if let Some((name, _)) = fragment.split_once('@') {
            return name.to_string();
        }
        return url.rsplit('/').next().unwrap_or(url).to_string();
    }
    id.split_whitespace().next().unwrap_or(id).to_string()
}

/// The tests in `bin` whose names contain `filter`, asked from the binary itself (`--list`).
pub fn list_tests(bin: &Path, filter: &str) -> Result<Vec<String>> {
    let out = Command::new(bin)
        .args(["--list", filter])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} --list", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} --list failed ({}): {}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(parse_list(&String::from_utf8_lossy(&out.stdout)))
}

/// Reads libtest's `--list` output (`name: test` lines; benches and the summary are skipped).
pub fn parse_list(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|line| line.strip_suffix(": test"))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_linking_is_added_to_inherited_rustflags() {
        assert_eq!(static_rustflags(None), "-C target-feature=+crt-static");
        assert_eq!(
            static_rustflags(Some(" -D warnings ")),
            "-D warnings -C target-feature=+crt-static"
        );
    }

    #[test]
    fn list_output_yields_test_names_only() {
        let out = "tests::kernel_a: test\nkernel_b: test\nbench_x: bench\n\n2 tests, 1 benchmark\n";
        assert_eq!(parse_list(out), ["tests::kernel_a", "kernel_b"]);
    }

    #[test]
    fn package_ids_of_every_cargo_format_name_the_package() {
        assert_eq!(package_name("path+file:///work/main/iommu#0.1.0"), "iommu");
        assert_eq!(
            package_name("path+file:///work/main/tools/vm-rig#vm-rig@0.1.0"),
            "vm-rig"
        );
        assert_eq!(
            package_name("path+file:///work/main#gmem-dma@0.1.0"),
            "gmem-dma"
        );
        assert_eq!(
            package_name("iommu 0.1.0 (path+file:///work/main/iommu)"),
            "iommu"
        );
    }

    #[test]
    fn cargo_messages_separate_tests_bins_and_compile_errors() {
        let stdout = [
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/iommu#0.1.0","target":{"kind":["lib"],"name":"iommu"},"profile":{"test":true},"executable":"/t/iommu-1"}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/iommu#0.1.0","target":{"kind":["lib"],"name":"iommu"},"profile":{"test":false},"executable":null}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tools/vm-rig#0.1.0","target":{"kind":["test"],"name":"rig"},"profile":{"test":true},"executable":"/t/rig-2"}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tools/dma-map#0.1.0","target":{"kind":["bin"],"name":"dma-map"},"profile":{"test":false},"executable":"/t/dma-map"}"#,
            r#"{"reason":"compiler-message","package_id":"path+file:///w/src#gmem-dma@0.1.0","target":{"kind":["test"],"name":"convert"},"message":{"level":"error","rendered":"error[E0425]: x"}}"#,
            r#"{"reason":"compiler-message","package_id":"path+file:///w/src#gmem-dma@0.1.0","target":{"kind":["test"],"name":"convert"},"message":{"level":"error","rendered":"error: second"}}"#,
            r#"{"reason":"compiler-message","package_id":"path+file:///w/iommu#0.1.0","target":{"kind":["lib"],"name":"iommu"},"message":{"level":"warning","rendered":"warning: w"}}"#,
            "not json",
            r#"{"reason":"build-finished","success":false}"#,
        ]
        .join("\n");
        let built = parse_messages(&stdout);
        assert_eq!(
            built.tests,
            [
                TestBinary {
                    label: "iommu".into(),
                    path: "/t/iommu-1".into()
                },
                TestBinary {
                    label: "vm-rig/tests/rig".into(),
                    path: "/t/rig-2".into()
                },
            ]
        );
        assert_eq!(
            built.bins.get("dma-map"),
            Some(&PathBuf::from("/t/dma-map"))
        );
        assert_eq!(built.bins.len(), 1);
        assert_eq!(
            built.failures,
            [CompileFailure {
                label: "gmem-dma/tests/convert".into(),
                message: "error[E0425]: x".into()
            }]
        );
        assert!(!built.success);
    }
}
