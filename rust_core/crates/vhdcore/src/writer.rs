//! Creating disks (fixed, dynamic, differencing children) and writing byte ranges into them.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use zerocopy::IntoBytes;

use crate::chain::{Chain, MAX_CHAIN_DEPTH};
use crate::disk::Disk;
use crate::error::{Result, VhdError};
use crate::format::layout::{new_footer, new_header, sparse_layout, SparseLayout};
use crate::format::{
    encode_utf16, now_vhd_timestamp, DiskType, Footer, Header, ParentLocatorEntry, FOOTER_SIZE, MAX_BLOCK_SIZE,
    MAX_VIRTUAL_SIZE, MIN_BLOCK_SIZE, PLATFORM_W2KU, PLATFORM_W2RU, SECTOR_SIZE,
};

fn write_all_at(file: &File, path: &Path, buf: &[u8], offset: u64) -> Result<()> {
    file.write_all_at(buf, offset).map_err(|e| VhdError::io(path, "write", e))
}

fn validate_new(path: &Path, size: u64, block_size: u32) -> Result<u64> {
    if size == 0 || size > MAX_VIRTUAL_SIZE {
        return Err(VhdError::invalid_argument(
            Some(path),
            format!("size {size} must be between 1 byte and {MAX_VIRTUAL_SIZE} (2040 GiB)"),
        ));
    }
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(VhdError::invalid_argument(
            Some(path),
            format!("block size {block_size} must be a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"),
        ));
    }
    Ok(size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE)
}

fn create_new_file(path: &Path) -> Result<File> {
    OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            VhdError::invalid_argument(
                Some(path),
                format!("{} already exists; refusing to overwrite it", path.display()),
            )
        } else {
            VhdError::io(path, "create", e)
        }
    })
}

/// Writes an empty sparse disk (footer copy, header, empty BAT, footer); returns the end of the metadata.
fn write_sparse_skeleton(
    file: &File,
    path: &Path,
    footer: &Footer,
    header: &Header,
    layout: &SparseLayout,
) -> Result<()> {
    write_all_at(file, path, footer.as_bytes(), 0)?;
    write_all_at(file, path, header.as_bytes(), FOOTER_SIZE)?;
    let bat = vec![0xFFu8; usize::try_from(layout.table_bytes).unwrap_or(0)];
    write_all_at(file, path, &bat, layout.table_offset)
}

pub fn create(path: &Path, size: u64, disk_type: DiskType, block_size: u32) -> Result<Disk> {
    let size = validate_new(path, size, block_size)?;
    let uuid = *uuid::Uuid::new_v4().as_bytes();
    let footer = new_footer(disk_type, size, uuid);
    let file = create_new_file(path)?;
    match disk_type {
        DiskType::Fixed => {
            file.set_len(size).map_err(|e| VhdError::io(path, "extend", e))?;
            write_all_at(&file, path, footer.as_bytes(), size)?;
        }
        DiskType::Dynamic => {
            let layout = sparse_layout(size, block_size)?;
            let mut header = new_header(&layout, block_size);
            header.seal();
            write_sparse_skeleton(&file, path, &footer, &header, &layout)?;
            write_all_at(&file, path, footer.as_bytes(), layout.table_offset + layout.table_bytes)?;
        }
        DiskType::Differencing => {
            return Err(VhdError::invalid_argument(Some(path), "a differencing disk is made with snapshot(parent)"));
        }
    }
    file.sync_all().map_err(|e| VhdError::io(path, "sync", e))?;
    drop(file);
    Disk::open(path)
}

/// The relative path from the child's folder to the parent, as locators store it.
pub(crate) fn relative_parent_name(parent: &Path, child: &Path) -> Result<String> {
    let parent_abs = std::fs::canonicalize(parent).map_err(|e| VhdError::io(parent, "resolve", e))?;
    let child_dir = child.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let child_dir = std::fs::canonicalize(child_dir).map_err(|e| VhdError::io(child_dir, "resolve", e))?;
    let parent_dir = parent_abs.parent().unwrap_or(Path::new("/"));
    let name = parent_abs
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| VhdError::invalid_argument(Some(parent), "parent file name is not valid UTF-8"))?;
    // Walk up from the child's folder to the common ancestor, then down to the parent.
    let common = child_dir.ancestors().find(|a| parent_dir.starts_with(a)).unwrap_or(Path::new("/"));
    let ups = child_dir.strip_prefix(common).map(|p| p.components().count()).unwrap_or(0);
    let down: PathBuf = parent_dir.strip_prefix(common).map(Path::to_path_buf).unwrap_or_default();
    let mut parts: Vec<String> = vec![".".into()];
    parts.extend(std::iter::repeat_n("..".to_string(), ups));
    parts.extend(down.components().map(|c| c.as_os_str().to_string_lossy().into_owned()));
    parts.push(name.to_string());
    Ok(parts.join("/"))
}

