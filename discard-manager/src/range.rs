//! Guest-physical address ranges, the two attributes and the two views.

use std::fmt;

/// The guest_memfd attribute of a granule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Attribute {
    /// Host-visible memory: may be mapped for ordinary device DMA.
    Shared,
    /// Guest-private memory (in guest_memfd); only trusted-IO devices may reach it.
    Private,
}

impl Attribute {
    /// The view a plugged granule with this attribute belongs to.
    pub fn view(self) -> View {
        match self {
            Attribute::Shared => View::Shared,
            Attribute::Private => View::Private,
        }
    }
}

/// One of the two derived views listeners subscribe to.
///
/// The shared view is `plugged AND shared`; the private view is `plugged AND private`.
/// Private is not discarded: the private view has its own listeners (trusted IO, migration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum View {
    /// Plugged and shared granules.
    Shared,
    /// Plugged and private granules.
    Private,
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            View::Shared => "shared",
            View::Private => "private",
        })
    }
}

/// An inclusive range `[start, last]` of guest-physical addresses, never empty.
///
/// Built only through [`GpaRange::new`] / [`GpaRange::try_new`], which check that the range
/// is not empty and that its exclusive end `start + len` fits in a `u64` (so [`GpaRange::end`]
/// is always representable; guest-physical addresses never come near 2^64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GpaRange {
    start: u64,
    last: u64,
}

impl GpaRange {
    /// The range of `len` bytes from `start`; `None` if `len` is zero or `start + len`
    /// overflows.
    ///
    /// ```
    /// # use gmem_dma_discard_manager::GpaRange;
    /// let r = GpaRange::new(0x1000, 0x2000).unwrap();
    /// assert_eq!((r.start(), r.last(), r.end(), r.len()), (0x1000, 0x2fff, 0x3000, 0x2000));
    /// assert!(GpaRange::new(0x1000, 0).is_none());
    /// assert!(GpaRange::new(u64::MAX, 1).is_none());
    /// ```
    pub fn new(start: u64, len: u64) -> Option<Self> {
        Self::try_new(start, len).ok()
    }

    /// Like [`GpaRange::new`], but says what is wrong.
    ///
    /// # Errors
    /// [`RangeError::Empty`] for `len == 0`, [`RangeError::Overflow`] if `start + len`
    /// does not fit in a `u64`.
    pub fn try_new(start: u64, len: u64) -> Result<Self, RangeError> {
        if len == 0 {
            return Err(RangeError::Empty { start });
        }
        let end = start
            .checked_add(len)
            .ok_or(RangeError::Overflow { start, len })?;
        Ok(Self {
            start,
            last: end - 1,
        })
    }

    /// First address of the range.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Last address of the range (inclusive).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Number of bytes in the range (at least 1).
    pub fn len(&self) -> u64 {
        self.last - self.start + 1
    }

    /// Always `false`: a `GpaRange` is never empty. Present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Exclusive end, `start + len` (= `last + 1`; always representable, see the type docs).
    pub fn end(&self) -> u64 {
        self.last + 1
    }

    /// Whether `other` lies entirely inside `self`.
    pub fn contains(&self, other: &GpaRange) -> bool {
        self.start <= other.start && other.last <= self.last
    }

    /// The common part of two ranges, if any.
    pub fn intersect(&self, other: &GpaRange) -> Option<GpaRange> {
        let start = self.start.max(other.start);
        let last = self.last.min(other.last);
        (start <= last).then_some(GpaRange { start, last })
    }

    /// Builds `[start, end)` from trusted arithmetic (callers guarantee `start < end`).
    pub(crate) fn from_bounds(start: u64, end: u64) -> GpaRange {
        debug_assert!(start < end);
        GpaRange {
            start,
            last: end - 1,
        }
    }
}

impl fmt::Display for GpaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x}]", self.start, self.last)
    }
}

/// A request named a range the region cannot accept. Nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// The range has no bytes.
    #[error("range starting at {start:#x} has zero length")]
    Empty {
        /// Requested start.
        start: u64,
    },
    /// `start + len` does not fit in 64 bits.
    #[error("range of {len:#x} bytes from {start:#x} overflows the 64-bit address space")]
    Overflow {
        /// Requested start.
        start: u64,
        /// Requested length.
        len: u64,
    },
    /// Start or length is not a multiple of the region's granularity.
    #[error("range {range} is not aligned to the region granularity {granularity:#x}")]
    Unaligned {
        /// The requested range.
        range: GpaRange,
        /// The region's granularity.
        granularity: u64,
    },
    /// The range is not entirely inside the region.
    #[error("range {range} is not inside the region {region}")]
    OutsideRegion {
        /// The requested range.
        range: GpaRange,
        /// The whole region.
        region: GpaRange,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructor_rejects_empty_and_overflowing_ranges() {
        assert_eq!(GpaRange::try_new(5, 0), Err(RangeError::Empty { start: 5 }));
        assert_eq!(
            GpaRange::try_new(u64::MAX - 1, 2),
            Err(RangeError::Overflow {
                start: u64::MAX - 1,
                len: 2
            })
        );
        let r = GpaRange::try_new(u64::MAX - 1, 1).unwrap();
        assert_eq!((r.last(), r.end(), r.len()), (u64::MAX - 1, u64::MAX, 1));
    }

    #[test]
    fn intersect_and_contains_follow_inclusive_bounds() {
        let a = GpaRange::new(0x1000, 0x2000).unwrap();
        let b = GpaRange::new(0x2fff, 0x10).unwrap();
        assert_eq!(a.intersect(&b), GpaRange::new(0x2fff, 1));
        assert_eq!(a.intersect(&GpaRange::new(0x3000, 1).unwrap()), None);
        assert!(a.contains(&GpaRange::new(0x1000, 0x2000).unwrap()));
        assert!(!a.contains(&b));
        assert_eq!(a.to_string(), "[0x1000, 0x2fff]");
    }
}
