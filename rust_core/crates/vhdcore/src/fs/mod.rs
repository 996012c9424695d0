//! Live data only: which byte ranges of a flattened disk its filesystems *prove* free.
//!
//! [`usage`] reads the disk's partition table (MBR with extended/logical partitions, GPT with its CRCs, or none:
//! then the whole disk is one filesystem), identifies each partition's filesystem and asks it for the ranges it
//! proves free:
//!
//! - **ext2/3/4** ([`ext4`]): the block bitmaps of every group, uninitialised groups synthesised from the layout, and,
//!   when the journal needs recovery (a crash-consistent snapshot of a mounted filesystem), the union with every
//!   committed jbd2 copy of a bitmap or group descriptor block, so that no block a replay would bring back is lost;
//! - **XFS** ([`xfs`]): the free-space B+tree by block number of every allocation group, when the log is clean;
//! - **NTFS** ([`ntfs`]): the `$Bitmap` cluster bitmap found through the MFT, when the volume is not dirty and its
//!   `$LogFile` is clean;
//! - **Linux swap** ([`swap`]): everything after the header page (nothing when it holds a hibernation image).
//!
//! Everything else is kept: the area before the first partition (boot loaders), gaps between partitions, the
//! backup GPT, partitions with unknown or unsupported content (LVM, LUKS, btrfs, ...), the tail of a partition past
//! its filesystem, and any filesystem whose state is in doubt: then the partition's [`Decision`] is
//! [`Decision::KeepWhole`] with the reason. Malformed input never panics: every size and offset read from disk is
//! checked, and a doubt keeps the filesystem whole.
//!
//! Free ranges are byte ranges of the disk, aligned inwards to 512-byte sectors, sorted and merged;
//! [`DiskUsage::free_blocks`] says which blocks of a given size (2 MiB for an image's VHD) are wholly free.
//!
//! # Guarantees
//!
//! - Nothing that any committed state of a filesystem uses is called free (DESIGN §7b): ext3/4 journals that need
//!   recovery are walked and every committed copy of a bitmap or descriptor block is unioned in (revokes are not
//!   honoured: the union only grows); an XFS log that is not provably clean, an NTFS volume that is dirty or whose
//!   `$LogFile` is not clean, a swap area holding a hibernation image, keep the filesystem whole.
//! - The journal itself is kept, unreplayed: a restored server's kernel replays it at first mount.
//! - Bad input gives a [`Decision::KeepWhole`] with the reason, never a panic, a hang or unbounded memory: bitmaps
//!   are read one group at a time, counts and depths are capped, arithmetic on disk values is checked. Only an
//!   I/O error of the disk itself is an `Err`.
//!
//! ```no_run
//! # fn main() -> vhdcore::Result<()> {
//! let chain = vhdcore::Chain::open(std::path::Path::new("leaf.vhd"), vhdcore::MAX_CHAIN_DEPTH)?;
//! let usage = vhdcore::fs::usage(&chain)?;
//! for p in &usage.partitions {
//!     println!("{} {} {:?}", p.index, p.filesystem.as_str(), p.decision);
//! }
//! let free_2mib: Vec<bool> = usage.free_blocks(2 << 20);
//! # let _ = free_2mib;
//! # Ok(())
//! # }
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use serde::Serialize;

use crate::chain::Chain;
use crate::error::{Result, VhdError};

pub(crate) mod bytes;
pub(crate) mod ext4;
pub(crate) mod ntfs;
pub(crate) mod partition;
pub(crate) mod swap;
pub(crate) mod xfs;

