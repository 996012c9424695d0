//! The ext2/3/4 superblock: geometry, features, and the checks that decide whether the rest can be trusted.

use crate::fs::bytes::{crc32c_raw, le16, le32, slice};
use crate::fs::{doubt, FsResult};

pub const MAGIC: u16 = 0xEF53;

pub const COMPAT_HAS_JOURNAL: u32 = 0x4;
pub const COMPAT_SPARSE_SUPER2: u32 = 0x200;
pub const COMPAT_FAST_COMMIT: u32 = 0x400;

pub const INCOMPAT_FILETYPE: u32 = 0x2;
pub const INCOMPAT_RECOVER: u32 = 0x4;
pub const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
pub const INCOMPAT_META_BG: u32 = 0x10;
pub const INCOMPAT_EXTENTS: u32 = 0x40;
pub const INCOMPAT_64BIT: u32 = 0x80;
pub const INCOMPAT_MMP: u32 = 0x100;
pub const INCOMPAT_FLEX_BG: u32 = 0x200;
pub const INCOMPAT_EA_INODE: u32 = 0x400;
pub const INCOMPAT_DIRDATA: u32 = 0x1000;
pub const INCOMPAT_CSUM_SEED: u32 = 0x2000;
pub const INCOMPAT_LARGEDIR: u32 = 0x4000;
pub const INCOMPAT_INLINE_DATA: u32 = 0x8000;
pub const INCOMPAT_ENCRYPT: u32 = 0x10000;
pub const INCOMPAT_CASEFOLD: u32 = 0x20000;
/// The incompat features whose on-disk block allocation we understand.
const INCOMPAT_KNOWN: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_DIRDATA
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD;

pub const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
pub const RO_COMPAT_GDT_CSUM: u32 = 0x10;
pub const RO_COMPAT_HAS_SNAPSHOT: u32 = 0x80;
pub const RO_COMPAT_BIGALLOC: u32 = 0x200;
pub const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

/// Groups beyond this many are not believed (128 TiB of 4 KiB blocks): descriptors are held in memory.
const MAX_GROUPS: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct Superblock {
    pub blocks_count: u64,
    pub first_data_block: u64,
    pub block_size: u64,
    pub blocks_per_group: u64,
    pub inodes_per_group: u64,
    pub inode_size: u64,
    pub state: u16,
    pub compat: u32,
    pub incompat: u32,
    pub ro_compat: u32,
    pub uuid: [u8; 16],
    pub journal_inum: u32,
    pub journal_dev: u32,
    pub journal_uuid: [u8; 16],
    pub desc_size: u64,
    pub reserved_gdt_blocks: u64,
    pub first_meta_bg: u64,
    pub backup_bgs: [u32; 2],
    pub csum_seed: u32,
    pub group_count: u64,
}

impl Superblock {
    pub fn has_incompat(&self, f: u32) -> bool {
        self.incompat & f != 0
    }
    pub fn has_compat(&self, f: u32) -> bool {
        self.compat & f != 0
    }
    pub fn has_ro_compat(&self, f: u32) -> bool {
        self.ro_compat & f != 0
    }
    pub fn descs_per_block(&self) -> u64 {
        self.block_size / self.desc_size
    }
    /// Blocks the group descriptor table fills.
    pub fn desc_blocks(&self) -> u64 {
        self.group_count.div_ceil(self.descs_per_block())
    }

