//! The image: a dynamic VHD of the flattened chain (2 MiB blocks, all-zero and unallocated blocks left out),
//! compressed as one independent zstd frame per chunk plus a small head frame (footer copy, header, BAT).
//!
//! Logical layout of the decompressed image:
//! `[footer copy][header][BAT] [chunk 0 blocks] [chunk 1 blocks] ... [last chunk blocks][footer]`, where each stored
//! block is a 512-byte all-present bitmap and 2 MiB of data. A chunk's bytes depend only on its own plan, so chunks
//! are built and compressed anywhere, in any order; the head, which holds the BAT, is built last from their results.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use sha2::{Digest, Sha256};
use zerocopy::IntoBytes;

use crate::chain::Chain;
use crate::error::{Result, VhdError};
use crate::export::{is_zero, Target};
use crate::format::{bitmap_size, DiskType, SECTOR_SIZE};
use crate::plan::{ChunkPlan, FetchedChunk, ImagePlan, IMAGE_BLOCK_SIZE};
use crate::resolve::LayerSource;
use crate::writer::{new_footer_at, new_header, sparse_layout};

pub const DEFAULT_LEVEL: i32 = 3;
const BLOCK: u64 = IMAGE_BLOCK_SIZE as u64;
/// zstd's skippable frame magic (0x184D2A50..5F); decoders pass over such frames.
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;

/// One chunk of the image, compressed.
#[derive(Debug, Clone)]
pub struct ChunkFrame {
    pub index: usize,
    pub frame: Vec<u8>,
    /// Bytes of the image this frame decompresses to.
    pub logical_bytes: u64,
    /// Hex sha256 of those decompressed bytes.
    pub sha256: String,
    /// CRC-32C of the frame itself, as S3 takes part checksums.
    pub crc32c: u32,
    /// Image block indices (virtual offset / 2 MiB) stored in this chunk, ascending.
    pub stored_blocks: Vec<u64>,
    pub virtual_bytes: u64,
    pub read_bytes: u64,
    /// Length of the frame; kept when `frame` itself has been written away and dropped.
    pub compressed_bytes: u64,
    /// Where the frame starts in the image object, once placed there.
    pub object_offset: Option<u64>,
}

impl ChunkFrame {
    fn new(index: usize, logical: &[u8], frame: Vec<u8>, stored_blocks: Vec<u64>, virtual_bytes: u64) -> ChunkFrame {
        let sha256 = Sha256::digest(logical).iter().map(|b| format!("{b:02x}")).collect();
        ChunkFrame {
            index,
            crc32c: crc32c::crc32c(&frame),
            compressed_bytes: u64::try_from(frame.len()).unwrap_or(u64::MAX),
            object_offset: None,
            frame,
            logical_bytes: u64::try_from(logical.len()).unwrap_or(u64::MAX),
            sha256,
            stored_blocks,
            virtual_bytes,
            read_bytes: 0,
        }
    }
}

fn footer_of(plan: &ImagePlan) -> [u8; 512] {
    let footer = new_footer_at(DiskType::Dynamic, plan.virtual_size, plan.image_uuid, plan.timestamp);
    let mut out = [0u8; 512];
    out.copy_from_slice(footer.as_bytes());
    out
}

/// Bytes of the head (footer copy, header, BAT) before any block.
pub fn head_length(plan: &ImagePlan) -> Result<u64> {
    let layout = sparse_layout(plan.virtual_size, IMAGE_BLOCK_SIZE)?;
    Ok(layout.table_offset + layout.table_bytes)
}

/// Appends chunk `chunk`'s part of the image to `out`; returns the image blocks it stored.
pub fn build_chunk<S: LayerSource>(
    src: &S,
    plan: &ImagePlan,
    chunk: &ChunkPlan,
    out: &mut Vec<u8>,
) -> Result<Vec<u64>> {
    let bitmap_len = usize::try_from(bitmap_size(IMAGE_BLOCK_SIZE)).unwrap_or(0);
    let block_len = usize::try_from(BLOCK).unwrap_or(0);
    let end = chunk.start + chunk.length;
    let mut stored = Vec::new();
    let mut at = chunk.start;
    while at < end {
        let block_end = (at + BLOCK).min(end);
        let untouched = chunk.unallocated.iter().any(|(s, l)| *s <= at && block_end <= s + l);
        if !untouched {
            let base = out.len();
            out.resize(base + bitmap_len + block_len, 0);
            let data_len = usize::try_from(block_end - at).unwrap_or(0);
            let data = &mut out[base + bitmap_len..base + bitmap_len + data_len];
            src.read_at(at, data)?;
            if is_zero(data) {
                out.truncate(base);
            } else {
                out[base..base + bitmap_len].fill(0xFF);
                stored.push(at / BLOCK);
            }
        }
        at = block_end;
    }
    if end == plan.virtual_size {
        out.extend_from_slice(&footer_of(plan));
    }
    Ok(stored)
}

