//! Predicting the size of the compressed image (DESIGN §5) and the time to make it, before making it.
//!
//! The image is a zstd stream, one frame per chunk of virtual disk, whose decompression is a dynamic VHD of the
//! flattened chain with 2 MiB blocks, all-zero and unallocated blocks left out. Its size is estimated as follows.
//!
//! 1. **Exact accounting from the metadata.** Bytes that no layer allocates cost nothing. The allocated bytes,
//!    laid end to end in disk order (the *allocated stream*), are what the image stores, in that order.
//! 2. **Two-phase stratified sampling.** The stream is cut into `looks` equal strata (doubled, up to four times,
//!    while fewer than half the looks find data: zeros cost a look and nothing more); in each, a byte is drawn
//!    uniformly and the `sample_size` bytes from it are a *unit* (the last stratum's wraps round), whose first
//!    4 KiB (a file-system block: one kind of data) are read and *class* it: all zero, or a cell of order-0
//!    entropy × share of repeated 4-byte strings. Costs vary far less within a
//!    class than across classes (zeros 0, text about a quarter, machine code about 0.4, packed data about 1), so
//!    the many cheap looks weigh the classes and `samples` compressed units (spread over the classes with data in
//!    proportion, at least a few each, picked systematically so every unit of a class has the same chance) price
//!    them: a unit is compressed at the level with the `prefix_size` bytes of its frame before it as its window (a
//!    zstd reference prefix laid out right before it in memory, as in the image; random-looking units go without,
//!    no window helps them). `D` = Σ over classes of the class's stream bytes × its mean cost per byte.
//!    Zero units are priced at 0 without compressing anything: either their 2 MiB block is all zero and dropped
//!    from the image, or zeros in a kept block cost a few bytes per 128 KiB (counted).
//! 3. **Context correction.** The image's frames give every byte up to the level's whole window of context and let
//!    zstd's block splitter see the whole chunk, where a unit sees `prefix_size`. `spans` targets of `span_size`
//!    bytes, centred on units with data picked systematically (every byte with data about equally likely; zeros,
//!    which cost nothing, are not measured), are compressed as the image does: context (up to
//!    `context_size` bytes of the target's frame before it, all-zero 2 MiB blocks left out as the image leaves
//!    them out) and target compressed whole by the compressor's own frame encoder (so its early-abort decisions are
//!    made on them too), less the context alone. The ratio of the targets' summed in-frame costs to their summed
//!    costs as phase 2 prices them (each unit-sized piece at its class's mean) scales `D`.
//!
//!    Why so: the ratio varies from place to place where content repeats within the window (duplicated files), and
//!    long targets, measured exactly, average that out far better than the old per-sample spans; pricing the
//!    targets by class instead of compressing them again in pieces halves a span's cost. Compressing a target after
//!    its context as a prefix, or streamed with a flush before it, prices it differently from the image
//!    (+0.3-2.8%), hence whole-less-context.
//! 4. **Fixed costs, exact from the metadata.** As the compressor lays the image out: the room kept for the head
//!    frame at the start (`compress_bound(head) + 64` bytes, closed by a skippable frame, whatever the head
//!    compresses to); per chunk a frame header with content size and a 4-byte checksum (an empty frame for a chunk
//!    with nothing allocated); the closing footer inside the last chunk's frame; each kept block's 512-byte
//!    all-present bitmap (a few bytes once compressed).
//!
//! The range is the point estimate ± 3 standard errors of `D` (class mix: collapsed strata, finite-population
//! corrected; class prices: each class's spread) combined with 3 standard errors of the correction, plus a 1%
//! allowance for what the model leaves out (context beyond `context_size` at a target's start; where early abort's
//! 128 KiB pieces fall in the real chunk). The time is predicted from the per-thread speeds measured on the spans,
//! which do what the compressor does to each byte: a long sequential read of the allocated bytes, the frame
//! encoder on the data, sha256 of the data (timed on 256 KiB of each span); over rayon's threads. (Units, read
//! 4 KiB at a time and compressed alone by plain zstd, overstated reads and missed early abort and hashing: their
//! speeds serve only when no span found data.)
//!
//! Where the error comes from (measured over seeds on the bench's mixes): almost all of it is the correction's.
//! The ratio of a 4 MiB target's in-frame cost to its phase-2 price varies by 5-10% from target to target, with a
//! heavy low tail (content repeated within the window, which a unit's 32 KiB window cannot see), while `D` varies
//! by 0.3-0.5% from seed to seed: 512 compressed units price the classes as well as 1,024 did, and the budget goes
//! to the spans. The repeats in the class cells cut the targets' prediction error, and the spread on text and
//! machine code by a fifth to a half (not on sparse or zero-heavy disks, whose tails come from the window); what is
//! left is the spans' sampling error, which only more span bytes reduce (with their square root).
//!
//! Cost, whatever the disk size (a fixed budget): `looks × 4 KiB` read and classed (32 MiB by default, up to
//! seven times that on disks of mostly zeros), `samples × (sample_size + prefix_size)` read and about
//! `samples × sample_size` compressed and twice as much indexed, and `spans × (span_size + context_size)` read and
//! `spans × (span_size + 2 × context_size)` compressed (80 and 96 MiB); all in parallel; plus
//! the metadata (`Chain::occupancy`, the chunk plan).
//! The model's assumptions about the compressor: each chunk's frame is compressed in one call with the whole
//! chunk in memory (`frame_encoder`, zstd's `compress2`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Instant;

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use zerocopy::IntoBytes;
use zstd::zstd_safe::{compress_bound, get_error_name, CCtx, CParameter};

use crate::chain::Chain;
use crate::error::{Result, VhdError};
use crate::format::layout::{new_footer_at, sparse_layout};
use crate::format::{bitmap_size, DiskType, DEFAULT_BLOCK_SIZE, FOOTER_SIZE};
use crate::fs::DiskUsage;
use crate::image::compress::{encoder_for, head_length};
use crate::image::frame_encoder::FrameEncoder;
use crate::io::is_zero;
use crate::rng::SplitMix;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Compressed cost of one 512-byte all-present bitmap between two 2 MiB blocks of a frame: one literal and one
/// repeat match, plus its share of the block's tables. The range allows 0 to 512.
const BITMAP_COST: u64 = 8;
/// Zeros inside a kept block (unallocated or written): about one RLE block (4 bytes) or a long match per 128 KiB
/// zstd block; counted at 8 bytes per 128 KiB.
const ZERO_COST_PER_128K: u64 = 8;
/// The closing footer holds the image's own UUID and timestamp, unknown yet: its compressed size varies by a few
/// bytes with them; the range allows this much either way.
const FOOTER_SLACK: u64 = 8;
/// Share of the estimate allowed for what the model leaves out (see the module doc).
const MODEL_ALLOWANCE: f64 = 0.01;
/// Standard errors on each side of the point estimate.
const Z: f64 = 3.0;
/// Samples read and compressed by one task: one zstd context per batch.
const BATCH: usize = 16;
/// Bytes of each span hashed to time sha256 on this machine.
const HASH_SAMPLE: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EstimateOptions {
    /// zstd level of the image (default 3).
    pub level: i32,
    /// Bytes per unit: what a class look reads and a sample compresses (default 16 KiB).
    pub sample_size: usize,
    /// Strata, one unit each, looked at and classed (default 8192).
    pub looks: usize,
    /// Units compressed, spread over the classes with data (default 512; at least a few per class).
    pub samples: usize,
    /// Bytes of each context-correction target (default 4 MiB).
    pub span_size: usize,
    /// Context-correction targets (default 16).
    pub spans: usize,
    /// Bytes of allocated stream compressed in front of each target, as the image's frame would have them
    /// (default 1 MiB).
    pub context_size: usize,
    /// Bytes of allocated stream before each sample given to zstd as its window (default 32 KiB; 0 compresses
    /// samples alone).
    pub prefix_size: usize,
    /// Seed of the sample positions; the same seed on the same disk gives the same estimate.
    pub seed: u64,
    /// Virtual bytes per image chunk, one zstd frame each (default 64 MiB).
    pub chunk_size: u64,
}

