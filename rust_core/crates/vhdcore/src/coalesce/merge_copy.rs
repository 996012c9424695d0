//! Coalescing where files cannot change (object storage): a read-only layer C is merged into its parent B by
//! writing a new layer B' = B with C's sectors, never touching B or C. B' keeps B's layout, so most of it is B's
//! bytes unchanged (an object store copies those ranges itself, e.g. S3's UploadPartCopy); only the footer, the
//! BAT, the blocks both hold (merged) and C's other blocks (appended) are new. B' takes C's UUID and timestamp, so
//! C's child reads B' as its parent without being rewritten; B' keeps B's parent.
//!
//! [`merge_layout`] says what B' is made of, in file order; [`merged_block`] computes one new block's bytes when it
//! is written, so memory stays at one block whatever the layers' sizes.

use zerocopy::IntoBytes;

use crate::disk::{Disk, Sparse};
use crate::error::{Result, VhdError};
use crate::format::{DiskType, FOOTER_SIZE, SECTOR_SIZE};

/// One piece of the merged layer, at `offset` in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeSegment {
    /// The parent's bytes at the same offset, unchanged.
    Copy { offset: u64, length: u64 },
    /// New bytes: the footer (and its copy at 0) and the BAT.
    Bytes { offset: u64, data: Vec<u8> },
    /// Block `index` (bitmap then data), computed by [`merged_block`].
    Block { offset: u64, index: u64, length: u64 },
}

impl MergeSegment {
    pub fn offset(&self) -> u64 {
        match self {
            MergeSegment::Copy { offset, .. }
            | MergeSegment::Bytes { offset, .. }
            | MergeSegment::Block { offset, .. } => *offset,
        }
    }

    pub fn length(&self) -> u64 {
        match self {
            MergeSegment::Copy { length, .. } | MergeSegment::Block { length, .. } => *length,
            MergeSegment::Bytes { data, .. } => u64::try_from(data.len()).unwrap_or(u64::MAX),
        }
    }
}

/// What the merged layer is made of: segments covering `[0, size)` in order, without gaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeLayout {
    pub size: u64,
    pub segments: Vec<MergeSegment>,
    /// The merged layer's identity: the merged child's UUID.
    pub uuid: [u8; 16],
    /// Blocks the child adds to the parent, and blocks both hold (merged), in bytes of data.
    pub added_bytes: u64,
    pub merged_bytes: u64,
}

fn sparse_of(disk: &Disk) -> Result<&Sparse> {
    disk.sparse.as_ref().ok_or_else(|| {
        VhdError::invalid_argument(Some(&disk.path), format!("{} is not a sparse disk", disk.path.display()))
    })
}

/// Checks that `layer` is a differencing child of `parent` with the same shape.
fn check_pair<'a>(parent: &'a Disk, layer: &'a Disk) -> Result<(&'a Sparse, &'a Sparse)> {
    let (ps, ls) = (sparse_of(parent)?, sparse_of(layer)?);
    if layer.disk_type != DiskType::Differencing || layer.parent_uuid() != Some(parent.uuid()) {
        return Err(VhdError::invalid_argument(
            Some(&layer.path),
            format!("{} is not a differencing child of {}", layer.path.display(), parent.path.display()),
        ));
    }
    if ps.block_size != ls.block_size || parent.virtual_size != layer.virtual_size {
        return Err(VhdError::invalid_argument(
            Some(&layer.path),
            format!(
                "{} ({} bytes, blocks of {}) and its parent {} ({} bytes, blocks of {}) differ in shape",
                layer.path.display(),
                layer.virtual_size,
                ls.block_size,
                parent.path.display(),
                parent.virtual_size,
                ps.block_size
            ),
        ));
    }
    Ok((ps, ls))
}

