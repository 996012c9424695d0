//! The image: a dynamic VHD of the flattened chain (2 MiB blocks, all-zero and unallocated blocks left out),
//! compressed as one independent zstd frame per chunk plus a small head frame (footer copy, header, BAT).
//!
//! Logical layout of the decompressed image:
//! `[footer copy][header][BAT] [chunk 0 blocks] [chunk 1 blocks] ... [last chunk blocks][footer]`, where each stored
//! block is a 512-byte all-present bitmap and 2 MiB of data. A chunk's bytes depend only on its own plan, so chunks
//! are built and compressed anywhere, in any order; the head, which holds the BAT, is built last from their results.
//!
//! Each frame is made by `frame_encoder` (zstd at the requested level, content size and checksum, early abort of
//! incompressible pieces at every positive level, see `early_abort`); a worker keeps its buffers and zstd context from
//! chunk to chunk and hashes each stored block right after reading it.
//!
//! A chunk's digest ([`ChunkDigest`]) is the sha256 of the bytes its frame decompresses to, or the digest of its
//! *disk content* (the flattened disk's bytes in its range, zeros included): the sha256 of the sha256 digests of its
//! 2 MiB slices ([`CONTENT_LEAF`], the last may be shorter), in order. The leaves let a slice that is all zeros,
//! which is most of a sparse disk, be known by a remembered digest instead of hashed (hashing every zero byte dominated
//! the imaging of large sparse disks; see `bench/README.md`). The content digests of all chunks, in order,
//! hashed together make a tree hash of the whole disk that needs no second read of it (on a raw disk:
//! `split -b 2M --filter=sha256sum disk.raw | cut -c1-64 | xxd -r -p | split -b 1024 --filter=sha256sum | cut -c1-64
//! | xxd -r -p | sha256sum`, 1024 being 32 bytes per leaf of a 64 MiB chunk), while zstd's content checksum already
//! guards each frame's decompressed bytes.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Mutex;
use std::time::Instant;

use sha2::{Digest, Sha256};
use zerocopy::IntoBytes;

use crate::chain::resolve::LayerSource;
use crate::chain::Chain;
use crate::error::{Result, VhdError};
use crate::format::layout::{new_footer_at, new_header, sparse_layout};
use crate::format::{bitmap_size, DiskType, SECTOR_SIZE};
use crate::image::direct_writer::AppendWriter;
use crate::image::frame_encoder::FrameEncoder;
use crate::image::plan::{clip, covered, ChunkPlan, FetchedChunk, ImagePlan, IMAGE_BLOCK_SIZE};
use crate::io::{is_zero, Target};

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
    /// Hex sha256 of those decompressed bytes (with [`ChunkDigest::Image`]).
    pub sha256: Option<String>,
    /// Hex digest of the chunk's disk content (with [`ChunkDigest::Content`]): the flattened disk's bytes in its
    /// range, zeros included, as a tree over its [`CONTENT_LEAF`] slices.
    pub content_sha256: Option<String>,
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
    /// The description of a compressed chunk whose frame bytes stay with the caller (`frame` is left empty).
    fn describe(
        index: usize,
        sha256: Option<[u8; 32]>,
        logical_bytes: usize,
        frame: &[u8],
        stored_blocks: Vec<u64>,
    ) -> Self {
        ChunkFrame {
            index,
            crc32c: crc32c::crc32c(frame),
            compressed_bytes: u64::try_from(frame.len()).unwrap_or(u64::MAX),
            object_offset: None,
            frame: Vec::new(),
            logical_bytes: u64::try_from(logical_bytes).unwrap_or(u64::MAX),
            sha256: sha256.as_ref().map(hex),
            content_sha256: None,
            stored_blocks,
            virtual_bytes: 0,
            read_bytes: 0,
        }
    }
}

fn hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
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
    let mut bytes = ChunkBytes { buf: std::mem::take(out), len: 0 };
    bytes.len = bytes.buf.len();
    let built = assemble_chunk(src, plan, chunk, &mut bytes, None, None);
    bytes.buf.truncate(bytes.len);
    *out = bytes.buf;
    built
}

/// A chunk's image bytes in a buffer reused from chunk to chunk: `buf` is only ever grown, so its bytes past `len`
/// are stale but initialised, and growing does not zero what is about to be overwritten anyway.
#[derive(Default)]
struct ChunkBytes {
    buf: Vec<u8>,
    len: usize,
}

