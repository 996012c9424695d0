//! One VHD file: its footer, dynamic header and BAT, validated before use.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zerocopy::FromBytes;

use crate::error::{Result, VhdError};
use crate::format::{
    bitmap_size, decode_utf16, uuid_string, DiskType, Footer, Header, ParentLocatorEntry, BAT_UNUSED, FOOTER_COOKIE,
    FOOTER_SIZE, HEADER_COOKIE, HEADER_SIZE, LEGACY_FOOTER_SIZE, MAX_BLOCK_SIZE, MAX_LOCATOR_BYTES, MAX_VIRTUAL_SIZE,
    MIN_BLOCK_SIZE, SECTOR_SIZE,
};
use crate::source::ReadAt;

/// Collects the problems found while validating. Fail-fast (open) stops at the first; check keeps going.
pub(crate) struct Validator {
    collect: bool,
    pub(crate) problems: Vec<VhdError>,
}

impl Validator {
    pub(crate) fn fail_fast() -> Self {
        Validator { collect: false, problems: Vec::new() }
    }

    pub(crate) fn collecting() -> Self {
        Validator { collect: true, problems: Vec::new() }
    }

    /// Records a problem the reader can live with (the offending entry is ignored) when collecting.
    pub(crate) fn report(&mut self, problem: VhdError) -> Result<()> {
        if self.collect {
            self.problems.push(problem);
            Ok(())
        } else {
            Err(problem)
        }
    }
}

/// The sparse part of a dynamic or differencing disk.
#[derive(Debug, Clone)]
pub struct Sparse {
    pub header: Header,
    pub header_offset: u64,
    pub table_offset: u64,
    pub block_size: u32,
    pub bitmap_size: u64,
    /// Indices of the allocated blocks, ascending. Only allocated entries are kept: a 2 TiB disk's BAT has a
    /// million entries, mostly unused, and a chain has up to 30 of them.
    pub allocated: Vec<u32>,
    /// Sector offset of each allocated block's bitmap, parallel to `allocated`.
    pub sectors: Vec<u32>,
}

impl Sparse {
    pub fn sectors_per_block(&self) -> u64 {
        u64::from(self.block_size) / SECTOR_SIZE
    }

    /// File offset of block `index`'s bitmap, if allocated.
    pub fn block_offset(&self, index: u64) -> Option<u64> {
        let index = u32::try_from(index).ok()?;
        let at = self.allocated.binary_search(&index).ok()?;
        Some(u64::from(self.sectors[at]) * SECTOR_SIZE)
    }

    /// Records block `index` as stored at `sector` (the writer's allocation).
    pub(crate) fn set_block(&mut self, index: u32, sector: u32) {
        match self.allocated.binary_search(&index) {
            Ok(at) => self.sectors[at] = sector,
            Err(at) => {
                self.allocated.insert(at, index);
                self.sectors.insert(at, sector);
            }
        }
    }
}

#[derive(Debug)]
pub struct Disk {
    /// The file's path, or the layer's name in the store it was read from.
    pub path: PathBuf,
    /// Where the layer's bytes come from: its file, or the caller's reader.
    pub source: Arc<dyn ReadAt>,
    pub file_size: u64,
    pub footer: Footer,
    pub footer_offset: u64,
    pub legacy_footer: bool,
    pub disk_type: DiskType,
    /// The footer's current size, rounded down to whole sectors.
    pub virtual_size: u64,
    pub sparse: Option<Sparse>,
}

pub(crate) fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| read_error(path, buf, offset, e))
}

fn read_error(path: &Path, buf: &[u8], offset: u64, source: std::io::Error) -> VhdError {
    VhdError::Read { path: path.to_path_buf(), offset, length: u64::try_from(buf.len()).unwrap_or(u64::MAX), source }
}

fn read_source(source: &dyn ReadAt, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    source.read_at(buf, offset).map_err(|e| read_error(path, buf, offset, e))
}

