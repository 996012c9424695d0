//! Finding long repeats in data that early abort stores without compressing it (see [`crate::early_abort`]), so
//! that a copy of already-compressed bytes within the window still costs a few bytes instead of its length.
//!
//! zstd's own match finder indexes every position it passes and costs about as much on random bytes as on text;
//! here only the repeats that matter in such data are sought: long ones (a file's packed bytes stored twice), at any
//! distance the window allows and at any shift. With stride `S` ([`STRIDE`]):
//! - the chunk's positions `p` with `p % S == 0` are *indexed*: a hash of the 8 bytes at `p` → `p`;
//! - the positions `q` with `q % S² < S` are *looked up*: `S` consecutive positions every `S²` bytes.
//!
//! A repeat at distance `d` reaches an indexed position from exactly one `q` of every run of `S` consecutive ones
//! (the one with `q ≡ d (mod S)`), so every repeat at least `S² + S + 8` bytes long (4,168 at `S` = 64) is found,
//! most shorter ones too, for one index write and one look-up per `S` bytes on each side. The positions before a
//! run are indexed when the run starts, so a repeat closer than `S` bytes goes unseen (periodic data: zstd's own
//! business, and not what the probe calls incompressible). An entry keeps 32 more bits of its hash, so a look-up
//! reads the earlier bytes only when they very likely agree; a hit is then checked byte for byte and extended
//! forwards and backwards as far as the bytes agree (within the block and after the previous repeat), so what is
//! reported is exact.

/// Distance between indexed positions; look-ups come in runs of this many, every `STRIDE²` bytes.
pub const STRIDE: usize = 64;
/// Shortest repeat reported: shorter ones save less than the bytes they cost to describe.
pub const MIN_REPEAT: usize = 64;
const TABLE_BITS: u32 = 16;
const KEY: usize = 8;
/// An empty slot: a position no chunk reaches (chunks are far below 4 GiB).
const EMPTY: u64 = u64::MAX;

/// One repeat: `literals` bytes without a match, then `length` bytes equal to those `distance` bytes earlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repeat {
    pub literals: usize,
    pub distance: usize,
    pub length: usize,
}

/// The index of one chunk's positions, kept between the blocks of that chunk (and its allocation between chunks).
/// The table is allocated at its first use and cleared only when something was indexed: most chunks of most disks
/// never have a block to search.
#[derive(Debug, Default)]
pub struct LongMatches {
    /// Per slot: the 32 hash bits the slot's index does not use, then the position.
    table: Vec<u64>,
    /// Every indexed position below this one is in the table (a multiple of [`STRIDE`]).
    indexed_to: usize,
    /// Whether the table holds entries of the current chunk.
    dirty: bool,
}