impl ChunkBytes {
    fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The next `n` bytes, appended (their content is stale: the caller overwrites all of them).
    fn grow(&mut self, n: usize) -> &mut [u8] {
        let end = self.len + n;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        let start = self.len;
        self.len = end;
        &mut self.buf[start..end]
    }
}

/// Appends chunk `chunk`'s image bytes to `out`, feeding each stored block to `hasher` and the chunk's disk content
/// to `content` while they are still in cache; returns the image blocks it stored.
fn assemble_chunk<S: LayerSource>(
    src: &S,
    plan: &ImagePlan,
    chunk: &ChunkPlan,
    out: &mut ChunkBytes,
    mut hasher: Option<&mut Sha256>,
    mut content: Option<&mut Sha256>,
) -> Result<Vec<u64>> {
    let bitmap_len = usize::try_from(bitmap_size(IMAGE_BLOCK_SIZE)).unwrap_or(0);
    let end = chunk.start + chunk.length;
    let mut stored = Vec::new();
    let mut at = chunk.start;
    while at < end {
        let block_end = (at + BLOCK).min(end);
        let untouched = chunk.unallocated.iter().any(|(s, l)| *s <= at && block_end <= s + l)
            || covered(&chunk.free, at, block_end);
        if untouched {
            if let Some(content) = content.as_deref_mut() {
                content.update(zero_digest(block_end - at));
            }
        } else {
            let data_len = usize::try_from(block_end - at).unwrap_or(0);
            let block_len = usize::try_from(BLOCK).unwrap_or(0);
            let base = out.len;
            let slot = out.grow(bitmap_len + block_len);
            let (bitmap, data) = slot.split_at_mut(bitmap_len);
            let (data, padding) = data.split_at_mut(data_len);
            bitmap.fill(0xFF);
            // Hashed piece by piece as read, while in cache. Both hashes start at the block's first non-zero piece
            // (the bitmap and the zeros before it are hashed then), so an all-zero block, left out of the image and
            // known by its remembered content leaf, is never hashed.
            let mut zeros_before = 0usize;
            let mut nonzero = false;
            let mut leaf = content.is_some().then(Sha256::new);
            let free_here = clip(&chunk.free, at, block_end);
            let mut visit = |piece: &[u8]| -> Result<()> {
                if !nonzero {
                    if is_zero(piece) {
                        zeros_before += piece.len();
                        return Ok(());
                    }
                    nonzero = true;
                    let zeros = u64::try_from(zeros_before).unwrap_or(0);
                    if let Some(hasher) = hasher.as_deref_mut() {
                        hasher.update(&*bitmap);
                        hash_zeros(hasher, zeros);
                    }
                    if let Some(leaf) = leaf.as_mut() {
                        hash_zeros(leaf, zeros);
                    }
                }
                if let Some(hasher) = hasher.as_deref_mut() {
                    hasher.update(piece);
                }
                if let Some(leaf) = leaf.as_mut() {
                    leaf.update(piece);
                }
                Ok(())
            };
            if free_here.is_empty() {
                src.read_at_by(at, data, HASH_PIECE, &mut visit)?;
            } else {
                // Partly free (live-data imaging): the free bytes are stored, and hashed, as zeros.
                src.read_at_by(at, data, HASH_PIECE, &mut |_| Ok(()))?;
                for &(s, l) in &free_here {
                    let from = usize::try_from(s - at).unwrap_or(usize::MAX);
                    let to = usize::try_from(s - at + l).unwrap_or(usize::MAX);
                    if let Some(bytes) = data.get_mut(from..to) {
                        bytes.fill(0);
                    }
                }
                for piece in data.chunks(HASH_PIECE) {
                    visit(piece)?;
                }
            }
            if let (Some(content), Some(leaf)) = (content.as_deref_mut(), leaf) {
                let digest: [u8; 32] = if nonzero { leaf.finalize().into() } else { zero_digest(block_end - at) };
                content.update(digest);
            }
            if nonzero {
                padding.fill(0);
                if let Some(hasher) = hasher.as_deref_mut() {
                    hasher.update(&*padding);
                }
                stored.push(at / BLOCK);
            } else {
                out.len = base;
            }
        }
        at = block_end;
    }
    if end == plan.virtual_size {
        let footer = footer_of(plan);
        out.grow(footer.len()).copy_from_slice(&footer);
        if let Some(hasher) = hasher {
            hasher.update(footer);
        }
    }
    Ok(stored)
}