impl Default for EstimateOptions {
    fn default() -> Self {
        EstimateOptions {
            level: 3,
            sample_size: 16 * KIB,
            looks: 8192,
            samples: 512,
            span_size: 4 * MIB,
            spans: 16,
            context_size: MIB,
            prefix_size: 32 * KIB,
            seed: 0x5EED_1DEA,
            chunk_size: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub virtual_size: u64,
    /// Bytes some layer allocates (from the BATs): what making the image reads.
    pub allocated_bytes: u64,
    /// Bytes no layer allocates: they cost nothing.
    pub unallocated_bytes: u64,
    /// Bytes read for the estimate (class looks, compressed units with their prefixes, span targets with their
    /// context).
    pub sampled_bytes: u64,
    /// Units compressed (phase 2) and context-correction spans measured.
    pub samples: usize,
    pub spans: usize,
    /// Share of the allocated bytes in all-zero units.
    pub zero_fraction: f64,
    /// Allocated bytes outside all-zero units (to the unit size's granularity).
    pub estimated_nonzero_bytes: u64,
    /// 2 MiB blocks that meet an allocated range, and the estimated number of them that are not all zero (the
    /// image's blocks): blocks a sample found data in, plus the unsampled ones in the proportion seen.
    pub candidate_blocks: u64,
    pub image_blocks: u64,
    /// Estimated size of the image once decompressed (the dynamic VHD).
    pub image_bytes: u64,
    /// Point estimate of the compressed image's size, and a range meant to contain the true size.
    pub compressed_bytes: u64,
    pub low: u64,
    pub high: u64,
    /// In-frame cost over sampled cost of the span targets (1.0 when no span had data).
    pub context_correction: f64,
    /// Relative standard errors of the stratified sum and of the correction.
    pub sampling_error: f64,
    pub correction_error: f64,
    pub seconds_spent: f64,
    /// Predicted wall time of the full compression on this machine with `threads` threads.
    pub predicted_seconds: f64,
    pub threads: usize,
}

// ----------------------------------------------------------------------------------------------------------------
// Numbers: the statistics are in f64, the sizes in u64; conversions are explicit and never cast.

/// `v` as f64 (exact below 2^53, which every size here is: the largest VHD is 2040 GiB).
fn f64_of(v: u64) -> f64 {
    let hi = u32::try_from(v >> 32).unwrap_or(u32::MAX);
    let lo = u32::try_from(v & 0xFFFF_FFFF).unwrap_or(u32::MAX);
    f64::from(hi) * 4_294_967_296.0 + f64::from(lo)
}

fn f64_of_usize(v: usize) -> f64 {
    f64_of(u64_of_usize(v))
}

/// `x` rounded to the nearest u64, negatives and NaN to 0, saturating at u64::MAX (read from its bits).
fn u64_of(x: f64) -> u64 {
    if x.is_nan() || x < 0.5 {
        return 0;
    }
    let bits = x.round().to_bits();
    let exponent = (bits >> 52) & 0x7FF;
    let mantissa = (bits & ((1 << 52) - 1)) | (1 << 52);
    // value = mantissa * 2^(exponent - 1075); a rounded value >= 1 is normal, so exponent >= 1023.
    match exponent.checked_sub(1075) {
        None => mantissa >> (1075 - exponent).min(63),
        Some(up) if up < 12 => mantissa << up,
        Some(_) => u64::MAX,
    }
}

fn u64_of_usize(v: usize) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

fn usize_of(v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| overflow("a buffer size"))
}

fn overflow(what: &str) -> VhdError {
    VhdError::invalid_argument(None, format!("estimate: {what} overflows"))
}

/// Order-0 entropy in bits per byte of every `step`-th byte of `data`.
fn entropy(data: &[u8], step: usize) -> f64 {
    // Four tables, so consecutive equal bytes do not wait on each other's increments.
    let mut counts = [[0u32; 256]; 4];
    let mut n = 0u32;
    for (k, b) in data.iter().step_by(step.max(1)).enumerate() {
        let table = &mut counts[k & 3];
        table[usize::from(*b)] = table[usize::from(*b)].wrapping_add(1);
        n = n.wrapping_add(1);
    }
    // H = log2(n) - Σ c·log2(c) / n, with c·log2(c) from a table for the counts a class look can reach.
    let table = c_log2_c_table();
    let sum: f64 = (0..256)
        .map(|i| counts.iter().map(|t| t[i]).fold(0u32, u32::wrapping_add))
        .filter(|c| *c > 1)
        .map(|c| match table.get(usize::try_from(c).unwrap_or(usize::MAX)) {
            Some(v) => *v,
            None => f64::from(c) * f64::from(c).log2(),
        })
        .sum();
    let n = f64::from(n.max(1));
    (n.log2() - sum / n).max(0.0)
}

/// `c·log2(c)` for `c` up to a class look's length: the 8,192 looks of an estimate would otherwise take two
/// million logarithms.
fn c_log2_c_table() -> &'static [f64] {
    static TABLE: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u32::try_from(CLASS_LOOK).unwrap_or(4096))
            .map(|c| if c < 2 { 0.0 } else { f64::from(c) * f64::from(c).log2() })
            .collect()
    })
}

/// Order-0 entropy of at least 7.98 bits per byte: what zstd stores nearly raw whatever the window (already
/// compressed or encrypted data). Such bytes are compressed without a prefix: a window cannot help them, and
/// indexing it would cost more than compressing them.
fn looks_random(data: &[u8]) -> bool {
    data.len() >= 4096 && entropy(data, 1) >= 7.98
}

/// Classes of sample-sized units, from a quick look at their first bytes: all zero, or a cell of order-0 entropy ×
/// share of repeated 4-byte strings. Costs vary far less within a class than across classes (zeros cost nothing,
/// text about a quarter, machine code about 0.4, packed data about 1), so many cheap looks that weigh the classes
/// and fewer compressions that price each class beat compressions alone at the same cost (two-phase sampling).
/// Entropy alone misses how repetitive the bytes are (two texts of the same entropy can differ twofold in cost);
/// the repeats, what zstd's match finder feeds on, split each entropy bin in three (on the bench's text and ELF
/// mixes the targets' prediction error drops by a fifth to a quarter; finer cells gained no more).
const ENTROPY_EDGES: [f64; 5] = [3.0, 5.0, 6.0, 7.0, 7.6];
const REPEAT_BINS: usize = 3;
const CLASSES: usize = 1 + (ENTROPY_EDGES.len() + 1) * REPEAT_BINS;
/// Bytes at a unit's start whose entropy classes it: a file-system block, which holds one kind of data; reading
/// only those keeps the looks cheap.
const CLASS_LOOK: usize = 4096;
/// Compressed units per class at least (where the class has that many), so that each class's spread is known.
const MIN_PER_CLASS: usize = 3;

/// Slots of the repeat finder's table (a power of two): half the even positions of a class look.
const REPEAT_SLOTS: usize = 1024;

/// Share of the even positions of `data` (at most [`CLASS_LOOK`] bytes) whose 4 bytes equal the last 4 bytes seen
/// at an earlier even position with the same hash: what a one-entry-per-hash match finder would find. The table
/// holds the words themselves, so a hit needs no second read. Even positions only: half the work, and a string
/// repeated at an even distance (half of them) is still seen.
fn repeat_share(data: &[u8]) -> f64 {
    let data = data.get(..CLASS_LOOK).unwrap_or(data);
    let mut latest = [0u32; REPEAT_SLOTS];
    let mut repeats = 0u32;
    let mut positions = 0u32;
    for w in data.windows(4).step_by(2) {
        let word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        // Fibonacci hashing to the table's 10 bits.
        let slot = usize::try_from(word.wrapping_mul(0x9E37_79B1) >> 22).unwrap_or(0);
        repeats += u32::from(latest[slot] == word);
        latest[slot] = word;
        positions += 1;
    }
    f64::from(repeats) / f64::from(positions.max(1))
}

