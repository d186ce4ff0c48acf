//! When the backing a conversion vacated is freed: the discard policies.
//!
//! In the classic model a page converted to private leaves its shared (memfd) page behind, and a
//! page converted to shared leaves its guest_memfd page behind. Freeing them is a hole punch per
//! range, and the next conversion back refaults a zeroed page. Firmware that flips one or two
//! bounce pages per DMA transaction pays that on every transaction (a 1 GiB SNP guest booted in
//! 32 s without private memory, 1 min 43 s with eager discard and 1 min 08 s with shared discard
//! off). So the policy is per region:
//!
//! - [`DiscardPolicy::Eager`]: free at the end of every conversion.
//! - [`DiscardPolicy::Lazy`]: hold vacated pages until they add up to `budget_bytes`, then free
//!   them all. A page converted back while held is taken out of the held set (it is in use
//!   again and must never be freed by a later flush), which is what makes flip-flops free.
//! - [`DiscardPolicy::Batched`]: like lazy, but flushes as soon as the held pages form
//!   `max_ranges` separate ranges or `max_bytes` bytes; adjacent pages coalesce into one
//!   `fallocate` call.
//!
//! An eager conversion that changed several runs (a mixed range) frees their vacated side with
//! one `fallocate` over the span from the first run to the last when the caller allows it: the
//! granules in between already had the target attribute, so their vacated side is not in use
//! and, with nothing held, already freed (a second punch of a hole frees nothing). The held
//! sets never take such a span: they keep exactly the vacated runs, so what they report held is
//! really backed.
//!
//! Held pages are the only pages backed on both sides (invariant 5); [`HeldBack`] reports them
//! at any moment, exactly where the vacated side can say which pages hold memory, and as an
//! upper bound flagged `unverified_bytes` on a classic guest_memfd, which cannot (see
//! [`HeldBack`] and `Discarder::private_may_hold` for what the library knows there and why).
//! A free that fails stays held (reported as `failed_bytes`) and is retried at the next flush;
//! it never undoes the conversion that vacated it.

use discard_manager::{Attribute, GpaRange, View};

use crate::backing::RegionBacking;
use crate::range_set::{RangeSet, span};

/// When vacated backing pages are freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DiscardPolicy {
    /// Free at the end of every conversion.
    Eager,
    /// Hold vacated pages up to `budget_bytes`, then free them all.
    Lazy {
        /// Most bytes held at once.
        budget_bytes: u64,
    },
    /// Flush when the held pages reach `max_ranges` ranges or `max_bytes` bytes.
    Batched {
        /// Most separate ranges held at once.
        max_ranges: usize,
        /// Most bytes held at once.
        max_bytes: u64,
    },
}

/// Backing pages held back right now: backed on both sides on purpose or because a free failed.
///
/// **Which figures are exact.** A range is held only where its vacated side holds memory, as far
/// as the kernel lets the library know:
/// - a memfd (the shared side, or a software backing's private side) answers `SEEK_DATA`, and an
///   in-place guest_memfd's host mapping answers `mincore`: what is held there is exactly what is
///   backed;
/// - a classic backing's guest_memfd cannot answer (Linux 7.3: no `llseek`, so `SEEK_DATA`
///   fails with `ESPIPE`; no `i_blocks`; no host mapping, since creating it `MMAP` would make
///   its memslot `KVM_MEMSLOT_GMEM_ONLY` and KVM would fault shared pages from it). There the
///   library holds what it cannot rule out: a range whose KVM attribute may have been private
///   since the library last freed it (KVM allocates guest_memfd pages only on private faults,
///   see the policy module). Those bytes are counted in `private_bytes` and again in
///   `unverified_bytes`: an upper bound (a page the guest never touched holds no memory), while a
///   range that was never private, or was freed and has not been private since, is not held.
///
/// `shared_bytes` and `private_bytes - unverified_bytes` are exact; `unverified_bytes` bounds
/// the rest from above.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeldBack {
    /// Vacated shared-side bytes (pages that are private now) not yet freed.
    pub shared_bytes: u64,
    /// Vacated private-side bytes (pages that are shared now) not yet freed.
    pub private_bytes: u64,
    /// Of those, bytes whose free failed and will be retried at the next flush.
    pub failed_bytes: u64,
    /// Of the held bytes, those on a side that cannot report which pages hold memory (a
    /// classic guest_memfd): they may hold none.
    pub unverified_bytes: u64,
}