thread_local! {
    /// Per-thread buffers: a chunk's image bytes and its compressed frame, reused across chunks.
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

fn compress_frame(logical: &[u8], level: i32, frame_buf: &mut Vec<u8>) -> Result<Vec<u8>> {
    let failed = |e: std::io::Error| VhdError::invalid_argument(None, format!("zstd level {level}: {e}"));
    let mut compressor = zstd::bulk::Compressor::new(level).map_err(failed)?;
    compressor.include_checksum(true).map_err(failed)?;
    compressor.include_contentsize(true).map_err(failed)?;
    frame_buf.clear();
    frame_buf.reserve(zstd::zstd_safe::compress_bound(logical.len()));
    compressor.compress_to_buffer(logical, frame_buf).map_err(failed)?;
    Ok(frame_buf.clone())
}

/// Builds and compresses one chunk from any layer source.
pub fn compress_chunk<S: LayerSource>(src: &S, plan: &ImagePlan, chunk: &ChunkPlan, level: i32) -> Result<ChunkFrame> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let (logical, frame_buf) = &mut *scratch;
        logical.clear();
        let stored = build_chunk(src, plan, chunk, logical)?;
        let frame = compress_frame(logical, level, frame_buf)?;
        let mut result = ChunkFrame::new(chunk.index, logical, frame, stored, chunk.length);
        result.read_bytes = chunk.read_bytes();
        Ok(result)
    })
}

/// A worker's whole job: its chunk plan and the bytes of its reads in, the compressed frame out.
pub fn compress_fetched_chunk(plan: &ImagePlan, index: usize, data: &[Vec<u8>], level: i32) -> Result<ChunkFrame> {
    plan.validate()?;
    let chunk = plan.chunk(index)?;
    let source = FetchedChunk::new(plan, chunk, data)?;
    compress_chunk(&source, plan, chunk, level)
}

/// Where each chunk starts in the decompressed image, given how many bytes each one decompresses to.
fn chunk_offsets(plan: &ImagePlan, logical_lengths: &[u64]) -> Result<Vec<u64>> {
    let mut at = head_length(plan)?;
    let mut offsets = Vec::with_capacity(logical_lengths.len());
    for len in logical_lengths {
        offsets.push(at);
        at = at.checked_add(*len).ok_or_else(|| VhdError::invalid_argument(None, "image larger than 2^64 bytes"))?;
    }
    Ok(offsets)
}

/// The head's bytes: footer copy, header and the BAT pointing at every stored block of every chunk.
pub fn build_head(plan: &ImagePlan, chunks: &[(Vec<u64>, u64)]) -> Result<Vec<u8>> {
    if chunks.len() != plan.chunks.len() {
        return Err(VhdError::invalid_argument(
            None,
            format!("the head needs all {} chunks, got {}", plan.chunks.len(), chunks.len()),
        ));
    }
    let layout = sparse_layout(plan.virtual_size, IMAGE_BLOCK_SIZE)?;
    let lengths: Vec<u64> = chunks.iter().map(|(_, len)| *len).collect();
    let offsets = chunk_offsets(plan, &lengths)?;
    let span = bitmap_size(IMAGE_BLOCK_SIZE) + BLOCK;
    let mut bat = vec![0xFFu8; usize::try_from(layout.table_bytes).unwrap_or(0)];
    for ((stored, _), chunk_offset) in chunks.iter().zip(offsets) {
        for (i, block) in stored.iter().enumerate() {
            let at = chunk_offset + u64::try_from(i).unwrap_or(0) * span;
            let sector = u32::try_from(at / SECTOR_SIZE)
                .map_err(|_| VhdError::invalid_argument(None, "image too large for a VHD's 32-bit BAT"))?;
            let entry = usize::try_from(*block).unwrap_or(usize::MAX).saturating_mul(4);
            let slot = bat.get_mut(entry..entry + 4).ok_or_else(|| {
                VhdError::invalid_argument(None, format!("stored block {block} is past the image's BAT"))
            })?;
            slot.copy_from_slice(&sector.to_be_bytes());
        }
    }
    let mut header = new_header(&layout, IMAGE_BLOCK_SIZE);
    header.seal();
    let mut head = Vec::with_capacity(usize::try_from(layout.table_offset + layout.table_bytes).unwrap_or(0));
    head.extend_from_slice(&footer_of(plan));
    head.extend_from_slice(header.as_bytes());
    head.extend_from_slice(&bat);
    Ok(head)
}

pub fn compress_head(plan: &ImagePlan, chunks: &[(Vec<u64>, u64)], level: i32) -> Result<ChunkFrame> {
    let head = build_head(plan, chunks)?;
    let frame = compress_frame(&head, level, &mut Vec::new())?;
    Ok(ChunkFrame::new(usize::MAX, &head, frame, Vec::new(), 0))
}