/// Creates `child`, an empty differencing disk over `parent`: the snapshot primitive.
pub fn snapshot(parent: &Path, child: &Path) -> Result<Disk> {
    let parent_disk = Disk::open(parent)?;
    let relative = relative_parent_name(parent, child)?;
    let bytes = snapshot_bytes(&parent_disk, &relative)?;
    let file = create_new_file(child)?;
    let result = write_all_at(&file, child, &bytes, 0)
        .and_then(|()| file.sync_all().map_err(|e| VhdError::io(child, "sync", e)));
    if let Err(e) = result {
        let _ = std::fs::remove_file(child);
        return Err(e);
    }
    drop(file);
    Disk::open(child)
}

/// The whole file of an empty differencing child of `parent` (opened from a file or any source), whose locators
/// name the parent `relative_parent` (`./base.vhd`, `../a/base.vhd`: relative to the child's folder), for a child
/// that is written elsewhere than beside a local parent (an object store).
pub fn snapshot_bytes(parent: &Disk, relative_parent: &str) -> Result<Vec<u8>> {
    let size = parent.virtual_size;
    let block_size = parent.block_size().unwrap_or(crate::format::DEFAULT_BLOCK_SIZE);
    let relative = relative_parent.replace('\\', "/");
    let windows_relative = relative.replace('/', "\\");
    let file_name = relative.rsplit('/').next().unwrap_or(&relative).to_string();
    if file_name.is_empty() {
        return Err(VhdError::invalid_argument(None, format!("{relative_parent:?} does not name a parent file")));
    }
    let uuid = *uuid::Uuid::new_v4().as_bytes();
    let footer = new_footer(DiskType::Differencing, size, uuid);
    let layout = sparse_layout(size, block_size)?;
    let mut header = new_header(&layout, block_size);
    header.parent_unique_id = parent.uuid();
    header.parent_timestamp.set(parent.footer.timestamp.get());
    let name = encode_utf16(&file_name, true);
    let name_len = name.len().min(header.parent_unicode_name.len());
    header.parent_unicode_name[..name_len].copy_from_slice(&name[..name_len]);
    let locator = encode_utf16(&windows_relative, false);
    let locator_len = u32::try_from(locator.len())
        .ok()
        .filter(|len| *len <= crate::format::MAX_LOCATOR_BYTES)
        .ok_or_else(|| VhdError::invalid_argument(None, "parent path too long for a locator"))?;
    let locator_space = u64::from(locator_len).div_ceil(SECTOR_SIZE).max(1) * SECTOR_SIZE;
    let mut next = layout.table_offset + layout.table_bytes;
    for (slot, code) in [PLATFORM_W2RU, PLATFORM_W2KU].into_iter().enumerate() {
        let mut entry = ParentLocatorEntry::default();
        entry.platform_code.set(code);
        // The spec counts the space in sectors; Windows writes bytes. Readers use the length, so give sectors.
        entry.platform_data_space.set(u32::try_from(locator_space / SECTOR_SIZE).unwrap_or(1));
        entry.platform_data_length.set(locator_len);
        entry.platform_data_offset.set(next);
        header.parent_locators[slot] = entry;
        next += locator_space;
    }
    header.seal();
    let total = usize::try_from(next + FOOTER_SIZE)
        .map_err(|_| VhdError::invalid_argument(None, "the child's metadata does not fit in memory"))?;
    let mut bytes = vec![0u8; total];
    let mut place = |at: u64, data: &[u8]| {
        let at = usize::try_from(at).unwrap_or(usize::MAX);
        bytes[at..at + data.len()].copy_from_slice(data);
    };
    place(0, footer.as_bytes());
    place(FOOTER_SIZE, header.as_bytes());
    place(layout.table_offset, &vec![0xFFu8; usize::try_from(layout.table_bytes).unwrap_or(0)]);
    for entry in &header.parent_locators[..2] {
        place(entry.platform_data_offset.get(), &locator);
    }
    place(next, footer.as_bytes());
    Ok(bytes)
}

/// Writes `data` at byte `offset` of the disk at `path` (the leaf of its chain).
/// Marks the layer at `path` as changed: its footer's timestamp becomes now, and always later than before, so a
/// child made before the change can tell (its header's parent timestamp no longer matches; `check` reports it).
/// Returns the new timestamp. Both copies of a sparse disk's footer are rewritten.
pub fn restamp(path: &Path) -> Result<u32> {
    let footer = rewrite_footer(path, |footer| {
        let old = footer.timestamp.get();
        footer.timestamp.set(now_vhd_timestamp().max(old.checked_add(1).unwrap_or(old)));
    })?;
    Ok(footer.timestamp.get())
}

