//! The one random number generator every workload is drawn from.

/// A small deterministic random number generator (SplitMix64): reproducible from a seed on
/// every platform, any seed (0 included) giving a full-period sequence, which is all a workload
/// generator needs.
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

    /// A number in `[0, bound)`, or 0 when `bound` is 0.
    pub fn below(&mut self, bound: u64) -> u64 {
        // Multiply-shift: unbiased enough for workload generation, and never divides by zero.
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_below_stays_in_bounds() {
        let mut rng = Rng::new(0);
        assert!((0..10_000).all(|_| rng.below(3) < 3));
        assert_eq!(Rng::new(9).below(1), 0);
    }
}