/// The class of a unit from its bytes (at least its first [`CLASS_LOOK`]; a unit that is all zero there but not
/// further is classed by its first bytes, like any other).
fn class_of(data: &[u8]) -> usize {
    let look = data.get(..CLASS_LOOK).unwrap_or(data);
    if is_zero(look) {
        return 0;
    }
    let h = entropy(look, 1);
    let entropy_bin = ENTROPY_EDGES.iter().filter(|edge| h >= **edge).count();
    // Random-looking bytes have no repeats to count: spare the look.
    if entropy_bin == ENTROPY_EDGES.len() {
        return 1 + entropy_bin * REPEAT_BINS;
    }
    let repeat_bin = usize::try_from(u64_of((repeat_share(look) * f64_of_usize(REPEAT_BINS)).floor()))
        .unwrap_or(0)
        .min(REPEAT_BINS - 1);
    1 + entropy_bin * REPEAT_BINS + repeat_bin
}

// ----------------------------------------------------------------------------------------------------------------
// The allocated stream: the occupied ranges of the flattened disk laid end to end.

struct Stream<'a> {
    chain: &'a Chain,
    ranges: Vec<(u64, u64)>,
    /// Stream position of each range's first byte.
    starts: Vec<u64>,
    total: u64,
}

impl<'a> Stream<'a> {
    /// The occupied ranges less `free` (sorted, merged `(start, length)`: what a live-data image stores as zeros).
    fn new(chain: &'a Chain, free: &[(u64, u64)]) -> Result<Self> {
        let mut ranges = chain.occupancy().ranges;
        if !free.is_empty() {
            let occupied: Vec<(u64, u64)> = ranges.iter().map(|(s, e)| (*s, e.saturating_sub(*s))).collect();
            ranges = crate::fs::subtract(occupied, free).into_iter().map(|(s, l)| (s, s.saturating_add(l))).collect();
        }
        let mut starts = Vec::with_capacity(ranges.len());
        let mut total = 0u64;
        for (s, e) in &ranges {
            starts.push(total);
            let len = e.checked_sub(*s).ok_or_else(|| overflow("an occupied range"))?;
            total = total.checked_add(len).ok_or_else(|| overflow("the allocated bytes"))?;
        }
        Ok(Stream { chain, ranges, starts, total })
    }

    /// Index of the range holding stream position `pos`.
    fn range_of(&self, pos: u64) -> usize {
        self.starts.partition_point(|s| *s <= pos).saturating_sub(1)
    }

    /// Disk offset of stream position `pos`.
    fn disk_offset(&self, pos: u64) -> u64 {
        let i = self.range_of(pos);
        match (self.ranges.get(i), self.starts.get(i)) {
            (Some((s, _)), Some(start)) => s.saturating_add(pos.saturating_sub(*start)),
            _ => 0,
        }
    }

    /// Reads `buf.len()` bytes of the stream from `pos`, through the chain.
    fn read(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let mut i = self.range_of(pos);
        let mut at = pos;
        let mut done = 0usize;
        while done < buf.len() {
            let (Some((s, e)), Some(start)) = (self.ranges.get(i), self.starts.get(i)) else {
                return Err(VhdError::invalid_argument(None, "estimate: read past the allocated bytes"));
            };
            let offset = s.checked_add(at.saturating_sub(*start)).ok_or_else(|| overflow("a read offset"))?;
            let left = e.saturating_sub(offset);
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len() - done);
            if n > 0 {
                self.chain.read_at(offset, &mut buf[done..done + n])?;
                done += n;
                at = at.checked_add(u64_of_usize(n)).ok_or_else(|| overflow("a read offset"))?;
            }
            i += 1;
        }
        Ok(())
    }

    /// Stream position of the first allocated byte of the `chunk` (image frame) holding stream position `pos`:
    /// the frame's context starts there.
    fn frame_start(&self, pos: u64, chunk: u64) -> u64 {
        let begin = self.disk_offset(pos) / chunk.max(1) * chunk.max(1);
        self.stream_pos_at(begin).min(pos)
    }

    /// Stream position of the first allocated byte at or after disk offset `offset`.
    fn stream_pos_at(&self, offset: u64) -> u64 {
        let i = self.ranges.partition_point(|(_, e)| *e <= offset);
        match (self.ranges.get(i), self.starts.get(i)) {
            (Some((s, _)), Some(start)) => start.saturating_add(offset.saturating_sub(*s)),
            _ => self.total,
        }
    }

    /// Stream bytes `[from, to)` cut where an allocated range ends or a disk block of `block` bytes does:
    /// (stream position, length, disk block), in order.
    fn block_pieces(&self, from: u64, to: u64, block: u64) -> Vec<(u64, u64, u64)> {
        let block = block.max(1);
        let mut out = Vec::new();
        let mut pos = from;
        let mut i = self.range_of(pos);
        while pos < to {
            let (Some((s, e)), Some(start)) = (self.ranges.get(i), self.starts.get(i)) else { break };
            let offset = s.saturating_add(pos.saturating_sub(*start));
            let range_end = start.saturating_add(e.saturating_sub(*s));
            let block_end = pos.saturating_add(block - offset % block);
            let piece_end = range_end.min(block_end).min(to);
            if piece_end <= pos {
                i += 1;
                continue;
            }
            out.push((pos, piece_end - pos, offset / block));
            pos = piece_end;
            if pos >= range_end {
                i += 1;
            }
        }
        out
    }

    /// Like `read`, continuing at the stream's start when it runs past its end.
    fn read_circular(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let first = usize::try_from(self.total.saturating_sub(pos)).unwrap_or(usize::MAX).min(buf.len());
        let (head, rest) = buf.split_at_mut(first);
        self.read(pos, head)?;
        if !rest.is_empty() {
            self.read(0, rest)?;
        }
        Ok(())
    }
}

// ----------------------------------------------------------------------------------------------------------------
// zstd: one context per task, frames compressed into a reused buffer.

struct Zstd<'a> {
    cctx: CCtx<'a>,
    dst: Vec<u8>,
    /// Bytes of frame header and end a lone frame pays that the image's chunk frame pays once.
    overhead: u64,
}

fn zstd_code(code: usize) -> std::io::Error {
    std::io::Error::other(format!("zstd: {}", get_error_name(code)))
}

impl<'a> Zstd<'a> {
    fn new(level: i32) -> std::io::Result<Zstd<'a>> {
        let mut cctx = CCtx::try_create().ok_or_else(|| std::io::Error::other("zstd: cannot create a context"))?;
        cctx.set_parameter(CParameter::CompressionLevel(level)).map_err(zstd_code)?;
        cctx.set_parameter(CParameter::ContentSizeFlag(false)).map_err(zstd_code)?;
        cctx.set_parameter(CParameter::ChecksumFlag(false)).map_err(zstd_code)?;
        let mut z = Zstd { cctx, dst: Vec::new(), overhead: 0 };
        // An empty frame is its header plus a 3-byte empty last block.
        let (empty, _) = z.frame(&[], &[])?;
        z.overhead = empty.saturating_sub(3);
        Ok(z)
    }

    /// Compressed bytes of `data` as one frame whose window starts with `prefix` (a zstd reference prefix:
    /// indexed, not compressed), and the seconds it took.
    fn frame(&mut self, prefix: &'a [u8], data: &[u8]) -> std::io::Result<(u64, f64)> {
        self.dst.clear();
        self.dst.reserve(compress_bound(data.len()));
        let started = Instant::now();
        if !prefix.is_empty() && !is_zero(prefix) {
            self.cctx.ref_prefix(prefix).map_err(zstd_code)?;
        }
        let n = self.cctx.compress2(&mut self.dst, data).map_err(zstd_code)?;
        Ok((u64_of_usize(n), started.elapsed().as_secs_f64()))
    }

    /// Cost of `data` after `prefix`, less the lone frame's overhead; 0 when it is all zeros.
    fn cost(&mut self, prefix: &'a [u8], data: &[u8], t: &mut Timing) -> std::io::Result<u64> {
        if is_zero(data) {
            return Ok(0);
        }
        let (n, secs) = self.frame(prefix, data)?;
        t.compress_bytes = t.compress_bytes.saturating_add(u64_of_usize(data.len()));
        t.compress_secs += secs;
        Ok(n.saturating_sub(self.overhead))
    }
}

