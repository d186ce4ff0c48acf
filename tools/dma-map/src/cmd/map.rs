//! `dma-map map`: map a guest-RAM-like region for a device one granule per mapping (as the
//! conversion engine does), optionally prove with a device DMA test that the mapping reaches
//! memory and that the unmapped range does not, then unmap everything.

use anyhow::Context as _;
use serde::Serialize;
use vm_memory::{Bytes as _, MemoryRegionAddress};

use iommu::emulated::UnmapStyle;
use iommu::{DmaProt, Edu, EduError, Ledger};

use crate::cli::{MapArgs, MappingChoice, RegionChoice};
use crate::exit::{Class, error};
use crate::setup::{self, Backend, Device, REGION_BASE};

/// Granularity of the mappings `map` makes (one 4 KiB page each, like the engine's shared view).
const GRANULE: u64 = 4096;

/// One step of the device test.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    /// What was tried.
    pub name: String,
    /// Whether it did what a correct IOMMU does.
    pub passed: bool,
    /// What was seen.
    pub detail: String,
}

/// What `map` did.
#[derive(Clone, Debug, Serialize)]
pub struct MapSummary {
    /// The backend.
    pub backend: String,
    /// The region backing.
    pub region: String,
    /// What was not available.
    pub fallbacks: Vec<String>,
    /// First IOVA.
    pub iova: u64,
    /// Bytes mapped.
    pub size: u64,
    /// Mappings made.
    pub mappings: u64,
    /// Kernel map calls.
    pub map_calls: u64,
    /// Kernel unmap calls of the teardown (the ledger merges whole mappings).
    pub unmap_calls: u64,
    /// Bytes the teardown unmapped.
    pub unmapped_bytes: u64,
    /// Device test steps (empty without --verify).
    pub verify: Vec<Step>,
}

impl MapSummary {
    /// True when every test step passed.
    pub fn ok(&self) -> bool {
        self.verify.iter().all(|s| s.passed)
    }
}

/// A recognisable pattern that differs for each `seed`.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The device side of the test: something that can move bytes between IOVAs and itself.
enum Tester<'a> {
    Emulated(&'a iommu::EmulatedIommu),
    Edu {
        edu: Edu<std::sync::Arc<iommu::VfioPciDevice>>,
        translates: bool,
    },
    EduNoIommu {
        edu: Edu<std::sync::Arc<iommu::NoIommuDevice>>,
        backend: &'a iommu::NoIommuBackend,
    },
}

impl Tester<'_> {
    /// Max bytes per DMA.
    fn chunk(&self) -> usize {
        match self {
            Tester::Emulated(_) => 4096,
            Tester::Edu { .. } | Tester::EduNoIommu { .. } => {
                Edu::<std::sync::Arc<iommu::VfioPciDevice>>::MAX_DMA as usize
            }
        }
    }

    /// Device reads `[src, src+len)` and writes it to `[dst, dst+len)`.
    fn copy(&self, src: u64, dst: u64, len: usize) -> anyhow::Result<()> {
        match self {
            Tester::Emulated(emu) => {
                let mut buf = vec![0; len];
                emu.dma_read(src, &mut buf)?;
                emu.dma_write(dst, &buf)?;
            }
            Tester::Edu { edu, .. } => {
                edu.copy_to_device(src, len as u32).map_err(beyond_mask)?;
                edu.copy_from_device(dst, len as u32).map_err(beyond_mask)?;
            }
            Tester::EduNoIommu { edu, backend } => {
                let phys = |iova: u64| {
                    backend
                        .physical_address(iova)
                        .with_context(|| format!("no physical address for iova {iova:#x}"))
                };
                edu.copy_to_device(phys(src)?, len as u32)
                    .map_err(beyond_mask)?;
                edu.copy_from_device(phys(dst)?, len as u32)
                    .map_err(beyond_mask)?;
            }
        }
        Ok(())
    }

    /// Whether an unmapped IOVA is unreachable (false in no-IOMMU mode).
    fn isolates(&self) -> bool {
        match self {
            Tester::Emulated(_) => true,
            Tester::Edu { translates, .. } => *translates,
            Tester::EduNoIommu { .. } => false,
        }
    }
}