/// Random-access reads of a flattened disk.
pub trait DiskRead {
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset`; an error when the disk ends before.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

impl DiskRead for Chain {
    fn size(&self) -> u64 {
        self.virtual_size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset.checked_add(bytes::u64_of(buf.len()));
        if end.is_none_or(|e| e > self.virtual_size()) {
            return Err(VhdError::invalid_argument(
                None,
                format!("{} bytes at {offset} are past the disk's end {}", buf.len(), self.virtual_size()),
            ));
        }
        self.read_at(offset, buf)
    }
}

impl DiskRead for File {
    fn size(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        FileExt::read_exact_at(self, buf, offset).map_err(|source| VhdError::Read {
            path: PathBuf::from("<disk>"),
            offset,
            length: bytes::u64_of(buf.len()),
            source,
        })
    }
}

impl DiskRead for [u8] {
    fn size(&self) -> u64 {
        bytes::u64_of(self.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let src = usize::try_from(offset).ok().and_then(|s| self.get(s..s.checked_add(buf.len())?));
        match src {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(VhdError::invalid_argument(
                None,
                format!("{} bytes at {offset} are past the end {}", buf.len(), self.len()),
            )),
        }
    }
}

/// A borrowed byte slice (`usage(&&bytes[..])`).
impl DiskRead for &[u8] {
    fn size(&self) -> u64 {
        (**self).size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

impl DiskRead for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
}

/// What a filesystem reader could not prove: a doubt keeps the filesystem whole; an I/O error stops [`usage`].
#[derive(Debug)]
pub(crate) enum FsError {
    Io(VhdError),
    Doubt(String),
}

impl From<VhdError> for FsError {
    fn from(e: VhdError) -> Self {
        FsError::Io(e)
    }
}

pub(crate) type FsResult<T> = std::result::Result<T, FsError>;

pub(crate) fn doubt(reason: impl Into<String>) -> FsError {
    FsError::Doubt(reason.into())
}

/// A window of the disk (one partition): reads are relative to its start and may not leave it.
#[derive(Clone, Copy)]
pub(crate) struct Region<'a> {
    pub disk: &'a dyn DiskRead,
    pub start: u64,
    pub len: u64,
}

impl Region<'_> {
    pub fn read(&self, buf: &mut [u8], offset: u64) -> FsResult<()> {
        let len = bytes::u64_of(buf.len());
        let end = offset.checked_add(len).ok_or_else(|| doubt(format!("read at {offset} overflows")))?;
        if end > self.len {
            return Err(doubt(format!("a read of {len} bytes at {offset} is past the partition's end {}", self.len)));
        }
        let at = self.start.checked_add(offset).ok_or_else(|| doubt("read offset overflows"))?;
        self.disk.read_exact_at(buf, at)?;
        Ok(())
    }

    pub fn read_vec(&self, offset: u64, len: usize) -> FsResult<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read(&mut buf, offset)?;
        Ok(buf)
    }
}

/// More free ranges than this (per disk) and the shortest are dropped (kept): memory stays bounded.
const MAX_RANGES: usize = 4 << 20;

/// Free byte ranges `(start, length)` collected in ascending order; adjacent ones merge. Past [`MAX_RANGES`] the
/// shortest ranges are given up (treated as used), which is always safe.
#[derive(Debug, Default)]
pub(crate) struct FreeList {
    ranges: Vec<(u64, u64)>,
    min_len: u64,
}

impl FreeList {
    pub fn push(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Some(last) = self.ranges.last_mut() {
            if last.0.checked_add(last.1) == Some(start) {
                last.1 = last.1.saturating_add(len);
                return;
            }
        }
        if len < self.min_len {
            return;
        }
        self.ranges.push((start, len));
        if self.ranges.len() > MAX_RANGES {
            self.min_len = self.min_len.max(4096).saturating_mul(2);
            let min = self.min_len;
            self.ranges.retain(|r| r.1 >= min);
        }
    }

    pub fn into_ranges(self) -> Vec<(u64, u64)> {
        self.ranges
    }
}

/// Sorts and merges `(start, length)` ranges.
fn normalize(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|r| r.1 > 0);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, l) in ranges {
        let e = s.saturating_add(l);
        if let Some(last) = out.last_mut() {
            let last_end = last.0.saturating_add(last.1);
            if s <= last_end {
                last.1 = last_end.max(e) - last.0;
                continue;
            }
        }
        out.push((s, l));
    }
    out
}

/// `free` minus `kept`; both are `(start, length)` lists, the result sorted and merged.
pub(crate) fn subtract(free: Vec<(u64, u64)>, kept: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let free = normalize(free);
    let kept = normalize(kept.to_vec());
    let mut out = Vec::with_capacity(free.len());
    let mut k = 0usize;
    for (s, l) in free {
        let mut cur = s;
        let end = s.saturating_add(l);
        while k < kept.len() && kept[k].0.saturating_add(kept[k].1) <= cur {
            k += 1;
        }
        let mut j = k;
        while cur < end && j < kept.len() && kept[j].0 < end {
            let (ks, kl) = kept[j];
            if ks > cur {
                out.push((cur, ks - cur));
            }
            cur = cur.max(ks.saturating_add(kl));
            j += 1;
        }
        if cur < end {
            out.push((cur, end - cur));
        }
    }
    out
}

/// The filesystem (or other content) found in a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Ext2,
    Ext3,
    Ext4,
    Xfs,
    Ntfs,
    Swap,
    Lvm,
    Luks,
    Btrfs,
    Fat,
    /// An MBR extended partition's container (its logical partitions are listed on their own).
    Extended,
    Unknown,
}

impl FsKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FsKind::Ext2 => "ext2",
            FsKind::Ext3 => "ext3",
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
            FsKind::Ntfs => "ntfs",
            FsKind::Swap => "swap",
            FsKind::Lvm => "lvm",
            FsKind::Luks => "luks",
            FsKind::Btrfs => "btrfs",
            FsKind::Fat => "fat",
            FsKind::Extended => "extended",
            FsKind::Unknown => "unknown",
        }
    }
}

/// What imaging does with a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// The filesystem proved `free_bytes` free; those bytes are left out.
    Dropped { free_bytes: u64 },
    /// Everything is kept, for `reason`.
    KeepWhole { reason: String },
}

/// The partition table found on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    /// No table: the whole disk is one filesystem.
    None,
    Mbr,
    Gpt,
}

/// One partition (or the whole disk when there is no table).
#[derive(Debug, Clone, Serialize)]
pub struct Partition {
    /// MBR: 1-4 primary, 5.. logical; GPT: entry number from 1; 0 for a whole disk without a table.
    pub index: u32,
    /// Byte offset on the disk.
    pub start: u64,
    /// Byte length (clamped to the disk).
    pub length: u64,
    /// The table's type: `mbr:0x83`, or a GPT type GUID; empty without a table.
    pub type_id: String,
    pub filesystem: FsKind,
    #[serde(flatten)]
    pub decision: Decision,
    /// Bytes of the partition that are kept (its length minus what was dropped).
    pub used_bytes: u64,
}

/// The result of [`usage`].
#[derive(Debug, Clone, Serialize)]
pub struct DiskUsage {
    pub size: u64,
    pub table: TableKind,
    pub partitions: Vec<Partition>,
    /// Free byte ranges `(start, length)`: sorted, merged, 512-aligned, inside the partitions that dropped them.
    pub free: Vec<(u64, u64)>,
    /// Things worth telling an operator that did not stop the analysis (a backup GPT that does not match, ...).
    pub warnings: Vec<String>,
}

impl DiskUsage {
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|r| r.1).sum()
    }

    /// Whether the whole byte range `[start, start + len)` is free.
    pub fn is_free(&self, start: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let Some(end) = start.checked_add(len) else { return false };
        let i = self.free.partition_point(|r| r.0.saturating_add(r.1) <= start);
        self.free.get(i).is_some_and(|r| r.0 <= start && r.0.saturating_add(r.1) >= end)
    }

    /// Per block of `block_size` bytes (the last one may be short), whether it is wholly free.
    pub fn free_blocks(&self, block_size: u64) -> Vec<bool> {
        if block_size == 0 {
            return Vec::new();
        }
        let count = self.size.div_ceil(block_size);
        let mut out = vec![false; usize::try_from(count).unwrap_or(0)];
        for &(s, l) in &self.free {
            let e = s.saturating_add(l);
            let mut b = s.div_ceil(block_size);
            while let Some(slot) = usize::try_from(b).ok().and_then(|i| out.get_mut(i)) {
                let bs = b.saturating_mul(block_size);
                let be = bs.saturating_add(block_size).min(self.size);
                if be > e {
                    break;
                }
                *slot = true;
                b += 1;
            }
        }
        out
    }

    /// The bytes of `[start, start + len)` that are free.
    pub fn free_within(&self, start: u64, len: u64) -> u64 {
        let end = start.saturating_add(len);
        let i = self.free.partition_point(|r| r.0.saturating_add(r.1) <= start);
        self.free[i..].iter().take_while(|r| r.0 < end).map(|r| r.0.saturating_add(r.1).min(end) - r.0.max(start)).sum()
    }
}

/// What one filesystem reader concluded, with offsets relative to the partition's start.
pub(crate) struct FsReport {
    pub kind: FsKind,
    pub outcome: std::result::Result<Vec<(u64, u64)>, String>,
}

/// Identifies the content of `region` and asks its reader for free ranges.
fn analyze(region: Region<'_>) -> Result<FsReport> {
    let mut head = vec![0u8; 0];
    // 68 KiB: the btrfs superblock magic lies at 64 KiB + 0x40.
    let probe = 0x11000u64;
    if region.len >= 4096 {
        let n = usize::try_from(probe.min(region.len)).unwrap_or(4096);
        head = vec![0u8; n];
        match region.read(&mut head, 0) {
            Ok(()) => {}
            Err(FsError::Io(e)) => return Err(e),
            Err(FsError::Doubt(r)) => return Ok(FsReport { kind: FsKind::Unknown, outcome: Err(r) }),
        }
    }
    let kind = identify(&head);
    let result = match kind {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => ext4::free_ranges(region),
        FsKind::Xfs => xfs::free_ranges(region),
        FsKind::Ntfs => ntfs::free_ranges(region),
        FsKind::Swap => swap::free_ranges(region, &head),
        other => Err(doubt(format!("{} content is kept whole", other.as_str()))),
    };
    let outcome = match result {
        Ok(ranges) => Ok(ranges),
        Err(FsError::Doubt(r)) => Err(r),
        Err(FsError::Io(e)) => return Err(e),
    };
    Ok(FsReport { kind, outcome })
}

/// The content of a partition from its first 68 KiB.
pub(crate) fn identify(head: &[u8]) -> FsKind {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0x438, &[0x53, 0xEF]) {
        return ext4::kind_of(head);
    }
    if at(0, b"XFSB") {
        return FsKind::Xfs;
    }
    if at(3, b"NTFS    ") {
        return FsKind::Ntfs;
    }
    if swap::is_swap(head) {
        return FsKind::Swap;
    }
    if at(0, b"LUKS\xba\xbe") || at(0, b"SKUL\xba\xbe") {
        return FsKind::Luks;
    }
    if at(0x218, b"LVM2 001") || at(0x418, b"LVM2 001") || at(0x018, b"LVM2 001") {
        return FsKind::Lvm;
    }
    if at(0x10040, b"_BHRfS_M") {
        return FsKind::Btrfs;
    }
    if at(0x36, b"FAT") || at(0x52, b"FAT32") {
        return FsKind::Fat;
    }
    FsKind::Unknown
}

/// Which ranges of `disk` its partition table and filesystems prove free, and why the rest is kept.
pub fn usage(disk: &dyn DiskRead) -> Result<DiskUsage> {
    let size = disk.size();
    let table = partition::read_table(disk)?;
    let mut warnings = table.warnings;
    let mut partitions = Vec::new();
    let mut free_all: Vec<(u64, u64)> = Vec::new();
    // Partitions that overlap one another (or the table's own structures) are kept whole.
    let overlapping: Vec<bool> = table
        .entries
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let end = p.start.saturating_add(p.length);
            let hits_other = table.entries.iter().enumerate().any(|(j, q)| {
                j != i && !q.container && !p.container && q.start < end && p.start < q.start.saturating_add(q.length)
            });
            let hits_meta = table.reserved.iter().any(|&(s, l)| s < end && p.start < s.saturating_add(l));
            hits_other || hits_meta
        })
        .collect();
    for (i, entry) in table.entries.iter().enumerate() {
        let start = entry.start.min(size);
        let length = entry.length.min(size - start);
        let mut report = if entry.container {
            FsReport {
                kind: FsKind::Extended,
                outcome: Err("extended partition: a container, its logical partitions are listed on their own".into()),
            }
        } else if overlapping[i] {
            FsReport { kind: FsKind::Unknown, outcome: Err("overlaps another partition or the partition table".into()) }
        } else if length < entry.length {
            FsReport { kind: FsKind::Unknown, outcome: Err(format!("ends past the disk's end {size}")) }
        } else {
            analyze(Region { disk, start, len: length })?
        };
        let mut dropped: Vec<(u64, u64)> = Vec::new();
        if let Ok(ranges) = &report.outcome {
            for &(s, l) in ranges {
                let e = s.saturating_add(l).min(length);
                let (Some(abs_s), Some(abs_e)) = (start.checked_add(s), start.checked_add(e)) else { continue };
                let (a, b) = (abs_s.div_ceil(512) * 512, abs_e / 512 * 512);
                if b > a {
                    dropped.push((a, b - a));
                }
            }
            dropped = normalize(dropped);
        }
        let free_bytes: u64 = dropped.iter().map(|r| r.1).sum();
        let decision = match std::mem::replace(&mut report.outcome, Ok(Vec::new())) {
            Ok(_) => Decision::Dropped { free_bytes },
            Err(reason) => Decision::KeepWhole { reason },
        };
        free_all.extend(dropped);
        partitions.push(Partition {
            index: entry.index,
            start,
            length,
            type_id: entry.type_id.clone(),
            filesystem: report.kind,
            decision,
            used_bytes: if entry.container {
                // The EBRs and gaps only: its logical partitions are listed (and counted) on their own.
                let inner: u64 = table
                    .entries
                    .iter()
                    .filter(|q| !q.container && q.start >= start && q.start.saturating_add(q.length) <= start + length)
                    .map(|q| q.length)
                    .sum();
                length.saturating_sub(inner)
            } else {
                length - free_bytes.min(length)
            },
        });
    }
    let free = subtract(free_all, &table.reserved);
    if free.len() > MAX_RANGES {
        warnings.push(format!("{} free ranges; the analysis keeps memory bounded", free.len()));
    }
    Ok(DiskUsage { size, table: table.kind, partitions, free, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtract_splits_and_trims() {
        let got = subtract(vec![(0, 100), (200, 100)], &[(10, 10), (90, 120), (250, 10)]);
        assert_eq!(got, vec![(0, 10), (20, 70), (210, 40), (260, 40)]);
    }

    #[test]
    fn free_blocks_needs_whole_blocks() {
        let u = DiskUsage {
            size: 10 * 1024,
            table: TableKind::None,
            partitions: vec![],
            free: vec![(1024, 4096), (6144, 4096)],
            warnings: vec![],
        };
        assert_eq!(u.free_blocks(2048), vec![false, true, false, true, true]);
        assert!(u.is_free(2048, 2048));
        assert!(!u.is_free(4096, 2048));
        assert_eq!(u.free_within(0, 10240), 8192);
    }
}