/// What a file without a VHD footer is, from its first bytes, and how to make a VHD of it.
fn not_a_vhd_note(file: &dyn ReadAt, file_size: u64) -> String {
    let mut head = [0u8; 32];
    let length = usize::try_from(file_size).map_or(head.len(), |size| size.min(head.len()));
    let read = head.get_mut(..length).is_some_and(|buf| file.read_at(buf, 0).is_ok());
    let format = if read { head.get(..length).and_then(crate::format::foreign_format) } else { None };
    let convert = "convert it with `qemu-img convert -O vpc FILE OUT.vhd`";
    match format {
        Some(name) => format!("; this is a {name} image, not a VHD: {convert}"),
        None => format!(
            "; not a VHD: no known disk image signature (a raw disk or other data?); if it is a raw disk, {convert} \
             (with -f raw)"
        ),
    }
}

fn cookie_text(bytes: &[u8]) -> String {
    if bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        String::from_utf8_lossy(bytes).into_owned()
    } else {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("0x{hex}")
    }
}

impl Disk {
    pub fn open(path: &Path) -> Result<Disk> {
        Disk::open_validated(path, &mut Validator::fail_fast(), false)
    }

    pub fn open_writable(path: &Path) -> Result<Disk> {
        Disk::open_validated(path, &mut Validator::fail_fast(), true)
    }