/// Compresses every chunk on all cores and hands the frames to `place` in chunk order, as they become ready, so
/// writing overlaps compressing. Workers take chunks in order, so at most a few frames wait to be placed.
/// Returns false when `place` asked to stop.
fn compress_in_order<S: LayerSource>(
    src: &S,
    plan: &ImagePlan,
    level: i32,
    place: &mut dyn FnMut(ChunkFrame) -> Result<bool>,
) -> Result<bool> {
    let workers = rayon::current_num_threads().clamp(1, plan.chunks.len().max(1));
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<ChunkFrame>>(workers);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, stop) = (&next, &stop);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(chunk) = plan.chunks.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                    if tx.send(compress_chunk(src, plan, chunk, level)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut waiting: BTreeMap<usize, ChunkFrame> = BTreeMap::new();
        let mut wanted = 0usize;
        let outcome = (|| {
            for frame in rx.iter() {
                let frame = frame?;
                waiting.insert(frame.index, frame);
                while let Some(frame) = waiting.remove(&wanted) {
                    wanted += 1;
                    if !place(frame)? {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        })();
        // Whatever happened, let the workers finish their current chunk and leave.
        stop.store(true, Ordering::Relaxed);
        drop(rx);
        outcome
    })
}

#[derive(Debug, Clone)]
pub struct ImageStats {
    pub level: i32,
    pub virtual_size: u64,
    /// Bytes of the decompressed image (the dynamic VHD).
    pub image_bytes: u64,
    /// Bytes of the compressed image file.
    pub compressed_bytes: u64,
    /// Disk bytes stored (non-zero 2 MiB blocks).
    pub data_bytes: u64,
    pub read_bytes: u64,
    pub head: ChunkFrame,
    /// The chunks, in order, without their frame bytes.
    pub chunks: Vec<ChunkFrame>,
    pub seconds: f64,
}

/// Compresses the whole chain into `out` in this process: chunks in parallel, frames written in order.
/// The head frame goes first; the room kept for it is closed by a skippable frame.
pub fn compress_image(
    chain: &Chain,
    plan: &ImagePlan,
    level: i32,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<ImageStats> {
    let started = Instant::now();
    let head_len = usize::try_from(head_length(plan)?).unwrap_or(usize::MAX);
    let reserved = u64::try_from(zstd::zstd_safe::compress_bound(head_len)).unwrap_or(u64::MAX) + 64;
    let target = Target::staged(out)?;
    let result = (|| {
        let write = |buf: &[u8], at: u64| target.write_at(buf, at);
        let mut at = reserved;
        let mut chunks: Vec<ChunkFrame> = Vec::with_capacity(plan.chunks.len());
        let mut done_virtual = 0u64;
        let mut place = |mut frame: ChunkFrame| -> Result<bool> {
            write(&frame.frame, at)?;
            frame.object_offset = Some(at);
            at += u64::try_from(frame.frame.len()).unwrap_or(0);
            done_virtual += frame.virtual_bytes;
            frame.frame = Vec::new();
            chunks.push(frame);
            Ok(progress(done_virtual, plan.virtual_size))
        };
        if !compress_in_order(chain, plan, level, &mut place)? {
            return Err(VhdError::Interrupted { path: chain.leaf().path.clone() });
        }
        let summary: Vec<(Vec<u64>, u64)> = chunks.iter().map(|c| (c.stored_blocks.clone(), c.logical_bytes)).collect();
        let head = compress_head(plan, &summary, level)?;
        let head_size = u64::try_from(head.frame.len()).unwrap_or(u64::MAX);
        let gap = reserved
            .checked_sub(head_size + 8)
            .ok_or_else(|| VhdError::invalid_argument(None, "head frame larger than its reserved room"))?;
        let mut head = head;
        head.object_offset = Some(0);
        write(&head.frame, 0)?;
        let mut skippable = SKIPPABLE_MAGIC.to_le_bytes().to_vec();
        skippable.extend_from_slice(&u32::try_from(gap).unwrap_or(0).to_le_bytes());
        write(&skippable, head_size)?;
        target.file().set_len(at).map_err(|e| VhdError::io(target.path(), "extend", e))?;
        let image_bytes = u64::try_from(head_len).unwrap_or(0) + chunks.iter().map(|c| c.logical_bytes).sum::<u64>();
        let data_bytes = chunks.iter().map(|c| u64::try_from(c.stored_blocks.len()).unwrap_or(0)).sum::<u64>() * BLOCK;
        Ok(ImageStats {
            level,
            virtual_size: plan.virtual_size,
            image_bytes,
            compressed_bytes: at,
            data_bytes: data_bytes.min(plan.virtual_size),
            read_bytes: chunks.iter().map(|c| c.read_bytes).sum(),
            head,
            chunks,
            seconds: 0.0,
        })
    })();
    let mut stats = target.complete(result)?;
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}
