//! XFS: the free extents of every allocation group's by-block-number free-space B+tree (bnobt), when the log is
//! provably clean.
//!
//! The log is read the way recovery starts: the head is found from the cycle numbers stamped in every 512-byte
//! log block (binary search, then a window on both sides checked for out-of-order writes), and the last record
//! before it must be a lone unmount record ending exactly at the head. Anything else (a dirty log, an external
//! log, `sb_inprogress`, NEEDSREPAIR, log-incompat features, unknown incompat features, a checksum, magic, level
//! or count that does not match) keeps the filesystem whole. The AGFL's blocks are kept (they are not in the bnobt
//! anyway), as are the AG headers and the log.

use std::collections::HashSet;

use super::bytes::{be16, be32, be64, crc32c_raw, mul, u8_at, usize_of};
use super::{doubt, FreeList, FsResult, Region};

const SB_MAGIC: u32 = 0x5846_5342; // XFSB
const AGF_MAGIC: u32 = 0x5841_4746; // XAGF
const AGFL_MAGIC: u32 = 0x5841_464C; // XAFL
const ABTB_MAGIC: u32 = 0x4142_5442; // v4 bnobt
const AB3B_MAGIC: u32 = 0x4142_3342; // v5 bnobt
const LOG_MAGIC: u32 = 0xFEED_BABE;
const XLOG_UNMOUNT_TRANS: u8 = 0x20;
const MAX_LEVELS: u32 = 9;
const MAX_AGS: u64 = 1 << 20;

const INCOMPAT_FTYPE: u32 = 1;
const INCOMPAT_SPINODES: u32 = 2;
const INCOMPAT_META_UUID: u32 = 4;
const INCOMPAT_BIGTIME: u32 = 8;
const INCOMPAT_NEEDSREPAIR: u32 = 0x10;
const INCOMPAT_NREXT64: u32 = 0x20;
const INCOMPAT_KNOWN: u32 =
    INCOMPAT_FTYPE | INCOMPAT_SPINODES | INCOMPAT_META_UUID | INCOMPAT_BIGTIME | INCOMPAT_NREXT64;

struct Sb {
    block_size: u64,
    sect_size: u64,
    dblocks: u64,
    agblocks: u64,
    agcount: u64,
    agblklog: u32,
    logstart: u64,
    logblocks: u64,
    v5: bool,
}

/// XFS checksums: CRC-32C over the buffer with the 4-byte field at `off` taken as zero, stored little-endian.
fn crc_ok(buf: &[u8], off: usize) -> FsResult<bool> {
    let stored = u32::from_le_bytes(super::bytes::slice(buf, off, 4)?.try_into().map_err(|_| doubt("crc"))?);
    let mut c = crc32c_raw(!0, super::bytes::slice(buf, 0, off)?);
    c = crc32c_raw(c, &[0; 4]);
    c = crc32c_raw(c, super::bytes::slice(buf, off + 4, buf.len() - off - 4)?);
    Ok(!c == stored)
}