impl HeldBack {
    /// All held bytes.
    pub fn total(&self) -> u64 {
        self.shared_bytes + self.private_bytes
    }
}

impl std::ops::Add for HeldBack {
    type Output = HeldBack;

    /// The figures of two regions together.
    fn add(self, other: HeldBack) -> HeldBack {
        HeldBack {
            shared_bytes: self.shared_bytes + other.shared_bytes,
            private_bytes: self.private_bytes + other.private_bytes,
            failed_bytes: self.failed_bytes + other.failed_bytes,
            unverified_bytes: self.unverified_bytes + other.unverified_bytes,
        }
    }
}

/// What one flush did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlushReport {
    /// `fallocate` calls that succeeded.
    pub punched_ranges: u64,
    /// Bytes they freed.
    pub punched_bytes: u64,
    /// Ranges whose free failed (still held).
    pub failed_ranges: u64,
}

/// The held sets of one region, indexed by the side whose pages they are.
#[derive(Debug)]
pub(crate) struct Discarder {
    policy: DiscardPolicy,
    held_shared: RangeSet,
    held_private: RangeSet,
    failed: RangeSet,
    /// Where the private side cannot report residency (a classic guest_memfd): the shared
    /// ranges whose guest_memfd may hold pages that nothing holds, because a conversion or plug
    /// to private failed after KVM's attribute may have been private for a moment. `None`
    /// where the backing answers for itself. See [`Discarder::private_may_hold`].
    faulted_while_failing: Option<RangeSet>,
}

impl Discarder {
    /// The discard state of a region over `backing`.
    pub(crate) fn new(policy: DiscardPolicy, backing: &RegionBacking) -> Self {
        Self {
            policy,
            held_shared: RangeSet::new(),
            held_private: RangeSet::new(),
            failed: RangeSet::new(),
            faulted_while_failing: (!backing.reports_residency(View::Private)).then(RangeSet::new),
        }
    }

    /// Records that a conversion or plug of `range` to private failed: KVM's attribute may
    /// have been private for a moment, so its guest_memfd may hold pages (the failure path
    /// only: the conversions that succeed cost nothing here).
    pub(crate) fn failed_to_private(&mut self, range: GpaRange) {
        if let Some(faulted) = self.faulted_while_failing.as_mut() {
            faulted.insert(range.start(), range.end());
        }
    }

    /// `range` of `side` was freed: a guest_memfd range holds nothing until it is private again.
    fn freed(&mut self, side: View, range: GpaRange) {
        if let (View::Private, Some(faulted)) = (side, self.faulted_while_failing.as_mut()) {
            if !faulted.is_empty() {
                faulted.remove(range.start(), range.end());
            }
        }
    }

    /// Where the private side cannot report residency (a classic guest_memfd), the parts of
    /// `runs` whose guest_memfd may hold memory, of which `private` had the private attribute;
    /// `None` where the backing answers for itself.
    ///
    /// A granule's guest_memfd may hold memory when its attribute is private, when its vacated
    /// private side is held, or when a failed conversion to private may have faulted pages in;
    /// never otherwise. Why (read in Linux 7.3): a classic guest_memfd is created without
    /// `GUEST_MEMFD_FLAG_MMAP`, so its memslot is not `KVM_MEMSLOT_GMEM_ONLY` and KVM faults a
    /// gfn from guest_memfd only when the fault is private (`__kvm_mmu_faultin_pfn()`:
    /// `fault->is_private || kvm_memslot_is_gmem_only()`), and a fault whose privateness differs
    /// from the gfn's attribute exits to userspace before any pfn is looked up
    /// (`kvm_mmu_faultin_pfn()` compares with `kvm_mem_is_private()`); `KVM_PRE_FAULT_MEMORY`
    /// takes privateness from the attribute too. So while a range stays shared the guest cannot
    /// populate its guest_memfd pages. Other ways pages get there are the VMM's: `fallocate` on
    /// the fd, and the launch-time `kvm_gmem_populate()` (SNP_LAUNCH_UPDATE,
    /// TDX_INIT_MEM_REGION), which allocates the folio before it checks that the gfn is private;
    /// a VMM does both only on private memory. An unplugged granule keeps its attribute: a guest
    /// that touched unplugged private memory would fault guest_memfd pages in again, as touching
    /// unplugged shared memory faults memfd pages in; virtio-mem forbids both, and the library
    /// counts neither.
    fn private_may_hold(&self, runs: &[GpaRange], private: &[GpaRange]) -> Option<RangeSet> {
        let faulted = self.faulted_while_failing.as_ref()?;
        let mut may_hold = RangeSet::new();
        for r in private {
            may_hold.insert(r.start(), r.end());
        }
        for r in runs {
            for set in [&self.held_private, faulted] {
                for (s, e) in set.intersection(r.start(), r.end()) {
                    may_hold.insert(s, e);
                }
            }
        }
        Some(may_hold)
    }

