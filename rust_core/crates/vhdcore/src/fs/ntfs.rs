//! NTFS: the clusters the `$Bitmap` (MFT record 6, its data runs) marks free, when the volume is provably clean.
//!
//! Read: the boot sector, `$MFT`'s own data runs (record 0), then records 2 (`$LogFile`), 3 (`$Volume`) and 6
//! (`$Bitmap`), each with its update sequence fixups checked. Kept whole: a volume marked dirty (or with chkdsk
//! under way), a `$LogFile` whose newest restart area is not clean (a mounted or hibernated Windows), a `$Bitmap`
//! described through an attribute list, and anything malformed. The backup boot sector (past the last cluster) is
//! kept, as is everything past the volume.

use super::bytes::{le16, le32, le64, mul, slice, u64_of, u8_at, usize_of};
use super::{doubt, FreeList, FsResult, Region};

const ATTR_LIST: u32 = 0x20;
const ATTR_VOLUME_INFORMATION: u32 = 0x70;
const ATTR_DATA: u32 = 0x80;
const ATTR_END: u32 = 0xFFFF_FFFF;
const VOLUME_IS_DIRTY: u16 = 0x0001;
const VOLUME_CHKDSK_UNDERWAY: u16 = 0x4000;
const RESTART_VOLUME_IS_CLEAN: u16 = 0x0002;
const LOGFILE_NO_CLIENT: u16 = 0xFFFF;
const MAX_RUNS: usize = 1 << 20;

struct Vol {
    bps: u64,
    cluster: u64,
    clusters: u64,
    total_sectors: u64,
    record_size: u64,
    mft_runs: Vec<Run>,
}

/// A data run: `len` clusters at virtual cluster `vcn`, stored at `lcn` (None: sparse).
#[derive(Debug, Clone, Copy)]
struct Run {
    vcn: u64,
    lcn: Option<u64>,
    len: u64,
}

fn parse_boot(b: &[u8]) -> FsResult<(u64, u64, u64, u64, u64)> {
    if slice(b, 3, 8)? != b"NTFS    " || le16(b, 510)? != 0xAA55 {
        return Err(doubt("NTFS boot sector signature"));
    }
    let bps = u64::from(le16(b, 11)?);
    if !bps.is_power_of_two() || !(256..=4096).contains(&bps) {
        return Err(doubt(format!("NTFS bytes per sector {bps}")));
    }
    let raw = u8_at(b, 13)?;
    let spc = if raw <= 0x80 {
        u64::from(raw)
    } else {
        let shift = 256u32 - u32::from(raw);
        if shift > 12 {
            return Err(doubt(format!("NTFS sectors per cluster byte {raw:#x}")));
        }
        1u64 << shift
    };
    if spc == 0 || !spc.is_power_of_two() {
        return Err(doubt(format!("NTFS sectors per cluster {spc}")));
    }
    let cluster = bps * spc;
    if cluster > 2 << 20 {
        return Err(doubt(format!("NTFS cluster size {cluster}")));
    }
    let total_sectors = le64(b, 0x28)?;
    let mft_lcn = le64(b, 0x30)?;
    let c = i8::from_le_bytes([u8_at(b, 0x40)?]);
    let record_size = if c > 0 {
        u64::from(c.unsigned_abs()) * cluster
    } else {
        let shift = u32::from(c.unsigned_abs());
        if !(8..=16).contains(&shift) {
            return Err(doubt(format!("NTFS clusters per MFT record {c}")));
        }
        1u64 << shift
    };
    if !(512..=65536).contains(&record_size) || !record_size.is_power_of_two() {
        return Err(doubt(format!("NTFS MFT record size {record_size}")));
    }
    Ok((bps, cluster, total_sectors, mft_lcn, record_size))
}

