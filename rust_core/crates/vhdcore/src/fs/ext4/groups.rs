//! Block groups: descriptors (32- or 64-byte), their checksums, where the superblock and descriptor backups live
//! (sparse_super, sparse_super2, meta_bg), and the metadata an uninitialised group holds.

use super::superblock::{
    Superblock, COMPAT_SPARSE_SUPER2, INCOMPAT_META_BG, RO_COMPAT_GDT_CSUM, RO_COMPAT_METADATA_CSUM,
    RO_COMPAT_SPARSE_SUPER,
};
use crate::fs::bytes::{crc16, crc32c_raw, le16, le32, slice};
use crate::fs::FsResult;

pub const BG_BLOCK_UNINIT: u16 = 0x2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: u64,
    pub flags: u16,
    pub bitmap_csum: u32,
}

impl Desc {
    pub fn parse(sb: &Superblock, raw: &[u8]) -> FsResult<Desc> {
        let wide = sb.desc_size >= 64;
        let hi = |off: usize| -> FsResult<u64> {
            if wide {
                Ok(u64::from(le32(raw, off)?) << 32)
            } else {
                Ok(0)
            }
        };
        let csum_hi = if wide { u32::from(le16(raw, 0x38)?) << 16 } else { 0 };
        Ok(Desc {
            block_bitmap: u64::from(le32(raw, 0x0)?) | hi(0x20)?,
            inode_bitmap: u64::from(le32(raw, 0x4)?) | hi(0x24)?,
            inode_table: u64::from(le32(raw, 0x8)?) | hi(0x28)?,
            flags: le16(raw, 0x12)?,
            bitmap_csum: u32::from(le16(raw, 0x18)?) | csum_hi,
        })
    }

    pub fn block_uninit(&self, sb: &Superblock) -> bool {
        // The kernel honours BLOCK_UNINIT only with group descriptor checksums.
        has_group_csum(sb) && self.flags & BG_BLOCK_UNINIT != 0
    }
}

pub fn has_group_csum(sb: &Superblock) -> bool {
    sb.has_ro_compat(RO_COMPAT_METADATA_CSUM) || sb.has_ro_compat(RO_COMPAT_GDT_CSUM)
}

/// Whether the descriptor `raw` of `group` carries a valid checksum (true when the filesystem has none).
pub fn desc_checksum_ok(sb: &Superblock, group: u64, raw: &[u8]) -> FsResult<bool> {
    let size = usize::try_from(sb.desc_size).unwrap_or(32);
    let raw = slice(raw, 0, size)?;
    let stored = le16(raw, 0x1E)?;
    let g = u32::try_from(group).unwrap_or(u32::MAX).to_le_bytes();
    if sb.has_ro_compat(RO_COMPAT_METADATA_CSUM) {
        let mut c = crc32c_raw(sb.csum_seed, &g);
        c = crc32c_raw(c, slice(raw, 0, 0x1E)?);
        c = crc32c_raw(c, &[0, 0]);
        c = crc32c_raw(c, slice(raw, 0x20, size - 0x20)?);
        Ok(stored == u16::try_from(c & 0xFFFF).unwrap_or(0))
    } else if sb.has_ro_compat(RO_COMPAT_GDT_CSUM) {
        let mut c = crc16(!0, &sb.uuid);
        c = crc16(c, &g);
        c = crc16(c, slice(raw, 0, 0x1E)?);
        if size > 0x20 {
            c = crc16(c, slice(raw, 0x20, size - 0x20)?);
        }
        Ok(stored == c)
    } else {
        Ok(true)
    }
}

/// Whether the block bitmap checksum (metadata_csum) matches.
pub fn bitmap_checksum_ok(sb: &Superblock, desc: &Desc, bitmap: &[u8]) -> bool {
    if !sb.has_ro_compat(RO_COMPAT_METADATA_CSUM) {
        return true;
    }
    let bytes = usize::try_from(sb.blocks_per_group / 8).unwrap_or(usize::MAX);
    let Some(data) = bitmap.get(..bytes) else { return false };
    let c = crc32c_raw(sb.csum_seed, data);
    if sb.desc_size >= 64 {
        c == desc.bitmap_csum
    } else {
        c & 0xFFFF == desc.bitmap_csum & 0xFFFF
    }
}

fn is_power_of(mut n: u64, base: u64) -> bool {
    if n == 0 {
        return false;
    }
    while n.is_multiple_of(base) {
        n /= base;
    }
    n == 1
}

/// Whether group `g` holds a superblock (primary or backup).
pub fn has_super(sb: &Superblock, g: u64) -> bool {
    if g == 0 {
        return true;
    }
    if sb.has_compat(COMPAT_SPARSE_SUPER2) {
        return sb.backup_bgs.iter().any(|&b| b != 0 && u64::from(b) == g);
    }
    if g <= 1 || !sb.has_ro_compat(RO_COMPAT_SPARSE_SUPER) {
        return true;
    }
    if g.is_multiple_of(2) {
        return false;
    }
    is_power_of(g, 3) || is_power_of(g, 5) || is_power_of(g, 7)
}

pub fn group_start(sb: &Superblock, g: u64) -> u64 {
    sb.first_data_block.saturating_add(g.saturating_mul(sb.blocks_per_group))
}

/// Blocks in group `g` (the last one may be short).
pub fn group_len(sb: &Superblock, g: u64) -> u64 {
    let start = group_start(sb, g);
    sb.blocks_per_group.min(sb.blocks_count.saturating_sub(start))
}

fn meta_bg_start(sb: &Superblock) -> Option<u64> {
    if sb.has_incompat(INCOMPAT_META_BG) {
        Some(sb.first_meta_bg.saturating_mul(sb.descs_per_block()))
    } else {
        None
    }
}

/// The block holding descriptor block `b` (the primary copy).
pub fn desc_block_location(sb: &Superblock, b: u64) -> u64 {
    match meta_bg_start(sb) {
        Some(_) if b >= sb.first_meta_bg => {
            let g = b.saturating_mul(sb.descs_per_block());
            group_start(sb, g).saturating_add(u64::from(has_super(sb, g)))
        }
        _ => sb.first_data_block.saturating_add(1).saturating_add(b),
    }
}

/// Blocks at the start of group `g` used by the superblock and descriptor copies (and reserved GDT blocks).
pub fn base_meta_blocks(sb: &Superblock, g: u64) -> u64 {
    let sup = u64::from(has_super(sb, g));
    match meta_bg_start(sb) {
        Some(start) if g >= start => {
            let dpb = sb.descs_per_block();
            let first = g / dpb * dpb;
            let last = first.saturating_add(dpb - 1);
            sup + u64::from(g == first || g == first + 1 || g == last)
        }
        meta => {
            if sup == 0 {
                return 0;
            }
            let gdt = if meta.is_some() { sb.first_meta_bg } else { sb.desc_blocks() };
            sup.saturating_add(gdt).saturating_add(sb.reserved_gdt_blocks)
        }
    }
}

/// Blocks of one group's inode table.
pub fn inode_table_blocks(sb: &Superblock) -> u64 {
    sb.inodes_per_group.saturating_mul(sb.inode_size).div_ceil(sb.block_size)
}
