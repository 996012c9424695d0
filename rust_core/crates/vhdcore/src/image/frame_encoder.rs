//! A reusable zstd context that compresses one chunk's logical bytes into one zstd frame (content size and
//! XXH64 content checksum included) with early abort (see [`crate::early_abort`]; at every level but zstd's
//! negative ones, which get zstd's own frame).
//!
//! zstd's block-level sequence producer API does the early abort inside an ordinary frame: for every block zstd
//! forms, the producer either answers (the block overlaps only incompressible pieces) with the block's long repeats
//! found by [`crate::long_match`] and the rest as literals (zstd then stores it raw, or encodes the repeats and
//! Huffman-codes the literals when that is smaller), or declines, and zstd's own match finder runs as usual
//! (`ZSTD_c_enableSeqProducerFallback`). Declined blocks compress exactly as without the producer, with the frame's
//! whole history, so a chunk without incompressible pieces gives the very frame zstd gives alone with the same
//! parameters. zstd 1.5.7's block pre-splitter is turned off: blocks are then exactly the 128 KiB pieces the
//! decisions are made for, and it cost more time than it saved size on the benchmark's mixed chain (see
//! `bench/README.md`; the `zstd -3` of Debian's CLI, 1.5.4, has none). The context (its tables, a few MiB) is kept between chunks
//! instead of being allocated per frame.

use std::ffi::{c_int, c_uint, c_void};
use std::ptr::NonNull;

use zstd::zstd_safe;
use zstd_sys as sys;

use crate::error::{Result, VhdError};
use crate::image::early_abort::{applies_at, incompressible_pieces, PIECE_SIZE};
use crate::image::long_match::{LongMatches, Repeat};

/// The chunk being compressed, as the sequence producer sees it: its bytes, the piece decisions and the index of
/// long repeats.
struct Pieces {
    start: *const u8,
    len: usize,
    incompressible: Vec<bool>,
    repeats: LongMatches,
}

pub struct FrameEncoder {
    cctx: NonNull<sys::ZSTD_CCtx>,
    /// Owned (from `Box::into_raw`), freed on drop; zstd reads it through the producer while compressing.
    pieces: NonNull<Pieces>,
    level: i32,
}

fn zstd_failure(level: i32, what: &str, code: usize) -> VhdError {
    VhdError::invalid_argument(None, format!("zstd level {level}: {what}: {}", zstd_safe::get_error_name(code)))
}

impl FrameEncoder {
    pub fn new(level: i32) -> Result<FrameEncoder> {
        // SAFETY: plain constructor; a null return is handled.
        let cctx = NonNull::new(unsafe { sys::ZSTD_createCCtx() })
            .ok_or_else(|| VhdError::invalid_argument(None, "zstd: cannot create a compression context"))?;
        let pieces = NonNull::from(Box::leak(Box::new(Pieces {
            start: std::ptr::null(),
            len: 0,
            incompressible: Vec::new(),
            repeats: LongMatches::default(),
        })));
        let encoder = FrameEncoder { cctx, pieces, level };
        let params = [
            (sys::ZSTD_cParameter::ZSTD_c_compressionLevel, level),
            (sys::ZSTD_cParameter::ZSTD_c_checksumFlag, 1),
            (sys::ZSTD_cParameter::ZSTD_c_contentSizeFlag, 1),
            // ZSTD_c_enableSeqProducerFallback: a declined block goes to zstd's own match finder.
            (sys::ZSTD_cParameter::ZSTD_c_experimentalParam17, 1),
            // ZSTD_c_blockSplitterLevel = 1: no pre-splitting of blocks (see the module's documentation).
            (sys::ZSTD_cParameter::ZSTD_c_experimentalParam20, 1),
            // The producer API refuses long-distance matching, which zstd turns on by itself for huge windows.
            (
                sys::ZSTD_cParameter::ZSTD_c_enableLongDistanceMatching,
                sys::ZSTD_ParamSwitch_e::ZSTD_ps_disable as c_int,
            ),
        ];
        for (param, value) in params {
            // SAFETY: the context is live; zstd validates the value.
            let code = unsafe { sys::ZSTD_CCtx_setParameter(encoder.cctx.as_ptr(), param, value) };
            // SAFETY: pure function of the code.
            if unsafe { sys::ZSTD_isError(code) } != 0 {
                return Err(zstd_failure(level, &format!("parameter {param:?} = {value}"), code));
            }
        }
        if applies_at(level) {
            // SAFETY: `pieces` lives as long as the context (both freed in drop, the context first).
            unsafe {
                sys::ZSTD_registerSequenceProducer(encoder.cctx.as_ptr(), encoder.pieces.as_ptr().cast(), Some(produce))
            };
        }
        Ok(encoder)
    }