    /// Parses and checks the 1024 bytes of a superblock; a doubt names what is wrong.
    pub fn parse(b: &[u8]) -> FsResult<Superblock> {
        let magic = le16(b, 0x38)?;
        if magic != MAGIC {
            return Err(doubt(format!("ext superblock magic {magic:#06x}")));
        }
        let rev_level = le32(b, 0x4C)?;
        let (compat, incompat, ro_compat) =
            if rev_level >= 1 { (le32(b, 0x5C)?, le32(b, 0x60)?, le32(b, 0x64)?) } else { (0, 0, 0) };
        if ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
            let stored = le32(b, 0x3FC)?;
            let computed = crc32c_raw(!0, slice(b, 0, 0x3FC)?);
            if stored != computed {
                return Err(doubt(format!("superblock checksum {stored:#010x} does not match {computed:#010x}")));
            }
        }
        if incompat & INCOMPAT_JOURNAL_DEV != 0 {
            return Err(doubt("an external journal device, not a filesystem"));
        }
        let unknown = incompat & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(doubt(format!("unsupported incompat features {unknown:#x}")));
        }
        if ro_compat & RO_COMPAT_BIGALLOC != 0 {
            return Err(doubt("bigalloc (cluster bitmaps) is not supported"));
        }
        if ro_compat & RO_COMPAT_HAS_SNAPSHOT != 0 {
            return Err(doubt("ext4 snapshots are not supported"));
        }
        let log_block = le32(b, 0x18)?;
        if log_block > 6 {
            return Err(doubt(format!("s_log_block_size {log_block}")));
        }
        let block_size = 1024u64 << log_block;
        let hi = if incompat & INCOMPAT_64BIT != 0 { u64::from(le32(b, 0x150)?) } else { 0 };
        let blocks_count = u64::from(le32(b, 0x4)?) | (hi << 32);
        let first_data_block = u64::from(le32(b, 0x14)?);
        let expected_first = if block_size == 1024 { 1 } else { 0 };
        if first_data_block != expected_first {
            return Err(doubt(format!("s_first_data_block {first_data_block} with {block_size}-byte blocks")));
        }
        let blocks_per_group = u64::from(le32(b, 0x20)?);
        if blocks_per_group == 0 || blocks_per_group > block_size * 8 || blocks_per_group % 8 != 0 {
            return Err(doubt(format!("s_blocks_per_group {blocks_per_group}")));
        }
        if blocks_count <= first_data_block {
            return Err(doubt(format!("s_blocks_count {blocks_count}")));
        }
        let group_count = (blocks_count - first_data_block).div_ceil(blocks_per_group);
        if group_count > MAX_GROUPS {
            return Err(doubt(format!("{group_count} block groups")));
        }
        let desc_size = if incompat & INCOMPAT_64BIT != 0 {
            let d = u64::from(le16(b, 0xFE)?);
            if d < 64 || d > block_size || !d.is_power_of_two() {
                return Err(doubt(format!("s_desc_size {d}")));
            }
            d
        } else {
            32
        };
        let inode_size = if rev_level >= 1 { u64::from(le16(b, 0x58)?) } else { 128 };
        if inode_size < 128 || inode_size > block_size || !inode_size.is_power_of_two() {
            return Err(doubt(format!("s_inode_size {inode_size}")));
        }
        let inodes_per_group = u64::from(le32(b, 0x28)?);
        if inodes_per_group == 0 {
            return Err(doubt("s_inodes_per_group 0"));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(slice(b, 0x68, 16)?);
        let mut journal_uuid = [0u8; 16];
        journal_uuid.copy_from_slice(slice(b, 0xD0, 16)?);
        let csum_seed = if incompat & INCOMPAT_CSUM_SEED != 0 { le32(b, 0x270)? } else { crc32c_raw(!0, &uuid) };
        Ok(Superblock {
            blocks_count,
            first_data_block,
            block_size,
            blocks_per_group,
            inodes_per_group,
            inode_size,
            state: le16(b, 0x3A)?,
            compat,
            incompat,
            ro_compat,
            uuid,
            journal_inum: le32(b, 0xE0)?,
            journal_dev: le32(b, 0xE4)?,
            journal_uuid,
            desc_size,
            reserved_gdt_blocks: u64::from(le16(b, 0xCE)?),
            first_meta_bg: u64::from(le32(b, 0x104)?),
            backup_bgs: [le32(b, 0x24C)?, le32(b, 0x250)?],
            csum_seed,
            group_count,
        })
    }
}