/// Bytes of a block read and hashed at a time: well inside a core's L2 cache.
const HASH_PIECE: usize = 256 * 1024;

/// Feeds `n` zero bytes to `hasher`.
fn hash_zeros(hasher: &mut Sha256, mut n: u64) {
    while n > 0 {
        let take = n.min(BLOCK);
        hasher.update(&ZERO_BLOCK[..usize::try_from(take).unwrap_or(0)]);
        n -= take;
    }
}

/// Zeros to hash as the content no layer holds: one image block's worth, in the binary's zeroed data.
static ZERO_BLOCK: [u8; BLOCK_BYTES] = [0; BLOCK_BYTES];
const BLOCK_BYTES: usize = IMAGE_BLOCK_SIZE as usize;

/// Bytes of disk content under one leaf of a chunk's content digest (see the module's documentation).
pub const CONTENT_LEAF: u64 = BLOCK;

/// The sha256 of `length` zero bytes, remembered per length (a disk has one or two lengths of zero leaves).
fn zero_digest(length: u64) -> [u8; 32] {
    remembered(&ZERO_LEAVES, length, || {
        let mut hasher = Sha256::new();
        hash_zeros(&mut hasher, length);
        hasher.finalize().into()
    })
}

/// The content digest of a chunk of `length` bytes that no layer holds anything of: the sha256 of its zero leaves'
/// digests (remembered per length, since a sparse disk has many such chunks, all of one or two lengths).
fn zero_chunk_digest(length: u64) -> [u8; 32] {
    remembered(&ZERO_CHUNKS, length, || {
        let mut tree = Sha256::new();
        let mut left = length;
        while left > 0 {
            let leaf = left.min(CONTENT_LEAF);
            tree.update(zero_digest(leaf));
            left -= leaf;
        }
        tree.finalize().into()
    })
}

type Remembered = Mutex<Vec<(u64, [u8; 32])>>;
static ZERO_LEAVES: Remembered = Mutex::new(Vec::new());
static ZERO_CHUNKS: Remembered = Mutex::new(Vec::new());

fn remembered(known: &Remembered, length: u64, make: impl FnOnce() -> [u8; 32]) -> [u8; 32] {
    let mut known = known.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, digest)) = known.iter().find(|(len, _)| *len == length) {
        return *digest;
    }
    let digest = make();
    known.push((length, digest));
    digest
}

/// A worker's reusable state: the chunk's image bytes, its frame, and the zstd context (kept for its level).
#[derive(Default)]
struct Scratch {
    logical: ChunkBytes,
    frame: Vec<u8>,
    encoder: Option<FrameEncoder>,
}

/// The context in `slot`, made anew when there is none yet or it is for another level.
pub(crate) fn encoder_for(slot: &mut Option<FrameEncoder>, level: i32) -> Result<&mut FrameEncoder> {
    if slot.as_ref().is_none_or(|e| e.level() != level) {
        *slot = Some(FrameEncoder::new(level)?);
    }
    slot.as_mut().ok_or_else(|| VhdError::invalid_argument(None, "zstd context missing"))
}