/// The layout of `parent` with its child `layer` merged in (see the module's documentation).
pub fn merge_layout(parent: &Disk, layer: &Disk) -> Result<MergeLayout> {
    let (ps, ls) = check_pair(parent, layer)?;
    let span = ps.bitmap_size + u64::from(ps.block_size);
    let too_large = || VhdError::invalid_argument(Some(&parent.path), "the merged layer is too large for a VHD");
    // New blocks go after the parent's last byte of data, where its footer was.
    let data_end = parent.footer_offset.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    let mut table =
        vec![0u8; usize::try_from(u64::from(ps.header.max_table_entries.get()) * 4).map_err(|_| too_large())?];
    parent.read_exact_at(&mut table, ps.table_offset)?;
    let mut patches: Vec<MergeSegment> = Vec::new();
    let mut appended: Vec<MergeSegment> = Vec::new();
    let (mut added_bytes, mut merged_bytes) = (0u64, 0u64);
    let mut next = data_end;
    for &index in &ls.allocated {
        let index = u64::from(index);
        match ps.block_offset(index) {
            Some(at) => {
                patches.push(MergeSegment::Block { offset: at, index, length: span });
                merged_bytes = merged_bytes.checked_add(u64::from(ps.block_size)).ok_or_else(too_large)?;
            }
            None => {
                let sector = u32::try_from(next / SECTOR_SIZE).map_err(|_| too_large())?;
                let entry = usize::try_from(index * 4).map_err(|_| too_large())?;
                let slot = table.get_mut(entry..entry + 4).ok_or_else(too_large)?;
                slot.copy_from_slice(&sector.to_be_bytes());
                appended.push(MergeSegment::Block { offset: next, index, length: span });
                next = next.checked_add(span).ok_or_else(too_large)?;
                added_bytes = added_bytes.checked_add(u64::from(ps.block_size)).ok_or_else(too_large)?;
            }
        }
    }
    let mut footer = parent.footer.clone();
    footer.unique_id = layer.uuid();
    footer.timestamp.set(layer.footer.timestamp.get());
    footer.seal();
    let footer_bytes = footer.as_bytes().to_vec();
    patches.push(MergeSegment::Bytes { offset: ps.table_offset, data: table });
    if ps.header_offset >= FOOTER_SIZE {
        patches.push(MergeSegment::Bytes { offset: 0, data: footer_bytes.clone() });
    }
    patches.sort_by_key(MergeSegment::offset);
    // The parent's bytes between the patches are copied; its footer (and anything past its data) is not.
    let mut segments = Vec::with_capacity(patches.len() * 2 + appended.len() + 1);
    let mut at = 0u64;
    for patch in patches {
        if patch.offset() < at {
            return Err(VhdError::invalid_argument(
                Some(&parent.path),
                format!(
                    "{}: the block or table at {} overlaps what precedes it",
                    parent.path.display(),
                    patch.offset()
                ),
            ));
        }
        if patch.offset() > at {
            segments.push(MergeSegment::Copy { offset: at, length: patch.offset() - at });
        }
        at = patch.offset() + patch.length();
        segments.push(patch);
    }
    if data_end > at {
        segments.push(MergeSegment::Copy { offset: at, length: data_end - at });
    }
    segments.extend(appended);
    segments.push(MergeSegment::Bytes { offset: next, data: footer_bytes });
    let size = next.checked_add(FOOTER_SIZE).ok_or_else(too_large)?;
    Ok(MergeLayout { size, segments, uuid: layer.uuid(), added_bytes, merged_bytes })
}

/// The merged layer's block `index`: the parent's sectors overlaid with the child's, bitmap then data. A dynamic
/// parent's block is all data (sectors neither holds are zeros); a differencing parent's keeps both bitmaps' bits.
pub fn merged_block(parent: &Disk, layer: &Disk, index: u64) -> Result<Vec<u8>> {
    let (ps, ls) = check_pair(parent, layer)?;
    let bitmap_len = usize::try_from(ps.bitmap_size).unwrap_or(usize::MAX);
    let span = usize::try_from(ps.bitmap_size + u64::from(ps.block_size)).unwrap_or(usize::MAX);
    let layer_at = ls.block_offset(index).ok_or_else(|| {
        VhdError::invalid_argument(
            Some(&layer.path),
            format!("block {index} is not allocated in {}", layer.path.display()),
        )
    })?;
    let mut child = vec![0u8; span];
    layer.read_exact_at(&mut child, layer_at)?;
    let mut out = vec![0u8; span];
    if let Some(at) = ps.block_offset(index) {
        parent.read_exact_at(&mut out, at)?;
    }
    let (out_bits, out_data) = out.split_at_mut(bitmap_len);
    let (child_bits, child_data) = child.split_at(bitmap_len);
    if parent.disk_type == DiskType::Dynamic {
        out_bits.fill(0xFF);
    } else {
        out_bits.iter_mut().zip(child_bits).for_each(|(o, c)| *o |= c);
    }
    let sector = usize::try_from(SECTOR_SIZE).unwrap_or(512);
    for (i, (dst, src)) in out_data.chunks_mut(sector).zip(child_data.chunks(sector)).enumerate() {
        if child_bits.get(i / 8).is_some_and(|byte| byte & (0x80 >> (i % 8)) != 0) {
            dst.copy_from_slice(src);
        }
    }
    Ok(out)
}
