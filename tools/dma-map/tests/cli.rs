//! The built `dma-map` binary, run as a user would: exit codes, messages, and summaries whose
//! numbers must agree with each other and with the workload.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn dma_map(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dma-map"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("GMEM_DMA_EDU")
        .output()
        .expect("the dma-map binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs with `--json` and parses stdout; panics with stderr when it does not exit 0.
fn json(args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let o = dma_map(&all);
    assert_eq!(o.status.code(), Some(0), "dma-map {args:?}: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("stdout is JSON")
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn all_checks_passed(run: &Value) {
    let checks = run["checks"].as_array().expect("checks");
    assert!(checks.len() >= 9, "too few checks: {checks:?}");
    for c in checks {
        assert_eq!(c["passed"], Value::Bool(true), "check failed: {c}");
    }
    assert_eq!(run["failure"], Value::Null);
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("dma-map-test-{}-{name}", std::process::id()))
}

#[test]
fn probe_reports_the_guest_memfd_this_host_really_has() {
    let p = json(&["probe"]);
    let kvm_direct = vm_rig::Feature::Kvm.probe().is_ok();
    let mmap_direct = vm_rig::Feature::GuestMemfdMmap.probe().is_ok();
    assert_eq!(
        p["kvm"]["unavailable"].is_null(),
        kvm_direct,
        "{}",
        p["kvm"]
    );
    let row = |item: &str| {
        p["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["item"] == item)
            .cloned()
    };
    if kvm_direct {
        let default = &p["kvm"]["vm_types"][0];
        assert_eq!(default["vm_type"], 0);
        let flags = default["support"]["Ok"]["guest_memfd_flags"]
            .as_u64()
            .unwrap();
        assert_eq!(flags & 3 == 3, mmap_direct, "flags {flags:#x}");
        let f = row("guest_memfd flags").expect("a guest_memfd flags finding");
        assert_eq!(f["status"], if mmap_direct { "yes" } else { "no" });
    } else {
        assert_eq!(row("/dev/kvm").unwrap()["status"], "no");
    }
    // Every missing piece says what it blocks and how to get it.
    for f in p["findings"].as_array().unwrap() {
        if f["status"] == "no" {
            assert!(f["blocks"].as_str().is_some_and(|s| !s.is_empty()), "{f}");
            assert!(f["fix"].as_str().is_some_and(|s| !s.is_empty()), "{f}");
        }
    }
    // The emulated backend is always usable.
    assert_eq!(p["backends"][0], "emulated");
}

#[test]
fn probe_table_names_each_area() {
    let o = dma_map(&["probe"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    for needle in [
        "KVM",
        "guest_memfd",
        "VFIO",
        "IOMMUFD",
        "RLIMIT_MEMLOCK",
        "PCI devices",
    ] {
        assert!(out.contains(needle), "{needle} missing from:\n{out}");
    }
}

#[test]
fn firmware_bounce_run_counts_add_up() {
    let r = json(&[
        "run",
        "--workload",
        "firmware-bounce",
        "--count",
        "500",
        "--region-size",
        "64M",
    ]);
    assert_eq!(u(&r, "requests"), 1000);
    assert_eq!(u(&r, "conversions_done"), 1000);
    all_checks_passed(&r);
    let k = &r["kernel_calls"];
    // Every request flips the pages it names (private -> shared -> private).
    assert_eq!(u(k, "attribute_sets"), 1000);
    // One map per page shared (1 or 2 per transaction), one merged unmap per transaction.
    assert!((500..=1000).contains(&u(k, "iommu_maps")), "{k}");
    assert_eq!(u(k, "iommu_unmaps"), 500);
    assert_eq!(u(&r, "final_mappings"), 0);
    assert!(u(&r, "peak_mappings") <= 2);
    assert_eq!(u(&r["latency"], "count"), 1000);
    let l = &r["latency"];
    assert!(u(l, "p50_ns") <= u(l, "p90_ns") && u(l, "p90_ns") <= u(l, "p99_ns"));
    assert!(u(l, "p99_ns") <= u(l, "max_ns"));
}

#[test]
fn linux_boot_run_maps_the_whole_pool_once() {
    let r = json(&[
        "run",
        "--workload",
        "linux-boot",
        "--region-size",
        "256M",
        "--chunk",
        "4M",
    ]);
    let pool_pages = (64u64 << 20) / 4096;
    assert_eq!(u(&r, "requests"), 16);
    assert_eq!(u(&r, "conversions_done"), 16);
    all_checks_passed(&r);
    assert_eq!(u(&r, "bytes_changed"), 64 << 20);
    assert_eq!(u(&r["kernel_calls"], "iommu_maps"), pool_pages);
    assert_eq!(u(&r["kernel_calls"], "iommu_unmaps"), 0);
    assert_eq!(u(&r, "final_mappings"), pool_pages);
    assert_eq!(u(&r, "peak_mappings"), pool_pages);
}

#[test]
fn random_mixed_run_passes_every_check() {
    let r = json(&[
        "run",
        "--workload",
        "random-mixed",
        "--count",
        "400",
        "--region-size",
        "64M",
        "--seed",
        "9",
    ]);
    assert_eq!(u(&r, "conversions_done"), 400);
    all_checks_passed(&r);
    assert!(u(&r, "final_mappings") <= u(&r, "peak_mappings"));
    assert!(u(&r["kernel_calls"], "attribute_sets") <= 400);
}

#[test]
fn virtio_mem_run_plugs_unplugs_and_refuses_conversions_of_unplugged_memory() {
    let args = [
        "run",
        "--workload",
        "virtio-mem",
        "--count",
        "800",
        "--region-size",
        "64M",
        "--region",
        "memfd-only",
        "--seed",
        "2",
    ];
    let r = json(&args);
    all_checks_passed(&r);
    let p = &r["plugging"];
    let (plugs, unplugs, refused) = (u(p, "plugs"), u(p, "unplugs"), u(p, "refused_unplugged"));
    assert!(plugs > 0 && unplugs > 0 && refused > 0, "{p}");
    assert_eq!(u(p, "plugged_bytes"), plugs * (2 << 20));
    assert_eq!(u(p, "unplugged_bytes"), unplugs * (2 << 20));
    // Every unplug frees its block; the plugs' and unplugs' calls are part of the whole run's.
    assert!(u(&p["unplug_calls"], "hole_punches") >= unplugs);
    let k = &r["kernel_calls"];
    for kind in [
        "attribute_sets",
        "iommu_maps",
        "iommu_unmaps",
        "hole_punches",
    ] {
        assert!(
            u(&p["plug_calls"], kind) + u(&p["unplug_calls"], kind) <= u(k, kind),
            "{kind}"
        );
    }
    assert_eq!(u(&r, "conversions_done"), u(&r, "requests"));
    // Conversions alone are timed.
    assert_eq!(
        u(&r["latency"], "count"),
        u(&r, "requests") - plugs - unplugs - refused
    );
    let checks: Vec<&str> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(
        checks.contains(&"no IOMMU mapping of unplugged memory, in any device's view"),
        "{checks:?}"
    );
    // Saved, the trace keeps what starts unplugged and replays to the same calls.
    let path = temp_path("virtio-mem.trace");
    let mut save = args.to_vec();
    save.extend(["--save-trace", path.to_str().unwrap()]);
    let first = json(&save);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains("\nunplugged 0x2000000 0x2000000\n"),
        "{}",
        &text[..300]
    );
    let again = json(&[
        "run",
        "--trace",
        path.to_str().unwrap(),
        "--region-size",
        "64M",
        "--region",
        "memfd-only",
    ]);
    std::fs::remove_file(&path).ok();
    all_checks_passed(&again);
    assert_eq!(first["kernel_calls"], again["kernel_calls"]);
    assert_eq!(first["plugging"], again["plugging"]);
    // The table shows the calls by request kind.
    let table = stdout(&dma_map(&args));
    for row in [
        "plugs",
        "unplugs",
        "conversions of unplugged memory refused",
    ] {
        assert!(table.contains(row), "{row} missing from:\n{table}");
    }
}

#[test]
fn eager_discard_punches_and_lazy_holds_back_within_its_budget() {
    let eager = json(&[
        "run",
        "--region",
        "classic",
        "--region-size",
        "64M",
        "--count",
        "300",
        "--policy",
        "eager",
    ]);
    all_checks_passed(&eager);
    // Each transaction vacates both sides once: two hole punches.
    assert_eq!(u(&eager["kernel_calls"], "hole_punches"), 600);
    assert_eq!(u(&eager, "peak_held_back_bytes"), 0);
    let lazy = json(&[
        "run",
        "--region",
        "classic",
        "--region-size",
        "64M",
        "--count",
        "300",
        "--policy",
        "lazy",
        "--lazy-budget",
        "256K",
    ]);
    all_checks_passed(&lazy);
    assert!(u(&lazy, "peak_held_back_bytes") <= 256 << 10);
    assert!(u(&lazy, "peak_held_back_bytes") > 0);
    assert!(u(&lazy["kernel_calls"], "hole_punches") < 600);
}

#[test]
fn compare_runs_each_policy_on_the_same_workload() {
    let c = json(&[
        "compare",
        "--region",
        "classic",
        "--region-size",
        "64M",
        "--count",
        "200",
    ]);
    let runs = c["runs"].as_array().unwrap();
    let policies: Vec<&str> = runs
        .iter()
        .map(|r| {
            r["setup"]["policy"]
                .as_str()
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
        })
        .collect();
    // The emulated IOMMU offers both mapping modes: each runs every policy.
    assert_eq!(
        policies,
        ["eager", "lazy", "batched", "eager", "lazy", "batched"]
    );
    let modes: Vec<&str> = runs
        .iter()
        .map(|r| {
            r["setup"]["backend"]
                .as_str()
                .unwrap()
                .rsplit(", ")
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(
        modes,
        [
            "per run",
            "per run",
            "per run",
            "per granule",
            "per granule",
            "per granule"
        ]
    );
    for mode in runs.chunks(3) {
        for r in mode {
            all_checks_passed(r);
            // Same workload: the same attribute sets and IOMMU calls whatever the policy.
            assert_eq!(
                r["kernel_calls"]["attribute_sets"],
                mode[0]["kernel_calls"]["attribute_sets"]
            );
            assert_eq!(
                r["kernel_calls"]["iommu_maps"],
                mode[0]["kernel_calls"]["iommu_maps"]
            );
        }
    }
    // Bounce buffers of one or two pages: per run maps each once, per granule each page.
    let maps = |i: usize| u(&runs[i]["kernel_calls"], "iommu_maps");
    assert!(
        maps(0) < maps(3),
        "per run {} vs per granule {}",
        maps(0),
        maps(3)
    );
    let punches = |i: usize| u(&runs[i]["kernel_calls"], "hole_punches");
    assert!(
        punches(0) > punches(1),
        "eager {} vs lazy {}",
        punches(0),
        punches(1)
    );
    let table = stdout(&dma_map(&[
        "compare",
        "--region-size",
        "64M",
        "--count",
        "50",
    ]));
    assert!(
        table.contains("eager") && table.contains("batched"),
        "{table}"
    );
}

#[test]
fn a_saved_trace_replays_to_the_same_counts() {
    let path = temp_path("roundtrip.trace");
    let p = path.to_str().unwrap();
    let first = json(&[
        "run",
        "--count",
        "100",
        "--region-size",
        "16M",
        "--seed",
        "4",
        "--save-trace",
        p,
    ]);
    let again = json(&["run", "--trace", p, "--region-size", "16M"]);
    std::fs::remove_file(&path).ok();
    assert_eq!(first["requests"], again["requests"]);
    assert_eq!(first["kernel_calls"], again["kernel_calls"]);
    assert!(again["workload"].as_str().unwrap().starts_with("trace"));
}

/// The requests of a saved trace: (direction, gpa, len).
fn saved_requests(args: &[&str]) -> Vec<(String, u64, u64)> {
    let path = temp_path(&format!("saved-{}.trace", args.join("-")));
    let mut all = args.to_vec();
    all.extend(["--save-trace", path.to_str().unwrap()]);
    json(&all);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).ok();
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[1].to_string(), hex(f[2]), hex(f[3]))
        })
        .collect()
}

#[test]
fn bounce_slots_and_freed_pages_shape_the_generated_workload() {
    let bounce = saved_requests(&[
        "run",
        "--count",
        "200",
        "--region-size",
        "16M",
        "--bounce-slots",
        "8",
    ]);
    assert_eq!(bounce.len(), 400);
    let slots: Vec<u64> = (0..8).map(|s| 0x10_0000 + s * 0x2000).collect();
    assert!(
        bounce.iter().all(|(_, gpa, _)| slots.contains(gpa)),
        "{bounce:?}"
    );

    let boot = saved_requests(&[
        "run",
        "--workload",
        "linux-boot",
        "--region-size",
        "256M",
        "--freed-pages",
        "16",
    ]);
    assert_eq!(boot.len(), 32 + 16);
    assert!(
        boot[..32]
            .iter()
            .all(|(to, _, len)| to == "shared" && *len == 2 << 20)
    );
    assert!(
        boot[32..]
            .iter()
            .all(|(to, _, len)| to == "private" && *len == 0x1000)
    );

    let o = dma_map(&["run", "--bounce-slots", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn a_bad_trace_line_is_named_by_its_number() {
    let path = temp_path("bad.trace");
    std::fs::write(
        &path,
        "# ok\n0 shared 0x1000 0x1000\n10 sideways 0x1000 0x1000\n",
    )
    .unwrap();
    let o = dma_map(&[
        "run",
        "--trace",
        path.to_str().unwrap(),
        "--region-size",
        "16M",
    ]);
    std::fs::remove_file(&path).ok();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("line 3") && e.contains("sideways"), "{e}");
}

#[test]
fn a_missing_trace_file_is_a_usage_error() {
    let o = dma_map(&["run", "--trace", "/nonexistent/x.trace"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot read the trace file /nonexistent/x.trace"));
}

#[test]
fn bad_arguments_exit_2_with_a_helpful_message() {
    let o = dma_map(&["run", "--workload", "nope"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("firmware-bounce"), "{}", stderr(&o));

    let o = dma_map(&["run", "--region-size", "lots"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("'lots' is not a size"),
        "{}",
        stderr(&o)
    );

    let o = dma_map(&["run", "--backend", "type1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--device"), "{}", stderr(&o));

    let o = dma_map(&["map", "--device", "zz"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("0000:00:03.0"), "{}", stderr(&o));

    let o = dma_map(&["run", "--workload", "linux-boot", "--region-size", "32M"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--region-size"), "{}", stderr(&o));
}

#[test]
fn a_missing_device_is_named_and_exits_3() {
    let o = dma_map(&["map", "--device", "0000:99:00.0", "--verify"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("0000:99:00.0") && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn map_without_a_device_verifies_through_the_emulated_iommu() {
    let m = json(&["map", "--size", "64K", "--verify"]);
    assert_eq!(u(&m, "mappings"), 16);
    assert_eq!(u(&m, "unmapped_bytes"), 64 << 10);
    let steps = m["verify"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    for s in steps {
        assert_eq!(s["passed"], Value::Bool(true), "{s}");
    }
}

#[test]
fn help_documents_the_exit_codes() {
    for args in [&["--help"][..], &["run", "--help"], &["map", "--help"]] {
        let o = dma_map(args);
        assert_eq!(o.status.code(), Some(0));
        let out = stdout(&o);
        assert!(
            out.contains("Exit codes:") && out.contains("3  this host lacks"),
            "{out}"
        );
    }
}

#[test]
fn the_main_job_probes_runs_and_compares() {
    let o = dma_map(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    for needle in [
        "Host probe",
        "Run: firmware-bounce",
        "invariant checks: ",
        "Compare:",
        "eager",
        "lazy",
        "batched",
    ] {
        assert!(out.contains(needle), "{needle} missing from:\n{out}");
    }
    assert!(!out.contains("FAIL"), "{out}");
    if vm_rig::Feature::Kvm.probe().is_err() {
        assert!(out.contains("no KVM"), "{out}");
    }
}

/// In the VM rig: the real edu device through VFIO type1, DMA in and out, and no DMA after unmap.
#[test]
fn kernel_dma_map_verifies_edu_through_type1() {
    if !vm_rig::need(
        "kernel_dma_map_verifies_edu_through_type1",
        &[vm_rig::Feature::Edu, vm_rig::Feature::VfioType1],
    ) {
        return;
    }
    let m = json(&["map", "--device", "edu", "--backend", "type1", "--verify"]);
    assert!(
        m["verify"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["passed"] == true),
        "{m}"
    );
}

/// In the VM rig: the same through IOMMUFD.
#[test]
fn kernel_dma_map_verifies_edu_through_iommufd() {
    if !vm_rig::need(
        "kernel_dma_map_verifies_edu_through_iommufd",
        &[vm_rig::Feature::Edu, vm_rig::Feature::Iommufd],
    ) {
        return;
    }
    let m = json(&["map", "--device", "edu", "--backend", "iommufd", "--verify"]);
    assert!(
        m["verify"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["passed"] == true),
        "{m}"
    );
}

#[test]
fn a_type1_sized_mapping_budget_stops_a_large_boot_and_leaves_state_consistent() {
    // 6 % of 8 GiB is a 491 MiB pool: more than 65535 mappings of 4 KiB (256 MiB).
    let o = dma_map(&[
        "--json",
        "run",
        "--workload",
        "linux-boot",
        "--region-size",
        "8G",
        "--mapping-budget",
        "65535",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("mapping budget"), "{}", stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).expect("the summary is still printed");
    let done = u(&r, "conversions_done");
    assert!(done > 0 && done < u(&r, "requests"), "{done}");
    assert!(u(&r, "peak_mappings") <= 65535);
    // The refused conversion changed nothing: every check on the state still passes.
    let checks = r["checks"].as_array().unwrap();
    assert!(checks.iter().all(|c| c["passed"] == true), "{checks:?}");
    assert!(
        r["failure"]
            .as_str()
            .unwrap()
            .contains(&format!("request {}", done + 1))
    );
}

#[test]
fn a_mapping_budget_is_refused_for_device_backends() {
    let o = dma_map(&[
        "run",
        "--backend",
        "type1",
        "--device",
        "0000:99:00.0",
        "--mapping-budget",
        "5",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("emulated IOMMU only"), "{}", stderr(&o));
}

/// In the VM rig: no-IOMMU mode pins and "maps" (physical addresses), and unpins. The edu test
/// runs when the pinned pages lie below edu's 28-bit DMA mask; otherwise the tool must say that
/// (exit 3 naming the mask) rather than report a failed mapping.
#[test]
fn kernel_dma_map_maps_edu_through_noiommu() {
    if !vm_rig::need(
        "kernel_dma_map_maps_edu_through_noiommu",
        &[vm_rig::Feature::Edu, vm_rig::Feature::NoIommu],
    ) {
        return;
    }
    let m = json(&[
        "map",
        "--device",
        "edu",
        "--backend",
        "noiommu",
        "--size",
        "64K",
    ]);
    assert_eq!(u(&m, "mappings"), 16);
    assert_eq!(u(&m, "unmapped_bytes"), 64 << 10);
    let o = dma_map(&[
        "--json",
        "map",
        "--device",
        "edu",
        "--backend",
        "noiommu",
        "--verify",
    ]);
    match o.status.code() {
        Some(0) => {
            let m: Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(m["verify"][0]["passed"], true, "{m}");
        }
        Some(3) => assert!(stderr(&o).contains("DMA mask"), "{}", stderr(&o)),
        other => panic!("exit {other:?}: {}", stderr(&o)),
    }
}

/// In the VM rig: a whole run on a real kernel, with the attribute changes sent to KVM (a
/// sw-protected VM) and the shared pages mapped through VFIO type1 for the edu device.
#[test]
fn kernel_dma_map_run_through_type1_with_kvm_private_memory() {
    if !vm_rig::need(
        "kernel_dma_map_run_through_type1_with_kvm_private_memory",
        &[
            vm_rig::Feature::Edu,
            vm_rig::Feature::VfioType1,
            vm_rig::Feature::KvmPrivateMemory,
        ],
    ) {
        return;
    }
    // virtio-mem: plugs and unplugs set KVM's attributes, unmap from type1 and free guest_memfd.
    for workload in ["firmware-bounce", "random-mixed", "virtio-mem"] {
        let r = json(&[
            "run",
            "--device",
            "edu",
            "--backend",
            "type1",
            "--workload",
            workload,
            "--region-size",
            "64M",
            "--count",
            "300",
            "--policy",
            "eager",
        ]);
        all_checks_passed(&r);
        assert_eq!(r["conversions_done"], r["requests"]);
        let fallbacks = r["setup"]["fallbacks"].to_string();
        assert!(!fallbacks.contains("memory attributes"), "{fallbacks}");
        assert!(
            r["setup"]["region"].as_str().unwrap().contains("VM type 1"),
            "{r}"
        );
        assert!(u(&r["kernel_calls"], "iommu_maps") > 0);
        if workload == "virtio-mem" {
            let p = &r["plugging"];
            assert!(u(p, "unplugs") > 0 && u(p, "refused_unplugged") > 0, "{p}");
        }
    }
}
