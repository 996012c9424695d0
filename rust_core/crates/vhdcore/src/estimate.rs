//! Predicting the size of the compressed image (DESIGN §5) and the time to make it, before making it.
//!
//! The image is a zstd stream, one frame per chunk of virtual disk, whose decompression is a dynamic VHD of the
//! flattened chain with 2 MiB blocks, all-zero and unallocated blocks left out. Its size is estimated as follows.
//!
//! 1. **Exact accounting from the metadata.** Bytes that no layer allocates cost nothing. The allocated bytes,
//!    laid end to end in disk order (the *allocated stream*), are what the image stores, in that order; a chunk
//!    of virtual disk is a frame, so context never crosses a chunk boundary in what follows.
//! 2. **Stratified samples.** The allocated stream is cut into `n` equal strata (`n` ≤ `samples`); in each, a
//!    byte is drawn uniformly and the `sample_size` bytes from it are the sample (the last stratum's wraps round),
//!    so every byte is sampled with the same probability, strata edges included. A sample is compressed at the
//!    level with the `prefix_size` bytes of its frame before it as its window: a zstd *reference prefix*, laid
//!    out in memory right before the sample as in the image, indexed rather than compressed. Its cost per byte
//!    times its stratum's width, summed, is `D`. Random-looking samples (order-0 entropy ≥ 7.98 bits/byte) skip
//!    the prefix: no window helps them and indexing it would cost more than compressing them.
//! 3. **Zeros.** An all-zero sample costs nothing: either its 2 MiB block is all zero and dropped from the image,
//!    or it sits in a kept block, where zeros cost about 4 bytes per 128 KiB (counted). Telling the two apart
//!    would need whole blocks read; only the number of kept blocks depends on it (estimated from the blocks the
//!    samples saw, see [`Estimate::image_blocks`]), and the size hardly does. Zero samples cost a read and no
//!    compression, so while at most half of `samples` samples have data, strata are halved and resampled (up to
//!    four times as many): disks of mostly zeros get about as many data samples as disks full of data.
//! 4. **Context correction.** The image's frames give every byte up to the level's whole window of context and
//!    let zstd's block splitter see the whole chunk. `spans` targets of `span_size` bytes are chosen with
//!    probability proportional to the samples' costs (systematic PPS: the bytes that make the image are the ones
//!    measured), each around a sample. A target's cost in its frame is measured as `zstd(context + target) -
//!    zstd(context)` with up to `context_size` bytes of its frame before it, both compressed whole as the image
//!    does, and divided by its cost measured as the samples measure it (in `sample_size` pieces with their
//!    prefixes). The mean of these ratios (Hansen–Hurwitz under PPS) scales `D`. The ratio is heavy-tailed
//!    where content repeats within a window (one target in 16 at 0.6 among 0.97s moves the mean by 2.5%), so
//!    while its relative standard error exceeds 1%, another round of `spans` targets is measured (three at most).
//!
//!    Why so: a 1 MiB span compressed whole against its pieces alone (the simple scheme) overstates text-like
//!    data by 2-14%, since a lone span's first bytes have no context where almost every byte of a chunk has; a
//!    span streamed with a flush before the target misses the block splitter (+0.5-2.7%); a target compressed
//!    after a reference prefix of its context runs in zstd's separate-dictionary mode (+0.3-2.8%). And the
//!    ratio's spread from place to place, not its mean, limits the accuracy: the samples' own prefixes capture
//!    most of the context, which shrinks that spread four- to eightfold against samples compressed alone.
//! 5. **Fixed costs.** The head frame (footer copy, header, BAT) is built as the image would have it and
//!    compressed, the closing footer frame likewise; each kept block adds its 512-byte all-present bitmap (a few
//!    bytes once compressed) and each chunk a frame header.
//!
//! The range is the point estimate ± 3 standard errors of the stratified sum (collapsed strata, finite-population
//! corrected) combined with 3 standard errors of the correction, plus a 1% allowance for what the model leaves
//! out (a frame's first bytes without context, ~1-2% more on a chunk's first MiB; zstd state that lives as long
//! as a frame; zero blocks the image drops from the window). The time is predicted from the per-thread speeds
//! measured on the samples (reads; compressions less each sample frame's set-up and prefix indexing), applied to
//! the allocated and the non-zero bytes, over rayon's thread count.
//!
//! Cost, whatever the disk size: `samples × (sample_size + prefix_size)` bytes read (320 MiB by default; all-zero
//! and random-looking samples read no prefix, and extra strata only come with zero samples) plus `spans ×
//! (span_size + context_size)` per round of spans; about `samples × sample_size` compressed and four times as
//! much indexed, plus `spans × (3 × span_size + 2 × context_size)` per round; all in parallel; plus the metadata
//! (`Chain::occupancy` and a BAT-sized head). Measured on 2 cores: 0.24 s, 14% of the full compression of a
//! 1 GiB disk and 1.5% of a 32 GiB one with 10 GiB allocated.
//! The model's assumptions about the compressor: each chunk's frame is compressed in one call with the whole
//! chunk in memory (zstd's `compress2`, as `zstd::bulk` does); a streaming encoder fed in pieces gives frames
//! 0.5-2.7% larger on the same data.

