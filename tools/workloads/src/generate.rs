//! The workload generators, and the oracle a run's final state is checked against.
//!
//! They model the conversion patterns real confidential guests produce:
//! - [`firmware_bounce`]: OVMF-style DMA, 1 or 2 pages flipped to shared for one transaction and
//!   straight back to private (the case that took a 1 GiB SNP boot from 32 s to 1 min 43 s),
//!   anywhere in the region or in a small pool of bounce slots.
//! - [`linux_boot`]: a Linux CoCo guest converting its SWIOTLB bounce pool to shared once at boot
//!   (`clamp(total * 6 / 100, 64 MiB, 1 GiB)`), in chunks, then optionally freeing single pages
//!   of it again (`dma_free_coherent`), which leaves a large shared range mixed.
//! - [`random_mixed`]: random directions, places and lengths (1 page to 2 MiB).
//! - [`bounce_in_flight`]: bounce buffers that stay shared while a number of others are in flight.

use std::fmt;

use crate::{Bytes, PAGE, Request, Rng, Target, Workload};

/// Time between two generated guest requests (a firmware DMA transaction takes a few µs).
const GENERATED_INTERVAL_NS: u64 = 5_000;

/// Requests in the making, each [`GENERATED_INTERVAL_NS`] after the one before.
struct Requests {
    list: Vec<Request>,
    time_ns: u64,
}

impl Requests {
    fn with_capacity(requests: u64) -> Self {
        Self {
            list: Vec::with_capacity(usize::try_from(requests).unwrap_or(0)),
            time_ns: 0,
        }
    }

    fn push(&mut self, to: Target, gpa: u64, len: u64) {
        self.list.push(Request {
            time_ns: self.time_ns,
            to,
            gpa,
            len,
        });
        self.time_ns += GENERATED_INTERVAL_NS;
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
    /// A bounce area of zero slots.
    NoSlots,
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
                Bytes(*region_size),
                Bytes(*needed)
            ),
            GenError::NoSlots => write!(f, "a bounce area needs at least one slot"),
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

/// Where a firmware places its bounce buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BounceArea {
    /// At a random page of the region for every transaction: a fresh place each time.
    Anywhere,
    /// In one of this many two-page slots from [`BOUNCE_POOL_OFFSET`]: a firmware taking its
    /// bounce buffers from a small pool it reuses, as OVMF's IoMmuDxe does.
    Slots(u64),
}

/// Where the [`BounceArea::Slots`] pool starts in the region (1 MiB: low firmware memory).
pub const BOUNCE_POOL_OFFSET: u64 = 1 << 20;

/// What [`firmware_bounce`] generates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirmwareBounce {
    /// DMA transactions (two requests each).
    pub transactions: u64,
    /// Where the buffers go.
    pub area: BounceArea,
}

/// Firmware bounce buffers: `transactions` DMA transactions, each flipping 1 or 2 pages in
/// `area` to shared and straight back to private (two requests per transaction). The workload
/// ends with every page private.
///
/// # Errors
/// The region is not page-aligned or too small for the area (two pages; the end of the last
/// slot), or the area has no slot.
pub fn firmware_bounce(
    region_size: u64,
    params: FirmwareBounce,
    seed: u64,
) -> Result<Workload, GenError> {
    let FirmwareBounce { transactions, area } = params;
    let pages = region_size / PAGE;
    let area_name = match area {
        BounceArea::Anywhere => {
            check_region(region_size, 2 * PAGE)?;
            String::new()
        }
        BounceArea::Slots(0) => return Err(GenError::NoSlots),
        BounceArea::Slots(slots) => {
            let end = slots
                .checked_mul(2 * PAGE)
                .and_then(|len| len.checked_add(BOUNCE_POOL_OFFSET))
                .unwrap_or(u64::MAX);
            check_region(region_size, end)?;
            format!(", {slots} slots")
        }
    };
    let mut rng = Rng::new(seed);
    let mut requests = Requests::with_capacity(transactions.saturating_mul(2));
    for _ in 0..transactions {
        let len_pages = 1 + rng.below(2);
        let page = match area {
            BounceArea::Anywhere => rng.below(pages - len_pages + 1),
            BounceArea::Slots(slots) => BOUNCE_POOL_OFFSET / PAGE + rng.below(slots) * 2,
        };
        for to in [Target::Shared, Target::Private] {
            requests.push(to, page * PAGE, len_pages * PAGE);
        }
    }
    Ok(Workload {
        name: format!("firmware-bounce ({transactions} transactions{area_name}, seed {seed})"),
        region_size,
        requests: requests.list,
    })
}

