//! Per-granule state kept as maximal runs (extents), never per page.
//!
//! Storage: one packed `u64` per run, `start granule << 2 | state`, kept sorted in chunks of
//! at most [`CHUNK`] entries (a two-level sorted array: `firsts` holds each chunk's first
//! key for the outer binary search). A run extends to the next entry's key (or to the end of
//! the region). Invariants, checked by `check_invariants` in tests: the first entry has key
//! 0, keys strictly increase, two consecutive entries never hold the same state (runs are
//! maximal), no chunk is empty or above `CHUNK`, every slot past a chunk's length holds
//! [`EMPTY`], and `firsts` matches the chunks.
//!
//! Why not `BTreeMap`: a conversion touches two or three neighbouring keys. Here it costs one
//! binary search over `firsts` (contiguous, in cache), one inside a chunk, and one in-chunk
//! shift of at most 512 bytes; a B-tree with B = 6 walks several nodes per lookup and does
//! several lookups. Memory is 8 bytes per run plus chunk slack, exactly accountable. The
//! first version used `BTreeMap<u64, State>`; on the bounce benchmark this layout is about
//! twice as fast and takes 17.7 instead of 23.6 heap bytes per run.
//!
//! Why fixed arrays: a chunk is a boxed `[u64; CHUNK]` padded with [`EMPTY`] rather than a
//! `Vec`, so the in-chunk search is seven branch-free steps with no length or bounds checks,
//! and a bounce buffer's split or merge writes the array directly (584 -> 538 instructions per
//! single-granule conversion, 742 -> 620 with 10,000 other runs; same bytes per run).
//! A bitmap for dense 64-granule windows was tried and not adopted (README "Performance"): as
//! a hashed overlay of exception masks over big runs it takes a bounce buffer's way back from
//! a search and a merge to a probe and a bit flip, but the way there still needs the search
//! (is the window inside one run?), so it saved 53-55 of 435-436 instructions per conversion
//! (123 of 513 with 10,000 other runs) and cost 5% on mixed 2 MiB blocks, whose small
//! conversions are folded into the entries later anyway.
//! Granule indices fit in 62 bits (a region has at most 2^64 / 4 KiB = 2^52 granules).

use crate::change::ChangeKind;
use crate::range::{Attribute, View};

/// Maximum entries per chunk (one chunk = 512 bytes of entries): a power of two, for the
/// fixed-step search.
const CHUNK: usize = 64;

/// Emptied chunk buffers kept for reuse.
const SPARE_CHUNKS: usize = 4;

/// What a transaction of one kind does to a state: the bit it keeps and the bits it sets.
/// Computed where the kind is a constant (the public transaction methods), so that the
/// transaction itself does not decode the kind (about ten instructions per conversion).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Update {
    keep: u8,
    set: u8,
}

impl Update {
    #[inline(always)]
    pub(crate) fn of(kind: ChangeKind) -> Update {
        let (keep, set) = match kind {
            ChangeKind::Convert { to } => (2, matches!(to, Attribute::Private) as u8),
            ChangeKind::Plug => (1, 2),
            ChangeKind::Unplug => (1, 0),
        };
        Update { keep, set }
    }
}

/// Combined state of one granule: the two sources of truth, packed in two bits
/// (bit 1 = plugged, bit 0 = private) so that comparing and storing states is one byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct State(u8);

impl State {
    pub(crate) const fn new(plugged: bool, attribute: Attribute) -> State {
        let private = matches!(attribute, Attribute::Private);
        State((plugged as u8) << 1 | private as u8)
    }

    pub(crate) fn plugged(self) -> bool {
        self.0 & 2 != 0
    }

    pub(crate) fn attribute(self) -> Attribute {
        if self.0 & 1 != 0 {
            Attribute::Private
        } else {
            Attribute::Shared
        }
    }

    /// The state after `update`.
    pub(crate) fn after(self, update: Update) -> State {
        State(self.0 & update.keep | update.set)
    }

    /// The state of the granules in `view`: plugged, with the view's attribute.
    pub(crate) const fn of_view(view: View) -> State {
        State::new(
            true,
            match view {
                View::Shared => Attribute::Shared,
                View::Private => Attribute::Private,
            },
        )
    }

    /// The view this granule belongs to, `None` when unplugged.
    pub(crate) fn view(self) -> Option<View> {
        self.plugged().then(|| self.attribute().view())
    }

    fn index(self) -> usize {
        // Masked (a no-op: two bits) so that indexing `totals` needs no bounds check.
        usize::from(self.0 & 3)
    }

    fn from_index(i: u64) -> State {
        State((i & 3) as u8)
    }
}

fn pack(key: u64, state: State) -> u64 {
    key << 2 | state.index() as u64
}

fn key_of(entry: u64) -> u64 {
    entry >> 2
}