    pub fn level(&self) -> i32 {
        self.level
    }

    /// Compresses `logical` into `frame` (cleared first; its allocation is reused).
    pub fn compress(&mut self, logical: &[u8], frame: &mut Vec<u8>) -> Result<()> {
        {
            // SAFETY: no compression is running, so nothing else reads the pieces now.
            let pieces = unsafe { self.pieces.as_mut() };
            pieces.start = logical.as_ptr();
            pieces.len = logical.len();
            if applies_at(self.level) {
                incompressible_pieces(logical, self.level, &mut pieces.incompressible);
                pieces.repeats.reset();
            }
        }
        frame.clear();
        frame.reserve(zstd_safe::compress_bound(logical.len()));
        // SAFETY: `frame` has `capacity()` writable bytes; `logical` is readable for its length; zstd writes at
        // most the capacity and returns how many bytes it wrote.
        let code = unsafe {
            sys::ZSTD_compress2(
                self.cctx.as_ptr(),
                frame.as_mut_ptr().cast(),
                frame.capacity(),
                logical.as_ptr().cast(),
                logical.len(),
            )
        };
        // SAFETY: pure function of the code.
        if unsafe { sys::ZSTD_isError(code) } != 0 {
            return Err(zstd_failure(self.level, "compress", code));
        }
        // SAFETY: zstd initialised the first `code` bytes, and `code <= capacity`.
        unsafe { frame.set_len(code) };
        Ok(())
    }
}

impl Drop for FrameEncoder {
    fn drop(&mut self) {
        // SAFETY: both were made in `new` and are freed once; the context, which points at the pieces, goes first.
        unsafe {
            sys::ZSTD_freeCCtx(self.cctx.as_ptr());
            drop(Box::from_raw(self.pieces.as_ptr()));
        }
    }
}

/// `ZSTD_SEQUENCE_PRODUCER_ERROR`: decline the block, zstd's own match finder takes it.
const DECLINE: usize = usize::MAX;

