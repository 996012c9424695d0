//! The internal jbd2 journal: its inode's block map (extents or indirect blocks), its superblock, and a walk of the
//! log from `s_start`/`s_sequence` (with wrap-around) that lists, for every filesystem block, the journal blocks
//! holding a committed copy of it. The walk follows the kernel's recovery scan: it stops at the first block whose
//! magic or sequence is wrong, and a transaction counts only once its commit block is found. Checksums are not
//! required to continue (continuing only adds copies, which only adds used blocks).

use std::collections::HashMap;

use super::groups::Desc;
use super::superblock::Superblock;
use crate::fs::bytes::{be16, be32, crc32c_raw, le16, le32, slice, usize_of};
use crate::fs::{doubt, FsResult, Region};

pub const JBD2_MAGIC: u32 = 0xC03B_3998;
const BT_DESCRIPTOR: u32 = 1;
const BT_COMMIT: u32 = 2;
const BT_SB_V1: u32 = 3;
const BT_SB_V2: u32 = 4;
const BT_REVOKE: u32 = 5;

const INCOMPAT_REVOKE: u32 = 0x1;
const INCOMPAT_64BIT: u32 = 0x2;
const INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
const INCOMPAT_CSUM_V2: u32 = 0x8;
const INCOMPAT_CSUM_V3: u32 = 0x10;
pub const INCOMPAT_FAST_COMMIT: u32 = 0x20;
const INCOMPAT_KNOWN: u32 = INCOMPAT_REVOKE
    | INCOMPAT_64BIT
    | INCOMPAT_ASYNC_COMMIT
    | INCOMPAT_CSUM_V2
    | INCOMPAT_CSUM_V3
    | INCOMPAT_FAST_COMMIT;

const FLAG_ESCAPE: u16 = 1;
const FLAG_SAME_UUID: u16 = 2;
const FLAG_LAST_TAG: u16 = 8;

const EXTENTS_FL: u32 = 0x80000;
const EXTENT_MAGIC: u16 = 0xF30A;
const MAX_EXTENT_DEPTH: u16 = 5;
/// Journals longer than this many blocks are not believed (the kernel's maximum is 2^30 bytes at 1 KiB blocks).
const MAX_JOURNAL_BLOCKS: u64 = 1 << 21;

/// One run of the journal's block map: `(logical, physical, length)` in filesystem blocks.
pub type Run = (u64, u64, u64);

/// A committed copy of a filesystem block inside the journal.
#[derive(Debug, Clone, Copy)]
pub struct Copy {
    /// Byte offset of the copy in the partition.
    pub offset: u64,
    /// The first four bytes were the jbd2 magic and were zeroed in the log (JBD2_FLAG_ESCAPE).
    pub escaped: bool,
}

#[derive(Debug, Default)]
pub struct Journal {
    /// The journal's block map.
    pub runs: Vec<Run>,
    pub needs_recovery: bool,
    pub fast_commit: bool,
    /// Filesystem block -> its committed copies, oldest first.
    pub copies: HashMap<u64, Vec<Copy>>,
    pub transactions: u64,
}

impl Journal {
    /// Reads the copy `c` of a block, the escaped magic restored.
    pub fn read_copy(&self, region: &Region<'_>, c: Copy, block_size: usize) -> FsResult<Vec<u8>> {
        let mut buf = region.read_vec(c.offset, block_size)?;
        if c.escaped {
            if let Some(head) = buf.get_mut(..4) {
                head.copy_from_slice(&JBD2_MAGIC.to_be_bytes());
            }
        }
        Ok(buf)
    }
}

/// The inode `ino`'s raw bytes.
pub fn read_inode(region: &Region<'_>, sb: &Superblock, descs: &[Desc], ino: u64) -> FsResult<Vec<u8>> {
    if ino == 0 {
        return Err(doubt("inode 0"));
    }
    let group = (ino - 1) / sb.inodes_per_group;
    let index = (ino - 1) % sb.inodes_per_group;
    let desc = descs.get(usize_of(group, "inode group")?).ok_or_else(|| doubt(format!("inode {ino}: no group")))?;
    let at = desc
        .inode_table
        .checked_mul(sb.block_size)
        .and_then(|t| t.checked_add(index.checked_mul(sb.inode_size)?))
        .ok_or_else(|| doubt(format!("inode {ino} offset overflows")))?;
    let raw = region.read_vec(at, usize_of(sb.inode_size, "inode size")?)?;
    if sb.has_ro_compat(super::superblock::RO_COMPAT_METADATA_CSUM) && !inode_checksum_ok(sb, ino, &raw)? {
        return Err(doubt(format!("inode {ino} checksum does not match")));
    }
    Ok(raw)
}