impl Scratch {
    /// Builds and compresses `chunk`; the frame is left in `self.frame`, the result describes it.
    fn compress<S: LayerSource>(
        &mut self,
        src: &S,
        plan: &ImagePlan,
        chunk: &ChunkPlan,
        level: i32,
        digest: ChunkDigest,
    ) -> Result<ChunkFrame> {
        self.logical.len = 0;
        let mut image = (digest == ChunkDigest::Image).then(Sha256::new);
        let nothing_allocated = chunk.reads.is_empty();
        let mut content = (digest == ChunkDigest::Content && !nothing_allocated).then(Sha256::new);
        let stored = assemble_chunk(src, plan, chunk, &mut self.logical, image.as_mut(), content.as_mut())?;
        let encoder = encoder_for(&mut self.encoder, level)?;
        encoder.compress(self.logical.as_slice(), &mut self.frame)?;
        let mut result = ChunkFrame::describe(
            chunk.index,
            image.map(|h| h.finalize().into()),
            self.logical.len,
            &self.frame,
            stored,
        );
        result.virtual_bytes = chunk.length;
        result.read_bytes = chunk.read_bytes();
        if digest == ChunkDigest::Content {
            let digest = content.map_or_else(|| zero_chunk_digest(chunk.length), |tree| tree.finalize().into());
            result.content_sha256 = Some(hex(&digest));
        }
        Ok(result)
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Which sha256 a compressed chunk carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChunkDigest {
    /// Of the bytes its frame decompresses to.
    #[default]
    Image,
    /// Of its disk content: the flattened disk's bytes in the chunk's range, zeros included, as a tree over its
    /// [`CONTENT_LEAF`] slices (see the module's documentation).
    Content,
}

/// Builds and compresses one chunk from any layer source.
pub fn compress_chunk<S: LayerSource>(
    src: &S,
    plan: &ImagePlan,
    chunk: &ChunkPlan,
    level: i32,
    digest: ChunkDigest,
) -> Result<ChunkFrame> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let mut result = scratch.compress(src, plan, chunk, level, digest)?;
        result.frame = scratch.frame.clone();
        Ok(result)
    })
}

/// A worker's whole job: its chunk plan and the bytes of its reads in, the compressed frame out.
pub fn compress_fetched_chunk(
    plan: &ImagePlan,
    index: usize,
    data: &[Vec<u8>],
    level: i32,
    digest: ChunkDigest,
) -> Result<ChunkFrame> {
    plan.validate()?;
    let chunk = plan.chunk(index)?;
    let source = FetchedChunk::new(plan, chunk, data)?;
    compress_chunk(&source, plan, chunk, level, digest)
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
    let mut frame = Vec::new();
    FrameEncoder::new(level)?.compress(&head, &mut frame)?;
    let mut result =
        ChunkFrame::describe(usize::MAX, Some(Sha256::digest(&head).into()), head.len(), &frame, Vec::new());
    result.frame = frame;
    Ok(result)
}

/// Frame buffers handed back by the writer, for the workers' next frames (no fresh allocation per chunk).
#[derive(Default)]
struct SparePool(Mutex<Vec<Vec<u8>>>);

impl SparePool {
    fn take(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop().unwrap_or_default()
    }

    fn give(&self, buffer: Vec<u8>) {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(buffer);
    }
}

/// Asks the kernel to start reading `chunk`'s source ranges now (`posix_fadvise` WILLNEED), so the block-by-block
/// reads that follow find them in the page cache instead of waiting on the disk one small read at a time (measured:
/// most of a loaded machine's wall time on a depth-3 chain whose layers had partly left the cache). A layer read
/// through another source than a file gets no hint.
pub fn prefetch(chain: &Chain, chunk: &ChunkPlan) {
    use std::os::fd::AsRawFd;
    for read in &chunk.reads {
        let Some(file) = chain.layers.get(read.layer).and_then(|layer| layer.source.file()) else { continue };
        let (Ok(offset), Ok(length)) = (libc::off_t::try_from(read.file_offset), libc::off_t::try_from(read.length))
        else {
            continue;
        };
        // SAFETY: an advisory call on a descriptor the chain keeps open; a failure only means no prefetch.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, length, libc::POSIX_FADV_WILLNEED) };
    }
}