fn zstd_error(chain: &Chain, e: std::io::Error) -> VhdError {
    VhdError::io(&chain.leaf().path, "compress a sample (zstd)", e)
}

#[derive(Default, Clone, Copy)]
struct Timing {
    read_bytes: u64,
    read_secs: f64,
    compress_bytes: u64,
    compress_secs: f64,
}

// ----------------------------------------------------------------------------------------------------------------
// Phase 1: stratified samples.

#[derive(Clone, Copy)]
struct Sample {
    /// Width of the unit's stratum (its weight).
    weight: u64,
    /// Stream position and length of the unit.
    pos: u64,
    len: u64,
}

/// What a class look found in a unit.
struct Look {
    class: usize,
    /// The 2 MiB image block holding the whole unit, when it fits in one.
    block: Option<u64>,
    read_secs: f64,
}

struct SampleResult {
    /// Compressed bytes less the frame overhead; 0 for an all-zero sample.
    cost: u64,
    timing: Timing,
    /// Part of the compression time that is the sample's own frame set-up and prefix indexing (measured once per
    /// batch on a one-byte frame), which the image's frames do not pay per sample.
    setup_secs: f64,
}

/// `total * i / n` without overflow.
fn stratum_edge(total: u64, i: u64, n: u64) -> Result<u64> {
    let edge =
        u128::from(total).checked_mul(u128::from(i)).ok_or_else(|| overflow("a stratum edge"))? / u128::from(n.max(1));
    u64::try_from(edge).map_err(|_| overflow("a stratum edge"))
}

/// One unit per stratum: a byte drawn uniformly in the stratum and the `len` bytes from it, running into the next
/// stratum (the last one wraps round to the stream's start). Every byte of the stream is then in a unit with the
/// same probability, edges of strata included, so the sum is unbiased whatever the layout.
fn plan_units(total: u64, len: u64, strata: usize, rng: &mut SplitMix) -> Result<Vec<Sample>> {
    if total == 0 {
        return Ok(Vec::new());
    }
    let len = len.min(total);
    let n = u64_of_usize(strata).min((total / len).max(1));
    let mut out = Vec::with_capacity(usize_of(n)?);
    for i in 0..n {
        let a = stratum_edge(total, i, n)?;
        let b = stratum_edge(total, i + 1, n)?;
        out.push(Sample { weight: b - a, pos: a + rng.below(b - a), len });
    }
    Ok(out)
}

/// The 2 MiB image block holding the whole of `len` stream bytes from `pos`, when they fit in one.
fn block_of(stream: &Stream, pos: u64, len: u64, block_size: u64) -> Option<u64> {
    let last = pos.saturating_add(len).saturating_sub(1);
    let (first_off, last_off) = (stream.disk_offset(pos), stream.disk_offset(last));
    let one_range = last < stream.total && stream.range_of(pos) == stream.range_of(last);
    (one_range && first_off / block_size == last_off / block_size).then_some(first_off / block_size)
}

/// Phase 1a: reads every unit and classes it, in parallel batches.
fn look_at_units(stream: &Stream, units: &[Sample]) -> Result<Vec<Look>> {
    let block_size = u64::from(DEFAULT_BLOCK_SIZE);
    let batches: Vec<Vec<Look>> = units
        .par_chunks(BATCH * 4)
        .map(|batch| {
            let mut buf = Vec::new();
            batch
                .iter()
                .map(|u| {
                    buf.resize(usize_of(u.len)?.min(CLASS_LOOK), 0);
                    let started = Instant::now();
                    stream.read_circular(u.pos, &mut buf)?;
                    let read_secs = started.elapsed().as_secs_f64();
                    Ok(Look { class: class_of(&buf), block: block_of(stream, u.pos, u.len, block_size), read_secs })
                })
                .collect::<Result<Vec<Look>>>()
        })
        .collect::<Result<_>>()?;
    Ok(batches.into_iter().flatten().collect())
}

/// Phase 1b: which units to compress. In each class with data, `samples` spread in proportion to the class's
/// units (at least [`MIN_PER_CLASS`]), picked systematically from a random start along the stream, so every unit
/// of a class has the same chance and the class's mean cost is estimated without bias.
fn pick_for_compression(looks: &[Look], samples: usize, rng: &mut SplitMix) -> Vec<usize> {
    let with_data = looks.iter().filter(|l| l.class != 0).count();
    let mut picks = Vec::new();
    for class in 1..CLASSES {
        let members: Vec<usize> = (0..looks.len()).filter(|i| looks[*i].class == class).collect();
        if members.is_empty() {
            continue;
        }
        let share = f64_of_usize(samples) * f64_of_usize(members.len()) / f64_of_usize(with_data.max(1));
        let wanted = usize::try_from(u64_of(share.ceil())).unwrap_or(usize::MAX).max(MIN_PER_CLASS).min(members.len());
        let step = f64_of_usize(members.len()) / f64_of_usize(wanted);
        let start = step * f64_of(rng.below(1 << 30)) / f64_of(1 << 30);
        for k in 0..wanted {
            let at = usize::try_from(u64_of((start + step * f64_of_usize(k)).floor())).unwrap_or(0);
            if let Some(i) = members.get(at.min(members.len() - 1)) {
                picks.push(*i);
            }
        }
    }
    picks.sort_unstable();
    picks.dedup();
    picks
}

/// Reads and compresses a batch of units with one zstd context.
fn run_samples(stream: &Stream, batch: &[Sample], opts: &EstimateOptions) -> Result<Vec<SampleResult>> {
    let prefix_size = u64_of_usize(opts.prefix_size);
    // Each sample gets room for its prefix and its bytes, contiguous in one buffer (zstd then sees the prefix as
    // the window right before the data, as in the image, not as a separate dictionary segment); the bytes are read
    // first and the prefix only when they need one (not all zero, not random-looking). The zstd context borrows the
    // whole buffer.
    let mut layout = Vec::with_capacity(batch.len());
    let mut total = 0usize;
    for s in batch {
        // A window that wraps round must not see its own wrapped bytes in its prefix, nor look past its frame.
        let wrapped = s.pos.saturating_add(s.len).saturating_sub(stream.total);
        let frame = stream.frame_start(s.pos, opts.chunk_size).max(wrapped);
        let room = usize_of(s.pos.saturating_sub(frame).min(prefix_size))?;
        let len = usize_of(s.len)?;
        layout.push((total, room, len));
        total = total.checked_add(room).and_then(|t| t.checked_add(len)).ok_or_else(|| overflow("a batch"))?;
    }
    let mut buf = vec![0u8; total];
    let mut timings = vec![Timing::default(); batch.len()];
    let mut prefixes = Vec::with_capacity(batch.len());
    for ((s, (at, room, len)), t) in batch.iter().zip(&layout).zip(&mut timings) {
        let data_at = at + room;
        let started = Instant::now();
        stream.read_circular(s.pos, &mut buf[data_at..data_at + len])?;
        t.read_bytes = s.len;
        let data = &buf[data_at..data_at + len];
        let pre = if is_zero(data) || looks_random(data) { 0 } else { *room };
        if pre > 0 {
            stream.read(s.pos - u64_of_usize(pre), &mut buf[data_at - pre..data_at])?;
            t.read_bytes = t.read_bytes.saturating_add(u64_of_usize(pre));
        }
        t.read_secs = started.elapsed().as_secs_f64();
        prefixes.push(pre);
    }
    let buf = buf;
    let mut z = Zstd::new(opts.level).map_err(|e| zstd_error(stream.chain, e))?;
    // Set-up time of a frame, without and with a prefix (the first one of the batch).
    let (_, bare) = z.frame(&[], &[1]).map_err(|e| zstd_error(stream.chain, e))?;
    let mut with_prefix = bare;
    if let Some(((at, room, _), pre)) = layout.iter().zip(&prefixes).find(|(_, pre)| **pre > 0) {
        let data_at = at + room;
        with_prefix = z.frame(&buf[data_at - pre..data_at], &[1]).map_err(|e| zstd_error(stream.chain, e))?.1;
    }
    let mut out = Vec::with_capacity(batch.len());
    for ((at, room, len), (pre, mut timing)) in layout.iter().zip(prefixes.iter().zip(timings)) {
        let data_at = at + room;
        let data = &buf[data_at..data_at + len];
        let zero = is_zero(data);
        let cost = z.cost(&buf[data_at - pre..data_at], data, &mut timing).map_err(|e| zstd_error(stream.chain, e))?;
        let setup_secs = match (zero, *pre > 0) {
            (true, _) => 0.0,
            (false, true) => with_prefix,
            (false, false) => bare,
        };
        out.push(SampleResult { cost, timing, setup_secs });
    }
    Ok(out)
}

