//! GPT: the primary header at LBA 1 (512- or 4096-byte logical sectors), its CRC32 and the entry array's CRC32,
//! falling back to the backup header at the last LBA. The headers, entry arrays and everything outside the usable
//! LBAs are reserved (kept).

use super::{Entry, Table};
use crate::error::Result;
use crate::fs::bytes::{crc32_ieee, le32, le64, slice};
use crate::fs::{DiskRead, TableKind};

/// Entry arrays larger than this are not believed.
const MAX_ARRAY_BYTES: u64 = 4 << 20;

struct Header {
    my_lba: u64,
    alternate_lba: u64,
    first_usable: u64,
    last_usable: u64,
    entries_lba: u64,
    count: u64,
    entry_size: u64,
    entries_crc: u32,
}

fn parse_header(sector: &[u8]) -> std::result::Result<Header, String> {
    if sector.get(..8) != Some(b"EFI PART") {
        return Err("no \"EFI PART\" signature".into());
    }
    let e = |r: crate::fs::FsResult<u64>| r.map_err(|_| "short GPT header".to_string());
    let size = e(le32(sector, 12).map(u64::from))?;
    let len = usize::try_from(size).map_err(|_| "header size".to_string())?;
    if !(92..=sector.len()).contains(&len) {
        return Err(format!("header size {size} is not in 92..={}", sector.len()));
    }
    let stored = e(le32(sector, 16).map(u64::from))?;
    let mut copy = slice(sector, 0, len).map_err(|_| "short GPT header".to_string())?.to_vec();
    copy[16..20].fill(0);
    let computed = u64::from(crc32_ieee(&copy));
    if computed != stored {
        return Err(format!("header CRC32 {stored:#010x} does not match {computed:#010x}"));
    }
    Ok(Header {
        my_lba: e(le64(sector, 24))?,
        alternate_lba: e(le64(sector, 32))?,
        first_usable: e(le64(sector, 40))?,
        last_usable: e(le64(sector, 48))?,
        entries_lba: e(le64(sector, 72))?,
        count: e(le32(sector, 80).map(u64::from))?,
        entry_size: e(le32(sector, 84).map(u64::from))?,
        entries_crc: le32(sector, 88).map_err(|_| "short GPT header".to_string())?,
    })
}

fn guid_string(g: &[u8]) -> String {
    if g.len() < 16 {
        return String::new();
    }
    format!(
        "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6], g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]
    )
}

/// The header at `lba` and its checked entry array.
fn read_at(disk: &dyn DiskRead, lba_size: u64, lba: u64) -> Result<std::result::Result<(Header, Vec<u8>), String>> {
    let size = disk.size();
    let Some(at) = lba.checked_mul(lba_size) else { return Ok(Err("header offset overflows".into())) };
    if at.saturating_add(lba_size) > size {
        return Ok(Err(format!("header LBA {lba} is past the disk's end")));
    }
    let mut sector = vec![0u8; usize::try_from(lba_size).unwrap_or(512)];
    disk.read_exact_at(&mut sector, at)?;
    let h = match parse_header(&sector) {
        Ok(h) => h,
        Err(r) => return Ok(Err(r)),
    };
    if h.my_lba != lba {
        return Ok(Err(format!("header at LBA {lba} says it is at LBA {}", h.my_lba)));
    }
    if h.entry_size < 128 || h.entry_size % 8 != 0 || h.entry_size > 4096 {
        return Ok(Err(format!("entry size {} is not supported", h.entry_size)));
    }
    let Some(bytes) = h.count.checked_mul(h.entry_size).filter(|b| *b <= MAX_ARRAY_BYTES) else {
        return Ok(Err(format!("{} entries of {} bytes are too many", h.count, h.entry_size)));
    };
    let Some(arr_at) = h.entries_lba.checked_mul(lba_size) else { return Ok(Err("entry array overflows".into())) };
    if arr_at.saturating_add(bytes) > size {
        return Ok(Err("entry array is past the disk's end".into()));
    }
    let mut array = vec![0u8; usize::try_from(bytes).unwrap_or(0)];
    disk.read_exact_at(&mut array, arr_at)?;
    let crc = crc32_ieee(&array);
    if crc != h.entries_crc {
        return Ok(Err(format!("entry array CRC32 {:#010x} does not match {crc:#010x}", h.entries_crc)));
    }
    Ok(Ok((h, array)))
}

