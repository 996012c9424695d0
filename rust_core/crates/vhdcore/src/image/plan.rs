//! Chunk plans: the flattened disk cut into chunks, each with the source reads that hold its data, computed from
//! footers, headers and BATs alone. A worker with one chunk plan and the bytes of its reads builds that chunk,
//! in this process or on another machine reading the layers from object storage.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::chain::resolve::{LayerGeometry, LayerSource};
use crate::chain::Chain;
use crate::error::{Result, VhdError};
use crate::format::{DiskType, DEFAULT_BLOCK_SIZE};

pub const DEFAULT_CHUNK_SIZE: u64 = 64 * 1024 * 1024;
/// Block size of the image (a dynamic VHD): the size qemu, Hyper-V and XenServer all default to.
pub const IMAGE_BLOCK_SIZE: u32 = DEFAULT_BLOCK_SIZE;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanLayer {
    /// Where the layer was when planned; workers map it to their own storage.
    pub path: String,
    pub uuid: String,
    pub file_size: u64,
    pub geometry: LayerGeometry,
}

/// One contiguous read of a layer's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRead {
    pub layer: usize,
    pub file_offset: u64,
    pub length: u64,
    /// Sparse layers: the read holds whole blocks `first_block..first_block + blocks`, each bitmap then data.
    /// Fixed layers: `blocks` is 0 and the read holds the disk bytes at virtual offset `file_offset`.
    pub first_block: u64,
    pub blocks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkPlan {
    pub index: usize,
    /// Virtual byte range of the flattened disk.
    pub start: u64,
    pub length: u64,
    pub reads: Vec<SourceRead>,
    /// `(start, length)` ranges no layer has allocated: zeros, never read.
    pub unallocated: Vec<(u64, u64)>,
    /// `(start, length)` ranges a filesystem proves free (live-data imaging, [`Chain::plan_live`]): sorted, merged,
    /// inside the chunk; stored as zeros, and a layer block or image block wholly inside them is never read. Empty
    /// (and absent from the JSON) for a plan of every block.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub free: Vec<(u64, u64)>,
}

impl ChunkPlan {
    pub fn read_bytes(&self) -> u64 {
        self.reads.iter().map(|r| r.length).sum()
    }

    /// Bytes of the chunk a filesystem proves free (stored as zeros).
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|r| r.1).fold(0u64, u64::saturating_add)
    }
}

/// Whether `[start, end)` lies wholly inside one of `ranges` (sorted, merged `(start, length)`).
pub(crate) fn covered(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    let i = ranges.partition_point(|r| r.0.saturating_add(r.1) <= start);
    ranges.get(i).is_some_and(|r| r.0 <= start && r.0.saturating_add(r.1) >= end)
}

/// The parts of `ranges` (sorted, merged) inside `[start, end)`, clipped to it.
pub(crate) fn clip(ranges: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    let i = ranges.partition_point(|r| r.0.saturating_add(r.1) <= start);
    ranges
        .get(i..)
        .unwrap_or_default()
        .iter()
        .take_while(|r| r.0 < end)
        .filter_map(|r| {
            let (s, e) = (r.0.max(start), r.0.saturating_add(r.1).min(end));
            (e > s).then(|| (s, e - s))
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePlan {
    pub virtual_size: u64,
    pub chunk_size: u64,
    pub layers: Vec<PlanLayer>,
    pub chunks: Vec<ChunkPlan>,
    /// Identity of the image VHD, fixed here so every worker writes the same footer.
    pub image_uuid: [u8; 16],
    pub timestamp: u32,
}

impl ImagePlan {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| unreachable!("plans hold only plain data"))
    }

    pub fn from_json(text: &str) -> Result<ImagePlan> {
        let plan: ImagePlan = serde_json::from_str(text)
            .map_err(|e| VhdError::invalid_argument(None, format!("not a chunk plan: {e}")))?;
        plan.validate()?;
        Ok(plan)
    }

    /// Rejects a plan that would make a worker misbehave (it may come from another machine).
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(VhdError::invalid_argument(None, format!("invalid chunk plan: {what}")));
        if self.layers.is_empty() || self.virtual_size > crate::format::MAX_VIRTUAL_SIZE {
            return bad("no layers or virtual size too large".into());
        }
        if self.chunk_size == 0 || !self.chunk_size.is_multiple_of(u64::from(IMAGE_BLOCK_SIZE)) {
            return bad(format!("chunk size {} is not a multiple of {IMAGE_BLOCK_SIZE}", self.chunk_size));
        }
        for layer in &self.layers {
            let g = layer.geometry;
            let sparse = g.disk_type != DiskType::Fixed;
            if sparse
                && (!g.block_size.is_power_of_two()
                    || u64::from(g.block_size) > self.chunk_size
                    || g.bitmap_size != crate::format::bitmap_size(g.block_size))
            {
                return bad(format!(
                    "layer {} has block size {} and bitmap {}",
                    layer.path, g.block_size, g.bitmap_size
                ));
            }
        }
        for chunk in &self.chunks {
            let chunk_end = chunk.start.checked_add(chunk.length);
            let mut cursor = chunk.start;
            for &(s, l) in &chunk.free {
                let e = s.checked_add(l);
                if l == 0 || s < cursor || e.is_none() || e > chunk_end || s % 512 != 0 || l % 512 != 0 {
                    return bad(format!("chunk {} has a free range of {l} bytes at {s}", chunk.index));
                }
                cursor = e.unwrap_or(u64::MAX).saturating_add(1);
            }
            for read in &chunk.reads {
                let Some(layer) = self.layers.get(read.layer) else {
                    return bad(format!("chunk {} reads layer {}", chunk.index, read.layer));
                };
                let g = layer.geometry;
                let expected = if g.disk_type == DiskType::Fixed {
                    None
                } else {
                    read.blocks.checked_mul(g.bitmap_size + u64::from(g.block_size))
                };
                if expected.is_some_and(|e| e != read.length) || read.length > self.chunk_size.saturating_mul(2) {
                    return bad(format!("chunk {} has a read of {} bytes", chunk.index, read.length));
                }
            }
        }
        Ok(())
    }

    pub fn chunk(&self, index: usize) -> Result<&ChunkPlan> {
        self.chunks.get(index).ok_or_else(|| VhdError::invalid_argument(None, format!("the plan has no chunk {index}")))
    }
}

