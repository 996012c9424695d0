//! A reusable zstd context that compresses one chunk's logical bytes into one zstd frame (content size and
//! XXH64 content checksum included) with early abort (see [`crate::early_abort`]; from its `MIN_LEVEL` on, below
//! that the frame is zstd's own).
//!
//! zstd's block-level sequence producer API does the early abort inside an ordinary frame: for every block zstd
//! forms, the producer either answers "all literals, no match" (the block overlaps only incompressible pieces;
//! zstd then stores it raw, or Huffman-codes its literals when that is smaller) or declines, and zstd's own match
//! finder runs as usual (`ZSTD_c_enableSeqProducerFallback`). Declined blocks compress exactly as without the
//! producer, with the frame's whole history, so a chunk without incompressible pieces gives the very frame zstd
//! gives alone. The context (its tables, a few MiB) is kept between chunks instead of being allocated per frame.

use std::ffi::{c_int, c_uint, c_void};
use std::ptr::NonNull;

use zstd::zstd_safe;
use zstd_sys as sys;

use crate::early_abort::{applies_at, incompressible_pieces, PIECE_SIZE};
use crate::error::{Result, VhdError};

/// The chunk being compressed, as the sequence producer sees it: where its bytes are and the piece decisions.
struct Pieces {
    start: usize,
    len: usize,
    incompressible: Vec<bool>,
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
        let pieces = NonNull::from(Box::leak(Box::new(Pieces { start: 0, len: 0, incompressible: Vec::new() })));
        let encoder = FrameEncoder { cctx, pieces, level };
        let params = [
            (sys::ZSTD_cParameter::ZSTD_c_compressionLevel, level),
            (sys::ZSTD_cParameter::ZSTD_c_checksumFlag, 1),
            (sys::ZSTD_cParameter::ZSTD_c_contentSizeFlag, 1),
            // ZSTD_c_enableSeqProducerFallback: a declined block goes to zstd's own match finder.
            (sys::ZSTD_cParameter::ZSTD_c_experimentalParam17, 1),
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
            pieces.start = logical.as_ptr().addr();
            pieces.len = logical.len();
            if applies_at(self.level) {
                incompressible_pieces(logical, self.level, &mut pieces.incompressible);
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

/// The sequence producer zstd calls for every block: one all-literal sequence when every piece the block overlaps
/// is incompressible, else decline.
unsafe extern "C" fn produce(
    state: *mut c_void,
    out: *mut sys::ZSTD_Sequence,
    capacity: usize,
    src: *const c_void,
    src_size: usize,
    _dict: *const c_void,
    _dict_size: usize,
    _level: c_int,
    _window: usize,
) -> usize {
    // SAFETY: `state` is the `Pieces` registered in `FrameEncoder::new`, not written while zstd compresses.
    let Some(pieces) = (unsafe { state.cast::<Pieces>().as_ref() }) else { return DECLINE };
    let Some(offset) = src.addr().checked_sub(pieces.start) else { return DECLINE };
    let Some(end) = offset.checked_add(src_size).filter(|end| *end <= pieces.len && *end > offset) else {
        return DECLINE;
    };
    let Some(decisions) = pieces.incompressible.get(offset / PIECE_SIZE..end.div_ceil(PIECE_SIZE)) else {
        return DECLINE;
    };
    let Ok(literals) = c_uint::try_from(src_size) else { return DECLINE };
    if capacity == 0 || out.is_null() || !decisions.iter().all(|d| *d) {
        return DECLINE;
    }
    // SAFETY: zstd guarantees `capacity` (checked non-zero) writable sequences at `out`.
    unsafe { out.write(sys::ZSTD_Sequence { offset: 0, litLength: literals, matchLength: 0, rep: 0 }) };
    1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::early_abort::MIN_LEVEL;
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

    fn zstd_alone(data: &[u8], level: i32) -> Vec<u8> {
        let mut reference = zstd::bulk::Compressor::new(level).unwrap();
        reference.include_checksum(true).unwrap();
        reference.include_contentsize(true).unwrap();
        reference.compress(data).unwrap()
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
    fn below_the_early_abort_level_noise_is_left_to_zstd() {
        let noise = random(PIECE_SIZE, 3);
        let data = [noise.clone(), noise].concat();
        let mut frame = Vec::new();
        FrameEncoder::new(MIN_LEVEL - 1).unwrap().compress(&data, &mut frame).unwrap();
        assert_eq!(frame, zstd_alone(&data, MIN_LEVEL - 1));
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
    fn a_piece_called_incompressible_is_not_searched() {
        // Noise repeated: zstd alone finds the copy; early abort stores both copies as they are (the documented
        // cost of not searching), which shows the producer answered for those blocks.
        let noise = random(PIECE_SIZE, 3);
        let data = [noise.clone(), noise].concat();
        let mut encoder = FrameEncoder::new(MIN_LEVEL).unwrap();
        let mut frame = Vec::new();
        encoder.compress(&data, &mut frame).unwrap();
        assert_eq!(decompress(&frame), data);
        assert!(frame.len() >= 2 * PIECE_SIZE);
        assert!(zstd_alone(&data, MIN_LEVEL).len() < PIECE_SIZE + 1024);
    }
}