/// Applies the update sequence fixups of a multi-sector record (strides of 512 bytes).
fn fixup(buf: &mut [u8], magic: &[u8; 4]) -> FsResult<()> {
    if slice(buf, 0, 4)? != magic {
        return Err(doubt(format!("NTFS record magic is not {}", String::from_utf8_lossy(magic))));
    }
    let usa_ofs = usize::from(le16(buf, 4)?);
    let usa_count = usize::from(le16(buf, 6)?);
    if usa_count == 0 || usa_count - 1 != buf.len() / 512 {
        return Err(doubt(format!("NTFS update sequence count {usa_count} for {} bytes", buf.len())));
    }
    let usn = le16(buf, usa_ofs)?;
    for i in 1..usa_count {
        let at = i * 512 - 2;
        if le16(buf, at)? != usn {
            return Err(doubt("NTFS update sequence mismatch (torn write)"));
        }
        let fix = le16(buf, usa_ofs + 2 * i)?;
        buf[at..at + 2].copy_from_slice(&fix.to_le_bytes());
    }
    Ok(())
}

fn signed_le(b: &[u8]) -> i64 {
    let mut v: u64 = 0;
    for (i, &x) in b.iter().enumerate() {
        v |= u64::from(x) << (8 * i);
    }
    let bits = 8 * b.len();
    if bits > 0 && bits < 64 && b[b.len() - 1] & 0x80 != 0 {
        v |= !0u64 << bits;
    }
    i64::from_le_bytes(v.to_le_bytes())
}

/// The data runs of a non-resident attribute at `attr`.
fn runlist(attr: &[u8], clusters: u64) -> FsResult<Vec<Run>> {
    let mut vcn = le64(attr, 16)?;
    let mut pos = usize::from(le16(attr, 32)?);
    let mut lcn: i64 = 0;
    let mut runs = Vec::new();
    loop {
        let h = u8_at(attr, pos)?;
        if h == 0 {
            break;
        }
        let ls = usize::from(h & 0xF);
        let os = usize::from(h >> 4);
        if ls == 0 || ls > 8 || os > 8 {
            return Err(doubt(format!("NTFS run header {h:#x}")));
        }
        let mut len = 0u64;
        for (i, &x) in slice(attr, pos + 1, ls)?.iter().enumerate() {
            len |= u64::from(x) << (8 * i);
        }
        let run_lcn = if os == 0 {
            None
        } else {
            lcn =
                lcn.checked_add(signed_le(slice(attr, pos + 1 + ls, os)?)).ok_or_else(|| doubt("NTFS LCN overflow"))?;
            let l = u64::try_from(lcn).map_err(|_| doubt("negative NTFS LCN"))?;
            if l.checked_add(len).is_none_or(|e| e > clusters) {
                return Err(doubt(format!("NTFS run {l}+{len} is past the volume")));
            }
            Some(l)
        };
        if len == 0 {
            return Err(doubt("NTFS run of length 0"));
        }
        runs.push(Run { vcn, lcn: run_lcn, len });
        if runs.len() > MAX_RUNS {
            return Err(doubt("too many NTFS runs"));
        }
        vcn = vcn.checked_add(len).ok_or_else(|| doubt("NTFS VCN overflow"))?;
        pos = pos + 1 + ls + os;
    }
    Ok(runs)
}

/// Reads `buf.len()` bytes at byte `offset` of a non-resident stream mapped by `runs`.
fn read_stream(region: &Region<'_>, cluster: u64, runs: &[Run], offset: u64, buf: &mut [u8]) -> FsResult<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset.checked_add(u64_of(done)).ok_or_else(|| doubt("stream offset overflows"))?;
        let vcn = at / cluster;
        let run = runs
            .iter()
            .find(|r| r.vcn <= vcn && vcn < r.vcn + r.len)
            .ok_or_else(|| doubt(format!("NTFS stream offset {at} is not mapped")))?;
        let lcn = run.lcn.ok_or_else(|| doubt("NTFS metadata stream is sparse"))?;
        let run_end = mul(run.vcn + run.len, cluster, "run end")?;
        let n = usize_of((run_end - at).min(u64_of(buf.len() - done)), "read")?;
        let disk = mul(lcn + (vcn - run.vcn), cluster, "LCN")? + at % cluster;
        region.read(&mut buf[done..done + n], disk)?;
        done += n;
    }
    Ok(())
}