/// Ok(table) or Err(why there is no valid GPT); Err(VhdError) only for I/O.
pub(crate) fn read(disk: &dyn DiskRead) -> Result<std::result::Result<Table, String>> {
    let size = disk.size();
    let mut reasons = Vec::new();
    for lba_size in [512u64, 4096] {
        if size < lba_size * 2 {
            continue;
        }
        let last_lba = size / lba_size - 1;
        let mut warnings = Vec::new();
        let (h, array) = match read_at(disk, lba_size, 1)? {
            Ok(found) => {
                let alt = found.0.alternate_lba;
                match read_at(disk, lba_size, alt)? {
                    Ok(_) if alt == last_lba => {}
                    Ok(_) => warnings.push(format!("backup GPT header at LBA {alt}, not the last LBA {last_lba}")),
                    Err(r) => warnings.push(format!("backup GPT header at LBA {alt}: {r}")),
                }
                found
            }
            Err(primary) => match read_at(disk, lba_size, last_lba)? {
                Ok(found) => {
                    warnings.push(format!("primary GPT header: {primary}; the backup header is used"));
                    found
                }
                Err(backup) => {
                    reasons.push(format!("{lba_size}-byte sectors: primary: {primary}; backup: {backup}"));
                    continue;
                }
            },
        };
        if h.first_usable > h.last_usable || h.last_usable > last_lba {
            return Ok(Err(format!("usable LBAs {}..={} do not fit the disk", h.first_usable, h.last_usable)));
        }
        let mut entries = Vec::new();
        let step = usize::try_from(h.entry_size).unwrap_or(128);
        for (i, raw) in array.chunks_exact(step).enumerate() {
            let type_guid = &raw[..16];
            if type_guid.iter().all(|&b| b == 0) {
                continue;
            }
            let (Ok(first), Ok(last)) = (le64(raw, 32), le64(raw, 40)) else { continue };
            let index = u32::try_from(i + 1).unwrap_or(u32::MAX);
            let (Some(start), Some(end)) =
                (first.checked_mul(lba_size), last.checked_add(1).and_then(|l| l.checked_mul(lba_size)))
            else {
                return Ok(Err(format!("entry {index} overflows")));
            };
            if last < first {
                return Ok(Err(format!("entry {index} ends (LBA {last}) before it starts (LBA {first})")));
            }
            entries.push(Entry {
                index,
                start,
                length: end - start,
                type_id: guid_string(type_guid),
                container: false,
            });
        }
        // Everything outside the usable LBAs: MBR, headers, entry arrays, the backup GPT.
        let usable_start = h.first_usable * lba_size;
        let usable_end = (h.last_usable + 1) * lba_size;
        let reserved = vec![(0, usable_start), (usable_end, size.saturating_sub(usable_end))];
        return Ok(Ok(Table { kind: TableKind::Gpt, entries, reserved, warnings }));
    }
    Ok(Err(if reasons.is_empty() { "disk too small".into() } else { reasons.join("; ") }))
}

#[cfg(test)]
mod tests {
    use crate::fs::bytes::crc32_ieee;
    use crate::fs::{usage, Decision, FsKind, TableKind};

    const LBA: usize = 4096;

    fn header(my: u64, alt: u64, entries: u64, first: u64, last: u64, array_crc: u32) -> Vec<u8> {
        let mut h = vec![0u8; LBA];
        h[..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&my.to_le_bytes());
        h[32..40].copy_from_slice(&alt.to_le_bytes());
        h[40..48].copy_from_slice(&first.to_le_bytes());
        h[48..56].copy_from_slice(&last.to_le_bytes());
        h[72..80].copy_from_slice(&entries.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&array_crc.to_le_bytes());
        let crc = crc32_ieee(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// A GPT on 4096-byte logical sectors holding one swap partition.
    #[test]
    fn gpt_with_4k_sectors() {
        let size = 8usize << 20;
        let last = u64::try_from(size / LBA - 1).unwrap();
        let mut disk = vec![0u8; size];
        disk[446 + 4] = 0xEE;
        disk[510] = 0x55;
        disk[511] = 0xAA;
        let mut array = vec![0u8; 128 * 128];
        array[..16].copy_from_slice(&[
            0x6D, 0xFD, 0x57, 0x06, 0xAB, 0xA4, 0xC4, 0x43, 0x84, 0xE5, 0x09, 0x33, 0xC8, 0x4B, 0x4F, 0x4F,
        ]);
        array[16] = 1;
        array[32..40].copy_from_slice(&256u64.to_le_bytes());
        array[40..48].copy_from_slice(&1279u64.to_le_bytes());
        let array_crc = crc32_ieee(&array);
        disk[LBA..2 * LBA].copy_from_slice(&header(1, last, 2, 6, last - 5, array_crc));
        disk[2 * LBA..6 * LBA].copy_from_slice(&array);
        let backup_entries = usize::try_from(last - 4).unwrap() * LBA;
        disk[backup_entries..backup_entries + array.len()].copy_from_slice(&array);
        let at = usize::try_from(last).unwrap() * LBA;
        disk[at..at + LBA].copy_from_slice(&header(last, 1, last - 4, 6, last - 5, array_crc));
        // The swap area: 1024 pages of 4 KiB.
        let part = 256 * LBA;
        disk[part + 4086..part + 4096].copy_from_slice(b"SWAPSPACE2");
        disk[part + 1028..part + 1032].copy_from_slice(&1023u32.to_le_bytes());
        let u = usage(&disk).unwrap();
        assert_eq!(u.table, TableKind::Gpt);
        assert!(u.warnings.is_empty(), "{:?}", u.warnings);
        assert_eq!(u.partitions.len(), 1);
        let p = &u.partitions[0];
        assert_eq!((p.start, p.length), (1 << 20, 4 << 20));
        assert_eq!(p.type_id, "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F");
        assert_eq!(p.filesystem, FsKind::Swap);
        assert_eq!(p.decision, Decision::Dropped { free_bytes: (4 << 20) - 4096 });
        assert_eq!(u.free, vec![((1 << 20) + 4096, (4 << 20) - 4096)]);
    }
}