    pub(crate) fn policy(&self) -> DiscardPolicy {
        self.policy
    }

    fn set(&mut self, side: View) -> &mut RangeSet {
        match side {
            View::Shared => &mut self.held_shared,
            View::Private => &mut self.held_private,
        }
    }

    /// Records that `runs` (maximal, in address order) became `to`, and frees what the policy
    /// says is due now: the gaining side's pages are in use again (never free them later); the
    /// losing side's pages are vacated. `span_ok`: the losing side of every granule between
    /// the runs may be punched too (nothing else uses it, e.g. no device still maps it), so an
    /// eager free may be one call over the runs' span.
    pub(crate) fn converted(
        &mut self,
        backing: &RegionBacking,
        runs: &[GpaRange],
        to: Attribute,
        span_ok: bool,
    ) -> FlushReport {
        let (gaining, losing) = match to {
            Attribute::Shared => (View::Shared, View::Private),
            Attribute::Private => (View::Private, View::Shared),
        };
        // Eager with nothing held: no gaining page is in a set, so the vacated runs are freed
        // at once without entering one (a set costs an insert and a remove per run).
        if self.policy == DiscardPolicy::Eager
            && self.held_shared.is_empty()
            && self.held_private.is_empty()
            && self.failed.is_empty()
        {
            return self.free_runs(backing, losing, runs, span_ok);
        }
        for r in runs {
            self.set(gaining).remove(r.start(), r.end());
            // A key for `failed` is a (side-less) range: a failed page that is in use again
            // is no longer pending on the side that regained it.
            self.failed.remove(r.start(), r.end());
            for b in backed(backing, losing, *r) {
                self.set(losing).insert(b.start(), b.end());
            }
        }
        if self.due() {
            self.flush(backing)
        } else {
            FlushReport::default()
        }
    }

    /// Frees the `side` backing of `runs`, held by nobody: with one punch over their span when
    /// `span_ok`, else one per run. What fails is held (the runs, never the span: the granules
    /// between them are not backed on that side).
    fn free_runs(
        &mut self,
        backing: &RegionBacking,
        side: View,
        runs: &[GpaRange],
        span_ok: bool,
    ) -> FlushReport {
        let mut report = FlushReport::default();
        match (span_ok && runs.len() > 1).then(|| span(runs)).flatten() {
            Some(all) => match backing.punch_hole(side, all) {
                Ok(()) => {
                    self.freed(side, all);
                    report.punched_ranges += 1;
                    report.punched_bytes += runs.iter().map(GpaRange::len).sum::<u64>();
                }
                Err(e) => {
                    log::warn!("held back the {side} backing of {all}: {e}");
                    for &r in runs {
                        self.hold_failed(backing, side, r, &mut report);
                    }
                }
            },
            None => {
                for &r in runs {
                    self.punch(backing, side, r, &mut report);
                }
            }
        }
        report
    }

    /// True when the policy says the held pages must be freed now.
    fn due(&self) -> bool {
        let bytes = self.held_shared.bytes() + self.held_private.bytes();
        match self.policy {
            DiscardPolicy::Eager => bytes > 0,
            DiscardPolicy::Lazy { budget_bytes } => bytes > budget_bytes,
            DiscardPolicy::Batched {
                max_ranges,
                max_bytes,
            } => {
                self.held_shared.len() + self.held_private.len() >= max_ranges || bytes >= max_bytes
            }
        }
    }

    /// Frees every held range. A failed free stays held and is logged; the rest go on.
    pub(crate) fn flush(&mut self, backing: &RegionBacking) -> FlushReport {
        let mut report = FlushReport::default();
        for side in [View::Shared, View::Private] {
            if self.set(side).is_empty() {
                continue;
            }
            // Every extent leaves the set; a failed one is put back.
            let held = std::mem::take(self.set(side));
            for (start, end) in held.iter() {
                let Some(range) = GpaRange::new(start, end - start) else {
                    continue;
                };
                self.punch(backing, side, range, &mut report);
            }
        }
        report
    }