impl Vol {
    fn record(&self, region: &Region<'_>, n: u64) -> FsResult<Vec<u8>> {
        let mut buf = vec![0u8; usize_of(self.record_size, "record size")?];
        read_stream(region, self.cluster, &self.mft_runs, mul(n, self.record_size, "record")?, &mut buf)?;
        fixup(&mut buf, b"FILE")?;
        if le16(&buf, 22)? & 1 == 0 {
            return Err(doubt(format!("MFT record {n} is not in use")));
        }
        Ok(buf)
    }
}

/// The attributes of an MFT record: `(type, offset, length)`.
fn attributes(rec: &[u8]) -> FsResult<Vec<(u32, usize, usize)>> {
    let used = usize_of(u64::from(le32(rec, 24)?), "bytes used")?.min(rec.len());
    let mut off = usize::from(le16(rec, 20)?);
    let mut out = Vec::new();
    for _ in 0..512 {
        let t = le32(rec, off)?;
        if t == ATTR_END {
            return Ok(out);
        }
        let len = usize_of(u64::from(le32(rec, off + 4)?), "attribute length")?;
        if len < 16 || off + len > used {
            return Err(doubt("NTFS attribute runs past its record"));
        }
        out.push((t, off, len));
        off += len;
    }
    Err(doubt("too many NTFS attributes"))
}

/// The unnamed non-resident $DATA of a record: its runs, data size and initialized size.
fn data_runs(rec: &[u8], clusters: u64) -> FsResult<(Vec<Run>, u64, u64)> {
    let attrs = attributes(rec)?;
    if attrs.iter().any(|a| a.0 == ATTR_LIST) {
        return Err(doubt("NTFS metadata file with an attribute list is not supported"));
    }
    let (_, off, len) = *attrs
        .iter()
        .find(|a| a.0 == ATTR_DATA && rec.get(a.1 + 9) == Some(&0))
        .ok_or_else(|| doubt("no unnamed $DATA attribute"))?;
    let attr = slice(rec, off, len)?;
    if u8_at(attr, 8)? != 1 {
        return Err(doubt("resident $DATA where non-resident was expected"));
    }
    if le64(attr, 16)? != 0 {
        return Err(doubt("$DATA split across records"));
    }
    Ok((runlist(attr, clusters)?, le64(attr, 48)?, le64(attr, 56)?))
}

/// Whether `$LogFile` says the volume was cleanly unmounted (or was never used: all 0xFF).
fn logfile_clean(region: &Region<'_>, vol: &Vol) -> FsResult<()> {
    let rec = vol.record(region, 2)?;
    let (runs, size, _) = data_runs(&rec, vol.clusters)?;
    let mut best: Option<(u64, bool)> = None;
    let mut empty = 0;
    let mut page_size = 4096u64;
    for page in 0..2u64 {
        let at = page * page_size;
        if at + 512 > size {
            break;
        }
        let mut head = vec![0u8; 512];
        read_stream(region, vol.cluster, &runs, at, &mut head)?;
        if head.iter().all(|&b| b == 0xFF) {
            empty += 1;
            continue;
        }
        if slice(&head, 0, 4)? == b"CHKD" {
            return Err(doubt("$LogFile restart page is CHKD (chkdsk interrupted)"));
        }
        if slice(&head, 0, 4)? != b"RSTR" {
            continue;
        }
        let sys = u64::from(le32(&head, 16)?);
        if !(512..=65536).contains(&sys) || !sys.is_power_of_two() || (page == 1 && sys != page_size) {
            continue;
        }
        if page == 0 {
            page_size = sys;
        }
        let mut buf = vec![0u8; usize_of(sys, "restart page")?];
        read_stream(region, vol.cluster, &runs, page * sys, &mut buf)?;
        if fixup(&mut buf, b"RSTR").is_err() {
            continue;
        }
        let ra = usize::from(le16(&buf, 24)?);
        let lsn = le64(&buf, ra)?;
        let in_use = le16(&buf, ra + 12)?;
        let flags = le16(&buf, ra + 14)?;
        let clean = in_use == LOGFILE_NO_CLIENT || flags & RESTART_VOLUME_IS_CLEAN != 0;
        if best.is_none_or(|b| lsn > b.0) {
            best = Some((lsn, clean));
        }
    }
    match best {
        Some((_, true)) => Ok(()),
        Some((_, false)) => Err(doubt("$LogFile is not clean (mounted or hibernated Windows)")),
        None if empty > 0 => Ok(()),
        None => Err(doubt("$LogFile has no valid restart page")),
    }
}