/// Gives the disk at `path` the identity `uuid` (the footer's unique id, which children name as their parent's):
/// for a copy of a disk that must not pass for the original, e.g. a disk restored from an image. Both copies of a
/// sparse disk's footer are rewritten with their checksum; the disk's content is unchanged. Changing the UUID of a
/// layer that has children cuts them off from it: that is the caller's to avoid.
pub fn set_uuid(path: &Path, uuid: [u8; 16]) -> Result<()> {
    if uuid == [0u8; 16] {
        return Err(VhdError::invalid_argument(Some(path), "a disk's UUID cannot be the nil UUID"));
    }
    rewrite_footer(path, |footer| footer.unique_id = uuid).map(|_| ())
}

/// Applies `edit` to the footer of the disk at `path`, seals it and writes it over both copies (the one at the end,
/// and for a sparse disk the one at offset 0), then syncs. Returns the footer written.
fn rewrite_footer(path: &Path, edit: impl FnOnce(&mut Footer)) -> Result<Footer> {
    let disk = Disk::open_writable(path)?;
    let mut footer = disk.footer.clone();
    edit(&mut footer);
    footer.seal();
    let bytes = footer.as_bytes();
    let file = disk.file()?;
    let trailing = if disk.legacy_footer { &bytes[..511] } else { bytes };
    if disk.sparse.is_some() {
        write_all_at(file, path, trailing, 0)?;
    }
    write_all_at(file, path, trailing, disk.footer_offset)?;
    file.sync_all().map_err(|e| VhdError::io(path, "sync", e))?;
    Ok(footer)
}

/// The files among `candidates` that are differencing children of the layer at `path` (their header names its
/// UUID as their parent's), as coalesce finds other children; unreadable candidates and `path` itself are skipped.
pub fn children(path: &Path, candidates: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let layer = Disk::open(path)?;
    let own = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(candidates
        .iter()
        .filter(|c| std::fs::canonicalize(c).unwrap_or_else(|_| c.to_path_buf()) != own)
        .filter(|c| Disk::open(c).ok().and_then(|d| d.parent_uuid()) == Some(layer.uuid()))
        .cloned()
        .collect())
}

pub fn write(path: &Path, offset: u64, data: &[u8]) -> Result<()> {
    let disk = Disk::open_writable(path)?;
    let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
    let end = offset.checked_add(len).filter(|e| *e <= disk.virtual_size).ok_or_else(|| {
        VhdError::invalid_argument(
            Some(path),
            format!("write of {len} bytes at offset {offset} is past the disk's end ({})", disk.virtual_size),
        )
    })?;
    if data.is_empty() {
        return Ok(());
    }
    if disk.disk_type == DiskType::Fixed {
        return write_all_at(disk.file()?, path, data, offset);
    }
    let mut writer = SparseWriter { disk, chain: None };
    let block_size = u64::from(writer.block_size());
    let mut pos = offset;
    while pos < end {
        let block = pos / block_size;
        let block_end = ((block + 1) * block_size).min(end);
        let from = usize::try_from(pos - offset).unwrap_or(0);
        let to = usize::try_from(block_end - offset).unwrap_or(0);
        writer.write_in_block(block, pos % block_size, &data[from..to])?;
        pos = block_end;
    }
    Ok(())
}

struct SparseWriter {
    disk: Disk,
    /// The chain under a differencing disk, opened only when a partial sector needs its old bytes.
    chain: Option<Chain>,
}

impl SparseWriter {
    fn block_size(&self) -> u32 {
        self.disk.sparse.as_ref().map_or(crate::format::DEFAULT_BLOCK_SIZE, |s| s.block_size)
    }

