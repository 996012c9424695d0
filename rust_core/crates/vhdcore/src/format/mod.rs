//! On-disk structures of the VHD format (Microsoft's "Virtual Hard Disk Image Format Specification"),
//! as big-endian typed views, with the spec's names and its checksum.

pub(crate) mod layout;

use zerocopy::byteorder::{BigEndian, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const SECTOR_SIZE: u64 = 512;
pub const FOOTER_SIZE: u64 = 512;
/// Virtual PC before 2004 wrote a footer one byte short.
pub const LEGACY_FOOTER_SIZE: u64 = 511;
pub const HEADER_SIZE: u64 = 1024;
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
pub const FILE_FORMAT_VERSION: u32 = 0x0001_0000;
pub const HEADER_VERSION: u32 = 0x0001_0000;
pub const FEATURE_RESERVED: u32 = 0x0000_0002;
pub const FIXED_DATA_OFFSET: u64 = u64::MAX;
pub const BAT_UNUSED: u32 = 0xFFFF_FFFF;
pub const DEFAULT_BLOCK_SIZE: u32 = 2 * 1024 * 1024;
pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 256 * 1024 * 1024;
/// The largest disk the format (and qemu, Hyper-V) accepts: 2040 GiB.
pub const MAX_VIRTUAL_SIZE: u64 = 2040 * 1024 * 1024 * 1024;
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH_OFFSET: u64 = 946_684_800;
/// What we write into creator_app; qemu trusts current_size for any app other than "vpc " and "qemu".
pub const CREATOR_APP: &[u8; 4] = b"cimg";
pub const CREATOR_HOST_OS: &[u8; 4] = b"Wi2k";
/// A parent locator's path is never longer than this (Windows' long-path limit, in UTF-16 code units ×2).
pub const MAX_LOCATOR_BYTES: u32 = 65_536;

pub const PLATFORM_NONE: u32 = 0;
pub const PLATFORM_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
pub const PLATFORM_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
pub const PLATFORM_MACX: u32 = u32::from_be_bytes(*b"MacX");
pub const PLATFORM_WI2R: u32 = u32::from_be_bytes(*b"Wi2r");
pub const PLATFORM_WI2K: u32 = u32::from_be_bytes(*b"Wi2k");
pub const PARENT_LOCATOR_COUNT: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    pub fn from_raw(raw: u32) -> Option<DiskType> {
        match raw {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }

    pub fn raw(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// The hard disk footer: the last 512 bytes of every VHD (and a copy at offset 0 of sparse ones).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Footer {
    pub cookie: [u8; 8],
    pub features: U32<BigEndian>,
    pub file_format_version: U32<BigEndian>,
    pub data_offset: U64<BigEndian>,
    pub timestamp: U32<BigEndian>,
    pub creator_app: [u8; 4],
    pub creator_version: U32<BigEndian>,
    pub creator_host_os: [u8; 4],
    pub original_size: U64<BigEndian>,
    pub current_size: U64<BigEndian>,
    pub cylinders: U16<BigEndian>,
    pub heads: u8,
    pub sectors_per_track: u8,
    pub disk_type: U32<BigEndian>,
    pub checksum: U32<BigEndian>,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
    pub reserved: [u8; 427],
}

pub const FOOTER_CHECKSUM_OFFSET: usize = 64;
pub const HEADER_CHECKSUM_OFFSET: usize = 36;

/// One of the eight parent locator entries of a differencing disk's header.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ParentLocatorEntry {
    pub platform_code: U32<BigEndian>,
    pub platform_data_space: U32<BigEndian>,
    pub platform_data_length: U32<BigEndian>,
    pub reserved: U32<BigEndian>,
    pub platform_data_offset: U64<BigEndian>,
}

/// The dynamic disk header, at the footer's data_offset.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Header {
    pub cookie: [u8; 8],
    pub data_offset: U64<BigEndian>,
    pub table_offset: U64<BigEndian>,
    pub header_version: U32<BigEndian>,
    pub max_table_entries: U32<BigEndian>,
    pub block_size: U32<BigEndian>,
    pub checksum: U32<BigEndian>,
    pub parent_unique_id: [u8; 16],
    pub parent_timestamp: U32<BigEndian>,
    pub reserved1: U32<BigEndian>,
    pub parent_unicode_name: [u8; 512],
    pub parent_locators: [ParentLocatorEntry; PARENT_LOCATOR_COUNT],
    pub reserved2: [u8; 256],
}

const _: () = assert!(std::mem::size_of::<Footer>() == 512);
const _: () = assert!(std::mem::size_of::<Header>() == 1024);
const _: () = assert!(std::mem::size_of::<ParentLocatorEntry>() == 24);

/// One's complement of the byte sum, with the 4-byte checksum field at `checksum_at` counted as zero.
pub fn checksum(bytes: &[u8], checksum_at: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(checksum_at..checksum_at + 4).contains(i))
        .fold(0u32, |acc, (_, b)| acc.wrapping_add(u32::from(*b)));
    !sum
}