impl Chain {
    /// Cuts the flattened disk into chunks of `chunk_size` bytes (rounded up to a multiple of every block size).
    pub fn plan(&self, chunk_size: u64) -> Result<ImagePlan> {
        self.plan_with(chunk_size, &[])
    }

    /// [`Chain::plan`] of the live data only (DESIGN §5): the ranges `usage` proves free are stored as zeros (each
    /// chunk carries its part of them in [`ChunkPlan::free`]), and layer blocks and image blocks wholly inside them
    /// are left out of the reads. With nothing free the plan equals [`Chain::plan`]'s.
    pub fn plan_live(&self, chunk_size: u64, usage: &crate::fs::DiskUsage) -> Result<ImagePlan> {
        if usage.size != self.virtual_size() {
            return Err(VhdError::invalid_argument(
                None,
                format!("the disk usage is of a {}-byte disk, the chain is {}", usage.size, self.virtual_size()),
            ));
        }
        self.plan_with(chunk_size, &usage.free)
    }

    /// The plan, leaving out `free` (sorted, merged `(start, length)` ranges, 512-byte aligned).
    fn plan_with(&self, chunk_size: u64, free: &[(u64, u64)]) -> Result<ImagePlan> {
        let image_block = u64::from(IMAGE_BLOCK_SIZE);
        let largest_block = self.layers.iter().filter_map(|d| d.block_size()).max().unwrap_or(IMAGE_BLOCK_SIZE);
        let unit = u64::from(largest_block.max(IMAGE_BLOCK_SIZE));
        let chunk_size = chunk_size.max(1).div_ceil(unit) * unit;
        let size = self.virtual_size();
        let occupancy = self.occupancy();
        let layers: Vec<PlanLayer> = self
            .layers
            .iter()
            .map(|d| PlanLayer {
                path: d.path.display().to_string(),
                uuid: d.uuid_string(),
                file_size: d.file_size,
                geometry: d.geometry(),
            })
            .collect();
        let mut chunks = Vec::new();
        let mut start = 0u64;
        while start < size {
            let end = (start + chunk_size).min(size);
            let chunk_free = clip(free, start, end);
            let mut reads = Vec::new();
            for (index, disk) in self.layers.iter().enumerate() {
                let limit = disk.virtual_size.min(end);
                if start >= limit {
                    continue;
                }
                match &disk.sparse {
                    None if chunk_free.is_empty() => reads.push(SourceRead {
                        layer: index,
                        file_offset: start,
                        length: limit - start,
                        first_block: 0,
                        blocks: 0,
                    }),
                    // Fixed layer: the bytes of every image block not wholly free, in runs.
                    None => {
                        let mut at = start;
                        while at < limit {
                            let block_end = at.saturating_add(image_block).min(end);
                            let read_end = block_end.min(limit);
                            if !covered(&chunk_free, at, block_end) {
                                match reads.last_mut() {
                                    Some(r) if r.layer == index && r.file_offset.saturating_add(r.length) == at => {
                                        r.length += read_end - at;
                                    }
                                    _ => reads.push(SourceRead {
                                        layer: index,
                                        file_offset: at,
                                        length: read_end - at,
                                        first_block: 0,
                                        blocks: 0,
                                    }),
                                }
                            }
                            at = block_end;
                        }
                    }
                    Some(sparse) => {
                        let block = u64::from(sparse.block_size);
                        let span = sparse.bitmap_size + block;
                        let first = start / block;
                        let last = limit.div_ceil(block);
                        let from = sparse.allocated.partition_point(|b| u64::from(*b) < first);
                        for &b in sparse.allocated[from..].iter().take_while(|b| u64::from(**b) < last) {
                            let b = u64::from(b);
                            let Some(offset) = sparse.block_offset(b) else { continue };
                            let block_start = b.saturating_mul(block);
                            if covered(&chunk_free, block_start, block_start.saturating_add(block).min(size)) {
                                continue;
                            }
                            match reads.last_mut() {
                                // Adjacent blocks stored back to back become one read.
                                Some(SourceRead { layer, file_offset, length, first_block, blocks })
                                    if *layer == index
                                        && *first_block + *blocks == b
                                        && *file_offset + *length == offset =>
                                {
                                    *length += span;
                                    *blocks += 1;
                                }
                                _ => reads.push(SourceRead {
                                    layer: index,
                                    file_offset: offset,
                                    length: span,
                                    first_block: b,
                                    blocks: 1,
                                }),
                            }
                        }
                    }
                }
            }
            let mut unallocated = Vec::new();
            let mut cursor = start;
            let from = occupancy.ranges.partition_point(|(_, e)| *e <= start);
            for &(s, e) in occupancy.ranges[from..].iter().take_while(|(s, _)| *s < end) {
                if s > cursor {
                    unallocated.push((cursor, s - cursor));
                }
                cursor = cursor.max(e);
            }
            if cursor < end {
                unallocated.push((cursor, end - cursor));
            }
            chunks.push(ChunkPlan {
                index: chunks.len(),
                start,
                length: end - start,
                reads,
                unallocated,
                free: chunk_free,
            });
            start = end;
        }
        Ok(ImagePlan {
            virtual_size: size,
            chunk_size,
            layers,
            chunks,
            image_uuid: *uuid::Uuid::new_v4().as_bytes(),
            timestamp: crate::format::now_vhd_timestamp(),
        })
    }
}

