//! Conversion workloads: what a guest asks of its VMM, as a list of timestamped requests.
//!
//! Everything here is pure and deterministic: the same parameters and `--seed` give the same
//! requests on every machine, so a run can be repeated and two policies compared on exactly the
//! same input. The generators model the cases notes/kernel-uapi.md section 7 measures:
//! - [`firmware_bounce`]: OVMF-style DMA, 1 or 2 pages flipped to shared for one transaction and
//!   straight back to private, at random places (the case that took a 1 GiB SNP boot from 32 s to
//!   1 min 43 s).
//! - [`linux_boot`]: a Linux CoCo guest converting its SWIOTLB bounce pool to shared once at boot
//!   (`clamp(total * 6 / 100, 64 MiB, 1 GiB)`), in chunks.
//! - [`random_mixed`]: random directions, places and lengths (1 page to 2 MiB).

use std::fmt;

use serde::Serialize;

/// The attribute a request asks a range to have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Convert to shared (host-visible, device-DMA-able).
    Shared,
    /// Convert to private.
    Private,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Shared => "shared",
            Target::Private => "private",
        })
    }
}

/// One conversion request: at `time_ns`, make `[gpa, gpa + len)` `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Request {
    /// When the guest asked, in nanoseconds from the start of the workload (informational: runs
    /// go as fast as the engine allows).
    pub time_ns: u64,
    /// The attribute asked for.
    pub to: Target,
    /// First guest-physical address, relative to the region base.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A named list of requests over a region whose pages all start private.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// What produced it (generator name and parameters, or the trace file).
    pub name: String,
    /// Bytes of guest RAM the requests address; every request lies inside `[0, region_size)`.
    pub region_size: u64,
    /// The requests, in time order.
    pub requests: Vec<Request>,
}

/// The base page size every generated request is a multiple of.
pub const PAGE: u64 = 4096;

/// Time between two generated guest requests (a firmware DMA transaction takes a few µs).
const GENERATED_INTERVAL_NS: u64 = 5_000;

/// A small deterministic random number generator (SplitMix64): reproducible from a seed on
/// every platform, which is all a workload generator needs.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `[0, bound)`; `bound` must not be zero.
    pub fn below(&mut self, bound: u64) -> u64 {
        // Multiply-shift: unbiased enough for workload generation, and never divides by zero
        // for bound >= 1.
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }
}

/// Parameters a generator was given that cannot describe a workload.
#[derive(Debug, PartialEq, Eq)]
pub enum GenError {
    /// The region is too small for the workload.
    RegionTooSmall {
        /// Region size asked for.
        region_size: u64,
        /// What the workload needs at least.
        needed: u64,
    },
    /// A size that must be a multiple of the page size is not.
    Unaligned {
        /// Which parameter.
        what: &'static str,
        /// Its value.
        value: u64,
    },
}

impl fmt::Display for GenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GenError::RegionTooSmall {
                region_size,
                needed,
            } => write!(
                f,
                "the region ({}) is too small for this workload, which needs at least {}; \
                 pass a larger --region-size",
                crate::units::Bytes(*region_size),
                crate::units::Bytes(*needed)
            ),
            GenError::Unaligned { what, value } => write!(
                f,
                "{what} ({value:#x}) is not a multiple of the 4 KiB page size"
            ),
        }
    }
}

impl std::error::Error for GenError {}

fn check_region(region_size: u64, needed: u64) -> Result<(), GenError> {
    if region_size % PAGE != 0 {
        return Err(GenError::Unaligned {
            what: "the region size",
            value: region_size,
        });
    }
    if region_size < needed {
        return Err(GenError::RegionTooSmall {
            region_size,
            needed,
        });
    }
    Ok(())
}

/// Firmware bounce buffers: `transactions` DMA transactions, each flipping 1 or 2 pages at a
/// random page of the region to shared and back to private (two requests per transaction).
///
/// # Errors
/// The region is not page-aligned or smaller than two pages.
pub fn firmware_bounce(
    region_size: u64,
    transactions: u64,
    seed: u64,
) -> Result<Workload, GenError> {
    check_region(region_size, 2 * PAGE)?;
    let pages = region_size / PAGE;
    let mut rng = Rng::new(seed);
    let mut requests = Vec::with_capacity(usize::try_from(transactions * 2).unwrap_or(0));
    let mut time_ns = 0;
    for _ in 0..transactions {
        let len_pages = 1 + rng.below(2);
        let page = rng.below(pages - len_pages + 1);
        for to in [Target::Shared, Target::Private] {
            requests.push(Request {
                time_ns,
                to,
                gpa: page * PAGE,
                len: len_pages * PAGE,
            });
            time_ns += GENERATED_INTERVAL_NS;
        }
    }
    Ok(Workload {
        name: format!("firmware-bounce ({transactions} transactions, seed {seed})"),
        region_size,
        requests,
    })
}