fn parse_sb(b: &[u8]) -> FsResult<Sb> {
    if be32(b, 0)? != SB_MAGIC {
        return Err(doubt("XFS superblock magic"));
    }
    let block_size = u64::from(be32(b, 4)?);
    let blocklog = u32::from(u8_at(b, 120)?);
    if !(9..=16).contains(&blocklog) || block_size != 1u64 << blocklog {
        return Err(doubt(format!("sb_blocksize {block_size}")));
    }
    let sect_size = u64::from(be16(b, 102)?);
    let sectlog = u32::from(u8_at(b, 121)?);
    if !(9..=15).contains(&sectlog) || sect_size != 1u64 << sectlog || sect_size > block_size {
        return Err(doubt(format!("sb_sectsize {sect_size}")));
    }
    let version = be16(b, 100)? & 0xF;
    let v5 = match version {
        4 => false,
        5 => true,
        v => return Err(doubt(format!("XFS version {v}"))),
    };
    if v5 {
        let sector = super::bytes::slice(b, 0, usize_of(sect_size, "sector")?)?;
        if !crc_ok(sector, 224)? {
            return Err(doubt("XFS superblock CRC does not match"));
        }
        let incompat = be32(b, 216)?;
        if incompat & INCOMPAT_NEEDSREPAIR != 0 {
            return Err(doubt("XFS marked NEEDSREPAIR"));
        }
        let unknown = incompat & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(doubt(format!("XFS incompat features {unknown:#x}")));
        }
        if be32(b, 220)? != 0 {
            return Err(doubt("XFS log-incompat features are set: the log is in use"));
        }
    }
    if u8_at(b, 126)? != 0 {
        return Err(doubt("sb_inprogress: mkfs did not finish"));
    }
    let dblocks = be64(b, 8)?;
    let agblocks = u64::from(be32(b, 84)?);
    let agcount = u64::from(be32(b, 88)?);
    let agblklog = u32::from(u8_at(b, 124)?);
    if agblocks < 16 || agcount == 0 || agcount > MAX_AGS || agblklog > 31 || (1u64 << agblklog) < agblocks {
        return Err(doubt(format!("{agcount} AGs of {agblocks} blocks (agblklog {agblklog})")));
    }
    let max = mul(agcount, agblocks, "XFS size")?;
    if dblocks > max || dblocks <= max - agblocks {
        return Err(doubt(format!("sb_dblocks {dblocks} with {agcount} AGs of {agblocks}")));
    }
    Ok(Sb {
        block_size,
        sect_size,
        dblocks,
        agblocks,
        agcount,
        agblklog,
        logstart: be64(b, 48)?,
        logblocks: u64::from(be32(b, 96)?),
        v5,
    })
}

impl Sb {
    /// Byte offset of the filesystem block `fsb` (`agno << agblklog | agbno`).
    fn fsb_offset(&self, fsb: u64) -> FsResult<u64> {
        let agno = fsb >> self.agblklog;
        let agbno = fsb & ((1u64 << self.agblklog) - 1);
        if agno >= self.agcount || agbno >= self.agblocks {
            return Err(doubt(format!("XFS block {fsb} is outside the filesystem")));
        }
        mul(agno * self.agblocks + agbno, self.block_size, "XFS block offset")
    }
}

/// The log, as 512-byte basic blocks.
struct Log<'a> {
    region: &'a Region<'a>,
    start: u64,
    blocks: u64,
}

impl Log<'_> {
    fn read_bb(&self, i: u64) -> FsResult<[u8; 512]> {
        let mut b = [0u8; 512];
        self.region.read(&mut b, self.start + (i % self.blocks) * 512)?;
        Ok(b)
    }

    /// The cycle number of basic block `i` (a record header carries it in its second word).
    fn cycle(&self, i: u64) -> FsResult<u32> {
        let b = self.read_bb(i)?;
        if be32(&b, 0)? == LOG_MAGIC {
            be32(&b, 4)
        } else {
            be32(&b, 0)
        }
    }
}

