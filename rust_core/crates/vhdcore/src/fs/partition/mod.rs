//! Partition tables: MBR (with extended/logical partitions), GPT (with its CRCs), or none (the whole disk is one
//! filesystem). The table's own structures are listed as `reserved`: no partition may overlap them.

use super::{DiskRead, FsKind};
use crate::error::Result;

pub mod gpt;
pub mod mbr;

/// One entry of a table.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub index: u32,
    pub start: u64,
    pub length: u64,
    pub type_id: String,
    /// An MBR extended partition: a container of logical partitions, not a filesystem.
    pub container: bool,
}

#[derive(Debug)]
pub(crate) struct Table {
    pub kind: super::TableKind,
    pub entries: Vec<Entry>,
    /// Byte ranges `(start, length)` of the table's own structures (MBR, EBRs, GPT headers and entry arrays).
    pub reserved: Vec<(u64, u64)>,
    pub warnings: Vec<String>,
}

/// The disk's partition table; a disk without one is a single entry covering it all.
pub(crate) fn read_table(disk: &dyn DiskRead) -> Result<Table> {
    let size = disk.size();
    let mut sector0 = [0u8; 512];
    if size >= 512 {
        disk.read_exact_at(&mut sector0, 0)?;
    }
    let mut warnings = Vec::new();
    if mbr::has_signature(&sector0) && !looks_like_boot_sector(&sector0) {
        if mbr::is_protective(&sector0) {
            match gpt::read(disk)? {
                Ok(table) => return Ok(table),
                Err(reason) => {
                    // A protective MBR without a readable GPT: nothing can be trusted, keep it all.
                    return Ok(Table {
                        kind: super::TableKind::Gpt,
                        entries: Vec::new(),
                        reserved: vec![(0, size)],
                        warnings: vec![format!("protective MBR but no valid GPT ({reason}): the disk is kept whole")],
                    });
                }
            }
        }
        match mbr::read(disk, &sector0)? {
            Ok(table) => {
                if !table.entries.is_empty() {
                    return Ok(table);
                }
            }
            Err(reason) => {
                return Ok(Table {
                    kind: super::TableKind::Mbr,
                    entries: Vec::new(),
                    reserved: vec![(0, size)],
                    warnings: vec![format!("MBR not understood ({reason}): the disk is kept whole")],
                });
            }
        }
        warnings.push("MBR signature without partitions: the disk is read as one filesystem".to_string());
    } else if let Ok(table) = gpt::read(disk)? {
        // A GPT whose protective MBR was lost is still a GPT.
        return Ok(table);
    }
    Ok(Table {
        kind: super::TableKind::None,
        entries: vec![Entry { index: 0, start: 0, length: size, type_id: String::new(), container: false }],
        reserved: Vec::new(),
        warnings,
    })
}

/// A filesystem boot sector (NTFS, FAT) also ends in 0x55AA: it is not a partition table.
fn looks_like_boot_sector(sector0: &[u8; 512]) -> bool {
    matches!(super::identify(sector0), FsKind::Ntfs | FsKind::Fat)
}