/// edu cannot address the range at all: the test cannot run here, which is not a mapping fault.
fn beyond_mask(e: EduError) -> anyhow::Error {
    match e {
        EduError::BeyondDmaMask { bus_addr, mask, .. } => error(
            Class::HostLacks,
            format!(
                "the edu device cannot reach bus address {bus_addr:#x} (its DMA mask is \
                 {mask:#x}): use an --iova below 256 MiB, or in no-IOMMU mode start QEMU with \
                 -device edu,dma_mask=0xffffffffff"
            ),
        ),
        other => other.into(),
    }
}

fn tester<'a>(b: &'a Backend) -> anyhow::Result<Tester<'a>> {
    if let Some(emu) = &b.emulated {
        return Ok(Tester::Emulated(emu));
    }
    let not_edu = |address, e: EduError| match e {
        EduError::NotEdu { .. } => error(
            Class::HostLacks,
            format!(
                "{address} has no DMA self-test: --verify knows only QEMU's edu device \
                 (1234:11e8); map without --verify"
            ),
        ),
        other => anyhow::Error::new(other).context(format!("starting the edu driver on {address}")),
    };
    match &b.device {
        Some((address, Device::Vfio(d))) => Ok(Tester::Edu {
            edu: Edu::new(d.clone()).map_err(|e| not_edu(*address, e))?,
            translates: b.backend.capabilities()?.translates,
        }),
        Some((address, Device::NoIommu(d, backend))) => Ok(Tester::EduNoIommu {
            edu: Edu::new(d.clone()).map_err(|e| not_edu(*address, e))?,
            backend,
        }),
        None => Err(anyhow::anyhow!("a kernel backend without a device")),
    }
}

fn step(name: &str, passed: bool, detail: impl Into<String>) -> Step {
    Step {
        name: name.to_string(),
        passed,
        detail: detail.into(),
    }
}