    /// `range` of `side` could not be freed: what of it holds memory is held, and retried at
    /// the next flush.
    fn hold_failed(
        &mut self,
        backing: &RegionBacking,
        side: View,
        range: GpaRange,
        report: &mut FlushReport,
    ) {
        self.hold(&backed(backing, side, range), side);
        report.failed_ranges += 1;
    }

    /// Holds `ranges` of `side` as failed frees, retried at the next flush.
    fn hold(&mut self, ranges: &[GpaRange], side: View) {
        for b in ranges {
            self.set(side).insert(b.start(), b.end());
            self.failed.insert(b.start(), b.end());
        }
    }

    /// Frees `range` of `side`, which is out of the held set; a failed free goes back into it.
    fn punch(
        &mut self,
        backing: &RegionBacking,
        side: View,
        range: GpaRange,
        report: &mut FlushReport,
    ) {
        let (start, end) = (range.start(), range.end());
        match backing.punch_hole(side, range) {
            Ok(()) => {
                if !self.failed.is_empty() {
                    self.failed.remove(start, end);
                }
                self.freed(side, range);
                report.punched_ranges += 1;
                report.punched_bytes += range.len();
            }
            Err(e) => {
                log::warn!("held back {range} of the {side} backing: {e}");
                self.hold_failed(backing, side, range, report);
            }
        }
    }

    /// A failed conversion to shared may have faulted in the shared side of `runs` (pinning
    /// for DMA does), which are private again: frees the pages it holds there, except what was
    /// held already (backed before the conversion, and still reported). A free that fails is
    /// held and reported. Where the backing cannot say which pages it holds, the whole runs
    /// are freed.
    pub(crate) fn release_faulted(
        &mut self,
        backing: &RegionBacking,
        runs: &[GpaRange],
    ) -> FlushReport {
        let page = crate::sys::page_size() as u64;
        let mut report = FlushReport::default();
        for r in runs {
            let mut todo = RangeSet::new();
            match backing.resident_pages(View::Shared, *r) {
                Ok(resident) => {
                    for (i, _) in resident.iter().enumerate().filter(|(_, res)| **res) {
                        let at = r.start() + i as u64 * page;
                        todo.insert(at, (at + page).min(r.end()));
                    }
                }
                Err(_) => todo.insert(r.start(), r.end()),
            }
            for (s, e) in self.held_shared.intersection(r.start(), r.end()) {
                todo.remove(s, e);
            }
            for (s, e) in todo.iter() {
                if let Some(piece) = GpaRange::new(s, e - s) {
                    self.punch(backing, View::Shared, piece, &mut report);
                }
            }
        }
        report
    }

    /// Records that `runs` were plugged with attribute `to`: their `to` side is in use again,
    /// so a free still pending there (one that failed at the unplug) must never happen.
    pub(crate) fn plugged(&mut self, runs: &[GpaRange], to: Attribute) {
        for r in runs {
            self.set(to.view()).remove(r.start(), r.end());
            self.failed.remove(r.start(), r.end());
        }
    }

