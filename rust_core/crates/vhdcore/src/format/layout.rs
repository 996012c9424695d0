//! The layouts of new disks: a sealed footer, the header and BAT placement of a sparse disk, an all-present
//! sector bitmap. What the writer, the exporter, the image and the estimate all lay out the same way.

use super::{
    bitmap_size, chs_geometry, now_vhd_timestamp, DiskType, Footer, Header, CREATOR_APP, CREATOR_HOST_OS,
    FEATURE_RESERVED, FILE_FORMAT_VERSION, FIXED_DATA_OFFSET, FOOTER_COOKIE, FOOTER_SIZE, HEADER_COOKIE, HEADER_SIZE,
    HEADER_VERSION, SECTOR_SIZE,
};
use crate::error::{Result, VhdError};

/// A sealed footer for a new disk.
pub(crate) fn new_footer(disk_type: DiskType, size: u64, uuid: [u8; 16]) -> Footer {
    new_footer_at(disk_type, size, uuid, now_vhd_timestamp())
}

/// A sealed footer with a given modification time (every worker of one image must write the same footer).
pub(crate) fn new_footer_at(disk_type: DiskType, size: u64, uuid: [u8; 16], timestamp: u32) -> Footer {
    let mut footer = Footer::new_zeroed();
    footer.cookie = *FOOTER_COOKIE;
    footer.features.set(FEATURE_RESERVED);
    footer.file_format_version.set(FILE_FORMAT_VERSION);
    footer.data_offset.set(if disk_type == DiskType::Fixed { FIXED_DATA_OFFSET } else { FOOTER_SIZE });
    footer.timestamp.set(timestamp);
    footer.creator_app = *CREATOR_APP;
    footer.creator_version.set(0x0001_0000);
    footer.creator_host_os = *CREATOR_HOST_OS;
    footer.original_size.set(size);
    footer.current_size.set(size);
    let (c, h, s) = chs_geometry(size / SECTOR_SIZE);
    footer.cylinders.set(c);
    footer.heads = h;
    footer.sectors_per_track = s;
    footer.disk_type.set(disk_type.raw());
    footer.unique_id = uuid;
    footer.seal();
    footer
}

/// Layout of a new sparse disk: header at 512, BAT right after, then the first free byte.
pub(crate) struct SparseLayout {
    pub table_offset: u64,
    pub entries: u32,
    pub table_bytes: u64,
}

pub(crate) fn sparse_layout(size: u64, block_size: u32) -> Result<SparseLayout> {
    let entries = u32::try_from(size.div_ceil(u64::from(block_size)))
        .map_err(|_| VhdError::invalid_argument(None, "too many blocks for a VHD"))?;
    let table_offset = FOOTER_SIZE + HEADER_SIZE;
    let table_bytes = (u64::from(entries) * 4).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    Ok(SparseLayout { table_offset, entries, table_bytes })
}

pub(crate) fn new_header(layout: &SparseLayout, block_size: u32) -> Header {
    let mut header = Header::new_zeroed();
    header.cookie = *HEADER_COOKIE;
    header.data_offset.set(u64::MAX);
    header.table_offset.set(layout.table_offset);
    header.header_version.set(HEADER_VERSION);
    header.max_table_entries.set(layout.entries);
    header.block_size.set(block_size);
    header
}

pub(crate) fn bitmap_all_present(block_size: u32) -> Vec<u8> {
    vec![0xFF; usize::try_from(bitmap_size(block_size)).unwrap_or(0)]
}