/// The SWIOTLB bounce pool size a Linux CoCo guest of `guest_ram` bytes converts at boot:
/// `clamp(guest_ram * 6 / 100, 64 MiB, 1 GiB)` (arch/x86/mm/mem_encrypt.c), rounded down to pages.
pub fn swiotlb_pool_size(guest_ram: u64) -> u64 {
    const MIN: u64 = 64 << 20;
    const MAX: u64 = 1 << 30;
    ((guest_ram / 100).saturating_mul(6)).clamp(MIN, MAX) / PAGE * PAGE
}

/// Linux boot: the SWIOTLB pool ([`swiotlb_pool_size`] of the region) converted to shared once,
/// in requests of `chunk` bytes (the last one may be shorter), at a 2 MiB-aligned place chosen by
/// `seed`.
///
/// # Errors
/// `chunk` is zero or not page-aligned, or the region is smaller than the pool.
pub fn linux_boot(region_size: u64, chunk: u64, seed: u64) -> Result<Workload, GenError> {
    if chunk == 0 || chunk % PAGE != 0 {
        return Err(GenError::Unaligned {
            what: "the chunk size",
            value: chunk,
        });
    }
    let pool = swiotlb_pool_size(region_size);
    check_region(region_size, pool)?;
    const ALIGN: u64 = 2 << 20;
    let slots = (region_size - pool) / ALIGN + 1;
    let base = Rng::new(seed).below(slots) * ALIGN;
    let base = base.min(region_size - pool);
    let mut requests = Vec::new();
    let mut offset = 0;
    let mut time_ns = 0;
    while offset < pool {
        let len = chunk.min(pool - offset);
        requests.push(Request {
            time_ns,
            to: Target::Shared,
            gpa: base + offset,
            len,
        });
        offset += len;
        time_ns += GENERATED_INTERVAL_NS;
    }
    Ok(Workload {
        name: format!(
            "linux-boot (SWIOTLB pool {} at {base:#x} in {} chunks, seed {seed})",
            crate::units::Bytes(pool),
            crate::units::Bytes(chunk)
        ),
        region_size,
        requests,
    })
}

/// Random mixed: `count` requests with a random direction, place and length (60 % one page,
/// 30 % 2..16 pages, 10 % 16 pages..2 MiB).
///
/// # Errors
/// The region is not page-aligned or smaller than 2 MiB.
pub fn random_mixed(region_size: u64, count: u64, seed: u64) -> Result<Workload, GenError> {
    const MAX_LEN: u64 = 2 << 20;
    check_region(region_size, MAX_LEN)?;
    let pages = region_size / PAGE;
    let mut rng = Rng::new(seed);
    let mut requests = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for i in 0..count {
        let to = if rng.below(2) == 0 {
            Target::Shared
        } else {
            Target::Private
        };
        let len_pages = match rng.below(10) {
            0..=5 => 1,
            6..=8 => 2 + rng.below(15),
            _ => 16 + rng.below(MAX_LEN / PAGE - 16 + 1),
        };
        let page = rng.below(pages - len_pages + 1);
        requests.push(Request {
            time_ns: i * GENERATED_INTERVAL_NS,
            to,
            gpa: page * PAGE,
            len: len_pages * PAGE,
        });
    }
    Ok(Workload {
        name: format!("random-mixed ({count} requests, seed {seed})"),
        region_size,
        requests,
    })
}