    /// Frees both sides of `runs`, which were just unplugged (`private`: those of them that
    /// had the private attribute): unplugged memory is gone, so nothing is held back for it,
    /// whatever the policy. The held sets forget the runs (they are freed now, not at a later
    /// flush); a free that fails is held and retried at the next flush, so what is reported
    /// held is really backed (or, on a classic guest_memfd, may be: see
    /// [`Discarder::private_may_hold`]). `one_file`: both views are the same file (in place),
    /// freed once.
    pub(crate) fn unplugged(
        &mut self,
        backing: &RegionBacking,
        runs: &[GpaRange],
        private: &[GpaRange],
        one_file: bool,
    ) -> FlushReport {
        let sides: &[View] = if one_file {
            &[View::Shared]
        } else {
            &[View::Shared, View::Private]
        };
        // Before the held sets forget the runs: they tell what the private side may hold.
        let private_may_hold = self.private_may_hold(runs, private);
        let mut report = FlushReport::default();
        for r in runs {
            self.held_shared.remove(r.start(), r.end());
            self.held_private.remove(r.start(), r.end());
            self.failed.remove(r.start(), r.end());
        }
        for &side in sides {
            for &r in runs {
                // Not `punch`: its success clears the (side-less) failed mark, which a failure
                // of the other side may just have set.
                match backing.punch_hole(side, r) {
                    Ok(()) => {
                        self.freed(side, r);
                        report.punched_ranges += 1;
                        report.punched_bytes += r.len();
                    }
                    Err(e) => {
                        log::warn!("unplugged {r}: its {side} backing stays held: {e}");
                        let held: Vec<GpaRange> = match (side, &private_may_hold) {
                            (View::Private, Some(may_hold)) => may_hold
                                .intersection(r.start(), r.end())
                                .into_iter()
                                .filter_map(|(s, e)| GpaRange::new(s, e - s))
                                .collect(),
                            _ => backed(backing, side, r),
                        };
                        self.hold(&held, side);
                        report.failed_ranges += 1;
                    }
                }
            }
        }
        report
    }

    /// Forgets everything held (the region leaves guest RAM and its backing is freed whole).
    pub(crate) fn forget(&mut self) {
        self.held_shared = RangeSet::new();
        self.held_private = RangeSet::new();
        self.failed = RangeSet::new();
        if let Some(faulted) = self.faulted_while_failing.as_mut() {
            *faulted = RangeSet::new();
        }
    }

    pub(crate) fn held(&self) -> HeldBack {
        HeldBack {
            shared_bytes: self.held_shared.bytes(),
            private_bytes: self.held_private.bytes(),
            failed_bytes: self.failed.bytes(),
            unverified_bytes: match self.faulted_while_failing {
                Some(_) => self.held_private.bytes(),
                None => 0,
            },
        }
    }

    /// True when `[start, end)` of `side` is held (allowed to be backed on both sides).
    pub(crate) fn holds(&self, side: View, start: u64, end: u64) -> bool {
        match side {
            View::Shared => self.held_shared.contains(start, end),
            View::Private => self.held_private.contains(start, end),
        }
    }
}