use std::collections::HashMap;
use std::time::Instant;

use rayon::prelude::*;
use zerocopy::IntoBytes;
use zstd::zstd_safe::{compress_bound, get_error_name, CCtx, CParameter};

use crate::chain::Chain;
use crate::error::{Result, VhdError};
use crate::export::is_zero;
use crate::format::{bitmap_size, DiskType, BAT_UNUSED, DEFAULT_BLOCK_SIZE, FOOTER_SIZE, SECTOR_SIZE};
use crate::rng::SplitMix;
use crate::writer::{new_footer, new_header, sparse_layout};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Compressed cost of one 512-byte all-present bitmap between two 2 MiB blocks of a frame: one literal and one
/// repeat match, plus its share of the block's tables. The range allows 0 to 512.
const BITMAP_COST: u64 = 8;
/// Zeros inside a kept block (unallocated or written): about one RLE block (4 bytes) or a long match per 128 KiB
/// zstd block; counted at 8 bytes per 128 KiB.
const ZERO_COST_PER_128K: u64 = 8;
/// A frame header with a 4-byte content size and its last-block header, no checksum.
const FRAME_OVERHEAD: u64 = 13;
/// Share of the estimate allowed for what the model leaves out (see the module doc).
const MODEL_ALLOWANCE: f64 = 0.01;
/// Standard errors on each side of the point estimate.
const Z: f64 = 3.0;
/// Relative standard error of the context correction above which another round of spans is measured, and the
/// most rounds.
const TARGET_CORRECTION_ERROR: f64 = 0.01;
const MAX_SPAN_ROUNDS: usize = 3;
/// Samples read and compressed by one task: one zstd context per batch.
const BATCH: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EstimateOptions {
    /// zstd level of the image (default 3).
    pub level: i32,
    /// Bytes per sample (default 32 KiB: a sample's fixed cost, its frame set-up and prefix indexing, makes
    /// more, smaller samples the better use of a budget; 2048 × 32 KiB beat 1024 × 64 KiB at the same time).
    pub sample_size: usize,
    /// Strata (samples) taken at first (default 2048); while at most half have data, strata are halved, up to
    /// four times as many (see the module doc).
    pub samples: usize,
    /// Bytes of each context-correction target (default 1 MiB).
    pub span_size: usize,
    /// Context-correction targets per round (default 16; up to three rounds, see the module doc).
    pub spans: usize,
    /// Bytes of allocated stream compressed in front of each target, as the image's frame would have them
    /// (default 1 MiB).
    pub context_size: usize,
    /// Bytes of allocated stream before each sample given to zstd as its window (default 128 KiB; 0 compresses
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
            sample_size: 32 * KIB,
            samples: 2048,
            span_size: MIB,
            spans: 16,
            context_size: MIB,
            prefix_size: 128 * KIB,
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
    /// Bytes read for the estimate (samples with their prefixes, span targets with their context).
    pub sampled_bytes: u64,
    /// Samples taken (strata) and context-correction spans measured.
    pub samples: usize,
    pub spans: usize,
    /// Share of the allocated bytes in all-zero samples.
    pub zero_fraction: f64,
    /// Allocated bytes outside all-zero samples (to the sample size's granularity).
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

/// Order-0 entropy of at least 7.98 bits per byte: what zstd stores nearly raw whatever the window (already
/// compressed or encrypted data). Such bytes are compressed without a prefix: a window cannot help them, and
/// indexing it would cost more than compressing them.
fn looks_random(data: &[u8]) -> bool {
    if data.len() < 4096 {
        return false;
    }
    // Four tables, so consecutive equal bytes do not wait on each other's increments.
    let mut counts = [[0u32; 256]; 4];
    let mut quads = data.chunks_exact(4);
    for q in quads.by_ref() {
        for (table, b) in counts.iter_mut().zip(q) {
            table[usize::from(*b)] = table[usize::from(*b)].wrapping_add(1);
        }
    }
    for b in quads.remainder() {
        counts[0][usize::from(*b)] = counts[0][usize::from(*b)].wrapping_add(1);
    }
    let n = f64_of_usize(data.len());
    let entropy: f64 = (0..256)
        .map(|i| counts.iter().map(|t| t[i]).fold(0u32, u32::wrapping_add))
        .filter(|c| *c > 0)
        .map(|c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    entropy >= 7.98
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
    fn new(chain: &'a Chain) -> Result<Self> {
        let ranges = chain.occupancy().ranges;
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

    /// Stream position where the chunk after the one holding `pos` starts (the stream's end if none).
    fn next_frame_start(&self, pos: u64, chunk: u64) -> u64 {
        let next = (self.disk_offset(pos) / chunk.max(1)).saturating_add(1).saturating_mul(chunk.max(1));
        self.stream_pos_at(next).max(pos)
    }

    /// Stream position of the first allocated byte at or after disk offset `offset`.
    fn stream_pos_at(&self, offset: u64) -> u64 {
        let i = self.ranges.partition_point(|(_, e)| *e <= offset);
        match (self.ranges.get(i), self.starts.get(i)) {
            (Some((s, _)), Some(start)) => start.saturating_add(offset.saturating_sub(*s)),
            _ => self.total,
        }
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

    /// Allocated bytes of each `chunk`-sized piece of virtual disk that has any, from the metadata.
    fn per_chunk(&self, chunk: u64) -> Vec<u64> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (s, e) in &self.ranges {
            let mut at = *s;
            while at < *e {
                let c = at / chunk;
                let end = c.saturating_add(1).saturating_mul(chunk).min(*e);
                match out.last_mut() {
                    Some((last, bytes)) if *last == c => *bytes = bytes.saturating_add(end - at),
                    _ => out.push((c, end - at)),
                }
                at = end;
            }
        }
        out.into_iter().map(|(_, bytes)| bytes).collect()
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

impl Timing {
    fn add(&mut self, o: &Timing) {
        self.read_bytes = self.read_bytes.saturating_add(o.read_bytes);
        self.read_secs += o.read_secs;
        self.compress_bytes = self.compress_bytes.saturating_add(o.compress_bytes);
        self.compress_secs += o.compress_secs;
    }
}

// ----------------------------------------------------------------------------------------------------------------
// Phase 1: stratified samples.

struct Sample {
    /// Stream position of the stratum's first byte, and its width (the sample's weight).
    start: u64,
    weight: u64,
    /// Stream position and length of the sample.
    pos: u64,
    len: u64,
}

struct SampleResult {
    /// Compressed bytes less the frame overhead; 0 for an all-zero sample.
    cost: u64,
    zero: bool,
    /// The 2 MiB image block holding the whole sample, when it fits in one.
    block: Option<u64>,
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

/// One sample per stratum: a byte drawn uniformly in the stratum and the `sample_size` bytes from it, running
/// into the next stratum (the last one wraps round to the stream's start). Every byte of the stream is then in a
/// sample with the same probability, edges of strata included, so the sum is unbiased whatever the layout.
fn plan_samples(total: u64, opts: &EstimateOptions, rng: &mut SplitMix) -> Result<Vec<Sample>> {
    if total == 0 {
        return Ok(Vec::new());
    }
    let len = u64_of_usize(opts.sample_size).min(total);
    let n = u64_of_usize(opts.samples).min((total / len).max(1));
    let mut out = Vec::with_capacity(usize_of(n)?);
    for i in 0..n {
        let a = stratum_edge(total, i, n)?;
        let b = stratum_edge(total, i + 1, n)?;
        out.push(Sample { start: a, weight: b - a, pos: a + rng.below(b - a), len });
    }
    Ok(out)
}

/// Splits each stratum at least twice a sample wide in two halves: the old sample stays with the half that holds
/// its first byte (where it is uniform, as a fresh draw would be), and a new one is drawn in the other half.
/// Returns the new strata.
fn split_strata(samples: &mut [Sample], rng: &mut SplitMix) -> Vec<Sample> {
    let mut out = Vec::new();
    for s in samples.iter_mut() {
        if s.weight < s.len.saturating_mul(2) {
            continue;
        }
        let mid = s.start.saturating_add(s.weight / 2);
        let left = mid - s.start;
        let right = s.weight - left;
        if s.pos < mid {
            out.push(Sample { start: mid, weight: right, pos: mid + rng.below(right), len: s.len });
            s.weight = left;
        } else {
            out.push(Sample { start: s.start, weight: left, pos: s.start + rng.below(left), len: s.len });
            s.start = mid;
            s.weight = right;
        }
    }
    out
}

/// Reads and measures a batch of samples with one zstd context.
fn run_samples(stream: &Stream, batch: &[Sample], opts: &EstimateOptions) -> Result<Vec<SampleResult>> {
    let block_size = u64::from(DEFAULT_BLOCK_SIZE);
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
    for (((s, (at, room, len)), pre), mut timing) in batch.iter().zip(&layout).zip(&prefixes).zip(timings) {
        let data_at = at + room;
        let data = &buf[data_at..data_at + len];
        let zero = is_zero(data);
        let cost = z.cost(&buf[data_at - pre..data_at], data, &mut timing).map_err(|e| zstd_error(stream.chain, e))?;
        let last = s.pos.saturating_add(s.len).saturating_sub(1);
        let (first_off, last_off) = (stream.disk_offset(s.pos), stream.disk_offset(last));
        let one_range = last < stream.total && stream.range_of(s.pos) == stream.range_of(last);
        let block = (one_range && first_off / block_size == last_off / block_size).then_some(first_off / block_size);
        let setup_secs = match (zero, *pre > 0) {
            (true, _) => 0.0,
            (false, true) => with_prefix,
            (false, false) => bare,
        };
        out.push(SampleResult { cost, zero, block, timing, setup_secs });
    }
    Ok(out)
}

fn measure_samples(stream: &Stream, samples: &[Sample], opts: &EstimateOptions) -> Result<Vec<SampleResult>> {
    let batches: Vec<Vec<SampleResult>> =
        samples.par_chunks(BATCH).map(|batch| run_samples(stream, batch, opts)).collect::<Result<_>>()?;
    Ok(batches.into_iter().flatten().collect())
}

// ----------------------------------------------------------------------------------------------------------------
// Phase 2: context-correction spans.

struct SpanResult {
    /// Cost of the target in a frame after its context, and as the samples measure it.
    in_frame: u64,
    sampled: u64,
    read_bytes: u64,
}

/// Systematic PPS: `m` points spread over the cumulated sample costs, each picking the sample it falls in.
fn plan_spans(costs: &[f64], m: usize, rng: &mut SplitMix) -> Vec<usize> {
    let total: f64 = costs.iter().sum();
    if m == 0 || total <= 0.0 {
        return Vec::new();
    }
    let u = f64_of(rng.below(1 << 30)) / f64_of(1 << 30);
    let step = total / f64_of_usize(m);
    let mut picks = Vec::with_capacity(m);
    let mut cumulated = 0.0;
    let mut i = 0usize;
    for k in 0..m {
        let point = (f64_of_usize(k) + u) * step;
        while i + 1 < costs.len() && cumulated + costs[i] <= point {
            cumulated += costs[i];
            i += 1;
        }
        picks.push(i);
    }
    picks
}

fn run_span(stream: &Stream, sample: &Sample, opts: &EstimateOptions) -> Result<SpanResult> {
    let err = |e| zstd_error(stream.chain, e);
    let chunk = opts.chunk_size;
    let target = u64_of_usize(opts.span_size).min(stream.total);
    // The target is centred on the sample, inside the stream; the read reaches back for the context and for the
    // first piece's prefix, never past the start of the target's frame.
    let centre = sample.pos.saturating_add(sample.len / 2);
    let start = centre.saturating_sub(target / 2).min(stream.total.saturating_sub(target));
    let frame = stream.frame_start(start, chunk);
    let read_start = start.saturating_sub(u64_of_usize(opts.context_size.max(opts.prefix_size))).max(frame);
    let context_start = start.saturating_sub(u64_of_usize(opts.context_size)).max(frame);
    let len = usize_of(start.saturating_add(target).saturating_sub(read_start))?;
    let mut buf = vec![0u8; len];
    stream.read(read_start, &mut buf)?;
    let buf = buf;
    let index = |pos: u64| usize_of(pos.saturating_sub(read_start)).map(|i| i.min(len));

    let mut z = Zstd::new(opts.level).map_err(err)?;
    let mut frames = Timing::default();
    // The target in its frame: after its context, and where it runs into the next chunk, as that frame's start.
    let mut in_frame = 0u64;
    let (mut from, mut seg) = (index(context_start)?, index(start)?);
    while seg < len {
        let next = index(stream.next_frame_start(read_start.saturating_add(u64_of_usize(seg)), chunk))?.max(seg + 1);
        let (whole, secs_whole) = z.frame(&[], &buf[from..next]).map_err(err)?;
        let (before, secs_before) =
            if seg > from { z.frame(&[], &buf[from..seg]).map_err(err)? } else { (z.overhead, 0.0) };
        frames.compress_bytes = frames.compress_bytes.saturating_add(u64_of_usize(2 * seg + next - 2 * from));
        frames.compress_secs += secs_whole + secs_before;
        in_frame = in_frame.saturating_add(whole.saturating_sub(before));
        (from, seg) = (next, next);
    }
    // The target as the samples see it: pieces with their prefixes (within their frame).
    let mut t = Timing::default();
    let mut sampled = 0u64;
    let mut piece = index(start)?;
    while piece < len {
        let end = piece.saturating_add(opts.sample_size).min(len);
        let pos = read_start.saturating_add(u64_of_usize(piece));
        let floor = index(stream.frame_start(pos, chunk))?;
        let data = &buf[piece..end];
        let from =
            if looks_random(data) { piece } else { piece.saturating_sub(opts.prefix_size).max(floor).min(piece) };
        let prefix = &buf[from..piece];
        sampled = sampled.saturating_add(z.cost(prefix, data, &mut t).map_err(err)?);
        piece = end;
    }
    Ok(SpanResult { in_frame, sampled, read_bytes: u64_of_usize(len) })
}

// ----------------------------------------------------------------------------------------------------------------
// Fixed costs: the head frame as the image would have it.

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

/// Compressed size of the head frame (footer copy, header, BAT with the `kept` blocks) and of the closing footer.
/// The image's UUID and timestamp are unknown yet: stand-ins from the seed keep the estimate reproducible.
fn head_and_tail(size: u64, kept: &[u64], level: i32, seed: u64) -> Result<(u64, u64)> {
    let layout = sparse_layout(size, DEFAULT_BLOCK_SIZE)?;
    let mut rng = SplitMix(seed);
    let mut uuid = [0u8; 16];
    uuid[..8].copy_from_slice(&rng.next_u64().to_be_bytes());
    uuid[8..].copy_from_slice(&rng.next_u64().to_be_bytes());
    let mut footer = new_footer(DiskType::Dynamic, size, uuid);
    footer.timestamp.set(u32::try_from(rng.next_u64() >> 33).unwrap_or(0));
    footer.seal();
    let mut header = new_header(&layout, DEFAULT_BLOCK_SIZE);
    header.seal();
    let block_bytes = bitmap_size(DEFAULT_BLOCK_SIZE)
        .checked_add(u64::from(DEFAULT_BLOCK_SIZE))
        .ok_or_else(|| overflow("a block size"))?;
    let mut bat = vec![BAT_UNUSED; usize_of(u64::from(layout.entries))?];
    let mut next = layout.table_offset.checked_add(layout.table_bytes).ok_or_else(|| overflow("the BAT"))?;
    for b in kept {
        if let Some(entry) = usize::try_from(*b).ok().and_then(|i| bat.get_mut(i)) {
            *entry = u32::try_from(next / SECTOR_SIZE).map_err(|_| overflow("a BAT entry"))?;
            next = next.checked_add(block_bytes).ok_or_else(|| overflow("the image size"))?;
        }
    }
    let mut head = Vec::with_capacity(usize_of(layout.table_offset.saturating_add(layout.table_bytes))?);
    head.extend_from_slice(footer.as_bytes());
    head.extend_from_slice(header.as_bytes());
    head.extend(bat.iter().flat_map(|e| e.to_be_bytes()));
    head.resize(usize_of(layout.table_offset.saturating_add(layout.table_bytes))?, 0xFF);
    let compress = |data: &[u8]| -> Result<u64> {
        zstd::bulk::compress(data, level)
            .map(|v| u64_of_usize(v.len()))
            .map_err(|e| VhdError::invalid_argument(None, format!("estimate: zstd: {e}")))
    };
    Ok((compress(&head)?, compress(footer.as_bytes())?))
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
    let started = Instant::now();
    validate(opts)?;
    let size = chain.virtual_size();
    let block_size = u64::from(DEFAULT_BLOCK_SIZE);
    let stream = Stream::new(chain)?;
    let threads = rayon::current_num_threads().max(1);
    let mut rng = SplitMix(opts.seed);

    // Phase 1: stratified samples; strata halved while the data samples stay within the budget.
    let mut samples = plan_samples(stream.total, opts, &mut rng)?;
    let mut results = measure_samples(&stream, &samples, opts)?;
    let max_strata = opts.samples.saturating_mul(4);
    loop {
        let with_data = results.iter().filter(|r| !r.zero).count();
        if samples.is_empty() || samples.len().saturating_mul(2) > max_strata || with_data * 2 > opts.samples {
            break;
        }
        let new = split_strata(&mut samples, &mut rng);
        if new.is_empty() {
            break;
        }
        let new_results = measure_samples(&stream, &new, opts)?;
        let mut pairs: Vec<(Sample, SampleResult)> =
            samples.into_iter().zip(results).chain(new.into_iter().zip(new_results)).collect();
        pairs.sort_by_key(|(s, _)| s.start);
        (samples, results) = pairs.into_iter().unzip();
    }
    let ys: Vec<f64> =
        samples.iter().zip(&results).map(|(s, r)| f64_of(s.weight) * f64_of(r.cost) / f64_of(s.len.max(1))).collect();
    let fpc: Vec<f64> = samples.iter().map(|s| 1.0 - f64_of(s.len) / f64_of(s.weight.max(1))).collect();
    let d: f64 = ys.iter().sum();
    let var_d = collapsed_variance(&ys, &fpc);
    let zero_weight: u64 = samples.iter().zip(&results).filter(|(_, r)| r.zero).map(|(s, _)| s.weight).sum();

    // Phase 2: spans around samples picked in proportion to their cost, in rounds of `spans` (each a systematic
    // PPS sample of its own) while the correction is uncertain: the ratio is heavy-tailed where content repeats
    // within a window (one span in 16 at 0.6 moves the mean by 2.5%), and more spans are the cure.
    let mut measured: HashMap<usize, SpanResult> = HashMap::new();
    let mut picks: Vec<usize> = Vec::new();
    let mut rounds = 0;
    let (c, se_c) = loop {
        let round = plan_spans(&ys, opts.spans, &mut rng);
        let mut todo: Vec<usize> = round.iter().copied().filter(|i| !measured.contains_key(i)).collect();
        todo.dedup();
        let new: Vec<(usize, SpanResult)> = todo
            .par_iter()
            .map(|i| match samples.get(*i) {
                Some(s) => run_span(&stream, s, opts).map(|r| (*i, r)),
                None => Err(VhdError::invalid_argument(None, "estimate: span without its sample")),
            })
            .collect::<Result<_>>()?;
        measured.extend(new);
        picks.extend(round);
        rounds += 1;
        let ratios: Vec<f64> = picks
            .iter()
            .filter_map(|i| measured.get(i))
            .filter(|r| r.sampled > 0 && r.in_frame > 0)
            .map(|r| f64_of(r.in_frame) / f64_of(r.sampled))
            .collect();
        // Picks repeat where one sample dominates; with fewer than two distinct spans the spread is unknown, so
        // the correction is given a 5% standard error.
        let (c, se_c) = match ratios.len() {
            0 => (1.0, 0.0),
            _ if measured.len() < 2 => (mean_se(&ratios).0, 0.05 * mean_se(&ratios).0),
            _ => mean_se(&ratios),
        };
        if ratios.is_empty() || rounds >= MAX_SPAN_ROUNDS || se_c <= TARGET_CORRECTION_ERROR * c {
            break (c, se_c);
        }
    };
    // Blocks: those a sample found data in, those it found zeros in, the rest in proportion.
    let candidates = candidate_blocks(&stream, block_size);
    let mut seen: HashMap<u64, bool> = HashMap::new();
    for r in &results {
        if let Some(b) = r.block {
            *seen.entry(b).or_insert(false) |= !r.zero;
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
    let guess = image_blocks > with_data;
    let known: Vec<u64> = candidates.iter().copied().filter(|b| seen.get(b).copied().unwrap_or(false)).collect();
    let kept: Vec<u64> = candidates.iter().copied().filter(|b| seen.get(b).copied().unwrap_or(guess)).collect();
    let (head, tail) = head_and_tail(size, &kept, opts.level, opts.seed)?;
    // The BAT's compressed size depends on which blocks are kept: bound it by the blocks known to hold data and
    // by all the candidates.
    let (head_min, _) = head_and_tail(size, &known, opts.level, opts.seed)?;
    let (head_max, _) = head_and_tail(size, &candidates, opts.level, opts.seed)?;

    let per_chunk = stream.per_chunk(opts.chunk_size);
    let frames = u64_of_usize(per_chunk.len()).saturating_mul(FRAME_OVERHEAD);

    let nonzero_bytes = stream.total.saturating_sub(zero_weight);
    let zeros_in_blocks = image_blocks.saturating_mul(block_size).saturating_sub(nonzero_bytes);
    let zero_runs = (zeros_in_blocks / (128 * 1024)).saturating_mul(ZERO_COST_PER_128K);
    let data = c * d;
    let compressed_bytes = u64_of(data)
        .saturating_add(zero_runs)
        .saturating_add(head)
        .saturating_add(tail)
        .saturating_add(image_blocks.saturating_mul(BITMAP_COST))
        .saturating_add(frames);
    let rel_d = if d > 0.0 { var_d.sqrt() / d } else { 0.0 };
    let rel_c = if c > 0.0 { se_c / c } else { 0.0 };
    let margin = Z * (rel_d * rel_d + rel_c * rel_c).sqrt() + MODEL_ALLOWANCE;
    let low = u64_of(data * (1.0 - margin).max(0.0)).saturating_add(head_min.min(head)).saturating_add(tail);
    let high = u64_of(data * (1.0 + margin))
        .saturating_add(zero_runs.saturating_mul(2))
        .saturating_add(head_max.max(head))
        .saturating_add(tail)
        .saturating_add(candidate_count.saturating_mul(bitmap_size(DEFAULT_BLOCK_SIZE)))
        .saturating_add(frames);

    // Time: the full compression reads every allocated byte and compresses the data. Per-thread speeds are those
    // of the sample reads and compressions, less each sample frame's own set-up and prefix indexing.
    let mut t = Timing::default();
    results.iter().for_each(|r| t.add(&r.timing));
    let read_secs_per_byte = if t.read_bytes > 0 { t.read_secs / f64_of(t.read_bytes) } else { 0.0 };
    let compress_secs: f64 = samples
        .iter()
        .zip(&results)
        .map(|(s, r)| f64_of(s.weight) * (r.timing.compress_secs - r.setup_secs).max(0.0) / f64_of(s.len.max(1)))
        .sum();
    let predicted_seconds = (f64_of(stream.total) * read_secs_per_byte + compress_secs) / f64_of_usize(threads);

    let sampled_bytes = results
        .iter()
        .map(|r| r.timing.read_bytes)
        .chain(measured.values().map(|r| r.read_bytes))
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
        samples: samples.len(),
        spans: measured.len(),
        zero_fraction: if stream.total > 0 { f64_of(zero_weight) / f64_of(stream.total) } else { 0.0 },
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
    fn strata_cover_the_stream_and_split_in_place() {
        let opts = EstimateOptions { samples: 7, sample_size: 4096, ..EstimateOptions::default() };
        let mut rng = SplitMix(1);
        let mut s = plan_samples(100_000, &opts, &mut rng).unwrap_or_default();
        assert_eq!(s.len(), 7);
        let new = split_strata(&mut s, &mut rng);
        s.extend(new);
        s.sort_by_key(|x| x.start);
        assert_eq!(s.len(), 14);
        assert_eq!(s.iter().map(|x| x.weight).sum::<u64>(), 100_000);
        let mut edge = 0;
        for x in &s {
            assert_eq!(x.start, edge);
            assert!(x.pos >= x.start && x.pos < x.start + x.weight);
            edge += x.weight;
        }
    }

    #[test]
    fn collapsed_variance_of_constants_is_zero() {
        assert!(collapsed_variance(&[2.0; 9], &[1.0; 9]).abs() < 1e-12);
        assert!(collapsed_variance(&[1.0, 3.0], &[1.0; 2]) > 0.0);
    }

    #[test]
    fn pps_picks_follow_the_costs() {
        let mut rng = SplitMix(3);
        let picks = plan_spans(&[0.0, 1.0, 0.0, 3.0], 4, &mut rng);
        assert_eq!(picks.iter().filter(|i| **i == 3).count(), 3);
        assert!(picks.iter().all(|i| *i == 1 || *i == 3));
        assert!(plan_spans(&[0.0, 0.0], 4, &mut rng).is_empty());
    }
}