/// The layers as one worker sees them: only the bytes its chunk plan asked for.
pub struct FetchedChunk<'a> {
    plan: &'a ImagePlan,
    chunk: &'a ChunkPlan,
    data: &'a [Vec<u8>],
    blocks: HashMap<(usize, u64), u64>,
}

impl<'a> FetchedChunk<'a> {
    /// `data[i]` must be the bytes of `chunk.reads[i]`.
    pub fn new(plan: &'a ImagePlan, chunk: &'a ChunkPlan, data: &'a [Vec<u8>]) -> Result<FetchedChunk<'a>> {
        if data.len() != chunk.reads.len() {
            return Err(VhdError::invalid_argument(
                None,
                format!("chunk {} has {} reads but {} buffers were given", chunk.index, chunk.reads.len(), data.len()),
            ));
        }
        let mut blocks = HashMap::new();
        for (read, bytes) in chunk.reads.iter().zip(data) {
            if u64::try_from(bytes.len()).ok() != Some(read.length) {
                return Err(VhdError::invalid_argument(
                    None,
                    format!(
                        "read of layer {} at offset {} should hold {} bytes, got {}",
                        read.layer,
                        read.file_offset,
                        read.length,
                        bytes.len()
                    ),
                ));
            }
            let geometry = plan.layers.get(read.layer).map(|l| l.geometry).ok_or_else(|| {
                VhdError::invalid_argument(None, format!("read names layer {} the plan lacks", read.layer))
            })?;
            let span = geometry.bitmap_size + u64::from(geometry.block_size);
            for i in 0..read.blocks {
                blocks.insert((read.layer, read.first_block + i), read.file_offset + i * span);
            }
        }
        Ok(FetchedChunk { plan, chunk, data, blocks })
    }
}

impl LayerSource for FetchedChunk<'_> {
    fn layer_count(&self) -> usize {
        self.plan.layers.len()
    }

    fn geometry(&self, layer: usize) -> LayerGeometry {
        self.plan.layers[layer].geometry
    }

    fn virtual_size(&self) -> u64 {
        self.plan.virtual_size
    }

    fn block_location(&self, layer: usize, index: u64) -> Option<u64> {
        self.blocks.get(&(layer, index)).copied()
    }

    fn read(&self, layer: usize, offset: u64, dst: &mut [u8]) -> Result<()> {
        let len = u64::try_from(dst.len()).unwrap_or(u64::MAX);
        let found = self.chunk.reads.iter().zip(self.data).find(|(r, _)| {
            r.layer == layer && r.file_offset <= offset && offset.saturating_add(len) <= r.file_offset + r.length
        });
        let Some((read, bytes)) = found else {
            return Err(VhdError::invalid_argument(
                None,
                format!("chunk {} needs {len} bytes of layer {layer} at {offset}, outside its reads", self.chunk.index),
            ));
        };
        let at = usize::try_from(offset - read.file_offset).unwrap_or(usize::MAX);
        dst.copy_from_slice(&bytes[at..at + dst.len()]);
        Ok(())
    }
}

impl crate::fs::DiskUsage {
    /// The usage as JSON (partitions with their decisions, the free ranges, the warnings), for manifests and the
    /// CLI; serialising plain data cannot fail.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| unreachable!("a disk usage holds only plain data"))
    }
}
