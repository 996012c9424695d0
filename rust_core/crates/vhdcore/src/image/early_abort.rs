//! Early abort, as ZFS does it: spotting the parts of a chunk that zstd will not shrink, so that the compressor
//! stores them as they are instead of running zstd's match finder over them.
//!
//! It applies at every positive zstd level (and at 0, zstd's name for its default level 3); zstd's negative
//! "fast" levels skip through such data by themselves. The probe below and the long-repeat search of
//! `long_match` cost a small part of what zstd's parser spends on random bytes; that search keeps what a blind probe
//! would lose, copies of packed data within the window (the measurements are in `bench/README.md`).
//!
//! The decision, which the size estimate mirrors, is made per *piece*:
//! - The pieces of a chunk are its logical bytes (the bytes its zstd frame decompresses to: stored blocks with
//!   their bitmaps, plus the closing footer for the last chunk) cut every [`PIECE_SIZE`] bytes (128 KiB, zstd's
//!   largest block) from the chunk's first byte; the last piece may be shorter.
//! - A piece shorter than [`MIN_PIECE`] is never called incompressible.
//! - Otherwise [`SAMPLE_WINDOWS`] windows are sampled, window `i` starting at `i * (len / SAMPLE_WINDOWS)` and
//!   `min(WINDOW, len / SAMPLE_WINDOWS)` bytes long: 128 bytes every 4 KiB of a full piece (about 3%), so every
//!   4 KiB file-system block of the piece is looked at.
//! - The piece is incompressible when all three hold:
//!   1. every window holds at least [`MIN_DISTINCT`]`* window / WINDOW` distinct byte values (128 random bytes
//!      hold about 101; text, code, tables and padding far fewer): no 4 KiB block of text or code is hidden in
//!      otherwise random data;
//!   2. the order-0 entropy (Shannon, over the byte histogram of all windows together) is at least
//!      [`MIN_ENTROPY_BITS`] bits per byte: no symbol skew that Huffman coding of literals could use;
//!   3. at most [`MAX_REPEATS`] of the 4-byte strings starting in a window (every offset where 4 bytes remain in
//!      that window) equal the last string seen with the same hash (a table of [`HASH_SLOTS`] slots shared by all
//!      windows, hash = `(word * 2654435761) >> (32 - HASH_BITS)` of the little-endian word): no repetition a
//!      match finder could use, including periodic patterns whose symbols look random.
//!
//! What the compressor does with it (see `frame_encoder`): the chunk is still one zstd frame made by zstd at the
//! requested level, content size and checksum included; zstd hands each block it forms (exactly the pieces: the
//! encoder turns zstd's pre-splitter off, so blocks are 128 KiB from the frame's start) to a sequence producer
//! that answers, when every piece the block overlaps is incompressible, with the block's long repeats (see
//! [`crate::long_match`]) and its other bytes as literals, and lets zstd's own match finder run otherwise. zstd then
//! stores such a block raw (3-byte block header + the bytes) unless the repeats, or Huffman coding of its
//! literals, save space, so a piece called incompressible costs at most its length + 3 bytes. What is lost:
//! repeats shorter than the search finds, and matches of later compressible blocks into such a piece (zstd does
//! not index it).

/// Lowest zstd level that uses early abort (besides 0, zstd's default level).
pub const MIN_LEVEL: i32 = 1;
/// Bytes of a piece: zstd's largest block (`ZSTD_BLOCKSIZE_MAX`).
pub const PIECE_SIZE: usize = 128 * 1024;
/// Pieces shorter than this are left to zstd (the chain's tail, a footer).
pub const MIN_PIECE: usize = 16 * 1024;
/// Windows sampled per piece.
pub const SAMPLE_WINDOWS: usize = 32;
/// Longest sampled window.
pub const WINDOW: usize = 128;
/// Fewest distinct byte values in a full window: 4.7 standard deviations under the 100.8 expected of random bytes.
pub const MIN_DISTINCT: usize = 80;
/// Minimum order-0 entropy of the sample, in bits per byte. A 4 KiB sample of uniform random bytes measures about
/// 7.955 (the estimator's bias for 4,096 draws of 256 symbols); deflate output about 7.95; ELF code and text stay
/// well under 7.
pub const MIN_ENTROPY_BITS: f64 = 7.8;
/// Most repeated 4-byte strings tolerated in the sample (random bytes give about none).
pub const MAX_REPEATS: usize = 8;
pub const HASH_BITS: u32 = 12;
pub const HASH_SLOTS: usize = 1 << HASH_BITS;

/// The repeat table of [`is_incompressible`], kept from piece to piece: each entry is tagged with the piece it was
/// written for, so a new piece starts with an empty table without clearing 32 KiB.
pub struct Probe {
    table: Vec<u64>,
    piece: u32,
}

impl Default for Probe {
    fn default() -> Self {
        Probe { table: vec![0; HASH_SLOTS], piece: 0 }
    }
}