/// The SWIOTLB bounce pool size a Linux CoCo guest of `guest_ram` bytes converts at boot:
/// `clamp(guest_ram * 6 / 100, 64 MiB, 1 GiB)` (arch/x86/mm/mem_encrypt.c), rounded down to pages.
pub fn swiotlb_pool_size(guest_ram: u64) -> u64 {
    const MIN: u64 = 64 << 20;
    const MAX: u64 = 1 << 30;
    ((guest_ram / 100).saturating_mul(6)).clamp(MIN, MAX) / PAGE * PAGE
}

/// What [`linux_boot`] generates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxBoot {
    /// Request size of the pool's conversion to shared (the last request may be shorter).
    pub chunk: u64,
    /// Single pages of the pool converted back to private afterwards, at random places (a
    /// driver's `dma_free_coherent`): they leave the shared pool mixed.
    pub freed_pages: u64,
}

/// Linux boot: the SWIOTLB pool ([`swiotlb_pool_size`] of the region) converted to shared once,
/// in requests of `chunk` bytes, at a 2 MiB-aligned place chosen by `seed`; then `freed_pages`
/// random pages of it converted back to private one by one.
///
/// # Errors
/// `chunk` is zero or not page-aligned, or the region is smaller than the pool.
pub fn linux_boot(region_size: u64, params: LinuxBoot, seed: u64) -> Result<Workload, GenError> {
    let LinuxBoot { chunk, freed_pages } = params;
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
    let mut rng = Rng::new(seed);
    let base = (rng.below(slots) * ALIGN).min(region_size - pool);
    let mut requests = Requests::with_capacity(pool.div_ceil(chunk).saturating_add(freed_pages));
    let mut offset = 0;
    while offset < pool {
        let len = chunk.min(pool - offset);
        requests.push(Target::Shared, base + offset, len);
        offset += len;
    }
    for _ in 0..freed_pages {
        requests.push(Target::Private, base + rng.below(pool / PAGE) * PAGE, PAGE);
    }
    let freed = match freed_pages {
        0 => String::new(),
        n => format!(", {n} pages freed"),
    };
    Ok(Workload {
        name: format!(
            "linux-boot (SWIOTLB pool {} at {base:#x} in {} chunks{freed}, seed {seed})",
            Bytes(pool),
            Bytes(chunk)
        ),
        region_size,
        requests: requests.list,
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
    let mut requests = Requests::with_capacity(count);
    for _ in 0..count {
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
        requests.push(to, page * PAGE, len_pages * PAGE);
    }
    Ok(Workload {
        name: format!("random-mixed ({count} requests, seed {seed})"),
        region_size,
        requests: requests.list,
    })
}

/// What [`bounce_in_flight`] generates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BounceInFlight {
    /// Buffers converted to shared (and later back).
    pub buffers: u64,
    /// How many other buffers are converted shared before a buffer goes back to private.
    pub in_flight: u64,
}

/// Bounce buffers in flight: each of `buffers` buffers (1-2 pages at a random place) is
/// converted shared, and converted back to private `in_flight` buffers later; the workload ends
/// with the buffers still in flight converted back, so every page is private again.
///
/// # Errors
/// The region is not page-aligned or smaller than two pages.
pub fn bounce_in_flight(
    region_size: u64,
    params: BounceInFlight,
    seed: u64,
) -> Result<Workload, GenError> {
    let BounceInFlight { buffers, in_flight } = params;
    check_region(region_size, 2 * PAGE)?;
    let pages = region_size / PAGE;
    let mut rng = Rng::new(seed);
    let mut live = std::collections::VecDeque::new();
    let mut requests = Requests::with_capacity(buffers.saturating_mul(2));
    for _ in 0..buffers {
        let len_pages = 1 + rng.below(2);
        let (gpa, len) = (rng.below(pages - len_pages + 1) * PAGE, len_pages * PAGE);
        requests.push(Target::Shared, gpa, len);
        live.push_back((gpa, len));
        if live.len() as u64 > in_flight {
            if let Some((gpa, len)) = live.pop_front() {
                requests.push(Target::Private, gpa, len);
            }
        }
    }
    for (gpa, len) in live {
        requests.push(Target::Private, gpa, len);
    }
    Ok(Workload {
        name: format!("bounce-in-flight ({buffers} buffers, {in_flight} in flight, seed {seed})"),
        region_size,
        requests: requests.list,
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

    fn anywhere(transactions: u64) -> FirmwareBounce {
        FirmwareBounce {
            transactions,
            area: BounceArea::Anywhere,
        }
    }

    fn boot(chunk: u64) -> LinuxBoot {
        LinuxBoot {
            chunk,
            freed_pages: 0,
        }
    }

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
        let w = firmware_bounce(64 << 20, anywhere(1000), 7).unwrap();
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
            firmware_bounce(1 << 30, anywhere(100), 1).unwrap(),
            firmware_bounce(1 << 30, anywhere(100), 1).unwrap()
        );
        assert_ne!(
            firmware_bounce(1 << 30, anywhere(100), 1).unwrap().requests,
            firmware_bounce(1 << 30, anywhere(100), 2).unwrap().requests
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
        let w = linux_boot(1 << 30, boot(2 << 20), 5).unwrap();
        all_inside_and_aligned(&w);
        assert_eq!(w.requests.len(), 32);
        assert!(w.requests.iter().all(|r| r.to == Target::Shared));
        assert_eq!(w.requests.iter().map(|r| r.len).sum::<u64>(), 64 << 20);
        // Contiguous, no page twice.
        for pair in w.requests.windows(2) {
            assert_eq!(pair[0].gpa + pair[0].len, pair[1].gpa);
        }
        // A chunk that does not divide the pool leaves a shorter last request.
        let w = linux_boot(1 << 30, boot(3 << 20), 5).unwrap();
        assert_eq!(w.requests.iter().map(|r| r.len).sum::<u64>(), 64 << 20);
        assert_eq!(w.requests.last().unwrap().len, (64 << 20) % (3 << 20));
    }

    #[test]
    fn linux_boot_refuses_a_region_smaller_than_its_pool() {
        assert_eq!(
            linux_boot(32 << 20, boot(2 << 20), 0),
            Err(GenError::RegionTooSmall {
                region_size: 32 << 20,
                needed: 64 << 20
            })
        );
        assert!(matches!(
            linux_boot(1 << 30, boot(100), 0),
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
        assert!(final_shared(&firmware_bounce(1 << 20, anywhere(100), 1).unwrap()).is_empty());
        let boot = linux_boot(1 << 30, boot(2 << 20), 1).unwrap();
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
    fn firmware_bounce_in_slots_reuses_the_slots_of_its_pool() {
        let params = FirmwareBounce {
            transactions: 1000,
            area: BounceArea::Slots(8),
        };
        let w = firmware_bounce(16 << 20, params, 7).unwrap();
        assert_eq!(w.requests.len(), 2000);
        all_inside_and_aligned(&w);
        let places: std::collections::BTreeSet<u64> = w.requests.iter().map(|r| r.gpa).collect();
        let slots: Vec<u64> = (0..8).map(|s| BOUNCE_POOL_OFFSET + s * 2 * PAGE).collect();
        assert_eq!(places.into_iter().collect::<Vec<_>>(), slots);
        assert!(w.requests.iter().all(|r| r.len <= 2 * PAGE));
        assert!(final_shared(&w).is_empty());
        let no_slots = FirmwareBounce {
            area: BounceArea::Slots(0),
            ..params
        };
        assert_eq!(
            firmware_bounce(16 << 20, no_slots, 7),
            Err(GenError::NoSlots)
        );
        assert!(matches!(
            firmware_bounce(1 << 20, params, 7),
            Err(GenError::RegionTooSmall { .. })
        ));
    }

    #[test]
    fn linux_boot_frees_single_pages_of_the_pool_after_sharing_it() {
        let params = LinuxBoot {
            chunk: 2 << 20,
            freed_pages: 16,
        };
        let w = linux_boot(256 << 20, params, 3).unwrap();
        all_inside_and_aligned(&w);
        assert_eq!(w.requests.len(), 32 + 16);
        let (pool, freed) = w.requests.split_at(32);
        assert!(pool.iter().all(|r| r.to == Target::Shared));
        let (start, end) = (pool[0].gpa, pool[31].gpa + pool[31].len);
        assert_eq!(end - start, 64 << 20);
        for r in freed {
            assert_eq!((r.to, r.len), (Target::Private, PAGE));
            assert!((start..end).contains(&r.gpa), "{r:?}");
        }
        // The pool stays shared but for the freed pages: a mixed range.
        let shared: u64 = final_shared(&w).iter().map(|(s, e)| e - s).sum();
        let distinct: std::collections::BTreeSet<u64> = freed.iter().map(|r| r.gpa).collect();
        assert_eq!(shared, (64 << 20) - distinct.len() as u64 * PAGE);
        // Without freed pages it is the boot alone.
        assert_eq!(
            linux_boot(256 << 20, boot(2 << 20), 3).unwrap().requests,
            pool
        );
    }

    #[test]
    fn bounce_in_flight_returns_each_buffer_after_the_others_in_flight() {
        let params = BounceInFlight {
            buffers: 500,
            in_flight: 64,
        };
        let w = bounce_in_flight(1 << 30, params, 5).unwrap();
        assert_eq!(w.requests.len(), 1000);
        all_inside_and_aligned(&w);
        // The first private request comes after 65 shared ones and returns the first buffer.
        let first_private = w
            .requests
            .iter()
            .position(|r| r.to == Target::Private)
            .unwrap();
        assert_eq!(first_private, 65);
        let (first, back) = (w.requests[0], w.requests[first_private]);
        assert_eq!((first.gpa, first.len), (back.gpa, back.len));
        assert!(final_shared(&w).is_empty());
    }
}