fn measure_samples(stream: &Stream, samples: &[Sample], opts: &EstimateOptions) -> Result<Vec<SampleResult>> {
    let batches: Vec<Vec<SampleResult>> =
        samples.par_chunks(BATCH).map(|batch| run_samples(stream, batch, opts)).collect::<Result<_>>()?;
    Ok(batches.into_iter().flatten().collect())
}

// ----------------------------------------------------------------------------------------------------------------
// Phase 2: context correction from spans compressed as the image compresses them.

struct SpanResult {
    /// Cost of the target in its frame, after its context.
    in_frame: u64,
    /// Cost of the target as phase 1 prices it: each unit-sized piece at its class's mean cost per byte.
    predicted: f64,
    read_bytes: u64,
    /// Seconds the span's one sequential read took (the compressor reads in such long runs).
    read_secs: f64,
    /// Bytes the compressor's frame encoder took in for this span, and the seconds it took.
    encoded_bytes: u64,
    encode_secs: f64,
    /// Bytes of the span's data hashed with sha256 (as the compressor hashes every stored block), and the seconds.
    hashed_bytes: u64,
    hash_secs: f64,
}

/// Stream positions of `n` span targets of `len` bytes: systematic over the units that hold data (a random start,
/// then every `1/n` of their summed widths), each target centred on its unit and kept inside the stream. Every
/// byte with data is about equally likely to be measured, and zeros (which cost nothing) are not measured.
fn plan_spans(units: &[Sample], looks: &[Look], total: u64, len: u64, n: usize, rng: &mut SplitMix) -> Vec<u64> {
    let weights: Vec<f64> =
        units.iter().zip(looks).map(|(u, l)| if l.class == 0 { 0.0 } else { f64_of(u.weight) }).collect();
    let sum: f64 = weights.iter().sum();
    if n == 0 || sum <= 0.0 {
        return Vec::new();
    }
    let step = sum / f64_of_usize(n);
    let mut point = step * f64_of(rng.below(1 << 30)) / f64_of(1 << 30);
    let (mut cumulated, mut starts) = (0.0, Vec::with_capacity(n));
    for (u, w) in units.iter().zip(&weights) {
        cumulated += w;
        while point < cumulated && starts.len() < n {
            starts.push(u.pos.saturating_sub(len / 2).min(total.saturating_sub(len)));
            point += step;
        }
    }
    starts
}

fn run_span(stream: &Stream, start: u64, opts: &EstimateOptions, class_rate: &[f64]) -> Result<SpanResult> {
    let chunk = opts.chunk_size.max(1);
    let block_size = u64::from(DEFAULT_BLOCK_SIZE);
    let end = start.saturating_add(u64_of_usize(opts.span_size)).min(stream.total);
    // The read reaches back for the context, never past the start of the target's frame.
    let context_start = start.saturating_sub(u64_of_usize(opts.context_size)).max(stream.frame_start(start, chunk));
    let mut buf = vec![0u8; usize_of(end.saturating_sub(context_start))?];
    let started = Instant::now();
    stream.read(context_start, &mut buf)?;
    let read_secs = started.elapsed().as_secs_f64();
    // The bytes as the image's frames hold them: all-zero 2 MiB blocks are left out of the image, so they are left
    // out of the window here too (the image's bitmaps, a few bytes each, are not put in). Each piece lies in one
    // block: (stream position, length, disk block).
    let mut pieces = stream.block_pieces(context_start, start, block_size);
    let first_target_piece = pieces.len();
    pieces.extend(stream.block_pieces(start, end, block_size));
    let piece_bytes = |pos: u64, len: u64| -> Result<&[u8]> {
        let at = usize_of(pos.saturating_sub(context_start))?;
        buf.get(at..at.saturating_add(usize_of(len)?)).ok_or_else(|| overflow("a span piece"))
    };
    let mut with_data: Vec<u64> = Vec::new();
    for (pos, len, block) in &pieces {
        if !is_zero(piece_bytes(*pos, *len)?) && with_data.last() != Some(block) {
            with_data.push(*block);
        }
    }
    // Kept bytes, and where each frame's part of them starts: (index in `image`, chunk, is target).
    let mut image = Vec::with_capacity(buf.len());
    let mut marks: Vec<(usize, u64, bool)> = Vec::new();
    for (k, (pos, len, block)) in pieces.iter().enumerate() {
        if !with_data.contains(block) {
            continue;
        }
        let frame = block.saturating_mul(block_size) / chunk;
        let target = k >= first_target_piece;
        if marks.last().is_none_or(|(_, f, t)| *f != frame || *t != target) {
            marks.push((image.len(), frame, target));
        }
        image.extend_from_slice(piece_bytes(*pos, *len)?);
    }

    // The target's cost in its frame: context and target compressed whole, less the context alone (a target
    // compressed after its context as a prefix, or streamed with a flush before it, is priced differently from the
    // image), both by the compressor's own frame encoder, so its early-abort decisions are made here too. Where the
    // target runs into the next chunk, that part starts a frame of its own.
    let (in_frame, encoded_bytes, encode_secs) = SPAN_ENCODER.with(|slot| -> Result<(u64, u64, f64)> {
        let mut slot = slot.borrow_mut();
        let (encoder, frame_buf) = &mut *slot;
        let encoder = encoder_for(encoder, opts.level)?;
        let (mut encoded_bytes, mut encode_secs) = (0u64, 0f64);
        let in_frame = span_cost(&image, &marks, &mut |data: &[u8]| -> Result<u64> {
            let started = Instant::now();
            encoder.compress(data, frame_buf)?;
            encode_secs += started.elapsed().as_secs_f64();
            encoded_bytes = encoded_bytes.saturating_add(u64_of_usize(data.len()));
            Ok(u64_of_usize(frame_buf.len()))
        })?;
        Ok((in_frame, encoded_bytes, encode_secs))
    })?;
    // The compressor also hashes every stored byte: its speed here, on a slice of the span, in cache.
    let slice = &image[..image.len().min(HASH_SAMPLE)];
    let started = Instant::now();
    std::hint::black_box(Sha256::digest(slice));
    let hash_secs = started.elapsed().as_secs_f64();
    let target_from = usize_of(start.saturating_sub(context_start))?;
    let predicted = buf[target_from.min(buf.len())..]
        .chunks(opts.sample_size)
        .map(|piece| class_rate.get(class_of(piece)).copied().unwrap_or(0.0) * f64_of_usize(piece.len()))
        .sum();
    Ok(SpanResult {
        in_frame,
        predicted,
        read_bytes: u64_of_usize(buf.len()),
        read_secs,
        encoded_bytes,
        encode_secs,
        hashed_bytes: u64_of_usize(slice.len()),
        hash_secs,
    })
}

thread_local! {
    /// A span worker's frame encoder and frame buffer, kept from span to span (and estimate to estimate).
    static SPAN_ENCODER: RefCell<(Option<FrameEncoder>, Vec<u8>)> = const { RefCell::new((None, Vec::new())) };
}

/// The targets' summed cost in their frames, given the kept bytes `image` with their frame marks and
/// `frame_size`, the size of a frame of some bytes as the compressor makes it.
fn span_cost(
    image: &[u8],
    marks: &[(usize, u64, bool)],
    frame_size: &mut dyn FnMut(&[u8]) -> Result<u64>,
) -> Result<u64> {
    // A frame's header and checksum: an empty frame less its 3-byte empty block.
    let overhead = frame_size(&[])?.saturating_sub(3);
    let mut in_frame = 0u64;
    for (k, (at, frame, target)) in marks.iter().enumerate() {
        if !*target {
            continue;
        }
        let until = marks.get(k + 1).map_or(image.len(), |m| m.0);
        let from = match k.checked_sub(1).and_then(|p| marks.get(p)) {
            Some((context_at, context_frame, false)) if context_frame == frame => *context_at,
            _ => *at,
        };
        let whole = frame_size(&image[from..until])?;
        let before = if *at > from { frame_size(&image[from..*at])? } else { overhead };
        in_frame = in_frame.saturating_add(whole.saturating_sub(before));
    }
    Ok(in_frame)
}