/// The shared extents `[start, end)` after every request of `w` applied in order to a region
/// that starts all private: the oracle a run's final state is checked against, computed
/// independently of the library.
pub fn final_shared(w: &Workload) -> Vec<(u64, u64)> {
    use std::collections::BTreeMap;
    // Disjoint, non-adjacent extents: start -> end.
    let mut set: BTreeMap<u64, u64> = BTreeMap::new();
    for r in &w.requests {
        let (mut start, mut end) = (r.gpa, r.gpa + r.len);
        // Every extent touching [start, end) (overlapping or adjacent) is cut or merged.
        let touching: Vec<(u64, u64)> = set
            .range(..=end)
            .rev()
            .take_while(|&(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            set.remove(&s);
            match r.to {
                Target::Shared => {
                    start = start.min(s);
                    end = end.max(e);
                }
                Target::Private => {
                    if s < start {
                        set.insert(s, start);
                    }
                    if e > end {
                        set.insert(end, e);
                    }
                }
            }
        }
        if r.to == Target::Shared {
            set.insert(start, end);
        }
    }
    set.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_inside_and_aligned(w: &Workload) {
        for r in &w.requests {
            assert!(r.len > 0 && r.len % PAGE == 0, "{r:?}");
            assert_eq!(r.gpa % PAGE, 0, "{r:?}");
            assert!(
                r.gpa + r.len <= w.region_size,
                "{r:?} outside {}",
                w.region_size
            );
        }
        assert!(w.requests.windows(2).all(|p| p[0].time_ns <= p[1].time_ns));
    }

    #[test]
    fn firmware_bounce_flips_one_or_two_pages_and_back() {
        let w = firmware_bounce(64 << 20, 1000, 7).unwrap();
        assert_eq!(w.requests.len(), 2000);
        all_inside_and_aligned(&w);
        let mut lens = std::collections::HashSet::new();
        for pair in w.requests.chunks(2) {
            assert_eq!(pair[0].to, Target::Shared);
            assert_eq!(pair[1].to, Target::Private);
            assert_eq!((pair[0].gpa, pair[0].len), (pair[1].gpa, pair[1].len));
            lens.insert(pair[0].len);
        }
        assert_eq!(lens, [PAGE, 2 * PAGE].into_iter().collect());
    }

    #[test]
    fn generators_are_deterministic_per_seed() {
        assert_eq!(
            firmware_bounce(1 << 30, 100, 1).unwrap(),
            firmware_bounce(1 << 30, 100, 1).unwrap()
        );
        assert_ne!(
            firmware_bounce(1 << 30, 100, 1).unwrap().requests,
            firmware_bounce(1 << 30, 100, 2).unwrap().requests
        );
        assert_eq!(
            random_mixed(1 << 30, 100, 3).unwrap(),
            random_mixed(1 << 30, 100, 3).unwrap()
        );
    }

    #[test]
    fn swiotlb_pool_is_six_percent_clamped_to_64m_1g() {
        assert_eq!(swiotlb_pool_size(1 << 30), 64 << 20);
        assert_eq!(
            swiotlb_pool_size(4 << 30),
            (4u64 << 30) / 100 * 6 / PAGE * PAGE
        );
        assert_eq!(swiotlb_pool_size(64 << 30), 1 << 30);
    }

    #[test]
    fn linux_boot_converts_the_pool_to_shared_exactly_once() {
        let w = linux_boot(1 << 30, 2 << 20, 5).unwrap();
        all_inside_and_aligned(&w);
        assert_eq!(w.requests.len(), 32);
        assert!(w.requests.iter().all(|r| r.to == Target::Shared));
        assert_eq!(w.requests.iter().map(|r| r.len).sum::<u64>(), 64 << 20);
        // Contiguous, no page twice.
        for pair in w.requests.windows(2) {
            assert_eq!(pair[0].gpa + pair[0].len, pair[1].gpa);
        }
        // A chunk that does not divide the pool leaves a shorter last request.
        let w = linux_boot(1 << 30, 3 << 20, 5).unwrap();
        assert_eq!(w.requests.iter().map(|r| r.len).sum::<u64>(), 64 << 20);
        assert_eq!(w.requests.last().unwrap().len, (64 << 20) % (3 << 20));
    }

    #[test]
    fn linux_boot_refuses_a_region_smaller_than_its_pool() {
        assert_eq!(
            linux_boot(32 << 20, 2 << 20, 0),
            Err(GenError::RegionTooSmall {
                region_size: 32 << 20,
                needed: 64 << 20
            })
        );
        assert!(matches!(
            linux_boot(1 << 30, 100, 0),
            Err(GenError::Unaligned { .. })
        ));
    }

    #[test]
    fn random_mixed_covers_both_directions_and_all_length_classes() {
        let w = random_mixed(256 << 20, 2000, 11).unwrap();
        assert_eq!(w.requests.len(), 2000);
        all_inside_and_aligned(&w);
        let shared = w.requests.iter().filter(|r| r.to == Target::Shared).count();
        assert!((800..1200).contains(&shared), "{shared} of 2000 shared");
        assert!(w.requests.iter().any(|r| r.len == PAGE));
        assert!(
            w.requests
                .iter()
                .any(|r| (2 * PAGE..16 * PAGE).contains(&r.len))
        );
        assert!(w.requests.iter().any(|r| r.len > 16 * PAGE));
        assert!(w.requests.iter().all(|r| r.len <= 2 << 20));
    }

    #[test]
    fn final_shared_replays_requests_in_order() {
        let req = |to, gpa, len| Request {
            time_ns: 0,
            to,
            gpa,
            len,
        };
        let w = Workload {
            name: String::new(),
            region_size: 1 << 20,
            requests: vec![
                req(Target::Shared, 0x1000, 0x4000),
                req(Target::Shared, 0x5000, 0x1000), // adjacent: merges
                req(Target::Private, 0x2000, 0x1000), // splits
                req(Target::Shared, 0x10000, 0x1000),
                req(Target::Private, 0x0, 0x1000), // already private: no change
                req(Target::Private, 0x5000, 0x20000), // cuts the tail and the lone page
            ],
        };
        assert_eq!(final_shared(&w), [(0x1000, 0x2000), (0x3000, 0x5000)]);
        // Firmware bounce ends where it started: everything private.
        assert!(final_shared(&firmware_bounce(1 << 20, 100, 1).unwrap()).is_empty());
        let boot = linux_boot(1 << 30, 2 << 20, 1).unwrap();
        let pool = &boot.requests;
        assert_eq!(
            final_shared(&boot),
            [(
                pool[0].gpa,
                pool[pool.len() - 1].gpa + pool[pool.len() - 1].len
            )]
        );
    }

    #[test]
    fn rng_below_stays_in_bounds() {
        let mut rng = Rng::new(0);
        assert!((0..10_000).all(|_| rng.below(3) < 3));
        assert_eq!(Rng::new(9).below(1), 0);
    }
}