fn read_key(chunk: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; KEY] = chunk.get(at..at.checked_add(KEY)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// The slot of a key and the check bits stored with it.
fn hash(key: u64) -> (usize, u64) {
    let h = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (usize::try_from(h >> (64 - TABLE_BITS)).unwrap_or(0), h & 0xFFFF_FFFF)
}

/// How many bytes from `a` and `b` on agree, at most `limit`, compared eight at a time.
fn agree_forwards(chunk: &[u8], a: usize, b: usize, limit: usize) -> usize {
    let mut n = 0;
    while n + KEY <= limit {
        match (read_key(chunk, a + n), read_key(chunk, b + n)) {
            (Some(x), Some(y)) if x == y => n += KEY,
            (Some(x), Some(y)) => return n + usize::try_from((x ^ y).trailing_zeros() / 8).unwrap_or(0),
            _ => return n,
        }
    }
    while n < limit && chunk.get(a + n).is_some_and(|x| Some(x) == chunk.get(b + n)) {
        n += 1;
    }
    n
}

impl LongMatches {
    /// Starts a new chunk: nothing indexed.
    pub fn reset(&mut self) {
        if self.dirty {
            self.table.fill(EMPTY);
            self.dirty = false;
        }
        self.indexed_to = 0;
    }

    /// Indexes the positions in `[indexed_to, upto)` that are at most `window` before `upto`.
    fn index_until(&mut self, chunk: &[u8], upto: usize, window: usize) {
        let oldest = upto.saturating_sub(window).next_multiple_of(STRIDE);
        let mut p = self.indexed_to.max(oldest);
        while p < upto {
            let Some(key) = read_key(chunk, p) else { break };
            let (slot, check) = hash(key);
            if let (Some(entry), Ok(position)) = (self.table.get_mut(slot), u32::try_from(p)) {
                *entry = check << 32 | u64::from(position);
            }
            p += STRIDE;
        }
        self.indexed_to = self.indexed_to.max(p);
    }

    /// The earlier position whose 8 bytes equal `key` (read at `q`), if the table holds one within `window`.
    fn look_up(&self, chunk: &[u8], q: usize, key: u64, window: usize) -> Option<usize> {
        let (slot, check) = hash(key);
        let entry = *self.table.get(slot)?;
        if entry == EMPTY || entry >> 32 != check {
            return None;
        }
        let earlier = usize::try_from(entry & 0xFFFF_FFFF).ok()?;
        (earlier < q && q - earlier <= window && read_key(chunk, earlier) == Some(key)).then_some(earlier)
    }

    /// The repeats of block `chunk[start..end]` within `window` bytes before them (inside `chunk`), in order, each
    /// given to `emit`; returns the literals after the last one. Blocks must come in order within a chunk; the
    /// positions of blocks skipped since the previous call are indexed first.
    pub fn find(
        &mut self,
        chunk: &[u8],
        start: usize,
        end: usize,
        window: usize,
        emit: &mut dyn FnMut(Repeat),
    ) -> usize {
        let end = end.min(chunk.len());
        if self.table.is_empty() {
            self.table = vec![EMPTY; 1 << TABLE_BITS];
        }
        self.dirty = true;
        let period = STRIDE * STRIDE;
        let mut literal_start = start;
        let mut q = start;
        while q < end {
            if q % period >= STRIDE {
                q = q.next_multiple_of(period);
                continue;
            }
            // A run of look-ups: everything before its first position is indexed first.
            let run_end = (q - q % period + STRIDE).min(end);
            self.index_until(chunk, q, window);
            let mut hit = None;
            while q < run_end {
                let Some(key) = read_key(chunk, q) else { break };
                if let Some(earlier) = self.look_up(chunk, q, key, window) {
                    hit = Some((q, earlier));
                    break;
                }
                q += 1;
            }
            let Some((at, earlier)) = hit else {
                q = run_end.max(q + 1);
                continue;
            };
            let distance = at - earlier;
            let mut from = at;
            while from > literal_start && from - distance > 0 && chunk.get(from - 1) == chunk.get(from - 1 - distance) {
                from -= 1;
            }
            let length = (at - from) + agree_forwards(chunk, at, earlier, end - at);
            if length < MIN_REPEAT {
                q = at + 1;
                continue;
            }
            emit(Repeat { literals: from - literal_start, distance, length });
            literal_start = from + length;
            q = literal_start;
        }
        self.index_until(chunk, end, window);
        end - literal_start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix;

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut out = vec![0u8; n];
        SplitMix(seed).fill(&mut out);
        out
    }

    /// Replays repeats over the block the way a decoder would, from the bytes before it.
    fn replay(chunk: &[u8], start: usize, end: usize, repeats: &[Repeat], last: usize) -> Vec<u8> {
        let mut out = chunk[..start].to_vec();
        let mut at = start;
        for r in repeats {
            out.extend_from_slice(&chunk[at..at + r.literals]);
            at += r.literals;
            for _ in 0..r.length {
                out.push(out[out.len() - r.distance]);
            }
            at += r.length;
        }
        out.extend_from_slice(&chunk[at..at + last]);
        assert_eq!(at + last, end);
        out[start..].to_vec()
    }

    fn find_all(chunk: &[u8], block: usize, window: usize) -> (Vec<Repeat>, usize) {
        let mut finder = LongMatches::default();
        let mut all = Vec::new();
        let mut covered = 0;
        let mut start = 0;
        while start < chunk.len() {
            let end = (start + block).min(chunk.len());
            let mut repeats = Vec::new();
            let last = finder.find(chunk, start, end, window, &mut |r| repeats.push(r));
            assert_eq!(replay(chunk, start, end, &repeats, last), chunk[start..end]);
            covered += repeats.iter().map(|r| r.length).sum::<usize>();
            all.extend(repeats);
            start = end;
        }
        (all, covered)
    }

    #[test]
    fn a_copy_at_any_shift_is_found_whole() {
        for shift in [0usize, 1, 7, 63, 64, 1000, 4095] {
            let noise = random(256 * 1024, 1);
            let mut chunk = random(300 * 1024 + shift, 2);
            let copy = &noise[10_000..10_000 + 40_000];
            chunk[..40_000].copy_from_slice(copy);
            chunk[200_000 + shift..240_000 + shift].copy_from_slice(copy);
            let (repeats, covered) = find_all(&chunk, 128 * 1024, 1 << 21);
            // Found from a look-up within the first STRIDE² bytes and extended back to its first byte.
            assert!(covered >= 40_000 - 8, "shift {shift}: {covered} of 40000 ({repeats:?})");
        }
    }

    #[test]
    fn nothing_is_found_in_fresh_noise_or_beyond_the_window() {
        let chunk = random(512 * 1024, 3);
        assert_eq!(find_all(&chunk, 128 * 1024, 1 << 21).0, vec![]);
        let mut far = random(512 * 1024, 4);
        let (head, tail) = far.split_at_mut(300 * 1024);
        tail[..100 * 1024].copy_from_slice(&head[..100 * 1024]);
        assert_eq!(find_all(&far, 128 * 1024, 256 * 1024).1, 0);
        assert!(find_all(&far, 128 * 1024, 1 << 21).1 >= 100 * 1024 - 8);
    }

    #[test]
    fn repeats_inside_one_block_and_overlapping_runs_replay_exactly() {
        let mut chunk = random(128 * 1024, 5);
        let period = random(5000, 6);
        for (i, b) in chunk[60_000..].iter_mut().enumerate() {
            *b = period[i % period.len()];
        }
        let (_, covered) = find_all(&chunk, 128 * 1024, 1 << 21);
        assert!(covered > 50_000, "{covered}");
    }
}