/// Ratio of sums of the spans' in-frame to predicted costs, and its standard error (linearised).
fn correction(spans: &[SpanResult]) -> (f64, f64) {
    let x: f64 = spans.iter().map(|s| s.predicted).sum();
    let y: f64 = spans.iter().map(|s| f64_of(s.in_frame)).sum();
    if x <= 0.0 || y <= 0.0 {
        return (1.0, 0.0);
    }
    let r = y / x;
    let n = f64_of_usize(spans.len());
    if spans.len() < 2 {
        return (r, 0.05 * r);
    }
    let residuals: f64 = spans.iter().map(|s| (f64_of(s.in_frame) - r * s.predicted).powi(2)).sum();
    let mean_x = x / n;
    (r, (residuals / (n - 1.0) / n).sqrt() / mean_x)
}

// ----------------------------------------------------------------------------------------------------------------
// Fixed costs: what the compressor adds around the data.

/// Which 2 MiB blocks meet an allocated range, ascending.
fn candidate_blocks(stream: &Stream, block_size: u64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for (s, e) in &stream.ranges {
        if e <= s {
            continue;
        }
        for b in s / block_size..e.div_ceil(block_size) {
            if out.last().is_none_or(|l| b > *l) {
                out.push(b);
            }
        }
    }
    out
}

/// A chunk frame's header with a window descriptor and a 4-byte content size (magic 4, descriptor 1, window 1, size
/// 4) and its 4-byte content checksum: the compressor writes both in every frame. (At levels whose window holds a
/// whole chunk the header is single-segment, one byte less.)
const DATA_FRAME_OVERHEAD: u64 = 14;

/// What the compressor adds around the data (see `compress.rs`), from the metadata alone.
struct FixedCosts {
    /// Room kept at the image's start for the head frame (footer copy, header, BAT) and closed by a skippable
    /// frame: `compress_bound(head) + 64` bytes whatever the head compresses to.
    head_room: u64,
    /// Frame headers and checksums: a data frame per chunk with allocated bytes, an empty frame per chunk without,
    /// and the closing footer, which lives in the last chunk's frame.
    frames: u64,
    /// The same if every chunk turned out to store nothing (its allocated blocks all zero): an empty frame each.
    frames_if_empty: u64,
}

fn fixed_costs(chain: &Chain, opts: &EstimateOptions, usage: Option<&DiskUsage>) -> Result<FixedCosts> {
    let plan = match usage {
        Some(usage) => chain.plan_live(opts.chunk_size, usage)?,
        None => chain.plan(opts.chunk_size)?,
    };
    let head_room = u64_of_usize(compress_bound(usize_of(head_length(&plan)?)?)).saturating_add(64);
    // Frames as the compressor makes them: content size and checksum on.
    let frame = |data: &[u8]| -> Result<u64> {
        let failed = |e: std::io::Error| VhdError::invalid_argument(None, format!("estimate: zstd: {e}"));
        let mut compressor = zstd::bulk::Compressor::new(opts.level).map_err(failed)?;
        compressor.include_checksum(true).map_err(failed)?;
        compressor.include_contentsize(true).map_err(failed)?;
        compressor.compress(data).map(|v| u64_of_usize(v.len())).map_err(failed)
    };
    let empty = frame(&[])?;
    // The image's UUID and timestamp are unknown yet: stand-ins from the seed keep the estimate reproducible.
    let mut rng = SplitMix(opts.seed);
    let mut uuid = [0u8; 16];
    uuid[..8].copy_from_slice(&rng.next_u64().to_be_bytes());
    uuid[8..].copy_from_slice(&rng.next_u64().to_be_bytes());
    let timestamp = u32::try_from(rng.next_u64() >> 33).unwrap_or(0);
    let footer = new_footer_at(DiskType::Dynamic, plan.virtual_size, uuid, timestamp);
    let footer_frame = frame(footer.as_bytes())?;
    // In a data frame the footer costs its blocks: its own frame less an empty frame's header and checksum.
    let footer_in_frame = footer_frame.saturating_sub(empty).saturating_add(3);
    let (mut frames, mut frames_if_empty) = (0u64, 0u64);
    for (i, chunk) in plan.chunks.iter().enumerate() {
        // A chunk wholly free (live data) stores nothing, as one no layer allocates.
        let unallocated = chunk.unallocated.iter().map(|(_, len)| *len).fold(0u64, u64::saturating_add);
        let unallocated = if chunk.reads.is_empty() { chunk.length } else { unallocated };
        let last = i + 1 == plan.chunks.len();
        let if_empty = if last { footer_frame } else { empty };
        let cost = match (unallocated >= chunk.length, last) {
            (true, _) => if_empty,
            (false, false) => DATA_FRAME_OVERHEAD,
            (false, true) => DATA_FRAME_OVERHEAD.saturating_add(footer_in_frame),
        };
        frames = frames.saturating_add(cost);
        frames_if_empty = frames_if_empty.saturating_add(if_empty);
    }
    Ok(FixedCosts { head_room, frames, frames_if_empty })
}

// ----------------------------------------------------------------------------------------------------------------

fn validate(opts: &EstimateOptions) -> Result<()> {
    let range = zstd::compression_level_range();
    let bad = |what: String| Err(VhdError::invalid_argument(None, format!("estimate: {what}")));
    if !range.contains(&opts.level) {
        return bad(format!("level {} must be in {}..={}", opts.level, range.start(), range.end()));
    }
    if !(512..=16 * MIB).contains(&opts.sample_size) {
        return bad(format!("sample size {} must be between 512 bytes and 16 MiB", opts.sample_size));
    }
    if !(1..=65_536).contains(&opts.samples) {
        return bad(format!("samples {} must be between 1 and 65536", opts.samples));
    }
    if !(1..=1 << 20).contains(&opts.looks) {
        return bad(format!("looks {} must be between 1 and 1048576", opts.looks));
    }
    if !(opts.sample_size..=64 * MIB).contains(&opts.span_size) {
        return bad(format!("span size {} must be between the sample size and 64 MiB", opts.span_size));
    }
    if opts.spans > 4096 {
        return bad(format!("spans {} must be at most 4096", opts.spans));
    }
    if opts.context_size > 64 * MIB || opts.prefix_size > 64 * MIB {
        return bad(format!("context {} and prefix {} must be at most 64 MiB", opts.context_size, opts.prefix_size));
    }
    let block = u64::from(DEFAULT_BLOCK_SIZE);
    if opts.chunk_size == 0 || !opts.chunk_size.is_multiple_of(block) {
        return bad(format!("chunk size {} must be a positive multiple of {block}", opts.chunk_size));
    }
    Ok(())
}

/// Collapsed-strata variance of a sum of one-per-stratum estimates `y` (neighbours in pairs, a triple at the end),
/// each group's term scaled by its finite-population factor `fpc`.
fn collapsed_variance(y: &[f64], fpc: &[f64]) -> f64 {
    let mut var = 0.0;
    let mut i = 0;
    while i + 1 < y.len() {
        let group = if y.len() - i == 3 { 3 } else { 2 };
        let g = &y[i..i + group];
        let n = f64_of_usize(group);
        let mean = g.iter().sum::<f64>() / n;
        let f = fpc[i..i + group].iter().sum::<f64>() / n;
        var += f * n / (n - 1.0) * g.iter().map(|v| (v - mean).powi(2)).sum::<f64>();
        i += group;
    }
    var
}

/// Mean and standard error of the mean.
fn mean_se(values: &[f64]) -> (f64, f64) {
    let n = f64_of_usize(values.len());
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, mean.abs());
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// Predicts the compressed image's size (with a range) and the time to make it; see the module doc.
pub fn estimate(chain: &Chain, opts: &EstimateOptions) -> Result<Estimate> {
    estimate_with(chain, opts, None)
}