    pub(crate) fn open_validated(path: &Path, v: &mut Validator, writable: bool) -> Result<Disk> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| VhdError::io(path, "open", e))?;
        Disk::from_source_validated(path, Arc::new(file), v)
    }

    /// Opens a layer whose bytes come from `source`; `name` is how errors and the chain name it.
    pub fn from_source(name: &Path, source: Arc<dyn ReadAt>) -> Result<Disk> {
        Disk::from_source_validated(name, source, &mut Validator::fail_fast())
    }

    pub(crate) fn from_source_validated(path: &Path, source: Arc<dyn ReadAt>, v: &mut Validator) -> Result<Disk> {
        let file_size = source.size().map_err(|e| VhdError::io(path, "stat", e))?;
        let (footer, footer_offset, legacy_footer) = read_footer(source.as_ref(), path, file_size)?;
        let footer_field_offset = footer_offset;
        let disk_type = DiskType::from_raw(footer.disk_type.get()).ok_or_else(|| VhdError::InvalidField {
            path: path.to_path_buf(),
            field: "footer.disk_type".into(),
            offset: footer_field_offset + 60,
            value: footer.disk_type.get().to_string(),
            reason: "expected 2 (fixed), 3 (dynamic) or 4 (differencing)".into(),
        })?;
        let current_size = footer.current_size.get();
        if current_size > MAX_VIRTUAL_SIZE {
            return Err(VhdError::InvalidField {
                path: path.to_path_buf(),
                field: "footer.current_size".into(),
                offset: footer_field_offset + 48,
                value: current_size.to_string(),
                reason: format!("larger than the format's maximum of {MAX_VIRTUAL_SIZE} bytes (2040 GiB)"),
            });
        }
        let virtual_size = current_size / SECTOR_SIZE * SECTOR_SIZE;
        let mut disk = Disk {
            path: path.to_path_buf(),
            source,
            file_size,
            footer,
            footer_offset,
            legacy_footer,
            disk_type,
            virtual_size,
            sparse: None,
        };
        match disk_type {
            DiskType::Fixed => {
                if footer_offset < virtual_size {
                    return Err(VhdError::Truncated {
                        path: path.to_path_buf(),
                        field: "footer.current_size".into(),
                        offset: footer_offset + 48,
                        needed: virtual_size,
                        file_size: footer_offset,
                    });
                }
            }
            DiskType::Dynamic | DiskType::Differencing => {
                disk.sparse = Some(read_sparse(&disk, v)?);
            }
        }
        Ok(disk)
    }

    /// Fills `buf` with the layer's bytes at `offset`; a typed error naming the layer and offset otherwise.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.source.read_at(buf, offset).map_err(|e| read_error(&self.path, buf, offset, e))
    }

    /// The local file of the layer, for writing; an error for a layer read through another source.
    pub(crate) fn file(&self) -> Result<&File> {
        self.source.file().ok_or_else(|| {
            VhdError::invalid_argument(
                Some(&self.path),
                format!("{} is not a local file; it can be read, not written", self.path.display()),
            )
        })
    }

    pub fn block_size(&self) -> Option<u32> {
        self.sparse.as_ref().map(|s| s.block_size)
    }

    pub fn uuid(&self) -> [u8; 16] {
        self.footer.unique_id
    }

    pub fn parent_uuid(&self) -> Option<[u8; 16]> {
        match (self.disk_type, &self.sparse) {
            (DiskType::Differencing, Some(s)) => Some(s.header.parent_unique_id),
            _ => None,
        }
    }

    pub fn parent_name(&self) -> Option<String> {
        match (self.disk_type, &self.sparse) {
            (DiskType::Differencing, Some(s)) => Some(decode_utf16(&s.header.parent_unicode_name, true)),
            _ => None,
        }
    }

    pub fn parent_timestamp(&self) -> Option<u32> {
        match (self.disk_type, &self.sparse) {
            (DiskType::Differencing, Some(s)) => Some(s.header.parent_timestamp.get()),
            _ => None,
        }
    }

    pub fn allocated_blocks(&self) -> u32 {
        self.sparse.as_ref().map_or(0, |s| u32::try_from(s.allocated.len()).unwrap_or(u32::MAX))
    }

    pub fn uuid_string(&self) -> String {
        uuid_string(&self.footer.unique_id)
    }

    /// The parent paths this child's header names, in the order to try them (locators, then the parent name).
    pub fn parent_path_hints(&self) -> Result<Vec<String>> {
        let Some(sparse) = self.sparse.as_ref().filter(|_| self.disk_type == DiskType::Differencing) else {
            return Ok(Vec::new());
        };
        let mut hints = Vec::new();
        for (index, entry) in sparse.header.parent_locators.iter().enumerate() {
            if let Some(hint) = self.read_locator(sparse, index, entry)? {
                hints.push(hint);
            }
        }
        let name = decode_utf16(&sparse.header.parent_unicode_name, true);
        if !name.is_empty() {
            hints.push(name);
        }
        Ok(hints)
    }

    fn read_locator(&self, sparse: &Sparse, index: usize, entry: &ParentLocatorEntry) -> Result<Option<String>> {
        use crate::format::{PLATFORM_MACX, PLATFORM_W2KU, PLATFORM_W2RU, PLATFORM_WI2K, PLATFORM_WI2R};
        let code = entry.platform_code.get();
        if ![PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_MACX, PLATFORM_WI2R, PLATFORM_WI2K].contains(&code) {
            return Ok(None);
        }
        let field = format!("header.parent_locator[{index}]");
        let entry_offset = sparse.header_offset + 576 + 24 * u64::try_from(index).unwrap_or(0);
        let length = entry.platform_data_length.get();
        let offset = entry.platform_data_offset.get();
        if length == 0 {
            return Ok(None);
        }
        if length > MAX_LOCATOR_BYTES {
            return Err(VhdError::InvalidField {
                path: self.path.clone(),
                field: format!("{field}.platform_data_length"),
                offset: entry_offset + 8,
                value: length.to_string(),
                reason: format!("a parent path is at most {MAX_LOCATOR_BYTES} bytes"),
            });
        }
        let end = offset.saturating_add(u64::from(length));
        if end > self.file_size {
            return Err(VhdError::Truncated {
                path: self.path.clone(),
                field: format!("{field}.platform_data_offset"),
                offset: entry_offset + 16,
                needed: end,
                file_size: self.file_size,
            });
        }
        let mut data = vec![0u8; usize::try_from(length).unwrap_or(0)];
        self.read_exact_at(&mut data, offset)?;
        let text = match code {
            PLATFORM_W2RU | PLATFORM_W2KU => decode_utf16(&data, false),
            _ => {
                let raw = String::from_utf8_lossy(&data);
                let raw = raw.trim_end_matches('\0');
                match raw.strip_prefix("file://") {
                    Some(rest) => percent_decode(rest),
                    None => raw.to_string(),
                }
            }
        };
        Ok((!text.is_empty()).then_some(text))
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let high = char::from(bytes[i + 1]).to_digit(16);
            let low = char::from(bytes[i + 2]).to_digit(16);
            if let (Some(high), Some(low)) = (high, low) {
                out.push(u8::try_from(high * 16 + low).unwrap_or(b'?'));
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_footer(file: &dyn ReadAt, path: &Path, file_size: u64) -> Result<(Footer, u64, bool)> {
    if file_size < LEGACY_FOOTER_SIZE {
        return Err(VhdError::Truncated {
            path: path.to_path_buf(),
            field: "footer".into(),
            offset: 0,
            needed: FOOTER_SIZE,
            file_size,
        });
    }
    let mut buf = [0u8; 512];
    let (offset, legacy) = if file_size >= FOOTER_SIZE {
        read_source(file, path, &mut buf, file_size - FOOTER_SIZE)?;
        if &buf[..8] == FOOTER_COOKIE {
            (file_size - FOOTER_SIZE, false)
        } else {
            probe_legacy(file, path, file_size, &mut buf)?
        }
    } else {
        probe_legacy(file, path, file_size, &mut buf)?
    };
    let footer = Footer::read_from_bytes(&buf[..]).unwrap_or_else(|_| unreachable!("512-byte buffer"));
    if &footer.cookie != FOOTER_COOKIE {
        return Err(VhdError::BadCookie {
            path: path.to_path_buf(),
            field: "footer.cookie".into(),
            offset,
            expected: "conectix".into(),
            found: cookie_text(&footer.cookie),
            note: not_a_vhd_note(file, file_size).into_boxed_str(),
        });
    }
    let computed = footer.computed_checksum();
    if computed != footer.checksum.get() {
        return Err(VhdError::Checksum {
            path: path.to_path_buf(),
            field: "footer.checksum".into(),
            offset: offset + 64,
            expected: computed,
            found: footer.checksum.get(),
        });
    }
    Ok((footer, offset, legacy))
}

/// Looks for a 511-byte footer; leaves the 512-byte candidate in `buf` when there is none, for the error.
fn probe_legacy(file: &dyn ReadAt, path: &Path, file_size: u64, buf: &mut [u8; 512]) -> Result<(u64, bool)> {
    let mut legacy = [0u8; 512];
    read_source(file, path, &mut legacy[..511], file_size - LEGACY_FOOTER_SIZE)?;
    if &legacy[..8] == FOOTER_COOKIE {
        *buf = legacy;
        return Ok((file_size - LEGACY_FOOTER_SIZE, true));
    }
    if file_size < FOOTER_SIZE {
        *buf = legacy;
        return Ok((file_size - LEGACY_FOOTER_SIZE, false));
    }
    Ok((file_size - FOOTER_SIZE, false))
}

fn read_sparse(disk: &Disk, v: &mut Validator) -> Result<Sparse> {
    let path = &disk.path;
    let header_offset = disk.footer.data_offset.get();
    let header_end = header_offset.saturating_add(HEADER_SIZE);
    if header_end > disk.footer_offset {
        return Err(VhdError::Truncated {
            path: path.clone(),
            field: "footer.data_offset".into(),
            offset: disk.footer_offset + 16,
            needed: header_end,
            file_size: disk.footer_offset,
        });
    }
    let mut buf = [0u8; 1024];
    disk.read_exact_at(&mut buf, header_offset)?;
    let header = Header::read_from_bytes(&buf[..]).unwrap_or_else(|_| unreachable!("1024-byte buffer"));
    if &header.cookie != HEADER_COOKIE {
        return Err(VhdError::BadCookie {
            path: path.clone(),
            field: "header.cookie".into(),
            offset: header_offset,
            expected: "cxsparse".into(),
            found: cookie_text(&header.cookie),
            note: "".into(),
        });
    }
    let computed = header.computed_checksum();
    if computed != header.checksum.get() {
        v.report(VhdError::Checksum {
            path: path.clone(),
            field: "header.checksum".into(),
            offset: header_offset + 36,
            expected: computed,
            found: header.checksum.get(),
        })?;
    }
    let block_size = header.block_size.get();
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(VhdError::InvalidField {
            path: path.clone(),
            field: "header.block_size".into(),
            offset: header_offset + 32,
            value: block_size.to_string(),
            reason: format!("expected a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"),
        });
    }
    let needed_entries = disk.virtual_size.div_ceil(u64::from(block_size));
    let max_entries = u64::from(header.max_table_entries.get());
    let cap = MAX_VIRTUAL_SIZE.div_ceil(u64::from(block_size));
    if max_entries < needed_entries || max_entries > cap {
        return Err(VhdError::InvalidField {
            path: path.clone(),
            field: "header.max_table_entries".into(),
            offset: header_offset + 28,
            value: max_entries.to_string(),
            reason: format!(
                "expected between {needed_entries} (to cover the virtual size) and {cap} (2040 GiB of blocks)"
            ),
        });
    }
    let table_offset = header.table_offset.get();
    let table_bytes = max_entries * 4;
    let table_end = table_offset.saturating_add(table_bytes);
    if table_end > disk.footer_offset {
        return Err(VhdError::Truncated {
            path: path.clone(),
            field: "header.table_offset".into(),
            offset: header_offset + 16,
            needed: table_end,
            file_size: disk.footer_offset,
        });
    }
    // Only the entries that cover the disk matter; the rest of the table is never read.
    let used_entries = usize::try_from(needed_entries).map_err(|_| VhdError::InvalidField {
        path: path.clone(),
        field: "header.max_table_entries".into(),
        offset: header_offset + 28,
        value: max_entries.to_string(),
        reason: "too many entries for this machine".into(),
    })?;
    let bitmap_bytes = bitmap_size(block_size);
    let block_span = bitmap_bytes + u64::from(block_size);
    let data_end = disk.footer_offset;
    // The BAT is read in slices through one small buffer, keeping only the allocated entries.
    let mut placed: Vec<(u64, u64, usize, u32)> = Vec::new();
    let mut slice = vec![0u8; 64 * 1024];
    let total_bytes = used_entries * 4;
    let mut done = 0usize;
    while done < total_bytes {
        let n = slice.len().min(total_bytes - done);
        let read_at = table_offset + u64::try_from(done).unwrap_or(u64::MAX);
        disk.read_exact_at(&mut slice[..n], read_at)?;
        for (i, raw) in slice[..n].chunks_exact(4).enumerate() {
            let entry = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
            if entry == BAT_UNUSED {
                continue;
            }
            let index = done / 4 + i;
            let start = u64::from(entry) * SECTOR_SIZE;
            let end = start + block_span;
            if end > data_end {
                v.report(VhdError::BatOutOfRange {
                    path: path.clone(),
                    field: format!("bat[{index}]"),
                    offset: table_offset + 4 * u64::try_from(index).unwrap_or(0),
                    sector: entry,
                    block_end: end,
                    data_end,
                })?;
                continue;
            }
            placed.push((start, end, index, entry));
        }
        done += n;
    }
    let metadata = [
        (0, FOOTER_SIZE.min(header_offset), "the footer copy"),
        (header_offset, header_end, "the dynamic header"),
        (table_offset, table_end, "the BAT"),
    ];
    placed.sort_unstable();
    let mut kept: Vec<(u32, u32)> = Vec::with_capacity(placed.len());
    for (i, &(start, end, index, entry)) in placed.iter().enumerate() {
        let overlap_meta = metadata.iter().find(|(ms, me, _)| start < *me && *ms < end && ms < me);
        let overlap_prev = i.checked_sub(1).map(|p| placed[p]).filter(|(_, pend, _, _)| *pend > start);
        let other = match (overlap_meta, overlap_prev) {
            (Some((_, _, what)), _) => Some((*what).to_string()),
            (None, Some((_, _, pidx, _))) => Some(format!("the block of bat[{pidx}]")),
            (None, None) => None,
        };
        match other {
            Some(other) => v.report(VhdError::OverlappingBlocks {
                path: path.clone(),
                field: format!("bat[{index}]"),
                offset: table_offset + 4 * u64::try_from(index).unwrap_or(0),
                start,
                end,
                other,
            })?,
            None => kept.push((u32::try_from(index).unwrap_or(u32::MAX), entry)),
        }
    }
    kept.sort_unstable();
    let (allocated, sectors): (Vec<u32>, Vec<u32>) = kept.into_iter().unzip();
    if disk.disk_type == DiskType::Differencing && header.parent_unique_id == [0u8; 16] {
        v.report(VhdError::InvalidField {
            path: path.clone(),
            field: "header.parent_uuid".into(),
            offset: header_offset + 40,
            value: "00000000-0000-0000-0000-000000000000".into(),
            reason: "a differencing disk must name its parent's uuid".into(),
        })?;
    }
    Ok(Sparse { header, header_offset, table_offset, block_size, bitmap_size: bitmap_bytes, allocated, sectors })
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn percent_decoding_of_file_urls() {
        assert_eq!(percent_decode("./my%20disk.vhd"), "./my disk.vhd");
        assert_eq!(percent_decode("./100%"), "./100%");
    }
}