/// Compresses every chunk on all cores and writes the frames in chunk order from the calling thread as they
/// become ready, so writing overlaps compressing; `done` sees each chunk, with its offset, once written.
/// One writer, because ext4 serialises buffered writes to one file (the inode lock): workers writing themselves
/// measured slower, each waiting on the other's copy. Workers take chunks in order, so few frames wait.
/// Returns the end of the last frame, or None when `done` asked to stop.
#[allow(clippy::too_many_arguments)]
fn compress_and_place<S: LayerSource>(
    src: &S,
    plan: &ImagePlan,
    chunks: &[ChunkPlan],
    level: i32,
    digest: ChunkDigest,
    target: &Target,
    first_offset: u64,
    sync_bytes: Option<u64>,
    prefetch: &(dyn Fn(&ChunkPlan) + Sync),
    done: &mut dyn FnMut(Placed) -> bool,
) -> Result<Option<u64>> {
    let workers = rayon::current_num_threads().clamp(1, chunks.len().max(1));
    let Some(first_index) = chunks.first().map(|chunk| chunk.index) else { return Ok(Some(first_offset)) };
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let spares = SparePool::default();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Compressed>(workers);
    let senders: Vec<SyncSender<Compressed>> = (0..workers).map(|_| tx.clone()).collect();
    drop(tx);
    let work = |tx: SyncSender<Compressed>| {
        while !stop.load(Ordering::Relaxed) {
            let index = next.fetch_add(1, Ordering::Relaxed);
            let Some(chunk) = chunks.get(index) else { break };
            // This chunk's reads, and the next one's, which the other worker takes soon.
            prefetch(chunk);
            if let Some(coming) = chunks.get(index + 1) {
                prefetch(coming);
            }
            let outcome = SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let frame = scratch.compress(src, plan, chunk, level, digest)?;
                let bytes = std::mem::replace(&mut scratch.frame, spares.take());
                Ok((frame, bytes))
            });
            if tx.send(outcome).is_err() {
                break;
            }
        }
    };
    with_workers(senders, &work, || {
        let mut waiting: BTreeMap<usize, (ChunkFrame, Vec<u8>)> = BTreeMap::new();
        let mut wanted = first_index;
        let mut at = first_offset;
        let mut synced_at = first_offset;
        let mut writer = AppendWriter::new(target, first_offset)?;
        let outcome = (|| {
            for ready in rx.iter() {
                let ready = ready?;
                waiting.insert(ready.0.index, ready);
                while let Some((mut frame, bytes)) = waiting.remove(&wanted) {
                    wanted += 1;
                    writer.append(&bytes)?;
                    spares.give(bytes);
                    frame.object_offset = Some(at);
                    at = at
                        .checked_add(frame.compressed_bytes)
                        .ok_or_else(|| VhdError::invalid_argument(None, "compressed image larger than 2^64 bytes"))?;
                    if !done(Placed::Written(frame)) {
                        return Ok(None);
                    }
                    if sync_bytes.is_some_and(|every| at - synced_at >= every) {
                        writer.sync()?;
                        synced_at = at;
                        if !done(Placed::Durable { end: at }) {
                            return Ok(None);
                        }
                    }
                }
            }
            Ok(Some(at))
        })();
        let outcome = match outcome {
            Ok(Some(_)) => writer.finish().map(Some),
            other => other,
        };
        // Whatever happened, let the workers finish their current chunk and leave.
        stop.store(true, Ordering::Relaxed);
        drop(rx);
        outcome
    })
}

/// A compressed chunk and its frame's bytes, from a worker to the writer.
type Compressed = Result<(ChunkFrame, Vec<u8>)>;

/// What the writer tells its caller, in order: each frame once written (with its offset), and, at sync points,
/// that every frame written so far, up to byte `end`, is on the device (`fdatasync` done).
#[derive(Debug)]
pub enum Placed {
    Written(ChunkFrame),
    Durable { end: u64 },
}

/// Room kept at the start of an image file for its head frame (footer copy, header, BAT), which is compressed
/// last: the worst case of its compressed size, plus room for the skippable frame that closes the gap.
pub fn head_room(plan: &ImagePlan) -> Result<u64> {
    let head_len = usize::try_from(head_length(plan)?)
        .map_err(|_| VhdError::invalid_argument(None, "the image head does not fit in memory"))?;
    u64::try_from(zstd::zstd_safe::compress_bound(head_len))
        .ok()
        .and_then(|bound| bound.checked_add(64))
        .ok_or_else(|| VhdError::invalid_argument(None, "the image head does not fit in memory"))
}

/// The head frame and the skippable frame that fills the rest of its room: the first `room` bytes of the image,
/// to be written at offset 0 (the skippable frame's payload is left as the file has it: zeros).
pub fn head_and_gap(head_frame: &[u8], room: u64) -> Result<Vec<u8>> {
    let head_size = u64::try_from(head_frame.len()).unwrap_or(u64::MAX);
    let gap = head_size
        .checked_add(8)
        .and_then(|used| room.checked_sub(used))
        .and_then(|gap| u32::try_from(gap).ok())
        .ok_or_else(|| VhdError::invalid_argument(None, "head frame larger than its reserved room"))?;
    let mut bytes = head_frame.to_vec();
    bytes.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    bytes.extend_from_slice(&gap.to_le_bytes());
    Ok(bytes)
}