/// Whether the log's last record is an unmount record at its head: a clean log.
fn log_is_clean(region: &Region<'_>, sb: &Sb) -> FsResult<()> {
    if sb.logstart == 0 {
        return Err(doubt("external XFS log: its state cannot be read"));
    }
    let start = sb.fsb_offset(sb.logstart)?;
    let bytes = mul(sb.logblocks, sb.block_size, "log size")?;
    if bytes < 64 * 1024 || start.checked_add(bytes).is_none_or(|e| e > region.len) {
        return Err(doubt(format!("XFS log of {bytes} bytes at {start}")));
    }
    let log = Log { region, start, blocks: bytes / 512 };
    let n = log.blocks;
    let first = log.cycle(0)?;
    let last = log.cycle(n - 1)?;
    let head = if first == last {
        // Written to the very end with one cycle: the head is at the start of the next cycle.
        n
    } else {
        if first != last.wrapping_add(1) {
            return Err(doubt(format!("XFS log cycles {first} at the start and {last} at the end")));
        }
        let (mut lo, mut hi) = (0u64, n - 1);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if log.cycle(mid)? == first {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    };
    let cur = log.cycle(head - 1)?;
    // Out-of-order log writes leave holes near the head: the window before it must all be `cur`, and the
    // window after it all `cur - 1` (or unwritten: cycle 0 before the first wrap).
    let window = (n / 2).min(4096);
    for i in head.saturating_sub(window)..head {
        if log.cycle(i)? != cur {
            return Err(doubt("XFS log has a hole before its head: it is not clean"));
        }
    }
    if head < n {
        for i in head..(head + window).min(n) {
            if log.cycle(i)? != cur.wrapping_sub(1) {
                return Err(doubt("XFS log has newer blocks past its head: it is not clean"));
            }
        }
    }
    // The last record header before the head.
    let mut rec = None;
    for back in 1..=window.min(head) {
        let b = log.read_bb(head - back)?;
        if be32(&b, 0)? == LOG_MAGIC {
            rec = Some((head - back, b));
            break;
        }
    }
    let Some((at, h)) = rec else { return Err(doubt("no XFS log record header before the head")) };
    let len = u64::from(be32(&h, 12)?);
    let version = be32(&h, 8)?;
    let size = u64::from(be32(&h, 320)?);
    let hblks = if version & 2 != 0 && size > 32768 { size.div_ceil(32768) } else { 1 };
    if at + hblks + len.div_ceil(512) != head {
        return Err(doubt("the last XFS log record does not end at the head: the log is not clean"));
    }
    if be32(&h, 40)? != 1 {
        return Err(doubt("the last XFS log record is not an unmount record: the log is dirty"));
    }
    let op = log.read_bb(at + hblks)?;
    if u8_at(&op, 9)? & XLOG_UNMOUNT_TRANS == 0 {
        return Err(doubt("the last XFS log record is not an unmount record: the log is dirty"));
    }
    Ok(())
}

/// Free byte ranges of the XFS filesystem in `region`, relative to its start.
pub(crate) fn free_ranges(region: Region<'_>) -> FsResult<Vec<(u64, u64)>> {
    let head = region.read_vec(0, 512)?;
    let sect = usize::from(be16(&head, 102)?).clamp(512, 32768);
    let raw = region.read_vec(0, sect)?;
    let sb = parse_sb(&raw)?;
    let fs_bytes = mul(sb.dblocks, sb.block_size, "XFS size")?;
    if fs_bytes > region.len {
        return Err(doubt(format!("the filesystem ({fs_bytes} bytes) is larger than its partition ({})", region.len)));
    }
    log_is_clean(&region, &sb)?;
    let bs = usize_of(sb.block_size, "block size")?;
    let ss = usize_of(sb.sect_size, "sector size")?;
    let mut free = FreeList::default();
    let mut kept = Vec::new();
    kept.push((sb.fsb_offset(sb.logstart)?, mul(sb.logblocks, sb.block_size, "log")?));
    for agno in 0..sb.agcount {
        let ag_first = agno * sb.agblocks;
        let ag_len = sb.agblocks.min(sb.dblocks - ag_first);
        let ag_at = mul(ag_first, sb.block_size, "AG offset")?;
        let agf = region.read_vec(ag_at + sb.sect_size, ss)?;
        if be32(&agf, 0)? != AGF_MAGIC || be32(&agf, 4)? != 1 || u64::from(be32(&agf, 8)?) != agno {
            return Err(doubt(format!("AG {agno}: bad AGF header")));
        }
        if sb.v5 && !crc_ok(&agf, 216)? {
            return Err(doubt(format!("AG {agno}: AGF CRC does not match")));
        }
        if u64::from(be32(&agf, 12)?) != ag_len {
            return Err(doubt(format!("AG {agno}: agf_length does not match the superblock")));
        }
        let root = u64::from(be32(&agf, 16)?);
        let levels = be32(&agf, 28)?;
        if root == 0 || root >= ag_len || levels == 0 || levels > MAX_LEVELS {
            return Err(doubt(format!("AG {agno}: bnobt root {root} / levels {levels}")));
        }
        let freeblks = u64::from(be32(&agf, 52)?);
        // AGFL: kept.
        let agfl = region.read_vec(ag_at + 3 * sb.sect_size, ss)?;
        let hdr = if sb.v5 {
            if be32(&agfl, 0)? != AGFL_MAGIC || !crc_ok(&agfl, 32)? {
                return Err(doubt(format!("AG {agno}: bad AGFL")));
            }
            36
        } else {
            0
        };
        let size = u64::try_from((ss - hdr) / 4).unwrap_or(0);
        let (flfirst, fllast, flcount) =
            (u64::from(be32(&agf, 40)?), u64::from(be32(&agf, 44)?), u64::from(be32(&agf, 48)?));
        if flcount > size || (flcount > 0 && (flfirst >= size || fllast >= size)) {
            return Err(doubt(format!("AG {agno}: AGFL indexes")));
        }
        for i in 0..flcount {
            let slot = usize_of((flfirst + i) % size, "AGFL slot")?;
            let b = u64::from(be32(&agfl, hdr + slot * 4)?);
            if b < ag_len {
                kept.push((mul(ag_first + b, sb.block_size, "AGFL")?, sb.block_size));
            }
        }
        // The bnobt, depth first in key order.
        let mut total = 0u64;
        let mut stack = vec![(root, levels - 1)];
        let mut seen = HashSet::new();
        let mut block = vec![0u8; bs];
        while let Some((agbno, level)) = stack.pop() {
            if agbno == 0 || agbno >= ag_len || !seen.insert(agbno) || seen.len() > 1 << 22 {
                return Err(doubt(format!("AG {agno}: bnobt pointer {agbno} is bad or repeated")));
            }
            let at = mul(ag_first + agbno, sb.block_size, "bnobt block")?;
            region.read(&mut block, at)?;
            let (magic, hlen) = if sb.v5 { (AB3B_MAGIC, 56usize) } else { (ABTB_MAGIC, 16usize) };
            if be32(&block, 0)? != magic || u32::from(be16(&block, 4)?) != level {
                return Err(doubt(format!("AG {agno}: bnobt block {agbno}: bad magic or level")));
            }
            if sb.v5 && (!crc_ok(&block, 52)? || be64(&block, 16)? != at / 512 || u64::from(be32(&block, 48)?) != agno)
            {
                return Err(doubt(format!("AG {agno}: bnobt block {agbno}: CRC, location or owner")));
            }
            let numrecs = usize::from(be16(&block, 6)?);
            if level == 0 {
                if hlen + numrecs * 8 > bs {
                    return Err(doubt(format!("AG {agno}: bnobt leaf {agbno}: {numrecs} records")));
                }
                for i in 0..numrecs {
                    let s = u64::from(be32(&block, hlen + i * 8)?);
                    let c = u64::from(be32(&block, hlen + i * 8 + 4)?);
                    if c == 0 || s.checked_add(c).is_none_or(|e| e > ag_len) {
                        return Err(doubt(format!("AG {agno}: free extent {s}+{c} is outside the AG")));
                    }
                    total += c;
                    free.push(mul(ag_first + s, sb.block_size, "free")?, mul(c, sb.block_size, "free")?);
                }
            } else {
                let maxrecs = (bs - hlen) / 12;
                if numrecs == 0 || numrecs > maxrecs {
                    return Err(doubt(format!("AG {agno}: bnobt node {agbno}: {numrecs} records")));
                }
                // Pushed in reverse so the lowest key is visited first.
                for i in (0..numrecs).rev() {
                    let ptr = u64::from(be32(&block, hlen + maxrecs * 8 + i * 4)?);
                    stack.push((ptr, level - 1));
                }
            }
        }
        if total != freeblks {
            return Err(doubt(format!("AG {agno}: the bnobt holds {total} free blocks, the AGF says {freeblks}")));
        }
    }
    Ok(super::subtract(free.into_ranges(), &kept))
}