/// The sequence producer zstd calls for every block: when every piece the block overlaps is incompressible, the
/// block's long repeats (see [`crate::long_match`]) and its literals; else decline.
unsafe extern "C" fn produce(
    state: *mut c_void,
    out: *mut sys::ZSTD_Sequence,
    capacity: usize,
    src: *const c_void,
    src_size: usize,
    _dict: *const c_void,
    _dict_size: usize,
    _level: c_int,
    window: usize,
) -> usize {
    // SAFETY: `state` is the `Pieces` registered in `FrameEncoder::new`; zstd calls the producer from the thread
    // running `compress`, which holds no other reference to it meanwhile.
    let Some(pieces) = (unsafe { state.cast::<Pieces>().as_mut() }) else { return DECLINE };
    let Some(offset) = src.addr().checked_sub(pieces.start.addr()) else { return DECLINE };
    let Some(end) = offset.checked_add(src_size).filter(|end| *end <= pieces.len && *end > offset) else {
        return DECLINE;
    };
    let Some(decisions) = pieces.incompressible.get(offset / PIECE_SIZE..end.div_ceil(PIECE_SIZE)) else {
        return DECLINE;
    };
    if capacity == 0 || out.is_null() || pieces.start.is_null() || !decisions.iter().all(|d| *d) {
        return DECLINE;
    }
    // SAFETY: `start` and `len` describe the chunk `compress` hands zstd, alive and unchanged while zstd runs.
    let chunk = unsafe { std::slice::from_raw_parts(pieces.start, pieces.len) };
    let mut written = 0usize;
    let mut overflow = false;
    let mut push = |literals: usize, offset: usize, length: usize| {
        let (Ok(lit), Ok(off), Ok(len)) =
            (c_uint::try_from(literals), c_uint::try_from(offset), c_uint::try_from(length))
        else {
            overflow = true;
            return;
        };
        if written >= capacity {
            overflow = true;
            return;
        }
        // SAFETY: zstd guarantees `capacity` writable (possibly uninitialised, hence no slice over them) sequences
        // at `out`, and `written < capacity`.
        unsafe { out.add(written).write(sys::ZSTD_Sequence { offset: off, litLength: lit, matchLength: len, rep: 0 }) };
        written += 1;
    };
    // Every repeat lies inside the chunk, before its copy and within `window` (by construction in `long_match`).
    // zstd's own check (ZSTD_c_validateSequences) cannot stand in: it counts positions from the block's start and
    // so refuses repeats into earlier blocks; a wrong one would still fail the frame's XXH64 check on decompression.
    let last = pieces.repeats.find(chunk, offset, end, window, &mut |r: Repeat| push(r.literals, r.distance, r.length));
    push(last, 0, 0);
    if overflow {
        return DECLINE;
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::early_abort::MIN_LEVEL;
    use crate::rng::SplitMix;

    fn text(n: usize) -> Vec<u8> {
        b"a chain of disks, flattened and compressed; ".iter().copied().cycle().take(n).collect()
    }

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut out = vec![0u8; n];
        SplitMix(seed).fill(&mut out);
        out
    }

    fn decompress(frame: &[u8]) -> Vec<u8> {
        zstd::bulk::decompress(frame, 64 << 20).unwrap()
    }

    /// zstd alone with the encoder's parameters (checksum, content size, no pre-splitting), no producer.
    fn zstd_alone(data: &[u8], level: i32) -> Vec<u8> {
        let mut frame = vec![0u8; zstd_safe::compress_bound(data.len())];
        // SAFETY: a fresh context, freed below; buffers valid for the lengths given.
        unsafe {
            let cctx = sys::ZSTD_createCCtx();
            for (param, value) in [
                (sys::ZSTD_cParameter::ZSTD_c_compressionLevel, level),
                (sys::ZSTD_cParameter::ZSTD_c_checksumFlag, 1),
                (sys::ZSTD_cParameter::ZSTD_c_contentSizeFlag, 1),
                (sys::ZSTD_cParameter::ZSTD_c_experimentalParam20, 1),
            ] {
                assert_eq!(sys::ZSTD_isError(sys::ZSTD_CCtx_setParameter(cctx, param, value)), 0);
            }
            let n = sys::ZSTD_compress2(cctx, frame.as_mut_ptr().cast(), frame.len(), data.as_ptr().cast(), data.len());
            assert_eq!(sys::ZSTD_isError(n), 0);
            sys::ZSTD_freeCCtx(cctx);
            frame.truncate(n);
        }
        frame
    }

    #[test]
    fn compressible_data_gives_zstds_own_frame() {
        let mut data = text(3 * PIECE_SIZE + 1000);
        data.extend(random(5000, 1)); // random, but too short a piece to be called incompressible
        for level in [3, MIN_LEVEL + 1] {
            let mut frame = Vec::new();
            FrameEncoder::new(level).unwrap().compress(&data, &mut frame).unwrap();
            assert_eq!(frame, zstd_alone(&data, level), "level {level}");
        }
    }

    #[test]
    fn at_negative_levels_noise_is_left_to_zstd() {
        let noise = random(PIECE_SIZE, 3);
        let data = [noise.clone(), noise].concat();
        let mut frame = Vec::new();
        FrameEncoder::new(-1).unwrap().compress(&data, &mut frame).unwrap();
        assert_eq!(frame, zstd_alone(&data, -1));
    }

    #[test]
    fn incompressible_pieces_are_stored_raw_between_compressed_ones() {
        let mut data = text(PIECE_SIZE);
        data.extend(random(2 * PIECE_SIZE, 2));
        data.extend(text(PIECE_SIZE));
        data.extend(&data[..4096].to_vec()); // a later block matching across the raw ones
        let mut encoder = FrameEncoder::new(MIN_LEVEL + 1).unwrap();
        let mut frame = Vec::new();
        for _ in 0..2 {
            encoder.compress(&data, &mut frame).unwrap();
            assert_eq!(decompress(&frame), data);
        }
        // Two raw blocks: their bytes plus a 3-byte header each; the text blocks and the repeat shrink to little.
        assert!(frame.len() < 2 * PIECE_SIZE + 2 * 3 + 600, "{}", frame.len());
        assert!(frame.len() >= 2 * PIECE_SIZE);
    }

    #[test]
    fn a_copy_of_incompressible_bytes_costs_a_few_bytes() {
        // Noise, other noise, then the first noise again at a shift of 1000 bytes: the producer answers for the
        // noise blocks (stored, not searched by zstd) and finds the copy by itself.
        let noise = random(2 * PIECE_SIZE, 3);
        let data = [noise.clone(), random(1000, 4), noise].concat();
        for level in [0, MIN_LEVEL, 3, 9] {
            let mut encoder = FrameEncoder::new(level).unwrap();
            let mut frame = Vec::new();
            encoder.compress(&data, &mut frame).unwrap();
            assert_eq!(decompress(&frame), data, "level {level}");
            assert!(frame.len() < 2 * PIECE_SIZE + 1000 + 1024, "level {level}: {}", frame.len());
        }
    }

    #[test]
    fn noise_with_copies_of_itself_everywhere_round_trips() {
        // Noise in which copies of earlier stretches (any length up to 64 KiB, any distance, overlapping ones
        // included) are planted: every repeat the producer reports must decode to exactly the input.
        for seed in 0..12u64 {
            let mut rng = SplitMix(seed);
            let mut data = random(3 * 1024 * 1024 + usize::try_from(rng.below(100_000)).unwrap(), seed + 100);
            for _ in 0..200 {
                let len = 1 + usize::try_from(rng.below(64 * 1024)).unwrap();
                let to = usize::try_from(rng.below(u64::try_from(data.len() - len).unwrap())).unwrap();
                let from = usize::try_from(rng.below(u64::try_from(to.max(1)).unwrap())).unwrap();
                data.copy_within(from..from + len, to);
            }
            let mut frame = Vec::new();
            FrameEncoder::new(3).unwrap().compress(&data, &mut frame).unwrap();
            // Streamed, as `zstd -d` does: its buffer holds only the frame's window, so a repeat from further back
            // fails here where a one-shot decompression into the whole output would still find the bytes.
            assert!(zstd::stream::decode_all(frame.as_slice()).unwrap() == data, "seed {seed}");
            assert!(frame.len() < data.len(), "seed {seed}: the planted copies gained nothing");
        }
    }

    #[test]
    fn fresh_noise_is_stored_raw() {
        // Fresh noise gains nothing: raw blocks, 3 bytes each, plus the frame's header and checksum.
        let data = random(8 * PIECE_SIZE, 5);
        let mut frame = Vec::new();
        FrameEncoder::new(3).unwrap().compress(&data, &mut frame).unwrap();
        assert!(frame.len() <= data.len() + 8 * 3 + 18, "{}", frame.len());
        assert_eq!(decompress(&frame), data);
    }
}