/// Compresses chunks `first .. first + count` of `plan` on all cores into the existing file `out` (created when
/// missing, never truncated), their frames one after the other in chunk order from byte `offset`; the bytes before
/// `offset` are left as they are. This is how an image is written once, where it will live: a run resumed after a
/// crash starts after the last frame reported durable. `events` sees each frame once written, and
/// [`Placed::Durable`] every `sync_bytes` of output and at the end (returning false stops the run, which then
/// fails with [`VhdError::Interrupted`]). Returns the end of the last frame.
#[allow(clippy::too_many_arguments)]
pub fn compress_chunks_into(
    chain: &Chain,
    plan: &ImagePlan,
    first: usize,
    count: usize,
    level: i32,
    digest: ChunkDigest,
    out: &Path,
    offset: u64,
    sync_bytes: u64,
    events: &mut dyn FnMut(Placed) -> bool,
) -> Result<u64> {
    let end = first.checked_add(count).filter(|end| *end <= plan.chunks.len()).ok_or_else(|| {
        VhdError::invalid_argument(
            None,
            format!("chunks {first}+{count} are outside the plan's {} chunks", plan.chunks.len()),
        )
    })?;
    let chunks = plan.chunks.get(first..end).unwrap_or_default();
    let target = Target::in_place(out)?;
    let every = Some(sync_bytes.max(1));
    let placed = compress_and_place(
        chain,
        plan,
        chunks,
        level,
        digest,
        &target,
        offset,
        every,
        &|c| prefetch(chain, c),
        events,
    )?;
    let Some(at) = placed else {
        return Err(VhdError::Interrupted { path: chain.leaf().path.clone() });
    };
    target.file().sync_data().map_err(|e| VhdError::io(out, "sync", e))?;
    if !events(Placed::Durable { end: at }) {
        return Err(VhdError::Interrupted { path: chain.leaf().path.clone() });
    }
    Ok(at)
}

/// Runs `work` once per item on worker threads while `lead` runs on this thread, and returns what `lead` returns
/// once every worker is done. The workers are rayon's threads, which live as long as the process, so the scratch
/// they keep (buffers and zstd context, a few hundred MiB in all) is made once, not faulted in anew by every call;
/// but when this thread is itself one of rayon's, busy in `lead`, it could be the one the work waits for (a pool of
/// one thread would never start it), so the workers are then threads of their own.
fn with_workers<T: Send, R>(items: Vec<T>, work: &(dyn Fn(T) + Sync), lead: impl FnOnce() -> R) -> R {
    if rayon::current_thread_index().is_some() {
        std::thread::scope(|scope| {
            for item in items {
                scope.spawn(move || work(item));
            }
            lead()
        })
    } else {
        rayon::in_place_scope(|scope| {
            for item in items {
                scope.spawn(move |_| work(item));
            }
            lead()
        })
    }
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
    let head_len = head_length(plan)?;
    let reserved = head_room(plan)?;
    let target = Target::staged(out)?;
    let result = (|| {
        let mut chunks: Vec<ChunkFrame> = Vec::with_capacity(plan.chunks.len());
        let mut done_virtual = 0u64;
        let mut done = |placed: Placed| -> bool {
            let Placed::Written(frame) = placed else { return true };
            done_virtual += frame.virtual_bytes;
            chunks.push(frame);
            progress(done_virtual, plan.virtual_size)
        };
        let prefetch_chain = |c: &ChunkPlan| prefetch(chain, c);
        let Some(at) = compress_and_place(
            chain,
            plan,
            &plan.chunks,
            level,
            ChunkDigest::Image,
            &target,
            reserved,
            None,
            &prefetch_chain,
            &mut done,
        )?
        else {
            return Err(VhdError::Interrupted { path: chain.leaf().path.clone() });
        };
        let summary: Vec<(Vec<u64>, u64)> = chunks.iter().map(|c| (c.stored_blocks.clone(), c.logical_bytes)).collect();
        let mut head = compress_head(plan, &summary, level)?;
        head.object_offset = Some(0);
        target.write_at(&head_and_gap(&head.frame, reserved)?, 0)?;
        target.file().set_len(at).map_err(|e| VhdError::io(target.path(), "extend", e))?;
        let image_bytes = head_len + chunks.iter().map(|c| c.logical_bytes).sum::<u64>();
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
