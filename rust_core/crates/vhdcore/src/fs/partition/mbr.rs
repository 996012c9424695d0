//! The MBR: four primary entries, and logical partitions in a chain of EBRs inside an extended partition.

use std::collections::HashSet;

use super::{Entry, Table};
use crate::error::Result;
use crate::fs::bytes::{le32, u8_at};
use crate::fs::{DiskRead, TableKind};

const SECTOR: u64 = 512;
/// Logical partitions beyond this many (or an EBR chain that loops) stop the walk: the rest is kept.
pub const MAX_LOGICAL: usize = 128;

pub(crate) fn has_signature(sector: &[u8; 512]) -> bool {
    sector[510] == 0x55 && sector[511] == 0xAA
}

/// A GPT's protective MBR: an entry of type 0xEE.
pub(crate) fn is_protective(sector: &[u8; 512]) -> bool {
    (0..4).any(|i| sector[446 + 16 * i + 4] == 0xEE)
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0F | 0x85)
}

struct Raw {
    status: u8,
    kind: u8,
    lba: u64,
    sectors: u64,
}

fn entry(sector: &[u8], i: usize) -> Option<Raw> {
    let base = 446 + 16 * i;
    Some(Raw {
        status: u8_at(sector, base).ok()?,
        kind: u8_at(sector, base + 4).ok()?,
        lba: u64::from(le32(sector, base + 8).ok()?),
        sectors: u64::from(le32(sector, base + 12).ok()?),
    })
}

/// Ok(table) or Err(reason the table is not understood); Err(VhdError) only for I/O.
pub(crate) fn read(disk: &dyn DiskRead, sector0: &[u8; 512]) -> Result<std::result::Result<Table, String>> {
    let mut entries = Vec::new();
    let mut reserved = vec![(0u64, SECTOR)];
    let mut warnings = Vec::new();
    let mut extended: Option<(u64, u64)> = None;
    for i in 0..4 {
        let Some(raw) = entry(sector0, i) else { return Ok(Err("short MBR".into())) };
        if raw.status != 0 && raw.status != 0x80 {
            return Ok(Err(format!("entry {} has status byte {:#04x}", i + 1, raw.status)));
        }
        if raw.kind == 0 || raw.sectors == 0 {
            continue;
        }
        let index = u32::try_from(i + 1).unwrap_or(0);
        let start = raw.lba * SECTOR;
        let length = raw.sectors * SECTOR;
        let container = is_extended(raw.kind);
        if container {
            if extended.is_some() {
                return Ok(Err("two extended partitions".into()));
            }
            extended = Some((raw.lba, raw.sectors));
        }
        entries.push(Entry { index, start, length, type_id: format!("mbr:{:#04x}", raw.kind), container });
    }
    if let Some((ext_lba, ext_sectors)) = extended {
        let mut seen = HashSet::new();
        let mut next_rel = 0u64;
        let mut index = 5u32;
        loop {
            if entries.len() > MAX_LOGICAL + 4 {
                warnings.push(format!("more than {MAX_LOGICAL} logical partitions: the rest are kept"));
                break;
            }
            if next_rel >= ext_sectors {
                return Ok(Err(format!("EBR at relative sector {next_rel} is outside the extended partition")));
            }
            let ebr_lba = ext_lba + next_rel;
            if !seen.insert(ebr_lba) {
                return Ok(Err(format!("EBR chain loops at sector {ebr_lba}")));
            }
            let Some(ebr_at) = ebr_lba.checked_mul(SECTOR) else { return Ok(Err("EBR offset overflows".into())) };
            if ebr_at.saturating_add(SECTOR) > disk.size() {
                return Ok(Err(format!("EBR at sector {ebr_lba} is past the disk's end")));
            }
            let mut ebr = [0u8; 512];
            disk.read_exact_at(&mut ebr, ebr_at)?;
            if !has_signature(&ebr) {
                return Ok(Err(format!("EBR at sector {ebr_lba} has no 0x55AA signature")));
            }
            reserved.push((ebr_at, SECTOR));
            let (Some(logical), Some(link)) = (entry(&ebr, 0), entry(&ebr, 1)) else {
                return Ok(Err("short EBR".into()));
            };
            if logical.kind != 0 && logical.sectors != 0 {
                let start = (ebr_lba + logical.lba) * SECTOR;
                let length = logical.sectors * SECTOR;
                let ext_end = (ext_lba + ext_sectors) * SECTOR;
                if start.saturating_add(length) > ext_end {
                    return Ok(Err(format!("logical partition {index} ends past its extended partition")));
                }
                entries.push(Entry {
                    index,
                    start,
                    length,
                    type_id: format!("mbr:{:#04x}", logical.kind),
                    container: false,
                });
                index += 1;
            }
            if link.kind == 0 || link.sectors == 0 {
                break;
            }
            if !is_extended(link.kind) {
                return Ok(Err(format!("EBR at sector {ebr_lba} links with type {:#04x}", link.kind)));
            }
            next_rel = link.lba;
        }
    }
    Ok(Ok(Table { kind: TableKind::Mbr, entries, reserved, warnings }))
}

#[cfg(test)]
mod tests {
    use crate::fs::{usage, TableKind};

    fn put_entry(disk: &mut [u8], sector: usize, slot: usize, kind: u8, lba: u32, sectors: u32) {
        let at = sector * 512 + 446 + 16 * slot;
        disk[at + 4] = kind;
        disk[at + 8..at + 12].copy_from_slice(&lba.to_le_bytes());
        disk[at + 12..at + 16].copy_from_slice(&sectors.to_le_bytes());
        disk[sector * 512 + 510] = 0x55;
        disk[sector * 512 + 511] = 0xAA;
    }

    #[test]
    fn ebr_loop_keeps_the_disk_whole() {
        let mut disk = vec![0u8; 2 << 20];
        put_entry(&mut disk, 0, 0, 0x05, 100, 2000);
        put_entry(&mut disk, 100, 0, 0x83, 2, 50);
        put_entry(&mut disk, 100, 1, 0x05, 0, 100); // links back to itself
        let u = usage(&disk).unwrap();
        assert_eq!(u.table, TableKind::Mbr);
        assert!(u.partitions.is_empty() && u.free.is_empty());
        assert!(u.warnings[0].contains("loops"), "{:?}", u.warnings);
    }

    #[test]
    fn long_ebr_chain_is_capped() {
        let mut disk = vec![0u8; 4 << 20];
        put_entry(&mut disk, 0, 0, 0x0F, 64, 8000);
        for i in 0..200u32 {
            let ebr = 64 + i * 20;
            put_entry(&mut disk, usize::try_from(ebr).unwrap(), 0, 0x83, 1, 10);
            put_entry(&mut disk, usize::try_from(ebr).unwrap(), 1, 0x05, (i + 1) * 20, 20);
        }
        let u = usage(&disk).unwrap();
        assert!(u.partitions.len() <= super::MAX_LOGICAL + 6, "{}", u.partitions.len());
        assert!(u.warnings.iter().any(|w| w.contains("logical")), "{:?}", u.warnings);
        let json = serde_json::to_string(&u).unwrap();
        assert!(json.contains("\"decision\":\"keep_whole\""), "{json}");
    }
}