/// [`estimate`] of the live-data image ([`Chain::plan_live`] with the same `usage`): the ranges `usage` proves free
/// count as the image stores them, as zeros (nothing read, nothing compressed, a wholly free block left out).
pub fn estimate_live(chain: &Chain, opts: &EstimateOptions, usage: &DiskUsage) -> Result<Estimate> {
    estimate_with(chain, opts, Some(usage))
}

fn estimate_with(chain: &Chain, opts: &EstimateOptions, usage: Option<&DiskUsage>) -> Result<Estimate> {
    let started = Instant::now();
    validate(opts)?;
    let size = chain.virtual_size();
    if usage.is_some_and(|u| u.size != size) {
        return Err(VhdError::invalid_argument(None, "the disk usage is of another disk than the chain"));
    }
    let block_size = u64::from(DEFAULT_BLOCK_SIZE);
    let stream = Stream::new(chain, usage.map_or(&[][..], |u| &u.free))?;
    let threads = rayon::current_num_threads().max(1);
    let mut rng = SplitMix(opts.seed);

    // Phase 1: a class look at one unit per stratum, then a few units of each class compressed (two-phase
    // sampling). Each class is weighed by its strata and priced by its mean compressed cost per byte.
    // Zeros cost a look and nothing more: while fewer than half the looks find data, the strata are doubled (up
    // to four times as many), so disks of mostly zeros get about as many looks at their data as disks full of it.
    let mut strata = opts.looks;
    let (units, looks) = loop {
        let units = plan_units(stream.total, u64_of_usize(opts.sample_size), strata, &mut rng)?;
        let looks = look_at_units(&stream, &units)?;
        let with_data = looks.iter().filter(|l| l.class != 0).count();
        if with_data * 2 >= strata || strata >= opts.looks.saturating_mul(4) || units.len() < strata {
            break (units, looks);
        }
        strata = strata.saturating_mul(2);
    };
    let picked = pick_for_compression(&looks, opts.samples, &mut rng);
    let to_compress: Vec<Sample> = picked.iter().filter_map(|i| units.get(*i).copied()).collect();
    let results = measure_samples(&stream, &to_compress, opts)?;
    let unit_len = f64_of(units.first().map_or(1, |u| u.len.max(1)));
    let mut class_weight = [0f64; CLASSES];
    let mut class_units = [0usize; CLASSES];
    for (u, l) in units.iter().zip(&looks) {
        class_weight[l.class] += f64_of(u.weight);
        class_units[l.class] += 1;
    }
    let mut class_costs: Vec<Vec<f64>> = vec![Vec::new(); CLASSES];
    for (i, r) in picked.iter().zip(&results) {
        if let Some(l) = looks.get(*i) {
            class_costs[l.class].push(f64_of(r.cost) / unit_len);
        }
    }
    let class_rate: Vec<f64> = class_costs.iter().map(|c| mean_se(c).0).collect();
    let d: f64 = (0..CLASSES).map(|c| class_weight[c] * class_rate[c]).sum();
    // Variance: the class mix (collapsed strata over the units' predicted costs) plus each class's price (its
    // units' spread, finite-population corrected).
    let predicted: Vec<f64> = units.iter().zip(&looks).map(|(u, l)| f64_of(u.weight) * class_rate[l.class]).collect();
    let fpc: Vec<f64> = units.iter().map(|u| 1.0 - f64_of(u.len) / f64_of(u.weight.max(1))).collect();
    let var_mix = collapsed_variance(&predicted, &fpc);
    let var_price: f64 = (1..CLASSES)
        .map(|c| {
            let m = class_costs[c].len();
            let (mean, se) = mean_se(&class_costs[c]);
            let se = if m < 2 { mean } else { se };
            let fpc = 1.0 - f64_of_usize(m) / f64_of_usize(class_units[c].max(1));
            class_weight[c] * class_weight[c] * se * se * fpc.max(0.0)
        })
        .sum();
    let var_d = var_mix + var_price;
    let zero_weight = u64_of(class_weight[0]);

    // Phase 2: a fixed number of spans (a fixed budget; their ratio is heavy-tailed where content repeats within
    // a window, so a standard error from a handful of them cannot be trusted to stop early).
    let starts = plan_spans(&units, &looks, stream.total, u64_of_usize(opts.span_size), opts.spans, &mut rng);
    let measured: Vec<SpanResult> =
        starts.par_iter().map(|start| run_span(&stream, *start, opts, &class_rate)).collect::<Result<_>>()?;
    let (c, se_c) = correction(&measured);
    // Blocks: those a unit found data in, those it found zeros in, the rest in proportion.
    let candidates = candidate_blocks(&stream, block_size);
    let mut seen: HashMap<u64, bool> = HashMap::new();
    for l in &looks {
        if let Some(b) = l.block {
            *seen.entry(b).or_insert(false) |= l.class != 0;
        }
    }
    let with_data = u64_of_usize(seen.values().filter(|v| **v).count());
    let seen_count = u64_of_usize(seen.len());
    let candidate_count = u64_of_usize(candidates.len());
    let unseen = candidate_count.saturating_sub(seen_count);
    let image_blocks = match seen_count {
        0 if d > 0.0 => candidate_count,
        0 => 0,
        _ => with_data.saturating_add(u64_of(f64_of(unseen) * f64_of(with_data) / f64_of(seen_count))),
    };
    let fixed = fixed_costs(chain, opts, usage)?;
    // No data seen: the allocated blocks are most likely all zero, and their chunks' frames empty.
    let frames = if d > 0.0 { fixed.frames } else { fixed.frames_if_empty };
    let exact = fixed.head_room.saturating_add(frames);
    let exact_low = fixed.head_room.saturating_add(fixed.frames.min(fixed.frames_if_empty));

    let nonzero_bytes = stream.total.saturating_sub(zero_weight);
    let zeros_in_blocks = image_blocks.saturating_mul(block_size).saturating_sub(nonzero_bytes);
    let zero_runs = (zeros_in_blocks / (128 * 1024)).saturating_mul(ZERO_COST_PER_128K);
    let data = c * d;
    let compressed_bytes = u64_of(data)
        .saturating_add(zero_runs)
        .saturating_add(image_blocks.saturating_mul(BITMAP_COST))
        .saturating_add(exact);
    let rel_d = if d > 0.0 { var_d.sqrt() / d } else { 0.0 };
    let rel_c = if c > 0.0 { se_c / c } else { 0.0 };
    let margin = Z * (rel_d * rel_d + rel_c * rel_c).sqrt() + MODEL_ALLOWANCE;
    let low = u64_of(data * (1.0 - margin).max(0.0)).saturating_add(exact_low.saturating_sub(FOOTER_SLACK));
    let high = u64_of(data * (1.0 + margin))
        .saturating_add(zero_runs.saturating_mul(2))
        .saturating_add(exact.saturating_add(FOOTER_SLACK))
        .saturating_add(candidate_count.saturating_mul(bitmap_size(DEFAULT_BLOCK_SIZE)));

    // Time: the full compression reads every allocated byte, then compresses and hashes the kept blocks. Without spans
    // (nothing but zeros seen), per-thread speeds are those of the class looks' reads and of the compressions of
    // each class, less each sample frame's own set-up and prefix indexing.
    let read_secs: f64 = looks.iter().map(|l| l.read_secs).sum();
    let look_len = unit_len.min(f64_of_usize(CLASS_LOOK));
    let read_secs_per_byte = read_secs / (look_len * f64_of_usize(looks.len().max(1)));
    let mut class_secs = [(0f64, 0usize); CLASSES];
    for (i, r) in picked.iter().zip(&results) {
        if let Some(l) = looks.get(*i) {
            class_secs[l.class].0 += (r.timing.compress_secs - r.setup_secs).max(0.0) / unit_len;
            class_secs[l.class].1 += 1;
        }
    }
    let compress_secs: f64 =
        (0..CLASSES).map(|c| class_weight[c] * class_secs[c].0 / f64_of_usize(class_secs[c].1.max(1))).sum();
    // Where spans were measured, their own speeds stand in for the classes' and the looks': they were read in long
    // runs and compressed as the image is (the frame encoder, early abort, whole frames), and they say how fast
    // the data bytes are hashed too.
    let per_byte = |f: fn(&SpanResult) -> (u64, f64)| -> Option<f64> {
        let (bytes, secs) = measured.iter().map(f).fold((0u64, 0f64), |(b, t), (x, y)| (b.saturating_add(x), t + y));
        (bytes > 0).then(|| secs / f64_of(bytes))
    };
    let spans_speeds = (
        per_byte(|m| (m.read_bytes, m.read_secs)),
        per_byte(|m| (m.encoded_bytes, m.encode_secs)),
        per_byte(|m| (m.hashed_bytes, m.hash_secs)),
    );
    let work_secs = match spans_speeds {
        // The image keeps whole blocks: the zeros inside a kept block are compressed and hashed with it.
        (Some(read), Some(encode), Some(hash)) => {
            f64_of(stream.total) * read + f64_of(image_blocks.saturating_mul(block_size)) * (encode + hash)
        }
        _ => f64_of(stream.total) * read_secs_per_byte + compress_secs,
    };
    let predicted_seconds = work_secs / f64_of_usize(threads);

    let sampled_bytes = units
        .iter()
        .map(|u| u.len.min(u64_of_usize(CLASS_LOOK)))
        .chain(results.iter().map(|r| r.timing.read_bytes))
        .chain(measured.iter().map(|r| r.read_bytes))
        .fold(0u64, u64::saturating_add);
    let layout = sparse_layout(size, DEFAULT_BLOCK_SIZE)?;
    let image_bytes = image_blocks
        .saturating_mul(block_size.saturating_add(bitmap_size(DEFAULT_BLOCK_SIZE)))
        .saturating_add(layout.table_offset.saturating_add(layout.table_bytes))
        .saturating_add(FOOTER_SIZE);
    Ok(Estimate {
        virtual_size: size,
        allocated_bytes: stream.total,
        unallocated_bytes: size.saturating_sub(stream.total),
        sampled_bytes,
        samples: results.len(),
        spans: measured.len(),
        zero_fraction: if stream.total > 0 { class_weight[0] / f64_of(stream.total) } else { 0.0 },
        estimated_nonzero_bytes: nonzero_bytes,
        candidate_blocks: candidate_count,
        image_blocks,
        image_bytes,
        compressed_bytes,
        low: low.min(compressed_bytes),
        high: high.max(compressed_bytes),
        context_correction: c,
        sampling_error: rel_d,
        correction_error: rel_c,
        seconds_spent: started.elapsed().as_secs_f64(),
        predicted_seconds,
        threads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u64_round_trip() {
        for v in [0u64, 1, 511, 1 << 20, (1 << 41) + 12345, (1 << 53) - 1] {
            assert_eq!(u64_of(f64_of(v)), v);
        }
        assert_eq!(u64_of(-3.0), 0);
        assert_eq!(u64_of(f64::NAN), 0);
        assert_eq!(u64_of(2.6), 3);
        assert_eq!(u64_of(1e30), u64::MAX);
        assert_eq!(u64_of(9_223_372_036_854_775_808.0), 1 << 63);
        assert_eq!(u64_of(18_446_744_073_709_549_568.0), u64::MAX - 2047);
    }

    #[test]
    fn strata_cover_the_stream() {
        let mut rng = SplitMix(1);
        let s = plan_units(100_000, 4096, 7, &mut rng).unwrap_or_default();
        assert_eq!(s.len(), 7);
        assert_eq!(s.iter().map(|x| x.weight).sum::<u64>(), 100_000);
        let mut edge = 0;
        for x in &s {
            assert!(x.pos >= edge && x.pos < edge + x.weight);
            edge += x.weight;
        }
    }

    #[test]
    fn classes_order_by_entropy() {
        let mut rng = SplitMix(5);
        let mut random = vec![0u8; 16 * KIB];
        rng.fill(&mut random);
        let text: Vec<u8> =
            b"the quick brown fox jumps over the lazy dog ".iter().copied().cycle().take(16 * KIB).collect();
        let entropy_bin = |class: usize| (class - 1) / REPEAT_BINS;
        let repeat_bin = |class: usize| (class - 1) % REPEAT_BINS;
        assert_eq!(class_of(&[0u8; 16 * KIB]), 0);
        let r = class_of(&random);
        assert_eq!((entropy_bin(r), repeat_bin(r)), (ENTROPY_EDGES.len(), 0), "random in class {r}");
        let t = class_of(&text);
        assert!(entropy_bin(t) < ENTROPY_EDGES.len(), "text in class {t}");
        // The same bytes without their repeats: the same entropy bin, fewer repeats.
        let mut shuffled = text.clone();
        let mut order = SplitMix(7);
        for i in (1..shuffled.len()).rev() {
            let j = usize::try_from(order.below(u64::try_from(i + 1).unwrap_or(1))).unwrap_or(0);
            shuffled.swap(i, j);
        }
        let s = class_of(&shuffled);
        assert_eq!(entropy_bin(s), entropy_bin(t));
        assert!(repeat_bin(s) < repeat_bin(t), "shuffled text in class {s}, text in {t}");
    }

    #[test]
    fn every_class_with_units_gets_compressed_units_in_proportion() {
        let classes =
            [[1usize; 900].as_slice(), [6usize; 90].as_slice(), [3usize; 2].as_slice(), [0usize; 500].as_slice()]
                .concat();
        let looks: Vec<Look> = classes.iter().map(|c| Look { class: *c, block: None, read_secs: 0.0 }).collect();
        let picks = pick_for_compression(&looks, 100, &mut SplitMix(9));
        let count = |c: usize| picks.iter().filter(|i| looks[**i].class == c).count();
        assert_eq!(count(0), 0);
        assert_eq!(count(1), 91);
        assert_eq!(count(6), MIN_PER_CLASS.max(10));
        assert_eq!(count(3), 2);
    }

    #[test]
    fn collapsed_variance_of_constants_is_zero() {
        assert!(collapsed_variance(&[2.0; 9], &[1.0; 9]).abs() < 1e-12);
        assert!(collapsed_variance(&[1.0, 3.0], &[1.0; 2]) > 0.0);
    }

    #[test]
    fn spans_go_where_the_data_is_inside_the_stream() {
        let mib = 1u64 << 20;
        let units: Vec<Sample> = (0..100).map(|i| Sample { weight: mib, pos: i * mib, len: 16384 }).collect();
        // Data in the first and last tenth only.
        let looks: Vec<Look> = (0..100)
            .map(|i| Look { class: if !(10..90).contains(&i) { 2 } else { 0 }, block: None, read_secs: 0.0 })
            .collect();
        let starts = plan_spans(&units, &looks, 100 * mib, 4 * mib, 8, &mut SplitMix(2));
        assert_eq!(starts.len(), 8);
        assert!(starts.windows(2).all(|w| w[0] <= w[1]));
        assert!(starts.iter().all(|s| s + 4 * mib <= 100 * mib));
        assert_eq!(starts.iter().filter(|s| **s < 10 * mib).count(), 4);
        let zeros: Vec<Look> = (0..100).map(|_| Look { class: 0, block: None, read_secs: 0.0 }).collect();
        assert!(plan_spans(&units, &zeros, 100 * mib, 4 * mib, 8, &mut SplitMix(2)).is_empty());
    }

    #[test]
    fn correction_is_the_ratio_of_sums() {
        let span = |in_frame, predicted| SpanResult {
            in_frame,
            predicted,
            read_bytes: 0,
            read_secs: 0.0,
            encoded_bytes: 0,
            encode_secs: 0.0,
            hashed_bytes: 0,
            hash_secs: 0.0,
        };
        let (c, se) = correction(&[span(90, 100.0), span(180, 200.0)]);
        assert!((c - 0.9).abs() < 1e-12 && se.abs() < 1e-12);
        let (c, se) = correction(&[span(50, 100.0), span(200, 200.0)]);
        assert!((c - 250.0 / 300.0).abs() < 1e-12 && se > 0.0);
    }
}