/// The parts of `range` of `side` that hold memory: held back only they are, so that the
/// held-back figures count real memory (pages never touched are holes). A file that cannot say
/// (a classic guest_memfd) counts as holding all of it: every caller's range was private until
/// now or is held, so its guest_memfd may hold memory (see [`Discarder::private_may_hold`]).
fn backed(backing: &RegionBacking, side: View, range: GpaRange) -> Vec<GpaRange> {
    backing
        .backed_ranges(side, range)
        .unwrap_or_else(|_| vec![range])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, len: u64) -> GpaRange {
        GpaRange::new(start, len).unwrap()
    }

    impl Discarder {
        /// A discarder over a backing that reports residency on both sides (the software
        /// backing of these tests).
        fn new_for_test(policy: DiscardPolicy) -> Self {
            Self {
                policy,
                held_shared: RangeSet::new(),
                held_private: RangeSet::new(),
                failed: RangeSet::new(),
                faulted_while_failing: None,
            }
        }
    }

    /// A software backing at 0 of `size` bytes whose every page holds memory on both sides,
    /// as after a guest used it.
    fn touched(size: u64) -> RegionBacking {
        use std::os::unix::fs::FileExt;
        let backing = RegionBacking::software(0, size).unwrap();
        for side in [View::Shared, View::Private] {
            let file = match side {
                View::Shared => backing.shared_file(),
                View::Private => backing.private_file(),
            };
            file.write_all_at(&vec![1; size as usize], 0).unwrap();
        }
        backing
    }

    #[test]
    fn a_vacated_page_that_holds_no_memory_is_not_held() {
        // Only page 1 of the shared side was ever touched.
        let backing = RegionBacking::software(0, 0x10000).unwrap();
        use std::os::unix::fs::FileExt;
        backing.shared_file().write_all_at(&[1], 0x1000).unwrap();
        let mut d = Discarder::new_for_test(DiscardPolicy::Lazy {
            budget_bytes: 1 << 20,
        });
        d.converted(&backing, &[r(0, 0x4000)], Attribute::Private, true);
        assert_eq!(
            d.held().shared_bytes,
            0x1000,
            "only the touched page is held"
        );
        assert!(d.holds(View::Shared, 0x1000, 0x2000));
        // A free that fails holds what is backed, too.
        backing.inject_punch_failures(|_, _| true);
        let report = d.unplugged(&backing, &[r(0, 0x8000)], &[], false);
        assert_eq!(report.failed_ranges, 2);
        assert_eq!(d.held().shared_bytes, 0x1000);
        assert_eq!(d.held().private_bytes, 0);
        backing.clear_punch_failures();
        assert_eq!(d.flush(&backing).punched_bytes, 0x1000);
        assert_eq!(d.held(), HeldBack::default());
    }

    #[test]
    fn a_private_side_that_cannot_report_holds_only_what_may_have_been_private() {
        // As over a classic guest_memfd: every page counts as backed where the library holds
        // it, and the discarder decides what may hold memory at an unplug.
        let backing = touched(0x10000);
        let mut d = Discarder::new_for_test(DiscardPolicy::Lazy {
            budget_bytes: 1 << 20,
        });
        d.faulted_while_failing = Some(RangeSet::new());
        d.converted(&backing, &[r(0, 0x4000)], Attribute::Shared, true);
        // Private until now: may hold memory, held, and flagged unverified.
        assert_eq!(d.held().private_bytes, 0x4000);
        assert_eq!(d.held().unverified_bytes, 0x4000);
        // Unplugging pages 0..8 while every private free fails: pages 0..4 are held (vacated),
        // 4..6 had the private attribute, 6..8 were shared and never private since.
        backing.inject_punch_failures(|side, _| side == View::Private);
        let report = d.unplugged(&backing, &[r(0, 0x8000)], &[r(0x4000, 0x2000)], false);
        assert_eq!(report.failed_ranges, 1);
        assert_eq!(d.held().private_bytes, 0x6000);
        assert_eq!(d.held().unverified_bytes, 0x6000);
        assert!(!d.holds(View::Private, 0x6000, 0x7000));
        backing.clear_punch_failures();
        assert_eq!(d.flush(&backing).punched_bytes, 0x6000);
        assert_eq!(d.held(), HeldBack::default());
        // A failed conversion to private may have let the guest fault pages in: a shared range
        // it left is held when its free fails, and forgotten once a free succeeds.
        d.failed_to_private(r(0x8000, 0x1000));
        backing.inject_punch_failures(|side, _| side == View::Private);
        d.unplugged(&backing, &[r(0x8000, 0x2000)], &[], false);
        assert_eq!(d.held().private_bytes, 0x1000);
        assert!(d.holds(View::Private, 0x8000, 0x9000));
        backing.clear_punch_failures();
        assert_eq!(d.flush(&backing).punched_bytes, 0x1000);
        backing.inject_punch_failures(|side, _| side == View::Private);
        d.unplugged(&backing, &[r(0x8000, 0x1000)], &[], false);
        assert_eq!(d.held(), HeldBack::default());
    }

    #[test]
    fn an_unplug_frees_both_sides_at_once_whatever_the_policy() {
        let backing = touched(0x10000);
        let mut d = Discarder::new_for_test(DiscardPolicy::Lazy {
            budget_bytes: 1 << 20,
        });
        d.converted(&backing, &[r(0, 0x4000)], Attribute::Shared, true);
        assert_eq!(d.held().private_bytes, 0x4000);
        // Pages 2..6 leave: their held private side goes with them, not at a later flush.
        let report = d.unplugged(&backing, &[r(0x2000, 0x4000)], &[], false);
        assert_eq!((report.punched_ranges, report.punched_bytes), (2, 0x8000));
        assert_eq!(d.held().private_bytes, 0x2000);
        assert!(!d.holds(View::Private, 0x2000, 0x3000));
        // One side's failure is held and marked failed even when the other side's free works.
        backing.inject_punch_failures(|side, _| side == View::Shared);
        d.unplugged(&backing, &[r(0x8000, 0x1000)], &[], false);
        assert_eq!(d.held().failed_bytes, 0x1000);
        assert!(d.holds(View::Shared, 0x8000, 0x9000));
        // Plugged again as shared: the page is in use, its pending free must never happen.
        d.plugged(&[r(0x8000, 0x1000)], Attribute::Shared);
        assert!(!d.holds(View::Shared, 0x8000, 0x9000));
        assert_eq!(d.held().failed_bytes, 0);
    }

    #[test]
    fn a_page_converted_back_while_held_is_never_freed() {
        let backing = touched(0x10000);
        let mut d = Discarder::new_for_test(DiscardPolicy::Lazy {
            budget_bytes: 0x2000,
        });
        let nothing = FlushReport::default();
        assert_eq!(
            d.converted(&backing, &[r(0x1000, 0x1000)], Attribute::Private, true),
            nothing
        );
        // Back to shared: the shared page is in use again, the private one is vacated.
        d.converted(&backing, &[r(0x1000, 0x1000)], Attribute::Shared, true);
        assert_eq!(
            d.held(),
            HeldBack {
                shared_bytes: 0,
                private_bytes: 0x1000,
                failed_bytes: 0,
                unverified_bytes: 0,
            }
        );
        // Over the budget: everything held is freed, the page in use again is not.
        let report = d.converted(&backing, &[r(0x4000, 0x2000)], Attribute::Private, true);
        assert_eq!(report.punched_bytes, 0x3000);
        assert_eq!(d.held(), HeldBack::default());
        assert!(!d.holds(View::Shared, 0x1000, 0x2000));
    }

    #[test]
    fn batched_coalesces_adjacent_pages_into_one_free() {
        let backing = touched(0x10000);
        let mut d = Discarder::new_for_test(DiscardPolicy::Batched {
            max_ranges: 2,
            max_bytes: 1 << 20,
        });
        for p in 0..4 {
            let report = d.converted(&backing, &[r(p * 0x1000, 0x1000)], Attribute::Private, true);
            assert_eq!(report.punched_ranges, 0, "adjacent pages form one range");
        }
        let report = d.converted(&backing, &[r(0x8000, 0x1000)], Attribute::Private, true);
        assert_eq!(report.punched_ranges, 2);
        assert_eq!(backing.punch_stats().calls, 2);
    }

    #[test]
    fn a_failed_free_stays_held_and_is_retried() {
        let backing = touched(0x10000);
        let mut d = Discarder::new_for_test(DiscardPolicy::Eager);
        backing.inject_punch_failures(|_, _| true);
        let report = d.converted(&backing, &[r(0, 0x2000)], Attribute::Private, true);
        assert_eq!(report.failed_ranges, 1);
        assert_eq!(d.held().failed_bytes, 0x2000);
        assert_eq!(d.held().shared_bytes, 0x2000);
        backing.clear_punch_failures();
        // The next conversion frees its own runs and retries the held one.
        let report = d.converted(&backing, &[r(0x4000, 0x1000)], Attribute::Private, true);
        assert_eq!(report.punched_bytes, 0x3000);
        assert_eq!(d.held(), HeldBack::default());
    }

    #[test]
    fn eager_frees_the_runs_of_a_mixed_conversion_with_one_punch_over_their_span() {
        let backing = touched(0x10000);
        let mut d = Discarder::new_for_test(DiscardPolicy::Eager);
        let runs = [r(0x1000, 0x1000), r(0x4000, 0x2000)];
        let report = d.converted(&backing, &runs, Attribute::Private, true);
        assert_eq!((report.punched_ranges, report.punched_bytes), (1, 0x3000));
        assert_eq!(
            (backing.punch_stats().calls, backing.punch_stats().bytes),
            (1, 0x5000)
        );
        // Not allowed to span (something may use the side between): one punch per run.
        let report = d.converted(&backing, &runs, Attribute::Shared, false);
        assert_eq!(report.punched_ranges, 2);
        assert_eq!(backing.punch_stats().calls, 3);
    }

    #[test]
    fn a_failed_span_punch_holds_exactly_the_runs() {
        let backing = touched(0x10000);
        let mut d = Discarder::new_for_test(DiscardPolicy::Eager);
        backing.inject_punch_failures(|_, _| true);
        let runs = [r(0x1000, 0x1000), r(0x4000, 0x2000)];
        let report = d.converted(&backing, &runs, Attribute::Private, true);
        assert_eq!(report.failed_ranges, 2);
        assert_eq!(d.held().shared_bytes, 0x3000, "the gap is not held");
        assert_eq!(d.held().failed_bytes, 0x3000);
        assert!(!d.holds(View::Shared, 0x2000, 0x3000));
        backing.clear_punch_failures();
        // Retried from the held set, run by run.
        assert_eq!(d.flush(&backing).punched_ranges, 2);
        assert_eq!(d.held(), HeldBack::default());
    }
}