/// The metadata_csum checksum of an inode (the kernel's `ext4_inode_csum`).
fn inode_checksum_ok(sb: &Superblock, ino: u64, raw: &[u8]) -> FsResult<bool> {
    const LO: usize = 0x7C;
    const HI: usize = 0x82;
    let ino32 = u32::try_from(ino).map_err(|_| doubt("inode number"))?;
    let mut c = crc32c_raw(sb.csum_seed, &ino32.to_le_bytes());
    c = crc32c_raw(c, &le32(raw, 0x64)?.to_le_bytes());
    c = crc32c_raw(c, slice(raw, 0, LO)?);
    c = crc32c_raw(c, &[0, 0]);
    c = crc32c_raw(c, slice(raw, LO + 2, 128 - LO - 2)?);
    let mut stored = u32::from(le16(raw, LO)?);
    let mut full = false;
    if raw.len() > 128 {
        let extra = usize::from(le16(raw, 0x80)?);
        c = crc32c_raw(c, slice(raw, 128, HI - 128)?);
        let mut off = HI;
        if 128 + extra >= HI + 2 {
            c = crc32c_raw(c, &[0, 0]);
            stored |= u32::from(le16(raw, HI)?) << 16;
            full = true;
            off += 2;
        }
        c = crc32c_raw(c, slice(raw, off, raw.len() - off)?);
    }
    Ok(if full { c == stored } else { c & 0xFFFF == stored })
}

fn push_run(runs: &mut Vec<Run>, logical: u64, physical: u64, len: u64) {
    if let Some(last) = runs.last_mut() {
        if last.0 + last.2 == logical && last.1 + last.2 == physical {
            last.2 += len;
            return;
        }
    }
    runs.push((logical, physical, len));
}

fn check_physical(sb: &Superblock, physical: u64, len: u64) -> FsResult<()> {
    match physical.checked_add(len) {
        Some(end) if physical >= sb.first_data_block && end <= sb.blocks_count => Ok(()),
        _ => Err(doubt(format!("journal block run {physical}+{len} is outside the filesystem"))),
    }
}