/// Free byte ranges of the NTFS volume in `region`, relative to its start.
pub(crate) fn free_ranges(region: Region<'_>) -> FsResult<Vec<(u64, u64)>> {
    let boot = region.read_vec(0, 512)?;
    let (bps, cluster, total_sectors, mft_lcn, record_size) = parse_boot(&boot)?;
    let vol_bytes = mul(total_sectors, bps, "volume size")?;
    if vol_bytes > region.len {
        return Err(doubt(format!("the volume ({vol_bytes} bytes) is larger than its partition ({})", region.len)));
    }
    let clusters = vol_bytes / cluster;
    if mft_lcn >= clusters {
        return Err(doubt(format!("$MFT at cluster {mft_lcn} is past the volume")));
    }
    // Record 0 from its known place, then $MFT's own runs.
    let mut rec0 = region.read_vec(mul(mft_lcn, cluster, "$MFT")?, usize_of(record_size, "record size")?)?;
    fixup(&mut rec0, b"FILE")?;
    let (mft_runs, _, _) = data_runs(&rec0, clusters)?;
    if mft_runs.first().and_then(|r| r.lcn) != Some(mft_lcn) {
        return Err(doubt("$MFT's data runs do not start at the boot sector's $MFT cluster"));
    }
    let vol = Vol { bps, cluster, clusters, total_sectors, record_size, mft_runs };

    let volume = vol.record(&region, 3)?;
    let info = attributes(&volume)?
        .into_iter()
        .find(|a| a.0 == ATTR_VOLUME_INFORMATION)
        .ok_or_else(|| doubt("$Volume has no volume information"))?;
    let attr = slice(&volume, info.1, info.2)?;
    let value = usize::from(le16(attr, 20)?);
    let flags = le16(attr, value + 10)?;
    if flags & VOLUME_IS_DIRTY != 0 {
        return Err(doubt("NTFS volume is marked dirty"));
    }
    if flags & VOLUME_CHKDSK_UNDERWAY != 0 {
        return Err(doubt("NTFS chkdsk is under way"));
    }
    logfile_clean(&region, &vol)?;

    let bitmap_rec = vol.record(&region, 6)?;
    let (runs, size, initialized) = data_runs(&bitmap_rec, clusters)?;
    let need = clusters.div_ceil(8);
    if size < need || initialized < need {
        return Err(doubt(format!("$Bitmap holds {size} bytes ({initialized} initialized) for {clusters} clusters")));
    }
    let mut free = FreeList::default();
    let chunk = 1u64 << 20;
    let mut buf = Vec::new();
    let mut base = 0u64;
    let mut run_start: Option<u64> = None;
    while base < need {
        let n = usize_of(chunk.min(need - base), "chunk")?;
        buf.resize(n, 0);
        read_stream(&region, cluster, &runs, base, &mut buf)?;
        for (i, &byte) in buf.iter().enumerate() {
            let first = (base + u64_of(i)) * 8;
            for bit in 0..8u64 {
                let c = first + bit;
                if c >= clusters {
                    break;
                }
                if byte & (1 << bit) == 0 {
                    run_start.get_or_insert(c);
                } else if let Some(s) = run_start.take() {
                    free.push(s * cluster, (c - s) * cluster);
                }
            }
        }
        base += u64_of(n);
    }
    if let Some(s) = run_start {
        free.push(s * cluster, (clusters - s) * cluster);
    }
    // The boot sector and its backup (the sector after the volume) are kept.
    let kept = [(0, cluster), (vol.total_sectors.saturating_mul(vol.bps), vol.bps)];
    Ok(super::subtract(free.into_ranges(), &kept))
}
