//! QEMU's record of the same conversions, the baseline the benchmarks compare the project with.
//!
//! QEMU's `RamBlockAttributes` (system/ram-block-attributes.c) keeps one bit per granule
//! (1 = shared) and tells its listeners (VFIO among them) what changed: a range whose granules
//! all change is notified whole, a mixed range granule by granule. A new listener is brought up
//! to date by a replay of the shared runs, found with `find_next_bit` / `find_next_zero_bit`
//! (util/bitops.c), or in QEMU 2026's `replay_by_populated_state` by testing every granule.
//! Offsets here are bytes from the start of the RAM block; the callers hold whatever lock they
//! model QEMU's with.

use std::fmt;

use crate::Target;

/// One bit per granule, 1 = shared, starting all private: QEMU's `RamBlockAttributes`.
#[derive(Clone, Debug)]
pub struct RamBlockAttributes {
    /// log2 of the granule size (QEMU's granules are powers of two).
    shift: u32,
    granules: u64,
    bits: Vec<u64>,
}

/// A range the bitmap cannot take, or a listener's failure.
#[derive(Debug, PartialEq, Eq)]
pub enum ModelError<E> {
    /// The range is empty, not granule-aligned or reaches past the block.
    BadRange {
        /// Its offset from the start of the block.
        offset: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// The listener refused a notification; the bits of the granules notified so far (this
    /// one included) are set, as in QEMU.
    Listener(E),
}

impl<E: fmt::Display> fmt::Display for ModelError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::BadRange { offset, len } => write!(
                f,
                "range {offset:#x}+{len:#x} is empty, unaligned or outside the block"
            ),
            ModelError::Listener(e) => write!(f, "the listener failed: {e}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for ModelError<E> {}

impl RamBlockAttributes {
    /// A block of `size` bytes in granules of `granule` bytes, all private; `None` when
    /// `granule` is not a power of two or does not divide `size`.
    pub fn new(size: u64, granule: u64) -> Option<Self> {
        if !granule.is_power_of_two() || size % granule != 0 {
            return None;
        }
        let shift = granule.trailing_zeros();
        let granules = size >> shift;
        let words = usize::try_from(granules.div_ceil(64)).ok()?;
        Some(Self {
            shift,
            granules,
            bits: vec![0; words],
        })
    }

    /// Whether granule `index` is shared (`false` past the end).
    pub fn is_shared(&self, index: u64) -> bool {
        index < self.granules && self.bit(index)
    }

    /// Bytes of heap the bitmap holds.
    pub fn heap_bytes(&self) -> usize {
        self.bits.capacity() * size_of::<u64>()
    }

    /// `ram_block_attributes_state_change`: makes `[offset, offset + len)` `to` and notifies
    /// `notify(offset, len)`: nothing when every granule already is `to`, the whole range once
    /// when every granule changes, else each changed granule on its own.
    ///
    /// # Errors
    /// A bad range (nothing changed), or the first notification that failed.
    #[inline]
    pub fn state_change<E>(
        &mut self,
        offset: u64,
        len: u64,
        to: Target,
        mut notify: impl FnMut(u64, u64) -> Result<(), E>,
    ) -> Result<(), ModelError<E>> {
        let (first, end) = self.granules_of(offset, len)?;
        let shared = to == Target::Shared;
        // The two range tests QEMU makes first, each stopping at the first granule that
        // answers it.
        if (first..end).all(|g| self.bit(g) == shared) {
            return Ok(());
        }
        if (first..end).all(|g| self.bit(g) != shared) {
            (first..end).for_each(|g| self.set(g, shared));
            return notify(offset, len).map_err(ModelError::Listener);
        }
        for g in first..end {
            if self.bit(g) != shared {
                self.set(g, shared);
                notify(g << self.shift, 1 << self.shift).map_err(ModelError::Listener)?;
            }
        }
        Ok(())
    }

    /// The replay of `ram_block_attributes_for_each_populated_section`: `f(offset, len)` for
    /// each shared run inside `[offset, offset + len)`, found a word at a time with
    /// `find_next_bit` / `find_next_zero_bit`.
    ///
    /// # Errors
    /// A bad range, or the first call of `f` that failed.
    pub fn for_each_shared_run<E>(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64) -> Result<(), E>,
    ) -> Result<(), ModelError<E>> {
        let (mut g, end) = self.granules_of(offset, len)?;
        while g < end {
            let start = find_next(&self.bits, end, g, true);
            if start >= end {
                break;
            }
            let stop = find_next(&self.bits, end, start, false);
            f(start << self.shift, (stop - start) << self.shift).map_err(ModelError::Listener)?;
            g = stop;
        }
        Ok(())
    }

    /// The same replay testing every granule (QEMU 2026's `replay_by_populated_state`).
    ///
    /// # Errors
    /// A bad range, or the first call of `f` that failed.
    pub fn for_each_shared_run_by_granule<E>(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64) -> Result<(), E>,
    ) -> Result<(), ModelError<E>> {
        let (first, end) = self.granules_of(offset, len)?;
        let mut run: Option<u64> = None;
        for g in first..=end {
            match (run, g < end && self.bit(g)) {
                (None, true) => run = Some(g),
                (Some(start), false) => {
                    f(start << self.shift, (g - start) << self.shift)
                        .map_err(ModelError::Listener)?;
                    run = None;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The granules `[first, end)` of a byte range, checked.
    #[inline]
    fn granules_of<E>(&self, offset: u64, len: u64) -> Result<(u64, u64), ModelError<E>> {
        let bad = ModelError::BadRange { offset, len };
        let Some(end) = offset.checked_add(len) else {
            return Err(bad);
        };
        let (first, end) = (offset >> self.shift, end >> self.shift);
        let unaligned = (offset | len) & ((1 << self.shift) - 1) != 0;
        if len == 0 || unaligned || end > self.granules {
            return Err(bad);
        }
        Ok((first, end))
    }

    /// Granule `index`'s bit; `index` is inside the block.
    #[inline]
    fn bit(&self, index: u64) -> bool {
        self.bits[(index / 64) as usize] >> (index % 64) & 1 == 1
    }

    #[inline]
    fn set(&mut self, index: u64, shared: bool) {
        let word = &mut self.bits[(index / 64) as usize];
        if shared {
            *word |= 1 << (index % 64);
        } else {
            *word &= !(1 << (index % 64));
        }
    }
}

/// The first bit equal to `value` at or after `offset`, or `size`: QEMU's `find_next_bit`
/// (`value` = 1) and `find_next_zero_bit` (util/bitops.c), a word at a time, and for set bits
/// four words per step across zero words, as QEMU unrolls it.
fn find_next(bits: &[u64], size: u64, offset: u64, value: bool) -> u64 {
    if offset >= size {
        return size;
    }
    let invert = if value { 0 } else { u64::MAX };
    let mut word = (offset / 64) as usize;
    let last = size.div_ceil(64) as usize;
    let mut tmp = (bits[word] ^ invert) & (u64::MAX << (offset % 64));
    while tmp == 0 {
        word += 1;
        if value {
            while word + 4 <= last
                && bits[word] | bits[word + 1] | bits[word + 2] | bits[word + 3] == 0
            {
                word += 4;
            }
        }
        if word >= last {
            return size;
        }
        tmp = bits[word] ^ invert;
    }
    (word as u64 * 64 + u64::from(tmp.trailing_zeros())).min(size)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;
    use crate::Rng;

    const G: u64 = 4096;

    fn change(
        block: &mut RamBlockAttributes,
        offset: u64,
        len: u64,
        to: Target,
    ) -> Vec<(u64, u64)> {
        let mut calls = Vec::new();
        block
            .state_change(offset, len, to, |o, l| {
                calls.push((o, l));
                Ok::<_, Infallible>(())
            })
            .unwrap();
        calls
    }

    #[test]
    fn uniform_ranges_notify_once_and_mixed_ranges_per_changed_granule() {
        let mut block = RamBlockAttributes::new(64 * G, G).unwrap();
        assert_eq!(
            change(&mut block, 4 * G, 4 * G, Target::Shared),
            [(4 * G, 4 * G)]
        );
        assert!(change(&mut block, 4 * G, 2 * G, Target::Shared).is_empty());
        // [2, 10) holds shared 4..8: to shared, the six private granules one by one.
        let calls = change(&mut block, 2 * G, 8 * G, Target::Shared);
        let expected: Vec<_> = [2, 3, 8, 9].iter().map(|&g| (g * G, G)).collect();
        assert_eq!(calls, expected);
        assert!((2..10).all(|g| block.is_shared(g)) && !block.is_shared(10));
        assert_eq!(change(&mut block, 0, 64 * G, Target::Private).len(), 8);
        assert!((0..64).all(|g| !block.is_shared(g)));
    }

    #[test]
    fn bad_ranges_and_listener_failures_are_errors() {
        let mut block = RamBlockAttributes::new(16 * G, G).unwrap();
        let ok = |_, _| Ok::<_, &str>(());
        for (offset, len) in [(0, 0), (1, G), (0, G + 1), (15 * G, 2 * G), (G, u64::MAX)] {
            assert_eq!(
                block.state_change(offset, len, Target::Shared, ok),
                Err(ModelError::BadRange { offset, len })
            );
        }
        assert_eq!(
            block.state_change(0, G, Target::Shared, |_, _| Err("no")),
            Err(ModelError::Listener("no"))
        );
        assert!(RamBlockAttributes::new(G + 1, G).is_none());
        assert!(RamBlockAttributes::new(G, 0).is_none());
        assert!(RamBlockAttributes::new(3 * G, 3 * G).is_none());
    }

    #[test]
    fn both_replays_find_the_shared_runs_of_a_random_bitmap() {
        let granules = 64 * 20 + 7;
        let mut block = RamBlockAttributes::new(granules * G, G).unwrap();
        let mut rng = Rng::new(3);
        for _ in 0..200 {
            let len = 1 + rng.below(40);
            let first = rng.below(granules - len + 1);
            let to = if rng.below(3) == 0 {
                Target::Private
            } else {
                Target::Shared
            };
            change(&mut block, first * G, len * G, to);
        }
        // Naive runs, granule by granule, of a section that starts and ends mid-word.
        let (a, b) = (5, granules - 3);
        let mut expected = Vec::new();
        let mut g = a;
        while g < b {
            if block.is_shared(g) {
                let s = g;
                while g < b && block.is_shared(g) {
                    g += 1;
                }
                expected.push((s * G, (g - s) * G));
            } else {
                g += 1;
            }
        }
        assert!(expected.len() > 10, "{expected:?}");
        let (mut word_scan, mut walk) = (Vec::new(), Vec::new());
        let section = (a * G, (b - a) * G);
        block
            .for_each_shared_run(section.0, section.1, |o, l| {
                word_scan.push((o, l));
                Ok::<_, Infallible>(())
            })
            .unwrap();
        block
            .for_each_shared_run_by_granule(section.0, section.1, |o, l| {
                walk.push((o, l));
                Ok::<_, Infallible>(())
            })
            .unwrap();
        assert_eq!(word_scan, expected);
        assert_eq!(walk, expected);
    }
}