impl Probe {
    /// Whether `piece` (one piece of a chunk, see the module's documentation) is stored without compressing it.
    pub fn is_incompressible(&mut self, piece: &[u8]) -> bool {
        let len = piece.len();
        if len < MIN_PIECE {
            return false;
        }
        self.piece = self.piece.wrapping_add(1);
        if self.piece == 0 {
            // Tags wrapped round: forget every entry once, then start again from 1.
            self.table.fill(0);
            self.piece = 1;
        }
        let tag = u64::from(self.piece) << 32;
        let stride = len / SAMPLE_WINDOWS;
        let window = WINDOW.min(stride);
        let mut histogram = [0u32; 256];
        let mut repeats = 0usize;
        let mut sampled = 0usize;
        for start in (0..SAMPLE_WINDOWS).map(|i| i * stride) {
            let Some(bytes) = piece.get(start..start + window) else { continue };
            let mut present = [0u64; 4];
            for b in bytes {
                histogram[usize::from(*b)] += 1;
                present[usize::from(*b >> 6)] |= 1 << (*b & 63);
            }
            let distinct: u32 = present.iter().map(|w| w.count_ones()).sum();
            if usize::try_from(distinct).unwrap_or(0) * WINDOW < MIN_DISTINCT * bytes.len() {
                return false;
            }
            sampled += bytes.len();
            for quad in bytes.windows(4) {
                let word = u32::from_le_bytes([quad[0], quad[1], quad[2], quad[3]]);
                let slot = usize::try_from(word.wrapping_mul(2_654_435_761) >> (32 - HASH_BITS)).unwrap_or(0);
                let entry = tag | u64::from(word);
                if let Some(seen) = self.table.get_mut(slot) {
                    if *seen == entry {
                        repeats += 1;
                        if repeats > MAX_REPEATS {
                            return false;
                        }
                    }
                    *seen = entry;
                }
            }
        }
        entropy_bits(&histogram, sampled) >= MIN_ENTROPY_BITS
    }
}

/// Whether `piece` (one piece of a chunk, see the module's documentation) is stored without compressing it.
#[cfg(test)]
pub fn is_incompressible(piece: &[u8]) -> bool {
    Probe::default().is_incompressible(piece)
}

/// Shannon entropy, in bits per byte, of `total` bytes counted in `histogram`.
fn entropy_bits(histogram: &[u32; 256], total: usize) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let total = f64::from(u32::try_from(total).unwrap_or(u32::MAX));
    histogram
        .iter()
        .filter(|c| **c > 0)
        .map(|c| {
            let p = f64::from(*c) / total;
            -p * p.log2()
        })
        .sum()
}

/// Whether frames at zstd level `level` use early abort.
pub fn applies_at(level: i32) -> bool {
    level >= MIN_LEVEL || level == 0
}

/// The decision for every piece of a chunk's logical bytes compressed at `level`, in order, into `out` (cleared
/// first): all false below [`MIN_LEVEL`].
pub fn incompressible_pieces(logical: &[u8], level: i32, out: &mut Vec<bool>) {
    out.clear();
    if applies_at(level) {
        let mut probe = Probe::default();
        out.extend(logical.chunks(PIECE_SIZE).map(|piece| probe.is_incompressible(piece)));
    } else {
        out.resize(logical.len().div_ceil(PIECE_SIZE), false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix;

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut rng = SplitMix(seed);
        (0..n).map(|_| rng.next_u64().to_le_bytes()[0]).collect()
    }

    #[test]
    fn random_bytes_are_incompressible() {
        assert!(is_incompressible(&random(PIECE_SIZE, 1)));
        assert!(is_incompressible(&random(MIN_PIECE, 2)));
    }

    #[test]
    fn text_zeros_short_pieces_and_periodic_noise_are_not() {
        let text: Vec<u8> =
            b"the image of a server, one chunk at a time\n".iter().copied().cycle().take(PIECE_SIZE).collect();
        assert!(!is_incompressible(&text));
        assert!(!is_incompressible(&vec![0u8; PIECE_SIZE]));
        assert!(!is_incompressible(&random(MIN_PIECE - 1, 3)));
        // Noise repeating every 1000 bytes has random-looking symbols but is all matches.
        let period = random(1000, 4);
        let periodic: Vec<u8> = period.iter().copied().cycle().take(PIECE_SIZE).collect();
        assert!(!is_incompressible(&periodic));
    }

    #[test]
    fn pieces_are_cut_from_the_first_byte() {
        let mut logical = vec![0u8; PIECE_SIZE];
        logical.extend(random(PIECE_SIZE + MIN_PIECE, 5));
        let mut out = vec![true; 9];
        incompressible_pieces(&logical, MIN_LEVEL, &mut out);
        assert_eq!(out, vec![false, true, true]);
        incompressible_pieces(&logical, -1, &mut out);
        assert_eq!(out, vec![false, false, false]);
    }
}
