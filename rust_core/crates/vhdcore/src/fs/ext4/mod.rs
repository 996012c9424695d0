//! ext2/3/4: the blocks the block bitmaps prove free, made safe for crash-consistent snapshots.
//!
//! A block is free only if the on-disk bitmap of its group says so **and** every committed jbd2 copy of that
//! bitmap block says so; a group whose descriptor is `BLOCK_UNINIT` on disk but initialised in a committed
//! journal copy of its descriptor block is read from its (possibly stale) on-disk bitmap and every journal copy.
//! The superblock and descriptor backups, bitmaps and inode tables of every group are always used (synthesised for
//! uninitialised groups), as is the journal. The partition past the filesystem's last block is kept.
//!
//! Kept whole: errors recorded, bigalloc, snapshots, unknown incompat features, an external journal, a fast-commit
//! journal that needs recovery, a journal the walker does not understand, a checksum that does not match (the
//! superblock, a group descriptor, the journal inode, or a block bitmap that no journal copy explains), a resize in
//! the journal.

pub(crate) mod groups;
pub(crate) mod journal;
pub(crate) mod superblock;

use std::collections::HashMap;

use groups::{
    base_meta_blocks, bitmap_checksum_ok, desc_block_location, desc_checksum_ok, group_len, group_start,
    inode_table_blocks, Desc,
};
use superblock::{Superblock, COMPAT_FAST_COMMIT, COMPAT_HAS_JOURNAL};

use super::bytes::{le32, mul, usize_of};
use super::{doubt, FreeList, FsKind, FsResult, Region};

const STATE_ERROR_FS: u16 = 0x2;

/// ext2, ext3 or ext4, from the superblock's features (the head holds at least 2 KiB).
pub(crate) fn kind_of(head: &[u8]) -> FsKind {
    let (Ok(compat), Ok(incompat), Ok(ro)) = (le32(head, 0x45C), le32(head, 0x460), le32(head, 0x464)) else {
        return FsKind::Ext2;
    };
    let ext4_incompat = 0x40 | 0x80 | 0x200 | 0x10 | 0x8000 | 0x400 | 0x4000;
    let ext4_ro = 0x8 | 0x10 | 0x20 | 0x40 | 0x200 | 0x400;
    if incompat & ext4_incompat != 0 || ro & ext4_ro != 0 {
        FsKind::Ext4
    } else if compat & COMPAT_HAS_JOURNAL != 0 {
        FsKind::Ext3
    } else {
        FsKind::Ext2
    }
}

/// Reads all group descriptors, checking their checksums.
fn read_descs(region: &Region<'_>, sb: &Superblock) -> FsResult<Vec<Desc>> {
    let bs = usize_of(sb.block_size, "block size")?;
    let per_block = sb.descs_per_block();
    let size = usize_of(sb.desc_size, "descriptor size")?;
    let mut descs = Vec::with_capacity(usize_of(sb.group_count, "group count")?);
    let mut buf = vec![0u8; bs];
    for b in 0..sb.desc_blocks() {
        let loc = desc_block_location(sb, b);
        if loc >= sb.blocks_count {
            return Err(doubt(format!("descriptor block {b} at block {loc} is past the filesystem")));
        }
        region.read(&mut buf, mul(loc, sb.block_size, "descriptor block")?)?;
        for (i, raw) in buf.chunks_exact(size).enumerate() {
            let g = b * per_block + super::bytes::u64_of(i);
            if g >= sb.group_count {
                break;
            }
            if !desc_checksum_ok(sb, g, raw)? {
                return Err(doubt(format!("group {g} descriptor checksum does not match")));
            }
            let d = Desc::parse(sb, raw)?;
            let itb = inode_table_blocks(sb);
            let fits = |blk: u64, n: u64| blk >= sb.first_data_block && blk.saturating_add(n) <= sb.blocks_count;
            if !fits(d.block_bitmap, 1) || !fits(d.inode_bitmap, 1) || !fits(d.inode_table, itb) {
                return Err(doubt(format!("group {g} descriptor points outside the filesystem")));
            }
            descs.push(d);
        }
    }
    Ok(descs)
}