impl Footer {
    pub fn computed_checksum(&self) -> u32 {
        checksum(self.as_bytes(), FOOTER_CHECKSUM_OFFSET)
    }

    pub fn seal(&mut self) {
        let sum = self.computed_checksum();
        self.checksum.set(sum);
    }

    pub fn new_zeroed() -> Footer {
        Footer::read_from_bytes(&[0u8; 512][..]).unwrap_or_else(|_| unreachable!("512 zero bytes form a footer"))
    }
}

impl Header {
    pub fn computed_checksum(&self) -> u32 {
        checksum(self.as_bytes(), HEADER_CHECKSUM_OFFSET)
    }

    pub fn seal(&mut self) {
        let sum = self.computed_checksum();
        self.checksum.set(sum);
    }

    pub fn new_zeroed() -> Header {
        Header::read_from_bytes(&[0u8; 1024][..]).unwrap_or_else(|_| unreachable!("1024 zero bytes form a header"))
    }
}

/// CHS geometry for a disk of `total_sectors`, per the algorithm in the spec's appendix.
pub fn chs_geometry(total_sectors: u64) -> (u16, u8, u8) {
    let total = total_sectors.min(65_535 * 16 * 255);
    let (mut spt, mut heads, mut cyl_x_heads): (u64, u64, u64);
    if total >= 65_535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cyl_x_heads = total / spt;
    } else {
        spt = 17;
        cyl_x_heads = total / spt;
        heads = cyl_x_heads.div_ceil(1024).max(4);
        if cyl_x_heads >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cyl_x_heads = total / spt;
        }
        if cyl_x_heads >= heads * 1024 {
            spt = 63;
            heads = 16;
            cyl_x_heads = total / spt;
        }
    }
    let cylinders = cyl_x_heads / heads;
    (
        u16::try_from(cylinders).unwrap_or(u16::MAX),
        u8::try_from(heads).unwrap_or(u8::MAX),
        u8::try_from(spt).unwrap_or(u8::MAX),
    )
}

/// Bytes of the sector bitmap in front of each block: one bit per sector, padded to whole sectors.
pub fn bitmap_size(block_size: u32) -> u64 {
    let sectors = u64::from(block_size) / SECTOR_SIZE;
    sectors.div_ceil(8).div_ceil(SECTOR_SIZE) * SECTOR_SIZE
}

/// The format of another disk image, named from its first bytes (its magic), or None for anything else (a raw
/// disk, or not a disk image).
pub fn foreign_format(head: &[u8]) -> Option<&'static str> {
    const MAGICS: [(&[u8], &str); 5] = [
        (b"QFI\xfb", "qcow2"),
        (b"KDMV", "VMDK"),
        (b"# Disk DescriptorFile", "VMDK (descriptor)"),
        (b"COWD", "VMDK (ESX sparse)"),
        (b"vhdxfile", "VHDX"),
    ];
    MAGICS.iter().find(|(magic, _)| head.starts_with(magic)).map(|(_, name)| *name)
}

pub fn uuid_string(bytes: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*bytes).hyphenated().to_string()
}

pub fn now_vhd_timestamp() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH_OFFSET);
    u32::try_from(unix.saturating_sub(VHD_EPOCH_OFFSET)).unwrap_or(u32::MAX)
}

/// Decodes UTF-16 code units, stopping at the first NUL.
pub fn decode_utf16(bytes: &[u8], big_endian: bool) -> String {
    let units = bytes.chunks_exact(2).map(|pair| {
        let pair = [pair[0], pair[1]];
        if big_endian {
            u16::from_be_bytes(pair)
        } else {
            u16::from_le_bytes(pair)
        }
    });
    let units: Vec<u16> = units.take_while(|u| *u != 0).collect();
    String::from_utf16_lossy(&units)
}

pub fn encode_utf16(text: &str, big_endian: bool) -> Vec<u8> {
    text.encode_utf16().flat_map(|u| if big_endian { u.to_be_bytes() } else { u.to_le_bytes() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_of_small_disk_matches_spec_example() {
        // 64 MiB = 131072 sectors: spt 17, heads 8 -> 963 cylinders (as qemu-img computes).
        assert_eq!(chs_geometry(131_072), (963, 8, 17));
    }

    #[test]
    fn bitmap_is_one_sector_for_2mib_blocks() {
        assert_eq!(bitmap_size(DEFAULT_BLOCK_SIZE), 512);
        assert_eq!(bitmap_size(4096), 512);
        assert_eq!(bitmap_size(64 * 1024 * 1024), 16 * 1024);
    }

    #[test]
    fn checksum_ignores_its_own_field() {
        let mut f = Footer::new_zeroed();
        f.cookie = *FOOTER_COOKIE;
        f.seal();
        let sealed = f.checksum.get();
        f.checksum.set(0x1234_5678);
        assert_eq!(f.computed_checksum(), sealed);
    }

    #[test]
    fn utf16_round_trip_both_endians() {
        for be in [true, false] {
            let enc = encode_utf16("parent-é.vhd", be);
            assert_eq!(decode_utf16(&enc, be), "parent-é.vhd");
        }
    }
}
