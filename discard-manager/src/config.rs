//! Region configuration and the arithmetic between addresses and granule indices.

use crate::range::{Attribute, GpaRange, RangeError};

/// Smallest granularity a region accepts (the x86 base page size).
pub const MIN_GRANULARITY: u64 = 4096;

/// Geometry and initial state of one guest RAM region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionConfig {
    /// First guest-physical address of the region (aligned to `granularity`).
    pub base: u64,
    /// Size in bytes (a non-zero multiple of `granularity`; `base + size` must fit in 64 bits).
    pub size: u64,
    /// Unit of state and of every notification: a power of two, at least [`MIN_GRANULARITY`].
    pub granularity: u64,
    /// Attribute of every granule at creation: `Private` for a confidential guest
    /// (KVM marks new guest_memfd slots private), `Shared` for an ordinary one.
    pub initial_attribute: Attribute,
    /// Whether every granule starts plugged (ordinary RAM) or unplugged (virtio-mem).
    pub initially_plugged: bool,
}

/// A [`RegionConfig`] that cannot describe a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The granularity is not a power of two.
    #[error("granularity {granularity:#x} is not a power of two")]
    GranularityNotPowerOfTwo {
        /// Requested granularity.
        granularity: u64,
    },
    /// The granularity is below [`MIN_GRANULARITY`].
    #[error("granularity {granularity:#x} is smaller than the minimum {min:#x}")]
    GranularityTooSmall {
        /// Requested granularity.
        granularity: u64,
        /// The minimum.
        min: u64,
    },
    /// The region has no bytes.
    #[error("region at {base:#x} has size zero")]
    EmptyRegion {
        /// Requested base.
        base: u64,
    },
    /// `base` is not a multiple of the granularity.
    #[error("region base {base:#x} is not aligned to the granularity {granularity:#x}")]
    BaseUnaligned {
        /// Requested base.
        base: u64,
        /// Requested granularity.
        granularity: u64,
    },
    /// `size` is not a multiple of the granularity.
    #[error("region size {size:#x} is not a multiple of the granularity {granularity:#x}")]
    SizeUnaligned {
        /// Requested size.
        size: u64,
        /// Requested granularity.
        granularity: u64,
    },
    /// `base + size` does not fit in 64 bits.
    #[error("region of {size:#x} bytes at {base:#x} overflows the 64-bit address space")]
    Overflow {
        /// Requested base.
        base: u64,
        /// Requested size.
        size: u64,
    },
}

/// Checked geometry: converts between guest-physical ranges and granule indices `[a, b)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub(crate) region: GpaRange,
    pub(crate) shift: u32,
    /// `granularity - 1`, kept so that the range check of every call is one load and test.
    mask: u64,
    pub(crate) granules: u64,
}

impl Geometry {
    pub(crate) fn new(c: &RegionConfig) -> Result<Self, ConfigError> {
        let granularity = c.granularity;
        if !granularity.is_power_of_two() {
            return Err(ConfigError::GranularityNotPowerOfTwo { granularity });
        }
        if granularity < MIN_GRANULARITY {
            return Err(ConfigError::GranularityTooSmall {
                granularity,
                min: MIN_GRANULARITY,
            });
        }
        if c.size == 0 {
            return Err(ConfigError::EmptyRegion { base: c.base });
        }
        if c.base % granularity != 0 {
            return Err(ConfigError::BaseUnaligned {
                base: c.base,
                granularity,
            });
        }
        if c.size % granularity != 0 {
            return Err(ConfigError::SizeUnaligned {
                size: c.size,
                granularity,
            });
        }
        let region = GpaRange::new(c.base, c.size).ok_or(ConfigError::Overflow {
            base: c.base,
            size: c.size,
        })?;
        let shift = granularity.trailing_zeros();
        Ok(Self {
            region,
            shift,
            mask: granularity - 1,
            granules: c.size >> shift,
        })
    }