    /// Allocates block `index` at the end of the file: bitmap and zeroed data, then the footer, then the BAT entry,
    /// so a crash in between leaves at worst an unreferenced block.
    fn allocate(&mut self, index: u64) -> Result<u64> {
        let path = self.disk.path.clone();
        let sparse = self.disk.sparse.as_ref().ok_or_else(|| VhdError::invalid_argument(Some(&path), "not sparse"))?;
        let at = self.disk.footer_offset.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let span = sparse.bitmap_size + u64::from(sparse.block_size);
        let sector = u32::try_from(at / SECTOR_SIZE)
            .map_err(|_| VhdError::invalid_argument(Some(&path), "disk file too large for another block"))?;
        let fill = if self.disk.disk_type == DiskType::Dynamic { 0xFF } else { 0x00 };
        let bitmap = vec![fill; usize::try_from(sparse.bitmap_size).unwrap_or(0)];
        let file = self.disk.file()?;
        file.set_len(at + span).map_err(|e| VhdError::io(&path, "extend", e))?;
        write_all_at(file, &path, &bitmap, at)?;
        write_all_at(file, &path, self.disk.footer.as_bytes(), at + span)?;
        let entry_at = sparse.table_offset + index * 4;
        write_all_at(file, &path, &sector.to_be_bytes(), entry_at)?;
        self.disk.footer_offset = at + span;
        self.disk.file_size = at + span + FOOTER_SIZE;
        if let Some(sparse) = self.disk.sparse.as_mut() {
            sparse.set_block(u32::try_from(index).unwrap_or(u32::MAX), sector);
        }
        Ok(at)
    }

    fn write_in_block(&mut self, index: u64, within: u64, data: &[u8]) -> Result<()> {
        let path = self.disk.path.clone();
        let sparse = self.disk.sparse.as_ref().ok_or_else(|| VhdError::invalid_argument(Some(&path), "not sparse"))?;
        let bitmap_bytes = sparse.bitmap_size;
        let block_sectors = sparse.sectors_per_block();
        let block_at = match sparse.block_offset(index) {
            Some(at) => at,
            None => self.allocate(index)?,
        };
        let data_at = block_at + bitmap_bytes;
        let mut bitmap = vec![0u8; usize::try_from(bitmap_bytes).unwrap_or(0)];
        self.disk.read_exact_at(&mut bitmap, block_at)?;
        let len = u64::try_from(data.len()).unwrap_or(0);
        let first_sector = within / SECTOR_SIZE;
        let last_sector = (within + len).div_ceil(SECTOR_SIZE);
        // Build the touched sectors whole: old bytes where the write covers a sector only in part.
        let span_start = first_sector * SECTOR_SIZE;
        let mut span = vec![0u8; usize::try_from((last_sector - first_sector) * SECTOR_SIZE).unwrap_or(0)];
        let head_partial = !within.is_multiple_of(SECTOR_SIZE);
        let tail_partial = !(within + len).is_multiple_of(SECTOR_SIZE);
        for (sector, partial) in [(first_sector, head_partial), (last_sector - 1, tail_partial)] {
            if partial {
                let at = usize::try_from((sector - first_sector) * SECTOR_SIZE).unwrap_or(0);
                let dst = &mut span[at..at + 512];
                self.old_sector(index * block_sectors + sector, data_at + sector * SECTOR_SIZE, &bitmap, sector, dst)?;
            }
        }
        let at = usize::try_from(within - span_start).unwrap_or(0);
        span[at..at + data.len()].copy_from_slice(data);
        write_all_at(self.disk.file()?, &path, &span, data_at + span_start)?;
        let mut changed = false;
        for sector in first_sector..last_sector {
            let byte = usize::try_from(sector / 8).unwrap_or(0);
            let mask = 0x80u8 >> (sector % 8);
            if bitmap[byte] & mask == 0 {
                bitmap[byte] |= mask;
                changed = true;
            }
        }
        if changed {
            write_all_at(self.disk.file()?, &path, &bitmap, block_at)?;
        }
        Ok(())
    }

    /// The current content of one sector: this layer's if its bit is set, else the chain below, else zeros.
    fn old_sector(&mut self, disk_sector: u64, file_at: u64, bitmap: &[u8], sector: u64, dst: &mut [u8]) -> Result<()> {
        let byte = usize::try_from(sector / 8).unwrap_or(0);
        let present = bitmap[byte] & (0x80u8 >> (sector % 8)) != 0;
        if present || self.disk.disk_type == DiskType::Dynamic {
            return self.disk.read_exact_at(dst, file_at);
        }
        if self.chain.is_none() {
            self.chain = Some(Chain::open(&self.disk.path, MAX_CHAIN_DEPTH)?);
        }
        match &self.chain {
            Some(chain) => chain.read_below_leaf(disk_sector, dst),
            None => {
                dst.fill(0);
                Ok(())
            }
        }
    }
}

impl Chain {
    /// Reads one sector as the leaf's parent sees the disk (the layers under the leaf).
    pub(crate) fn read_below_leaf(&self, sector: u64, dst: &mut [u8]) -> Result<()> {
        for layer in self.layers.iter().skip(1) {
            if let Some(at) = layer.sector_location(sector)? {
                return layer.read_exact_at(dst, at);
            }
        }
        dst.fill(0);
        Ok(())
    }
}