/// Runs `map`.
pub fn run(args: &MapArgs) -> anyhow::Result<MapSummary> {
    if args.size == 0 || args.size % GRANULE != 0 || args.iova % GRANULE != 0 {
        return Err(error(
            Class::Usage,
            format!(
                "--size {:#x} and --iova {:#x} must be non-zero multiples of 4 KiB",
                args.size, args.iova
            ),
        ));
    }
    let backend = match &args.device {
        Some(device) => setup::backend(args.backend, Some(device), None, MappingChoice::Auto)?,
        None => setup::emulated(None, UnmapStyle::Type1v2),
    };
    let mut fallbacks = Vec::new();
    if args.device.is_none() {
        fallbacks.push(format!(
            "no --device: the emulated IOMMU stands in for a device{}",
            match args.backend {
                crate::cli::BackendChoice::Emulated => String::new(),
                other => format!(" (--backend {other} needs --device)"),
            }
        ));
    }
    let region = setup::region(RegionChoice::Auto, args.size)?;
    fallbacks.extend(region.fallbacks.iter().cloned());
    let ledger =
        Ledger::new(backend.backend.clone()).context("reading the backend's capabilities")?;
    let host = region
        .backing
        .host_addr(REGION_BASE)
        .context("the region has no host mapping")?;
    // SAFETY: `host` is the start of the region's shared mapping, `args.size` bytes long (the
    // region was created with that size). The region outlives every mapping: the ledger is
    // closed (everything unmapped) below before `region` is dropped, and on an early return the
    // ledger is dropped first (declared after `region`), and its drop unmaps everything. The tool
    // holds no Rust reference into that memory; it touches it only through vm-memory's volatile
    // accessors.
    unsafe { ledger.map_va_pieces(args.iova, args.size, host, GRANULE, DmaProt::READ_WRITE) }
        .with_context(|| {
            format!(
                "mapping {:#x} bytes at iova {:#x} with {}",
                args.size, args.iova, backend.name
            )
        })?;
    let mapped = ledger.stats();
    let mut verify = Vec::new();
    let mem = region
        .backing
        .mapping()
        .context("the tool's backing is mapped by gmem-dma")?;
    let len_for_test = |t: &Tester| t.chunk().min((args.size / 2) as usize);
    // The device copies the first `n` bytes of the region onto the next `n`, which are cleared
    // first; returns how the copy went and what the target holds afterwards.
    let copy_and_read_back =
        |t: &Tester, n: usize| -> anyhow::Result<(anyhow::Result<()>, Vec<u8>)> {
            mem.write_slice(&vec![0; n], MemoryRegionAddress(n as u64))
                .context("clearing the test target")?;
            let moved = t.copy(args.iova, args.iova + n as u64, n);
            let mut back = vec![0; n];
            mem.read_slice(&mut back, MemoryRegionAddress(n as u64))
                .context("reading the test target")?;
            Ok((moved, back))
        };
    let tester = if args.verify {
        Some(tester(&backend)?)
    } else {
        None
    };
    if let Some(t) = &tester {
        let n = len_for_test(t);
        let p = pattern(n, 0x5a);
        mem.write_slice(&p, MemoryRegionAddress(0))
            .context("writing the test pattern")?;
        let (moved, back) = copy_and_read_back(t, n)?;
        verify.push(match moved {
            Ok(()) => step(
                "device reads and writes mapped memory",
                back == p,
                if back == p {
                    format!(
                        "{n} bytes DMA'd from iova {:#x} to {:#x} arrived intact",
                        args.iova,
                        args.iova + n as u64
                    )
                } else {
                    format!("{n} bytes DMA'd, but the target differs from the pattern")
                },
            ),
            // The device cannot run the test here at all: say so instead of failing a step.
            Err(e) if crate::exit::code_of(&e) == Class::HostLacks.code() => return Err(e),
            Err(e) => step(
                "device reads and writes mapped memory",
                false,
                format!("{e:#}"),
            ),
        });
    }
    let report = ledger.unmap_all().context("unmapping the region")?;
    if let Some(t) = &tester {
        let n = len_for_test(t);
        if t.isolates() {
            let (moved, back) = copy_and_read_back(t, n)?;
            let untouched = back.iter().all(|&b| b == 0);
            verify.push(step(
                "device cannot reach memory after unmap",
                untouched,
                match (&moved, untouched) {
                    (Err(e), true) => format!("the DMA was refused: {e:#}"),
                    (Ok(()), true) => {
                        "the DMA did not reach memory (the IOMMU dropped it)".to_string()
                    }
                    (_, false) => {
                        "memory changed after the unmap: the device still reaches it".to_string()
                    }
                },
            ));
        } else {
            // Not a step: a check that was not made must not read as passed.
            fallbacks.push(
                "no-IOMMU mode has no isolation by design: the after-unmap check is not made"
                    .to_string(),
            );
        }
    }
    let mappings = mapped.mappings;
    let region_name = region.name.clone();
    drop(ledger);
    drop(region);
    Ok(MapSummary {
        backend: backend.name,
        region: region_name,
        fallbacks,
        iova: args.iova,
        size: args.size,
        mappings,
        map_calls: mapped.map_calls,
        unmap_calls: report.calls,
        unmapped_bytes: report.bytes,
        verify,
    })
}

/// `map`'s summary as text.
pub fn render(s: &MapSummary) -> String {
    let mut out = format!(
        "Map: {} of a {} region at iova {:#x} through {}\n",
        crate::units::Bytes(s.size),
        s.region,
        s.iova,
        s.backend
    );
    for f in &s.fallbacks {
        out.push_str(&format!("  fallback: {f}\n"));
    }
    out.push_str(&format!(
        "  mapped as {} mappings ({} map calls); unmapped with {} calls ({})\n",
        s.mappings,
        s.map_calls,
        s.unmap_calls,
        crate::units::Bytes(s.unmapped_bytes)
    ));
    for v in &s.verify {
        let mark = if v.passed { "ok  " } else { "FAIL" };
        out.push_str(&format!("  {mark} {}: {}\n", v.name, v.detail));
    }
    out
}