    /// Granule indices `[a, b)` of a range, after checking alignment and containment.
    pub(crate) fn granules_of(&self, range: GpaRange) -> Result<(u64, u64), RangeError> {
        // With the start aligned, the length is aligned exactly when the end is: one test.
        if (range.start() | range.end()) & self.mask != 0 {
            return Err(RangeError::Unaligned {
                range,
                granularity: self.mask + 1,
            });
        }
        // In granules: inside the region when it starts at or after the base and ends at or
        // before the last granule (two compares; the indices are needed anyway). Below the
        // base, `a` wraps, harmlessly: granule counts are at most 2^52, so `b` cannot overflow.
        let (start, base) = (range.start(), self.region.start());
        let a = start.wrapping_sub(base) >> self.shift;
        let b = a + (range.len() >> self.shift);
        if start < base || b > self.granules {
            return Err(RangeError::OutsideRegion {
                range,
                region: self.region,
            });
        }
        Ok((a, b))
    }

    /// The guest-physical range of granules `[a, b)` (`a < b <= granules`).
    pub(crate) fn range_of(&self, a: u64, b: u64) -> GpaRange {
        let base = self.region.start();
        GpaRange::from_bounds(base + (a << self.shift), base + (b << self.shift))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(base: u64, size: u64, granularity: u64) -> RegionConfig {
        RegionConfig {
            base,
            size,
            granularity,
            initial_attribute: Attribute::Private,
            initially_plugged: true,
        }
    }

    #[test]
    fn each_bad_config_gets_its_own_error() {
        let cases = [
            (
                config(0, 0x10000, 0x3000),
                ConfigError::GranularityNotPowerOfTwo {
                    granularity: 0x3000,
                },
            ),
            (
                config(0, 0x10000, 0x800),
                ConfigError::GranularityTooSmall {
                    granularity: 0x800,
                    min: 0x1000,
                },
            ),
            (
                config(0x1000, 0, 0x1000),
                ConfigError::EmptyRegion { base: 0x1000 },
            ),
            (
                config(0x1000, 0x4000, 0x2000),
                ConfigError::BaseUnaligned {
                    base: 0x1000,
                    granularity: 0x2000,
                },
            ),
            (
                config(0, 0x3000, 0x2000),
                ConfigError::SizeUnaligned {
                    size: 0x3000,
                    granularity: 0x2000,
                },
            ),
            (
                config(u64::MAX - 0xfff, 0x1000, 0x1000),
                ConfigError::Overflow {
                    base: u64::MAX - 0xfff,
                    size: 0x1000,
                },
            ),
        ];
        for (c, want) in cases {
            assert_eq!(Geometry::new(&c).unwrap_err(), want);
        }
    }

    #[test]
    fn granule_indices_round_trip_and_bad_ranges_are_named() {
        let g = Geometry::new(&config(0x10_0000, 0x10_0000, 0x1000)).unwrap();
        let r = GpaRange::new(0x10_3000, 0x2000).unwrap();
        assert_eq!(g.granules_of(r), Ok((3, 5)));
        assert_eq!(g.range_of(3, 5), r);
        let unaligned = GpaRange::new(0x10_3000, 0x1800).unwrap();
        assert!(matches!(
            g.granules_of(unaligned),
            Err(RangeError::Unaligned { .. })
        ));
        let unaligned_start = GpaRange::new(0x10_3800, 0x1000).unwrap();
        assert_eq!(
            g.granules_of(unaligned_start),
            Err(RangeError::Unaligned {
                range: unaligned_start,
                granularity: 0x1000
            })
        );
        let outside = GpaRange::new(0x1f_f000, 0x2000).unwrap();
        assert!(matches!(
            g.granules_of(outside),
            Err(RangeError::OutsideRegion { .. })
        ));
        let below = GpaRange::new(0xf_f000, 0x1000).unwrap();
        assert!(matches!(
            g.granules_of(below),
            Err(RangeError::OutsideRegion { .. })
        ));
        // Starting below the base and ending inside; far above; the last granule exactly.
        for bad in [(0xf_f000, 0x2000), (u64::MAX - 0x1fff, 0x1000)] {
            let r = GpaRange::new(bad.0, bad.1).unwrap();
            assert!(
                matches!(g.granules_of(r), Err(RangeError::OutsideRegion { .. })),
                "{r}"
            );
        }
        let last = GpaRange::new(0x1f_f000, 0x1000).unwrap();
        assert_eq!(g.granules_of(last), Ok((0xff, 0x100)));
    }
}