fn state_of(entry: u64) -> State {
    State::from_index(entry & 3)
}

/// One clipped run of a planned update: granules `[start, end)`, state before and after.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Piece {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) old: State,
    pub(crate) new: State,
}

/// A range's enclosing run, from [`Extents::within_one_run`]: valid until the extents change.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Within {
    pos: Pos,
    start: u64,
    end: u64,
    /// State of the run.
    pub(crate) state: State,
}

/// Position of an entry: chunk and index in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Pos {
    chunk: usize,
    index: usize,
}

/// A computed but not yet applied update of `[a, b)`. Valid until the extents change; the
/// manager holds its lock from `plan` to `commit`, so nothing changes in between. Its
/// buffers are reused, so the hot path does not allocate.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub(crate) pieces: Vec<Piece>,
    /// The entries that replace every entry with a key in `[a, b]`.
    replacement: Vec<u64>,
    /// Where the first entry with key `>= a` is (or would be inserted).
    at: Pos,
    /// How many entries have a key in `[a, b]` (all replaced by `replacement`).
    existing: usize,
}

impl Plan {
    /// Heap bytes of the reusable buffers.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.pieces.capacity() * size_of::<Piece>() + self.replacement.capacity() * size_of::<u64>()
    }
}

/// An empty slot of a chunk: above every packed entry (keys are below 2^62), so the
/// fixed-step search in [`Chunk::count_below`] never counts it.
const EMPTY: u64 = u64::MAX;

/// Up to [`CHUNK`] sorted entries in a fixed array whose unused slots hold [`EMPTY`], so that a
/// search takes the same [`CHUNK`]`.ilog2() + 1` branch-free steps whatever the length, with
/// no length check and no bounds check.
#[derive(Clone)]
struct Chunk {
    keys: [u64; CHUNK],
    len: usize,
}

impl Chunk {
    fn new() -> Box<Chunk> {
        Box::new(Chunk {
            keys: [EMPTY; CHUNK],
            len: 0,
        })
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn entries(&self) -> &[u64] {
        &self.keys[..self.len]
    }

    /// How many entries are `< bound`: a fixed number of halving steps over the whole array
    /// (the empty slots compare above any bound).
    fn count_below(&self, bound: u64) -> usize {
        let mut i = 0;
        let mut step = CHUNK / 2;
        while step > 0 {
            if self.keys[i + step - 1] < bound {
                i += step;
            }
            step /= 2;
        }
        // The steps reach index CHUNK - 1 at most and never test it when every lower entry
        // is below `bound`.
        i + usize::from(self.keys[i] < bound)
    }

    /// Replaces entries `i..end` by `with`, shifting the tail once; the result must fit.
    #[inline]
    fn replace(&mut self, i: usize, end: usize, with: &[u64]) {
        let old = self.len;
        let new_end = i + with.len();
        let new_len = old - (end - i) + with.len();
        debug_assert!(new_len <= CHUNK, "chunk overflow");
        if new_end != end {
            self.keys.copy_within(end..old, new_end);
        }
        // A few entries: a loop, not a call to `memcpy`.
        for (slot, &entry) in self.keys[i..new_end].iter_mut().zip(with) {
            *slot = entry;
        }
        // At most a few slots on the hot path: a loop, not a call to `memset`.
        for slot in self.keys.get_mut(new_len..old).unwrap_or_default() {
            *slot = EMPTY;
        }
        self.len = new_len;
    }

    fn extend(&mut self, with: &[u64]) {
        self.replace(self.len, self.len, with);
    }

    fn clear(&mut self) {
        self.replace(0, self.len, &[]);
    }
}

impl std::ops::Index<usize> for Chunk {
    type Output = u64;

    fn index(&self, i: usize) -> &u64 {
        &self.entries()[i]
    }
}

pub(crate) struct Extents {
    #[expect(
        clippy::vec_box,
        reason = "inserting or removing a chunk moves 8-byte pointers, not 520-byte chunks"
    )]
    chunks: Vec<Box<Chunk>>,
    /// `firsts[c]` = key of `chunks[c][0]`.
    firsts: Vec<u64>,
    granules: u64,
    /// Granules per state, indexed by `State::index`.
    totals: [u64; 4],
    len: usize,
    /// Emptied chunk buffers kept for reuse.
    #[expect(clippy::vec_box, reason = "moved to and from `chunks` without copying")]
    spare: Vec<Box<Chunk>>,
    /// Buffer for the rare chunk overflow.
    scratch: Vec<u64>,
}