fn walk_extents(
    region: &Region<'_>,
    sb: &Superblock,
    node: &[u8],
    expect_depth: Option<u16>,
    runs: &mut Vec<Run>,
    budget: &mut u64,
) -> FsResult<()> {
    if le16(node, 0)? != EXTENT_MAGIC {
        return Err(doubt("journal inode: bad extent header magic"));
    }
    let entries = usize::from(le16(node, 2)?);
    let depth = le16(node, 6)?;
    if depth > MAX_EXTENT_DEPTH || expect_depth.is_some_and(|d| d != depth) {
        return Err(doubt(format!("journal inode: extent depth {depth}")));
    }
    if 12 + entries * 12 > node.len() {
        return Err(doubt("journal inode: extent entries overflow their node"));
    }
    for i in 0..entries {
        let e = 12 + i * 12;
        *budget = budget.checked_sub(1).ok_or_else(|| doubt("journal inode: too many extents"))?;
        if depth == 0 {
            let logical = u64::from(le32(node, e)?);
            let mut len = u64::from(le16(node, e + 4)?);
            if len > 32768 {
                len -= 32768;
            }
            let physical = (u64::from(le16(node, e + 6)?) << 32) | u64::from(le32(node, e + 8)?);
            check_physical(sb, physical, len)?;
            push_run(runs, logical, physical, len);
        } else {
            let child = (u64::from(le16(node, e + 8)?) << 32) | u64::from(le32(node, e + 4)?);
            check_physical(sb, child, 1)?;
            let at = child.checked_mul(sb.block_size).ok_or_else(|| doubt("extent node offset overflows"))?;
            let block = region.read_vec(at, usize_of(sb.block_size, "block size")?)?;
            walk_extents(region, sb, &block, Some(depth - 1), runs, budget)?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn walk_indirect(
    region: &Region<'_>,
    sb: &Superblock,
    block: u64,
    level: u32,
    next_logical: &mut u64,
    limit: u64,
    runs: &mut Vec<Run>,
    budget: &mut u64,
) -> FsResult<()> {
    if *next_logical >= limit {
        return Ok(());
    }
    if block == 0 {
        return Err(doubt("journal inode has a hole"));
    }
    check_physical(sb, block, 1)?;
    *budget = budget.checked_sub(1).ok_or_else(|| doubt("journal inode: too many blocks"))?;
    if level == 0 {
        push_run(runs, *next_logical, block, 1);
        *next_logical += 1;
        return Ok(());
    }
    let at = block.checked_mul(sb.block_size).ok_or_else(|| doubt("indirect block offset overflows"))?;
    let data = region.read_vec(at, usize_of(sb.block_size, "block size")?)?;
    for i in 0..data.len() / 4 {
        if *next_logical >= limit {
            break;
        }
        walk_indirect(region, sb, u64::from(le32(&data, i * 4)?), level - 1, next_logical, limit, runs, budget)?;
    }
    Ok(())
}

/// The block map of the journal inode, covering logical blocks `0..blocks` without holes.
fn block_map(region: &Region<'_>, sb: &Superblock, inode: &[u8]) -> FsResult<Vec<Run>> {
    let mode = le16(inode, 0)?;
    if mode & 0xF000 != 0x8000 {
        return Err(doubt(format!("journal inode mode {mode:#o} is not a regular file")));
    }
    let size = u64::from(le32(inode, 4)?) | (u64::from(le32(inode, 0x6C)?) << 32);
    let blocks = size / sb.block_size;
    if !(2..=MAX_JOURNAL_BLOCKS).contains(&blocks) {
        return Err(doubt(format!("journal inode size {size}")));
    }
    let flags = le32(inode, 0x20)?;
    let i_block = slice(inode, 0x28, 60)?;
    let mut runs = Vec::new();
    let mut budget = MAX_JOURNAL_BLOCKS * 2;
    if flags & EXTENTS_FL != 0 {
        walk_extents(region, sb, i_block, None, &mut runs, &mut budget)?;
    } else {
        let mut next = 0u64;
        for i in 0..12 {
            walk_indirect(region, sb, u64::from(le32(i_block, i * 4)?), 0, &mut next, blocks, &mut runs, &mut budget)?;
        }
        for (slot, level) in [(12usize, 1u32), (13, 2), (14, 3)] {
            let b = u64::from(le32(i_block, slot * 4)?);
            walk_indirect(region, sb, b, level, &mut next, blocks, &mut runs, &mut budget)?;
        }
    }
    // The map must cover 0..blocks contiguously in logical order.
    runs.sort_unstable();
    let mut expect = 0u64;
    for r in &runs {
        if r.0 != expect {
            return Err(doubt(format!("journal block map has a gap or overlap at logical block {expect}")));
        }
        expect = r.0 + r.2;
    }
    if expect < blocks {
        return Err(doubt(format!("journal block map covers {expect} of {blocks} blocks")));
    }
    Ok(runs)
}

fn physical(runs: &[Run], logical: u64) -> FsResult<u64> {
    let i = runs.partition_point(|r| r.0 + r.2 <= logical);
    match runs.get(i) {
        Some(r) if r.0 <= logical => Ok(r.1 + (logical - r.0)),
        _ => Err(doubt(format!("journal block {logical} is not mapped"))),
    }
}

/// Reads the journal of `sb` (inode `s_journal_inum`) and, when it holds transactions, walks them.
pub fn read(region: &Region<'_>, sb: &Superblock, descs: &[Desc]) -> FsResult<Journal> {
    let inode = read_inode(region, sb, descs, u64::from(sb.journal_inum))?;
    let runs = block_map(region, sb, &inode)?;
    let bs = usize_of(sb.block_size, "block size")?;
    let block_at = |logical: u64| -> FsResult<u64> {
        physical(&runs, logical)?.checked_mul(sb.block_size).ok_or_else(|| doubt("journal offset overflows"))
    };
    let jsb = region.read_vec(block_at(0)?, bs)?;
    if be32(&jsb, 0)? != JBD2_MAGIC {
        return Err(doubt("journal superblock magic"));
    }
    let version = be32(&jsb, 4)?;
    if version != BT_SB_V1 && version != BT_SB_V2 {
        return Err(doubt(format!("journal superblock block type {version}")));
    }
    let jbs = u64::from(be32(&jsb, 0xC)?);
    if jbs != sb.block_size {
        return Err(doubt(format!("journal block size {jbs} differs from the filesystem's {}", sb.block_size)));
    }
    let maxlen = u64::from(be32(&jsb, 0x10)?);
    let first = u64::from(be32(&jsb, 0x14)?);
    let mapped: u64 = runs.iter().map(|r| r.2).sum();
    if maxlen > mapped || first == 0 || first >= maxlen {
        return Err(doubt(format!("journal s_maxlen {maxlen} / s_first {first} with {mapped} mapped blocks")));
    }
    let sequence = be32(&jsb, 0x18)?;
    let start = u64::from(be32(&jsb, 0x1C)?);
    let incompat = if version == BT_SB_V2 { be32(&jsb, 0x28)? } else { 0 };
    let unknown = incompat & !INCOMPAT_KNOWN;
    if unknown != 0 {
        return Err(doubt(format!("journal incompat features {unknown:#x}")));
    }
    let mut journal = Journal {
        runs: runs.clone(),
        needs_recovery: sb.has_incompat(super::superblock::INCOMPAT_RECOVER) || start != 0,
        fast_commit: incompat & INCOMPAT_FAST_COMMIT != 0,
        ..Journal::default()
    };
    if start == 0 {
        return Ok(journal);
    }
    if start < first || start >= maxlen {
        return Err(doubt(format!("journal s_start {start} is outside {first}..{maxlen}")));
    }
    let csum = incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0;
    let tag_bytes: usize = if incompat & INCOMPAT_CSUM_V3 != 0 {
        16
    } else {
        let base = if csum { 14 } else { 12 };
        if incompat & INCOMPAT_64BIT != 0 {
            base
        } else {
            base - 4
        }
    };
    let wide = incompat & INCOMPAT_64BIT != 0;
    let tail = if csum { 4 } else { 0 };
    let next = |p: u64| if p + 1 >= maxlen { first } else { p + 1 };

    let mut pos = start;
    let mut seq = sequence;
    let mut steps = 0u64;
    let mut pending: Vec<(u64, Copy)> = Vec::new();
    let mut header = [0u8; 12];
    let limit = maxlen - first;
    while steps < limit {
        region.read(&mut header, block_at(pos)?)?;
        if be32(&header, 0)? != JBD2_MAGIC || be32(&header, 8)? != seq {
            break;
        }
        match be32(&header, 4)? {
            BT_DESCRIPTOR => {
                let block = region.read_vec(block_at(pos)?, bs)?;
                pos = next(pos);
                steps += 1;
                let mut off = 12usize;
                while off + tag_bytes + tail <= bs && steps < limit {
                    let lo = u64::from(be32(&block, off)?);
                    let flags = be16(&block, off + 6)?;
                    let hi = if wide { u64::from(be32(&block, off + 8)?) } else { 0 };
                    let fs_block = lo | (hi << 32);
                    pending.push((fs_block, Copy { offset: block_at(pos)?, escaped: flags & FLAG_ESCAPE != 0 }));
                    pos = next(pos);
                    steps += 1;
                    off += tag_bytes;
                    if flags & FLAG_SAME_UUID == 0 {
                        off += 16;
                    }
                    if flags & FLAG_LAST_TAG != 0 {
                        break;
                    }
                }
            }
            BT_COMMIT => {
                for (b, c) in pending.drain(..) {
                    journal.copies.entry(b).or_default().push(c);
                }
                journal.transactions += 1;
                seq = seq.wrapping_add(1);
                pos = next(pos);
                steps += 1;
            }
            BT_REVOKE => {
                pos = next(pos);
                steps += 1;
            }
            _ => break,
        }
    }
    Ok(journal)
}

/// Group descriptors of `block` in a journal copy: `(group, raw descriptor)` pairs.
pub fn descs_in_copy(sb: &Superblock, first_group: u64, data: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let size = usize::try_from(sb.desc_size).unwrap_or(32);
    data.chunks_exact(size)
        .enumerate()
        .map(|(i, raw)| (first_group + crate::fs::bytes::u64_of(i), raw.to_vec()))
        .filter(|(g, _)| *g < sb.group_count)
        .collect()
}