/// Free byte ranges of the ext2/3/4 filesystem in `region`, relative to its start.
pub(crate) fn free_ranges(region: Region<'_>) -> FsResult<Vec<(u64, u64)>> {
    let raw = region.read_vec(1024, 1024)?;
    let sb = Superblock::parse(&raw)?;
    if sb.state & STATE_ERROR_FS != 0 {
        return Err(doubt("the filesystem has errors recorded (run e2fsck)"));
    }
    let fs_bytes = mul(sb.blocks_count, sb.block_size, "filesystem size")?;
    if fs_bytes > region.len {
        return Err(doubt(format!("the filesystem ({fs_bytes} bytes) is larger than its partition ({})", region.len)));
    }
    let descs = read_descs(&region, &sb)?;
    let bs = usize_of(sb.block_size, "block size")?;

    let mut kept: Vec<(u64, u64)> = Vec::new();
    let journal = if sb.has_compat(COMPAT_HAS_JOURNAL) {
        if sb.journal_inum == 0 {
            return Err(doubt(format!(
                "external journal (device {:#x}, uuid {}): its transactions cannot be read",
                sb.journal_dev,
                crate::format::uuid_string(&sb.journal_uuid)
            )));
        }
        let j = journal::read(&region, &sb, &descs)?;
        if j.needs_recovery && (j.fast_commit || sb.has_compat(COMPAT_FAST_COMMIT)) {
            return Err(doubt("fast-commit journal needs recovery"));
        }
        for &(_, p, n) in &j.runs {
            kept.push((mul(p, sb.block_size, "journal")?, mul(n, sb.block_size, "journal")?));
        }
        Some(j)
    } else {
        if sb.has_incompat(superblock::INCOMPAT_RECOVER) {
            return Err(doubt("needs_recovery without a journal"));
        }
        None
    };
    let journal = journal.unwrap_or_default();

    // A resize in flight: a committed superblock copy with another size.
    let sb_block = if sb.block_size == 1024 { 1 } else { 0 };
    let sb_in_block = if sb.block_size == 1024 { 0 } else { 1024 };
    for c in journal.copies.get(&sb_block).into_iter().flatten() {
        let data = journal.read_copy(&region, *c, bs)?;
        let copy = super::bytes::slice(&data, sb_in_block, 1024)?;
        let count = u64::from(le32(copy, 0x4)?)
            | if sb.has_incompat(superblock::INCOMPAT_64BIT) { u64::from(le32(copy, 0x150)?) << 32 } else { 0 };
        if count != sb.blocks_count {
            return Err(doubt("the journal holds a superblock of another size (a resize in flight)"));
        }
    }

    // Committed journal copies of descriptor blocks: per group, the descriptors they carry.
    let mut journaled_descs: HashMap<u64, Vec<Desc>> = HashMap::new();
    for b in 0..sb.desc_blocks() {
        let loc = desc_block_location(&sb, b);
        for c in journal.copies.get(&loc).into_iter().flatten() {
            let data = journal.read_copy(&region, *c, bs)?;
            for (g, raw) in journal::descs_in_copy(&sb, b * sb.descs_per_block(), &data) {
                journaled_descs.entry(g).or_default().push(Desc::parse(&sb, &raw)?);
            }
        }
    }

    // Metadata of every group, wherever flex_bg put it: always used.
    let itb = inode_table_blocks(&sb);
    let mut meta: Vec<(u64, u64)> = Vec::with_capacity(descs.len() * 3);
    for d in descs.iter().chain(journaled_descs.values().flatten()) {
        meta.push((d.block_bitmap, 1));
        meta.push((d.inode_bitmap, 1));
        meta.push((d.inode_table, itb));
    }
    meta.sort_unstable();

    let mut free = FreeList::default();
    let mut used = vec![0u8; bs];
    let mut scratch = vec![0u8; bs];
    for (gi, d) in descs.iter().enumerate() {
        let g = super::bytes::u64_of(gi);
        let start = group_start(&sb, g);
        let len = group_len(&sb, g);
        let jdescs = journaled_descs.get(&g).map(Vec::as_slice).unwrap_or(&[]);
        if jdescs.iter().any(|j| j.block_bitmap != d.block_bitmap) {
            continue; // relocated bitmap in the journal: the group is kept
        }
        used.fill(0);
        let uninit = d.block_uninit(&sb);
        if !uninit || jdescs.iter().any(|j| !j.block_uninit(&sb)) {
            region.read(&mut scratch, mul(d.block_bitmap, sb.block_size, "bitmap")?)?;
            if !uninit && !bitmap_checksum_ok(&sb, d, &scratch) {
                let explained = journal.needs_recovery
                    && (journal.copies.contains_key(&d.block_bitmap)
                        || journal.copies.contains_key(&desc_block_location(&sb, g / sb.descs_per_block())));
                if !explained {
                    return Err(doubt(format!("group {g} block bitmap checksum does not match")));
                }
            }
            or_into(&mut used, &scratch);
        }
        for c in journal.copies.get(&d.block_bitmap).into_iter().flatten() {
            let copy = journal.read_copy(&region, *c, bs)?;
            or_into(&mut used, &copy);
        }
        // Synthesised metadata: superblock and descriptor copies, and any group's bitmaps and inode table here.
        let base = base_meta_blocks(&sb, g).min(len);
        mark(&mut used, 0, base);
        let end = start.saturating_add(len);
        let i = meta.partition_point(|m| m.0.saturating_add(m.1) <= start);
        for &(m, n) in meta[i..].iter().take_while(|m| m.0 < end) {
            let s = m.max(start);
            let e = m.saturating_add(n).min(end);
            mark(&mut used, s - start, e - s);
        }
        emit_free(&mut free, &used, start, len, sb.block_size);
    }
    let ranges = super::subtract(free.into_ranges(), &kept);
    Ok(ranges)
}

fn or_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= s;
    }
}

fn mark(bitmap: &mut [u8], from: u64, count: u64) {
    for i in from..from.saturating_add(count) {
        let Ok(i) = usize::try_from(i) else { return };
        match bitmap.get_mut(i / 8) {
            Some(b) => *b |= 1 << (i % 8),
            None => return,
        }
    }
}

/// Pushes the free (clear) bits `0..len` of a group's bitmap as byte ranges.
fn emit_free(free: &mut FreeList, used: &[u8], start: u64, len: u64, block_size: u64) {
    let mut run_start: Option<u64> = None;
    let mut i = 0u64;
    let mut flush = |run: &mut Option<u64>, at: u64| {
        if let Some(s) = run.take() {
            free.push((start + s) * block_size, (at - s) * block_size);
        }
    };
    while i < len {
        let Some(&byte) = usize::try_from(i / 8).ok().and_then(|b| used.get(b)) else { break };
        if i.is_multiple_of(8) && i + 8 <= len && (byte == 0xFF || byte == 0) {
            if byte == 0xFF {
                flush(&mut run_start, i);
            } else if run_start.is_none() {
                run_start = Some(i);
            }
            i += 8;
            continue;
        }
        if byte & (1 << (i % 8)) != 0 {
            flush(&mut run_start, i);
        } else if run_start.is_none() {
            run_start = Some(i);
        }
        i += 1;
    }
    flush(&mut run_start, i.min(len));
}