impl Extents {
    pub(crate) fn new(granules: u64, initial: State) -> Self {
        let mut totals = [0; 4];
        totals[initial.index()] = granules;
        let mut chunk = Chunk::new();
        chunk.extend(&[pack(0, initial)]);
        Self {
            chunks: vec![chunk],
            firsts: vec![0],
            granules,
            totals,
            len: 1,
            spare: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Number of runs.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Granules currently in `state`.
    pub(crate) fn total(&self, plugged: bool, attribute: Attribute) -> u64 {
        self.totals[State::new(plugged, attribute).index()]
    }

    /// Position of the last entry with key `<= g` (the run containing `g`).
    #[inline]
    fn locate(&self, g: u64) -> Pos {
        let chunk = match self.firsts.len() {
            1 => 0,
            _ => self.firsts.partition_point(|&f| f <= g) - 1,
        };
        // key_of(e) <= g  <=>  e < (g + 1) << 2: compares packed entries without unpacking
        // (g < 2^62, so the shift cannot overflow). The chunk's first key is <= g.
        let index = self.chunks[chunk].count_below((g + 1) << 2) - 1;
        Pos { chunk, index }
    }

    fn entry(&self, p: Pos) -> u64 {
        self.chunks[p.chunk][p.index]
    }

    fn next_pos(&self, p: Pos) -> Option<Pos> {
        if p.index + 1 < self.chunks[p.chunk].len() {
            Some(Pos {
                chunk: p.chunk,
                index: p.index + 1,
            })
        } else if p.chunk + 1 < self.chunks.len() {
            Some(Pos {
                chunk: p.chunk + 1,
                index: 0,
            })
        } else {
            None
        }
    }

    fn prev_pos(&self, p: Pos) -> Option<Pos> {
        if p.index > 0 {
            Some(Pos {
                chunk: p.chunk,
                index: p.index - 1,
            })
        } else if p.chunk > 0 {
            let chunk = p.chunk - 1;
            Some(Pos {
                chunk,
                index: self.chunks[chunk].len() - 1,
            })
        } else {
            None
        }
    }

    /// Calls `f(start, end, state)` for each maximal run overlapping `[a, b)`, clipped to
    /// it, in address order, until `f` fails: the one walk over runs (replay, queries,
    /// unregistration). The loop is inside, over the chunk slices, because a replay calls it
    /// for every run of a range: an external iterator's per-step bookkeeping made replay about
    /// twice as slow.
    pub(crate) fn try_for_each_run<E>(
        &self,
        a: u64,
        b: u64,
        mut f: impl FnMut(u64, u64, State) -> Result<(), E>,
    ) -> Result<(), E> {
        if a >= b {
            return Ok(());
        }
        let pos = self.locate(a);
        let (mut start, mut state) = (a, state_of(self.entry(pos)));
        let mut skip = pos.index + 1;
        for chunk in &self.chunks[pos.chunk..] {
            for &entry in chunk.entries().get(skip..).unwrap_or_default() {
                let key = key_of(entry);
                if key >= b {
                    return f(start, b, state);
                }
                f(start, key, state)?;
                (start, state) = (key, state_of(entry));
            }
            skip = 0;
        }
        f(start, b, state)
    }

    /// Calls `f(start, end)` for each maximal run of `view` overlapping `[a, b)`, clipped to
    /// it, in address order, until `f` fails: the walk of a replay. A view is one state
    /// (plugged, with the view's attribute), so the runs of the other states are passed over
    /// by one compare each, without a call.
    pub(crate) fn try_for_each_view_run<E>(
        &self,
        a: u64,
        b: u64,
        view: View,
        f: impl FnMut(u64, u64) -> Result<(), E>,
    ) -> Result<(), E> {
        // One copy of the walk per view, so that the state tested on every entry is a
        // constant rather than a value kept in a register across the calls.
        const SHARED: u8 = State::of_view(View::Shared).0;
        const PRIVATE: u8 = State::of_view(View::Private).0;
        match view {
            View::Shared => self.view_walk::<SHARED, E>(a, b, f),
            View::Private => self.view_walk::<PRIVATE, E>(a, b, f),
        }
    }

    /// [`Extents::try_for_each_view_run`] for the view whose state is `State(WANTED)`.
    fn view_walk<const WANTED: u8, E>(
        &self,
        a: u64,
        b: u64,
        mut f: impl FnMut(u64, u64) -> Result<(), E>,
    ) -> Result<(), E> {
        if a >= b {
            return Ok(());
        }
        let in_view = |run: u64| state_of(run) == State(WANTED);
        let pos = self.locate(a);
        // The run whose end is the next entry visited, as a packed entry of its own: the
        // first one starts at `a`, every later one at its key. Its state is tested on the
        // packed word, and its key unpacked only for a run of `view`.
        let mut run = pack(a, state_of(self.entry(pos)));
        let mut skip = pos.index + 1;
        'walk: for chunk in &self.chunks[pos.chunk..] {
            let entries = chunk.entries().get(skip..).unwrap_or_default();
            skip = 0;
            let (Some(&first), Some(&last)) = (entries.first(), entries.last()) else {
                continue;
            };
            if key_of(first) >= b {
                break;
            }
            if in_view(run) {
                f(key_of(run), key_of(first))?;
            }
            if key_of(last) < b {
                // A chunk that ends before `b` (all but the last one of a long replay): each
                // entry but the last starts a run that ends at the next one, all without the
                // bound test. After a run of `view` the next entry starts a run of another
                // state (runs are maximal), so it is skipped without its test: a replay's runs
                // alternate in and out of the view, and this halves the entries visited.
                let mut rest = entries;
                while let [start, end, ..] = *rest {
                    if in_view(start) {
                        f(key_of(start), key_of(end))?;
                        rest = &rest[2..];
                    } else {
                        rest = &rest[1..];
                    }
                }
                run = last;
                continue;
            }
            run = first;
            for &entry in &entries[1..] {
                if key_of(entry) >= b {
                    break 'walk;
                }
                if in_view(run) {
                    f(key_of(run), key_of(entry))?;
                }
                run = entry;
            }
        }
        if in_view(run) {
            f(key_of(run), b)
        } else {
            Ok(())
        }
    }

    /// [`Extents::try_for_each_run`] for a walk that cannot fail.
    pub(crate) fn for_each_run(&self, a: u64, b: u64, mut f: impl FnMut(u64, u64, State)) {
        let Ok(()) = self.try_for_each_run(a, b, |s, e, state| {
            f(s, e, state);
            Ok::<(), std::convert::Infallible>(())
        });
    }

    /// The run containing `[a, b)` if the range lies inside one run (the common case of a
    /// one- or two-granule conversion): the fast path that avoids building a [`Plan`].
    #[inline]
    pub(crate) fn within_one_run(&self, a: u64, b: u64) -> Option<Within> {
        let pos = self.locate(a);
        let chunk = &self.chunks[pos.chunk];
        let entry = chunk.keys[pos.index];
        // The run ends at the next entry's key: in this chunk (an empty slot reads as past
        // the region), else the next chunk's first, else the region's end.
        let next = chunk.keys.get(pos.index + 1).copied().unwrap_or(EMPTY);
        let end = if next != EMPTY {
            key_of(next)
        } else {
            self.firsts
                .get(pos.chunk + 1)
                .copied()
                .unwrap_or(self.granules)
        };
        (b <= end).then_some(Within {
            pos,
            start: key_of(entry),
            end,
            state: state_of(entry),
        })
    }

    /// Sets `[a, b)`, which lies inside run `w` (from [`Extents::within_one_run`] on the
    /// unchanged extents), to `new != w.state`; keeps runs maximal like [`Extents::commit`].
    /// Inlined into the transaction with its in-chunk shapes; the rest is out of line.
    #[inline]
    pub(crate) fn set_within(&mut self, w: Within, a: u64, b: u64, new: State) {
        let len = b - a;
        self.totals[w.state.index()] -= len;
        self.totals[new.index()] += len;
        if !self.set_within_chunk(w, a, b, new) {
            self.set_within_spliced(w, a, b, new);
        }
    }

    /// [`Extents::set_within`] for the shapes [`Extents::set_within_chunk`] does not take:
    /// one splice with the entries that keep runs maximal.
    #[inline(never)]
    fn set_within_spliced(&mut self, w: Within, a: u64, b: u64, new: State) {
        let left = if w.start < a {
            Some(w.state)
        } else {
            self.prev_pos(w.pos).map(|p| state_of(self.entry(p)))
        };
        let next = self.next_pos(w.pos);
        let right = if b < w.end {
            Some(w.state)
        } else {
            next.map(|p| state_of(self.entry(p)))
        };
        let mut replacement = [0u64; 2];
        let mut n = 0;
        if left != Some(new) {
            replacement[n] = pack(a, new);
            n += 1;
        }
        if let Some(r) = right.filter(|&r| r != new) {
            replacement[n] = pack(b, r);
            n += 1;
        }
        let existing = usize::from(w.start == a) + usize::from(b == w.end && next.is_some());
        let at = if w.start == a {
            w.pos
        } else {
            Pos {
                chunk: w.pos.chunk,
                index: w.pos.index + 1,
            }
        };
        self.splice(at, existing, &replacement[..n]);
    }

    /// The two shapes a bounce buffer takes, edited in place when the chunk has room (or,
    /// for a removal, stays dense): a range strictly inside its run splits it (two entries
    /// inserted), and a whole run whose neighbours both hold `new` merges with them (two
    /// entries removed). Returns `false`, changing nothing, for any other shape.
    #[inline]
    fn set_within_chunk(&mut self, w: Within, a: u64, b: u64, new: State) -> bool {
        let (c, i) = (w.pos.chunk, w.pos.index);
        let alone = self.chunks.len() == 1;
        let chunk = &mut self.chunks[c];
        let len = chunk.len();
        if w.start < a && b < w.end {
            if len + 2 > CHUNK {
                return false;
            }
            // The two slots past the end are empty and take the shifted tail.
            chunk.keys.copy_within(i + 1..len, i + 3);
            chunk.keys[i + 1] = pack(a, new);
            chunk.keys[i + 2] = pack(b, w.state);
            chunk.len = len + 2;
            self.len += 2;
            return true;
        }
        // A whole run with a left neighbour in this chunk and a right one (the entry at `b`)
        // in it too; the region's first run (no left neighbour) takes the general path.
        if w.start == a
            && b == w.end
            && i > 0
            && i + 1 < len
            && (alone || len - 2 >= CHUNK / 4)
            && state_of(chunk.keys[i - 1]) == new
            && state_of(chunk.keys[i + 1]) == new
        {
            chunk.keys.copy_within(i + 2..len, i);
            chunk.keys[len - 2] = EMPTY;
            chunk.keys[len - 1] = EMPTY;
            chunk.len = len - 2;
            self.len -= 2;
            return true;
        }
        false
    }

    /// Computes the update that sets every granule `g` in `[a, b)` to `f(state(g))`.
    pub(crate) fn plan(&self, a: u64, b: u64, f: impl Fn(State) -> State, plan: &mut Plan) {
        plan.pieces.clear();
        plan.replacement.clear();
        let pos = self.locate(a);
        let first = self.entry(pos);
        let (k0, s0) = (key_of(first), state_of(first));
        let left = if k0 < a {
            Some(s0)
        } else {
            self.prev_pos(pos).map(|p| state_of(self.entry(p)))
        };
        plan.at = if k0 == a {
            pos
        } else {
            Pos {
                chunk: pos.chunk,
                index: pos.index + 1,
            }
        };
        plan.existing = usize::from(k0 == a);
        let (mut start, mut state) = (a, s0);
        let mut right = None;
        let mut cur = self.next_pos(pos);
        while let Some(p) = cur {
            let e = self.entry(p);
            let k = key_of(e);
            if k >= b {
                if k == b {
                    right = Some(state_of(e));
                    plan.existing += 1;
                }
                break;
            }
            plan.pieces.push(Piece {
                start,
                end: k,
                old: state,
                new: f(state),
            });
            (start, state) = (k, state_of(e));
            plan.existing += 1;
            cur = self.next_pos(p);
        }
        plan.pieces.push(Piece {
            start,
            end: b,
            old: state,
            new: f(state),
        });
        if right.is_none() && b < self.granules {
            right = Some(state);
        }
        let mut prev = left;
        for p in &plan.pieces {
            if prev != Some(p.new) {
                plan.replacement.push(pack(p.start, p.new));
                prev = Some(p.new);
            }
        }
        if let Some(r) = right {
            if prev != Some(r) {
                plan.replacement.push(pack(b, r));
            }
        }
    }

    /// Applies a plan made by [`Extents::plan`] on the unchanged extents.
    pub(crate) fn commit(&mut self, plan: &Plan) {
        for p in &plan.pieces {
            let len = p.end - p.start;
            self.totals[p.old.index()] -= len;
            self.totals[p.new.index()] += len;
        }
        self.splice(plan.at, plan.existing, &plan.replacement);
    }

    /// Replaces the `existing` entries from position `at` on (the entries with a key in
    /// `[a, b]`; they may continue into the following chunks) by `replacement` (sorted, keys
    /// in `[a, b]`). `at` may be the insertion point at the end of its chunk.
    fn splice(&mut self, at: Pos, existing: usize, replacement: &[u64]) {
        let c = at.chunk;
        let chunk = &mut self.chunks[c];
        let i = at.index;
        let end = i + existing.min(chunk.len() - i);
        let mut spilled = existing - (end - i);
        self.len = self.len - existing + replacement.len();
        let mut next = c + 1;
        if chunk.len() - (end - i) + replacement.len() <= CHUNK {
            chunk.replace(i, end, replacement);
        } else {
            // Rare: the chunk overflows. Rebuild it as half-full chunks.
            let mut all = std::mem::take(&mut self.scratch);
            all.clear();
            let chunk = &mut self.chunks[c];
            all.extend_from_slice(&chunk.entries()[..i]);
            all.extend_from_slice(replacement);
            all.extend_from_slice(&chunk.entries()[end..]);
            let mut parts = all.chunks(CHUNK / 2);
            chunk.clear();
            chunk.extend(parts.next().unwrap_or(&[]));
            for part in parts {
                let mut fresh = self.spare.pop().unwrap_or_else(Chunk::new);
                fresh.extend(part);
                self.firsts.insert(next, key_of(part[0]));
                self.chunks.insert(next, fresh);
                next += 1;
            }
            // Keep a small scratch buffer; drop one grown by a huge conversion.
            if all.capacity() <= 4 * CHUNK {
                self.scratch = all;
            }
        }
        // Entries with keys in [a, b] may continue in the following chunks.
        while spilled > 0 && next < self.chunks.len() {
            let chunk = &mut self.chunks[next];
            let n = spilled.min(chunk.len());
            chunk.replace(0, n, &[]);
            spilled -= n;
            if chunk.is_empty() {
                self.remove_chunk(next);
                continue;
            }
            self.firsts[next] = key_of(chunk[0]);
            if chunk.len() < CHUNK / 4 {
                self.rebalance(next);
            }
            break;
        }
        if self.chunks[c].is_empty() {
            // Never the only chunk: key 0 is outside [a, b] or in `replacement`.
            self.remove_chunk(c);
        } else {
            self.firsts[c] = key_of(self.chunks[c][0]);
            if self.chunks[c].len() < CHUNK / 4 {
                self.rebalance(c);
            }
        }
    }

    /// Merges chunk `c` into a neighbour when it is below a quarter full and the merged
    /// chunk stays at most three quarters full, so chunks stay dense without thrashing.
    fn rebalance(&mut self, c: usize) {
        let limit = CHUNK * 3 / 4;
        if c + 1 < self.chunks.len() && self.chunks[c].len() + self.chunks[c + 1].len() <= limit {
            let (head, tail) = self.chunks.split_at_mut(c + 1);
            head[c].extend(tail[0].entries());
            self.remove_chunk(c + 1);
        } else if c > 0 && self.chunks[c - 1].len() + self.chunks[c].len() <= limit {
            let (head, tail) = self.chunks.split_at_mut(c);
            head[c - 1].extend(tail[0].entries());
            self.remove_chunk(c);
        }
    }

    /// Removes chunk `c`, keeping its buffer for reuse so that chunks oscillating between
    /// split and merge do not allocate.
    fn remove_chunk(&mut self, c: usize) {
        let mut chunk = self.chunks.remove(c);
        self.firsts.remove(c);
        if self.spare.len() < SPARE_CHUNKS {
            chunk.clear();
            self.spare.push(chunk);
        }
    }

    /// Heap bytes of the storage, exactly as allocated (by capacity): the chunk table, the
    /// `firsts` table, every chunk (live and spare) and the overflow scratch.
    pub(crate) fn heap_bytes(&self) -> usize {
        (self.chunks.capacity() + self.spare.capacity()) * size_of::<Box<Chunk>>()
            + (self.chunks.len() + self.spare.len()) * size_of::<Chunk>()
            + (self.firsts.capacity() + self.scratch.capacity()) * size_of::<u64>()
    }

    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        assert_eq!(self.chunks.len(), self.firsts.len());
        let mut prev: Option<u64> = None;
        let mut count = 0;
        for (c, chunk) in self.chunks.iter().enumerate() {
            assert!(!chunk.is_empty() && chunk.len() <= CHUNK, "chunk {c} size");
            assert!(
                chunk.keys[chunk.len()..].iter().all(|&k| k == EMPTY),
                "chunk {c} has a non-empty slot past its length"
            );
            assert_eq!(self.firsts[c], key_of(chunk[0]), "firsts[{c}]");
            for &e in chunk.entries() {
                match prev {
                    None => assert_eq!(key_of(e), 0, "first key is not 0"),
                    Some(p) => {
                        assert!(key_of(p) < key_of(e), "keys not increasing");
                        assert_ne!(state_of(p), state_of(e), "run at {} not maximal", key_of(e));
                    }
                }
                assert!(key_of(e) < self.granules);
                prev = Some(e);
                count += 1;
            }
        }
        assert_eq!(count, self.len);
        assert_eq!(self.totals.iter().sum::<u64>(), self.granules);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARED: State = State::new(true, Attribute::Shared);
    const PRIVATE: State = State::new(true, Attribute::Private);

    /// The runs of `[a, b)`, clipped, in address order.
    fn runs(e: &Extents, a: u64, b: u64) -> Vec<(u64, u64, State)> {
        let mut out = Vec::new();
        e.for_each_run(a, b, |s, t, st| out.push((s, t, st)));
        out
    }

    /// Sets `[a, b)` through the fast path when it applies (as the manager does), else
    /// through a plan.
    fn set(e: &mut Extents, a: u64, b: u64, to: State) {
        match e.within_one_run(a, b) {
            Some(w) if w.state == to => {}
            Some(w) => e.set_within(w, a, b, to),
            None => {
                let mut plan = Plan::default();
                e.plan(a, b, |_| to, &mut plan);
                e.commit(&plan);
            }
        }
        e.check_invariants();
    }

    /// Sets `[a, b)` through a plan, whatever the shape.
    fn set_planned(e: &mut Extents, a: u64, b: u64, to: State) {
        let mut plan = Plan::default();
        e.plan(a, b, |_| to, &mut plan);
        e.commit(&plan);
        e.check_invariants();
    }

    #[test]
    fn flipping_one_granule_splits_then_merges_back() {
        let mut e = Extents::new(100, PRIVATE);
        set(&mut e, 40, 41, SHARED);
        assert_eq!(
            runs(&e, 0, 100),
            [(0, 40, PRIVATE), (40, 41, SHARED), (41, 100, PRIVATE)]
        );
        assert_eq!(e.total(true, Attribute::Shared), 1);
        set(&mut e, 40, 41, PRIVATE);
        assert_eq!(e.len(), 1);
        assert_eq!(e.total(true, Attribute::Private), 100);
    }

    #[test]
    fn runs_are_clipped_to_the_query() {
        let mut e = Extents::new(100, PRIVATE);
        set(&mut e, 10, 20, SHARED);
        assert_eq!(runs(&e, 15, 25), [(15, 20, SHARED), (20, 25, PRIVATE)]);
        assert_eq!(runs(&e, 0, 5), [(0, 5, PRIVATE)]);
    }

    #[test]
    fn plan_reports_old_and_new_state_per_run() {
        let mut e = Extents::new(100, PRIVATE);
        set(&mut e, 10, 20, SHARED);
        let mut plan = Plan::default();
        e.plan(5, 15, |_| SHARED, &mut plan);
        let got: Vec<_> = plan
            .pieces
            .iter()
            .map(|p| (p.start, p.end, p.old, p.new))
            .collect();
        assert_eq!(got, [(5, 10, PRIVATE, SHARED), (10, 15, SHARED, SHARED)]);
        e.commit(&plan);
        e.check_invariants();
        assert_eq!(
            runs(&e, 0, 100),
            [(0, 5, PRIVATE), (5, 20, SHARED), (20, 100, PRIVATE)]
        );
    }

    #[test]
    fn chunk_search_counts_entries_below_a_bound_at_every_fill_level() {
        for len in 0..=CHUNK {
            let mut chunk = Chunk::new();
            let entries: Vec<u64> = (0..len as u64).map(|k| pack(3 * k, SHARED)).collect();
            chunk.extend(&entries);
            for g in 0..3 * CHUNK as u64 + 2 {
                let bound = g << 2;
                let expected = entries.iter().filter(|&&e| e < bound).count();
                assert_eq!(
                    chunk.count_below(bound),
                    expected,
                    "len {len}, bound {bound}"
                );
            }
            // Emptying slots restores the padding the search relies on.
            chunk.clear();
            assert!(chunk.keys.iter().all(|&k| k == EMPTY));
        }
    }

    #[test]
    fn a_full_chunk_splits_and_runs_merge_back_across_chunk_boundaries() {
        // 200 isolated shared granules: the first chunk fills (CHUNK entries), overflows into
        // new chunks, and some runs start a chunk, so taking them back merges across chunks.
        // (Granule 0 shared first, so that the shared runs' entries sit at even positions,
        // where a split at CHUNK / 2 starts a chunk.)
        let mut e = Extents::new(4000, PRIVATE);
        set(&mut e, 0, 1, SHARED);
        for i in 0..200 {
            set(&mut e, 10 * i + 5, 10 * i + 6, SHARED);
        }
        assert_eq!(e.len(), 402);
        assert!(e.chunks.len() > 402 / CHUNK, "chunks never split");
        assert!(
            (1..e.chunks.len()).any(|c| state_of(e.chunks[c][0]) == SHARED),
            "no shared run starts a chunk"
        );
        for i in (0..200).rev().step_by(2).chain((0..200).step_by(2)) {
            set(&mut e, 10 * i + 5, 10 * i + 6, PRIVATE);
        }
        set(&mut e, 0, 1, PRIVATE);
        assert_eq!(runs(&e, 0, 4000), [(0, 4000, PRIVATE)]);
        assert_eq!(e.chunks.len(), 1);
    }

    #[test]
    fn granules_at_both_ends_of_a_1_tib_region_flip_and_merge_back() {
        let granules = (1u64 << 40) / 4096;
        let last = granules - 1;
        let mut e = Extents::new(granules, PRIVATE);
        // The region's first and last granules: a run with no left or no right neighbour.
        set(&mut e, 0, 1, SHARED);
        set(&mut e, last, granules, SHARED);
        assert_eq!(
            runs(&e, 0, granules),
            [(0, 1, SHARED), (1, last, PRIVATE), (last, granules, SHARED)]
        );
        let w = e.within_one_run(last, granules).expect("one run");
        assert_eq!((w.start, w.end, w.state), (last, granules, SHARED));
        let mut shared = Vec::new();
        let _ = e.try_for_each_view_run(0, granules, View::Shared, |s, t| {
            shared.push((s, t));
            Ok::<(), ()>(())
        });
        assert_eq!(shared, [(0, 1), (last, granules)]);
        assert_eq!(e.total(true, Attribute::Shared), 2);
        set(&mut e, last, granules, PRIVATE);
        set(&mut e, 0, 1, PRIVATE);
        assert_eq!(runs(&e, 0, granules), [(0, granules, PRIVATE)]);
        // A region with one run costs bytes: one chunk, no tables beyond it.
        assert!(e.heap_bytes() < 1024, "{} bytes", e.heap_bytes());
    }

    #[test]
    fn view_walk_stops_at_the_first_failure() {
        let mut e = Extents::new(100, PRIVATE);
        for start in [10, 30, 50] {
            set(&mut e, start, start + 5, SHARED);
        }
        let mut seen = Vec::new();
        let stopped = e.try_for_each_view_run(0, 100, View::Shared, |s, t| {
            seen.push((s, t));
            if s == 30 { Err(s) } else { Ok(()) }
        });
        assert_eq!(stopped, Err(30));
        assert_eq!(seen, [(10, 15), (30, 35)]);
        // Clipped at both ends, and nothing for a range inside another state's run.
        seen.clear();
        let _ = e.try_for_each_view_run(12, 52, View::Shared, |s, t| {
            seen.push((s, t));
            Ok::<(), ()>(())
        });
        assert_eq!(seen, [(12, 15), (30, 35), (50, 52)]);
        seen.clear();
        let _ = e.try_for_each_view_run(16, 29, View::Shared, |s, t| {
            seen.push((s, t));
            Ok::<(), ()>(())
        });
        assert!(seen.is_empty());
    }

    #[test]
    fn random_updates_match_a_per_granule_vector() {
        random_updates(64, 64, 5000);
        // Thousands of runs: chunk splits, spills across chunks and merges.
        random_updates(4000, 8, 20000);
        random_updates(4000, 4000, 2000);
    }

    fn random_updates(granules: u64, max_len: u64, steps: usize) {
        let states = [
            SHARED,
            PRIVATE,
            State::new(false, Attribute::Shared),
            State::new(false, Attribute::Private),
        ];
        let mut e = Extents::new(granules, PRIVATE);
        let mut model = vec![PRIVATE; granules as usize];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ granules ^ max_len;
        let mut max_runs = 0;
        for _ in 0..steps {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let a = x % granules;
            let b = a + 1 + (x >> 8) % (granules - a).min(max_len);
            let to = states[(x >> 20) as usize % 4];
            if x & (1 << 40) == 0 {
                set(&mut e, a, b, to);
            } else {
                set_planned(&mut e, a, b, to);
            }
            model[a as usize..b as usize].fill(to);
            max_runs = max_runs.max(e.len());
            let flat: Vec<State> = runs(&e, 0, granules)
                .into_iter()
                .flat_map(|(s, t, st)| (s..t).map(move |_| st))
                .collect();
            assert_eq!(flat, model);
            // On a random sub-range the walk gives the model's runs, clipped, and stops at
            // the first failure.
            let (qa, qb) = (x % granules, (x >> 24) % granules + 1);
            let mut walked = Vec::new();
            let _ = e.try_for_each_run(qa, qb, |s, t, st| {
                walked.push((s, t, st));
                if walked.len() == 3 { Err(()) } else { Ok(()) }
            });
            let mut expected: Vec<(u64, u64, State)> = Vec::new();
            for g in qa..qb.max(qa) {
                let st = model[g as usize];
                match expected.last_mut() {
                    Some(last) if last.2 == st => last.1 = g + 1,
                    _ => expected.push((g, g + 1, st)),
                }
            }
            // The view walk gives exactly the runs of the view's state, clipped.
            for view in [View::Shared, View::Private] {
                let wanted = State::of_view(view);
                let mut walked = Vec::new();
                let _ = e.try_for_each_view_run(qa, qb, view, |s, t| {
                    walked.push((s, t));
                    Ok::<(), ()>(())
                });
                let in_view: Vec<(u64, u64)> = expected
                    .iter()
                    .filter(|r| r.2 == wanted)
                    .map(|r| (r.0, r.1))
                    .collect();
                assert_eq!(walked, in_view, "{view} runs of [{qa}, {qb})");
            }
            expected.truncate(3);
            assert_eq!(walked, expected, "runs of [{qa}, {qb})");
        }
        assert!(max_runs > 1, "no runs were created");
        if granules > 1000 && max_len < 100 {
            assert!(
                max_runs > 4 * CHUNK,
                "only {max_runs} runs: chunks never split"
            );
        }
    }
}
