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
//! - [`virtio_mem`]: a virtio-mem device's memory, plugged and unplugged in 2 MiB blocks while
//!   the guest converts pages of the plugged blocks.

use std::fmt;

use crate::{Action, Bytes, PAGE, Request, Rng, Target, Workload};

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

    fn push(&mut self, action: Action, gpa: u64, len: u64) {
        self.list.push(Request {
            time_ns: self.time_ns,
            action,
            gpa,
            len,
        });
        self.time_ns += GENERATED_INTERVAL_NS;
    }

    fn convert(&mut self, to: Target, gpa: u64, len: u64) {
        self.push(Action::Convert(to), gpa, len);
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
    /// A virtio-mem region that is not a whole number of blocks.
    NotWholeBlocks {
        /// Region size asked for.
        region_size: u64,
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
            GenError::NotWholeBlocks { region_size } => write!(
                f,
                "the region ({}) is not a whole number of {} virtio-mem blocks",
                Bytes(*region_size),
                Bytes(VIRTIO_MEM_BLOCK)
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
            requests.convert(to, page * PAGE, len_pages * PAGE);
        }
    }
    Ok(Workload {
        name: format!("firmware-bounce ({transactions} transactions{area_name}, seed {seed})"),
        region_size,
        unplugged_at_start: Vec::new(),
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
        requests.convert(Target::Shared, base + offset, len);
        offset += len;
    }
    for _ in 0..freed_pages {
        requests.convert(Target::Private, base + rng.below(pool / PAGE) * PAGE, PAGE);
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
        unplugged_at_start: Vec::new(),
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
        requests.convert(to, page * PAGE, len_pages * PAGE);
    }
    Ok(Workload {
        name: format!("random-mixed ({count} requests, seed {seed})"),
        region_size,
        unplugged_at_start: Vec::new(),
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
        requests.convert(Target::Shared, gpa, len);
        live.push_back((gpa, len));
        if live.len() as u64 > in_flight {
            if let Some((gpa, len)) = live.pop_front() {
                requests.convert(Target::Private, gpa, len);
            }
        }
    }
    for (gpa, len) in live {
        requests.convert(Target::Private, gpa, len);
    }
    Ok(Workload {
        name: format!("bounce-in-flight ({buffers} buffers, {in_flight} in flight, seed {seed})"),
        region_size,
        unplugged_at_start: Vec::new(),
        requests: requests.list,
    })
}

/// The block size of [`virtio_mem`]: the unit a virtio-mem device plugs and unplugs (Linux's
/// driver uses the device's block size, 2 MiB on x86 QEMU and Cloud Hypervisor).
pub const VIRTIO_MEM_BLOCK: u64 = 2 << 20;

/// Pages a DMA buffer of [`virtio_mem`] has at most (a driver's ring or buffer pool).
const VIRTIO_MEM_MAX_BUFFER_PAGES: u64 = 64;

/// What [`virtio_mem`] generates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMem {
    /// Steps: a plug, an unplug, a conversion of unplugged memory (refused), or the guest's
    /// conversions in a plugged block (one request, or two for a bounce buffer).
    pub steps: u64,
}

/// Of every `STEP_ROLL` steps of [`virtio_mem`], on average `PLUGS` plug a block, `UNPLUGS`
/// unplug one and `REFUSED` convert unplugged memory; the others are the guest's conversions.
const STEP_ROLL: u64 = 32;
const PLUGS: u64 = 2;
const UNPLUGS: u64 = 2;
const REFUSED: u64 = 1;
/// One plug in this many gives its block shared (a VMM whose guest memory starts shared);
/// the others private, the region's attribute on a confidential VM.
const PLUG_SHARED_EVERY: u64 = 8;

/// A virtio-mem device's memory, `region_size` bytes in [`VIRTIO_MEM_BLOCK`] blocks of which the
/// lower half is plugged at the start (the device's requested size at boot), over `steps` steps:
/// - 1 in 16 plugs a random unplugged block (1 in 8 of them shared, the others private);
/// - 1 in 16 unplugs a random plugged block (one always stays plugged), shared pages and all:
///   the guest does not convert memory back before giving it up;
/// - 1 in 32 is a deliberate conversion of unplugged memory (1-4 pages in an unplugged block,
///   half of them reaching one page back into a plugged block below), which the VMM must
///   refuse;
/// - the others are the guest's conversions in a random plugged block: a bounce buffer of 1-2
///   pages shared and straight back (6 in 10), a DMA buffer of 1-64 pages shared (2 in 10), or
///   1-64 pages converted private (2 in 10).
///
/// No other request touches unplugged memory: every conversion but the deliberate ones lies in
/// plugged blocks when it is made. Plugs and unplugs are whole, aligned blocks.
///
/// # Errors
/// The region is not a whole number of blocks, or smaller than four.
pub fn virtio_mem(region_size: u64, params: VirtioMem, seed: u64) -> Result<Workload, GenError> {
    const BLOCK_PAGES: u64 = VIRTIO_MEM_BLOCK / PAGE;
    check_region(region_size, 4 * VIRTIO_MEM_BLOCK)?;
    if region_size % VIRTIO_MEM_BLOCK != 0 {
        return Err(GenError::NotWholeBlocks { region_size });
    }
    let blocks = region_size / VIRTIO_MEM_BLOCK;
    let mut plugged: Vec<bool> = (0..blocks).map(|b| b < blocks / 2).collect();
    let pick = |rng: &mut Rng, plugged: &[bool], want: bool| -> Option<u64> {
        let candidates: Vec<u64> = (0..blocks)
            .filter(|&b| plugged[b as usize] == want)
            .collect();
        let i = rng.below(candidates.len() as u64) as usize;
        candidates.get(i).copied()
    };
    let mut rng = Rng::new(seed);
    let mut requests = Requests::with_capacity(params.steps.saturating_add(params.steps / 2));
    for _ in 0..params.steps {
        let roll = rng.below(STEP_ROLL);
        if roll < PLUGS {
            if let Some(b) = pick(&mut rng, &plugged, false) {
                let to = match rng.below(PLUG_SHARED_EVERY) {
                    0 => Target::Shared,
                    _ => Target::Private,
                };
                requests.push(Action::Plug(to), b * VIRTIO_MEM_BLOCK, VIRTIO_MEM_BLOCK);
                plugged[b as usize] = true;
                continue;
            }
        } else if roll < PLUGS + UNPLUGS {
            // One block always stays plugged, for the guest's conversions.
            if plugged.iter().filter(|&&p| p).count() > 1 {
                if let Some(b) = pick(&mut rng, &plugged, true) {
                    requests.push(Action::Unplug, b * VIRTIO_MEM_BLOCK, VIRTIO_MEM_BLOCK);
                    plugged[b as usize] = false;
                    continue;
                }
            }
        } else if roll < PLUGS + UNPLUGS + REFUSED {
            if let Some(b) = pick(&mut rng, &plugged, false) {
                let len = 1 + rng.below(4);
                let below_plugged = b > 0 && plugged[b as usize - 1];
                let first = match below_plugged && rng.below(2) == 0 {
                    // One page back into the plugged block below: half plugged, still refused.
                    true => b * BLOCK_PAGES - 1,
                    false => b * BLOCK_PAGES + rng.below(BLOCK_PAGES - len + 1),
                };
                let to = match rng.below(2) {
                    0 => Target::Shared,
                    _ => Target::Private,
                };
                requests.convert(to, first * PAGE, len * PAGE);
                continue;
            }
        }
        // The guest converts pages of a plugged block (one is always plugged).
        let Some(b) = pick(&mut rng, &plugged, true) else {
            continue;
        };
        let (len, to) = match rng.below(10) {
            0..=5 => (1 + rng.below(2), None),
            6..=7 => (
                1 + rng.below(VIRTIO_MEM_MAX_BUFFER_PAGES),
                Some(Target::Shared),
            ),
            _ => (
                1 + rng.below(VIRTIO_MEM_MAX_BUFFER_PAGES),
                Some(Target::Private),
            ),
        };
        let gpa = (b * BLOCK_PAGES + rng.below(BLOCK_PAGES - len + 1)) * PAGE;
        match to {
            Some(to) => requests.convert(to, gpa, len * PAGE),
            None => {
                requests.convert(Target::Shared, gpa, len * PAGE);
                requests.convert(Target::Private, gpa, len * PAGE);
            }
        }
    }
    Ok(Workload {
        name: format!(
            "virtio-mem ({} steps, {} blocks of {}, {} plugged at the start, seed {seed})",
            params.steps,
            blocks,
            Bytes(VIRTIO_MEM_BLOCK),
            blocks / 2
        ),
        region_size,
        unplugged_at_start: vec![(blocks / 2 * VIRTIO_MEM_BLOCK, region_size)],
        requests: requests.list,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Extents, Outcome, Replay, final_shared};

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
            assert_eq!(pair[0].conversion(), Some(Target::Shared));
            assert_eq!(pair[1].conversion(), Some(Target::Private));
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
        assert!(
            w.requests
                .iter()
                .all(|r| r.conversion() == Some(Target::Shared))
        );
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
        let shared = w
            .requests
            .iter()
            .filter(|r| r.conversion() == Some(Target::Shared))
            .count();
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
            action: Action::Convert(to),
            gpa,
            len,
        };
        let w = Workload {
            name: String::new(),
            region_size: 1 << 20,
            unplugged_at_start: Vec::new(),
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
        assert!(pool.iter().all(|r| r.conversion() == Some(Target::Shared)));
        let (start, end) = (pool[0].gpa, pool[31].gpa + pool[31].len);
        assert_eq!(end - start, 64 << 20);
        for r in freed {
            assert_eq!((r.conversion(), r.len), (Some(Target::Private), PAGE));
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
            .position(|r| r.conversion() == Some(Target::Private))
            .unwrap();
        assert_eq!(first_private, 65);
        let (first, back) = (w.requests[0], w.requests[first_private]);
        assert_eq!((first.gpa, first.len), (back.gpa, back.len));
        assert!(final_shared(&w).is_empty());
    }

    /// Plugged state per block, replayed from the plug and unplug requests alone.
    fn blocks_plugged(w: &Workload, upto: usize) -> Vec<bool> {
        let blocks = (w.region_size / VIRTIO_MEM_BLOCK) as usize;
        let mut plugged = vec![true; blocks];
        for &(s, e) in &w.unplugged_at_start {
            for b in s / VIRTIO_MEM_BLOCK..e / VIRTIO_MEM_BLOCK {
                plugged[b as usize] = false;
            }
        }
        for r in &w.requests[..upto] {
            match r.action {
                Action::Plug(_) => plugged[(r.gpa / VIRTIO_MEM_BLOCK) as usize] = true,
                Action::Unplug => plugged[(r.gpa / VIRTIO_MEM_BLOCK) as usize] = false,
                Action::Convert(_) => {}
            }
        }
        plugged
    }

    #[test]
    fn virtio_mem_is_deterministic_per_seed() {
        let params = VirtioMem { steps: 500 };
        assert_eq!(
            virtio_mem(64 << 20, params, 3).unwrap(),
            virtio_mem(64 << 20, params, 3).unwrap()
        );
        assert_ne!(
            virtio_mem(64 << 20, params, 3).unwrap().requests,
            virtio_mem(64 << 20, params, 4).unwrap().requests
        );
    }

    #[test]
    fn virtio_mem_plugs_and_unplugs_whole_aligned_blocks_of_a_half_plugged_region() {
        let w = virtio_mem(64 << 20, VirtioMem { steps: 2000 }, 1).unwrap();
        all_inside_and_aligned(&w);
        assert_eq!(w.unplugged_at_start, [(32 << 20, 64 << 20)]);
        assert_eq!(w.plugged_at_start(), [(0, 32 << 20)]);
        let mut kinds = std::collections::HashSet::new();
        for r in w.requests.iter().filter(|r| r.conversion().is_none()) {
            assert_eq!(r.gpa % VIRTIO_MEM_BLOCK, 0, "{r:?}");
            assert_eq!(r.len, VIRTIO_MEM_BLOCK, "{r:?}");
            kinds.insert(r.action);
        }
        let expected = [
            Action::Plug(Target::Shared),
            Action::Plug(Target::Private),
            Action::Unplug,
        ];
        assert_eq!(kinds, expected.into_iter().collect());
        // A plug names an unplugged block, an unplug a plugged one: each changes something.
        for (i, r) in w.requests.iter().enumerate() {
            let was = blocks_plugged(&w, i)[(r.gpa / VIRTIO_MEM_BLOCK) as usize];
            match r.action {
                Action::Plug(_) => assert!(!was, "request {i} plugs a plugged block"),
                Action::Unplug => assert!(was, "request {i} unplugs an unplugged block"),
                Action::Convert(_) => {}
            }
        }
    }

    #[test]
    fn virtio_mem_converts_only_plugged_memory_but_for_a_few_deliberate_refusals() {
        let steps = 4000;
        let w = virtio_mem(128 << 20, VirtioMem { steps }, 7).unwrap();
        let mut replay = Replay::new(&w);
        let (mut refused, mut straddling, mut conversions) = (0, 0, 0);
        for (i, r) in w.requests.iter().enumerate() {
            let plugged = blocks_plugged(&w, i);
            let (first, last) = (
                r.gpa / VIRTIO_MEM_BLOCK,
                (r.gpa + r.len - 1) / VIRTIO_MEM_BLOCK,
            );
            let all_plugged = (first..=last).all(|b| plugged[b as usize]);
            let outcome = replay.apply(r);
            if r.conversion().is_none() {
                assert_eq!(outcome, Outcome::Applied);
                continue;
            }
            conversions += 1;
            // The model refuses exactly what touches an unplugged block.
            assert_eq!(
                outcome == Outcome::Applied,
                all_plugged,
                "request {i}: {r:?}"
            );
            if !all_plugged {
                // The deliberate shape: 1-4 pages whose last page is in an unplugged block.
                refused += 1;
                assert!(r.len <= 4 * PAGE, "request {i}: {r:?}");
                assert!(!plugged[last as usize], "request {i}: {r:?}");
                straddling += u64::from(first != last);
            }
        }
        // 1 step in 32, with some slack for steps that found no unplugged block.
        assert!(
            (steps / 64..=steps / 16).contains(&refused),
            "{refused} refused"
        );
        assert!(
            straddling > 0 && straddling < refused,
            "{straddling} of {refused}"
        );
        assert!(conversions > steps / 2, "{conversions} conversions");
    }

    #[test]
    fn virtio_mem_ends_with_whole_blocks_unplugged_and_shared_memory_only_where_plugged() {
        let w = virtio_mem(64 << 20, VirtioMem { steps: 3000 }, 5).unwrap();
        let mut replay = Replay::new(&w);
        for r in &w.requests {
            replay.apply(r);
        }
        let plugged = blocks_plugged(&w, w.requests.len());
        let mut expected = Extents::default();
        for (b, _) in plugged.iter().enumerate().filter(|(_, p)| !**p) {
            let start = b as u64 * VIRTIO_MEM_BLOCK;
            expected.insert(start, start + VIRTIO_MEM_BLOCK);
        }
        assert_eq!(replay.unplugged(), &expected);
        assert!(plugged.iter().any(|&p| p), "a block stays plugged");
        assert!(plugged.iter().any(|&p| !p), "some stay unplugged");
        for (s, e) in replay.shared().to_vec() {
            assert!(
                !replay.unplugged().overlaps(s, e),
                "shared {s:#x}..{e:#x} is unplugged"
            );
        }
        assert!(replay.shared().bytes() > 0, "DMA buffers stay shared");
        assert_eq!(final_shared(&w), replay.shared().to_vec());
    }

    #[test]
    fn virtio_mem_refuses_regions_that_are_not_whole_blocks_or_too_small() {
        let params = VirtioMem { steps: 10 };
        assert_eq!(
            virtio_mem((8 << 20) + PAGE, params, 1),
            Err(GenError::NotWholeBlocks {
                region_size: (8 << 20) + PAGE
            })
        );
        assert!(matches!(
            virtio_mem(4 << 20, params, 1),
            Err(GenError::RegionTooSmall { .. })
        ));
    }
}
