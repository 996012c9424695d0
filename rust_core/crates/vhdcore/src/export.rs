//! Flattening a chain into a raw disk or a dynamic VHD whose all-zero blocks stay unallocated.
//!
//! Units of `UNIT` bytes are read in parallel batches (rayon) into reused buffers and written in order, so memory
//! stays at one batch whatever the disk size.

use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use zerocopy::IntoBytes;

use crate::chain::map::Occupancy;
use crate::chain::Chain;
use crate::error::{Result, VhdError};
use crate::format::layout::{bitmap_all_present, new_footer, new_header, sparse_layout};
use crate::format::{bitmap_size, DiskType, DEFAULT_BLOCK_SIZE, FOOTER_SIZE, SECTOR_SIZE};
use crate::io::{is_zero, Target};

const UNIT: u64 = DEFAULT_BLOCK_SIZE as u64;
const BATCH_BYTES: u64 = 64 * 1024 * 1024;
/// Units between two progress reports when writing a raw file (1 GiB).
const DIRECT_BATCH_UNITS: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Raw,
    Vhd,
}

impl ExportFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ExportFormat::Raw => "raw",
            ExportFormat::Vhd => "vhd",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExportStats {
    pub format: ExportFormat,
    pub virtual_size: u64,
    pub bytes_written: u64,
    /// Bytes of the flattened disk that are not zero, in whole units.
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub seconds: f64,
}

/// Writes the 4 KiB pages of `data` that hold anything but zeros (the file's holes already read as zeros).
fn write_nonzero_pages(target: &Target, data: &[u8], offset: u64) -> Result<()> {
    const PAGE: usize = 4096;
    let at = |i: usize| offset + u64::try_from(i).unwrap_or(0);
    let mut run: Option<usize> = None;
    for (i, page) in data.chunks(PAGE).enumerate() {
        let here = i * PAGE;
        if !is_zero(page) {
            run.get_or_insert(here);
        } else if let Some(start) = run.take() {
            target.write_at(&data[start..here], at(start))?;
        }
    }
    if let Some(start) = run {
        target.write_at(&data[start..], at(start))?;
    }
    Ok(())
}

/// Fills `buf` with unit `u` of the flattened disk, the ranges of `free` in it zeroed; returns false (buffer
/// untouched) when it is all zeros.
fn read_unit(chain: &Chain, occupied: &Occupancy, free: &[(u64, u64)], u: u64, buf: &mut [u8]) -> Result<bool> {
    let start = u * UNIT;
    let end = start + u64::try_from(buf.len()).unwrap_or(0);
    if !occupied.overlaps(start, end) || crate::image::plan::covered(free, start, end) {
        return Ok(false);
    }
    read_live(chain, free, start, buf)?;
    Ok(!is_zero(buf))
}

/// `chain.read_at`, with the bytes of `free` (sorted, merged `(start, length)` ranges) zeroed.
fn read_live(chain: &Chain, free: &[(u64, u64)], start: u64, buf: &mut [u8]) -> Result<()> {
    chain.read_at(start, buf)?;
    let end = start + u64::try_from(buf.len()).unwrap_or(0);
    for (s, l) in crate::image::plan::clip(free, start, end) {
        let from = usize::try_from(s - start).unwrap_or(usize::MAX);
        let to = usize::try_from(s - start + l).unwrap_or(usize::MAX);
        if let Some(bytes) = buf.get_mut(from..to) {
            bytes.fill(0);
        }
    }
    Ok(())
}

pub fn export(
    chain: &Chain,
    out: &Path,
    format: ExportFormat,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<ExportStats> {
    export_with(chain, out, format, &[], progress)
}

/// [`export`] of the live data only (DESIGN §5): the ranges `usage` proves free are written as zeros (a VHD leaves
/// blocks wholly free unallocated, a raw file leaves them sparse).
pub fn export_live(
    chain: &Chain,
    out: &Path,
    format: ExportFormat,
    usage: &crate::fs::DiskUsage,
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<ExportStats> {
    if usage.size != chain.virtual_size() {
        return Err(VhdError::invalid_argument(None, "the disk usage is of another disk than the chain"));
    }
    export_with(chain, out, format, &usage.free, progress)
}

fn export_with(
    chain: &Chain,
    out: &Path,
    format: ExportFormat,
    free: &[(u64, u64)],
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<ExportStats> {
    let started = Instant::now();
    let target = Target::open(out, format.as_str())?;
    let result = run_export(chain, &target, format, free, progress);
    let mut stats = target.complete(result)?;
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

fn run_export(
    chain: &Chain,
    target: &Target,
    format: ExportFormat,
    free: &[(u64, u64)],
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<ExportStats> {
    let size = chain.virtual_size();
    let units = size.div_ceil(UNIT);
    let occupied = chain.occupancy();
    let streaming = target.is_sequential();
    if streaming && format == ExportFormat::Vhd {
        return run_sequential_vhd(chain, target, &occupied, free, progress);
    }
    let layout = sparse_layout(size, DEFAULT_BLOCK_SIZE)?;
    let mut bat = vec![crate::format::BAT_UNUSED; usize::try_from(layout.entries).unwrap_or(0)];
    let mut next_block = layout.table_offset + layout.table_bytes;
    let bitmap = bitmap_all_present(DEFAULT_BLOCK_SIZE);
    let bitmap_len = bitmap_size(DEFAULT_BLOCK_SIZE);
    if format == ExportFormat::Raw && !streaming {
        target.file().set_len(size).map_err(|e| VhdError::io(target.path(), "extend", e))?;
    }
    let per_batch = usize::try_from(BATCH_BYTES / UNIT).unwrap_or(1).max(1);
    let unit_bytes = usize::try_from(UNIT).unwrap_or(0);
    let front = bitmap.len();
    // Each buffer keeps the block's bitmap in front of its data, so a VHD block goes out in one write.
    let mut pool: Vec<Vec<u8>> = (0..per_batch)
        .map(|_| {
            let mut buf = vec![0u8; front + unit_bytes];
            buf[..front].copy_from_slice(&bitmap);
            buf
        })
        .collect();
    let direct = format == ExportFormat::Raw && !streaming;
    let mut data_bytes = 0u64;
    let mut batch_start = 0u64;
    let unit_len = |u: u64| usize::try_from(UNIT.min(size - u * UNIT)).unwrap_or(0);
    while batch_start < units && direct {
        // A raw file: every unit has its own place, so workers read and write with no barrier but the
        // progress report every DIRECT_BATCH_UNITS.
        let batch_end = (batch_start + DIRECT_BATCH_UNITS).min(units);
        let stored = (batch_start..batch_end)
            .into_par_iter()
            .map_init(
                || vec![0u8; unit_bytes],
                |buf, u| {
                    let data = &mut buf[..unit_len(u)];
                    if !read_unit(chain, &occupied, free, u, data)? {
                        return Ok(0);
                    }
                    write_nonzero_pages(target, data, u * UNIT)?;
                    Ok(u64::try_from(data.len()).unwrap_or(0))
                },
            )
            .try_reduce(|| 0, |a, b| Ok(a + b))?;
        data_bytes += stored;
        batch_start = batch_end;
        if !progress((batch_start * UNIT).min(size), size) {
            return Err(VhdError::Interrupted { path: chain.leaf().path.clone() });
        }
    }
    while batch_start < units {
        let batch_end = (batch_start + u64::try_from(per_batch).unwrap_or(1)).min(units);
        let count = usize::try_from(batch_end - batch_start).unwrap_or(0);
        // Read in parallel; a raw file is written by the same workers, each unit having its own place.
        let results: Vec<bool> = pool[..count]
            .par_iter_mut()
            .enumerate()
            .map(|(i, buf)| {
                let u = batch_start + u64::try_from(i).unwrap_or(0);
                let len = unit_len(u);
                let (data, tail) = buf[front..].split_at_mut(len);
                tail.fill(0);
                read_unit(chain, &occupied, free, u, data)
            })
            .collect::<Result<_>>()?;
        for (i, has_data) in results.iter().enumerate() {
            if *has_data {
                data_bytes += u64::try_from(unit_len(batch_start + u64::try_from(i).unwrap_or(0))).unwrap_or(0);
            }
        }
        match format {
            ExportFormat::Raw if streaming => {
                // In order; the units left out go out as zeros when the next one (or the end) is written.
                for (i, has_data) in results.iter().enumerate() {
                    let u = batch_start + u64::try_from(i).unwrap_or(0);
                    if *has_data {
                        target.write_at(&pool[i][front..front + unit_len(u)], u * UNIT)?;
                    }
                }
            }
            ExportFormat::Raw => {}
            ExportFormat::Vhd => {
                // Stored blocks are placed in disk order, then written in parallel.
                let mut places: Vec<Option<u64>> = vec![None; count];
                for (i, has_data) in results.iter().enumerate() {
                    if *has_data {
                        places[i] = Some(next_block);
                        bat[i + usize::try_from(batch_start).unwrap_or(0)] = u32::try_from(next_block / SECTOR_SIZE)
                            .map_err(|_| VhdError::invalid_argument(Some(target.path()), "output too large"))?;
                        next_block += bitmap_len + UNIT;
                    }
                }
                pool[..count].par_iter().zip(places).try_for_each(|(buf, place)| match place {
                    Some(at) => target.write_at(buf, at),
                    None => Ok(()),
                })?;
            }
        }
        batch_start = batch_end;
        if !progress((batch_start * UNIT).min(size), size) {
            return Err(VhdError::Interrupted { path: chain.leaf().path.clone() });
        }
    }
    let bytes_written = match format {
        ExportFormat::Raw => {
            target.fill_to(size)?;
            size
        }
        ExportFormat::Vhd => {
            let uuid = *uuid::Uuid::new_v4().as_bytes();
            let footer = new_footer(DiskType::Dynamic, size, uuid);
            let mut header = new_header(&layout, DEFAULT_BLOCK_SIZE);
            header.seal();
            let mut table: Vec<u8> = bat.iter().flat_map(|e| e.to_be_bytes()).collect();
            table.resize(usize::try_from(layout.table_bytes).unwrap_or(0), 0xFF);
            target.write_at(footer.as_bytes(), 0)?;
            target.write_at(header.as_bytes(), FOOTER_SIZE)?;
            target.write_at(&table, layout.table_offset)?;
            target.write_at(footer.as_bytes(), next_block)?;
            next_block + FOOTER_SIZE
        }
    };
    Ok(ExportStats {
        format,
        virtual_size: size,
        bytes_written,
        data_bytes,
        zero_bytes: size - data_bytes,
        seconds: 0.0,
    })
}

/// A dynamic VHD written front to back (a pipe): its BAT comes before the blocks, so a first pass finds the units
/// that hold anything but zeros, and a second reads them again and writes them in order. Memory stays at one batch.
/// Each pass reports half of the progress.
fn run_sequential_vhd(
    chain: &Chain,
    target: &Target,
    occupied: &Occupancy,
    free: &[(u64, u64)],
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<ExportStats> {
    let size = chain.virtual_size();
    let units = size.div_ceil(UNIT);
    let unit_len = |u: u64| usize::try_from(UNIT.min(size - u * UNIT)).unwrap_or(0);
    let unit_bytes = usize::try_from(UNIT).unwrap_or(0);
    let per_batch = (BATCH_BYTES / UNIT).max(1);
    let interrupted = || VhdError::Interrupted { path: chain.leaf().path.clone() };
    let mut stored = Vec::with_capacity(usize::try_from(units).unwrap_or(0));
    let mut batch_start = 0u64;
    while batch_start < units {
        let batch_end = (batch_start + per_batch).min(units);
        let found: Vec<bool> = (batch_start..batch_end)
            .into_par_iter()
            .map_init(|| vec![0u8; unit_bytes], |buf, u| read_unit(chain, occupied, free, u, &mut buf[..unit_len(u)]))
            .collect::<Result<_>>()?;
        stored.extend(found);
        batch_start = batch_end;
        if !progress((batch_start * UNIT).min(size) / 2, size) {
            return Err(interrupted());
        }
    }
    let layout = sparse_layout(size, DEFAULT_BLOCK_SIZE)?;
    let bitmap = bitmap_all_present(DEFAULT_BLOCK_SIZE);
    let block_span = bitmap_size(DEFAULT_BLOCK_SIZE) + UNIT;
    let first_block = layout.table_offset + layout.table_bytes;
    let mut bat = vec![crate::format::BAT_UNUSED; usize::try_from(layout.entries).unwrap_or(0)];
    let mut next_block = first_block;
    for (entry, _) in bat.iter_mut().zip(&stored).filter(|(_, s)| **s) {
        *entry = u32::try_from(next_block / SECTOR_SIZE)
            .map_err(|_| VhdError::invalid_argument(Some(target.path()), "output too large"))?;
        next_block += block_span;
    }
    let footer = new_footer(DiskType::Dynamic, size, *uuid::Uuid::new_v4().as_bytes());
    let mut header = new_header(&layout, DEFAULT_BLOCK_SIZE);
    header.seal();
    let mut table: Vec<u8> = bat.iter().flat_map(|e| e.to_be_bytes()).collect();
    table.resize(usize::try_from(layout.table_bytes).unwrap_or(0), 0xFF);
    target.write_at(footer.as_bytes(), 0)?;
    target.write_at(header.as_bytes(), FOOTER_SIZE)?;
    target.write_at(&table, layout.table_offset)?;
    let front = bitmap.len();
    let mut pool: Vec<Vec<u8>> = (0..per_batch)
        .map(|_| {
            let mut buf = vec![0u8; front + unit_bytes];
            buf[..front].copy_from_slice(&bitmap);
            buf
        })
        .collect();
    let mut data_bytes = 0u64;
    let mut at = first_block;
    batch_start = 0;
    while batch_start < units {
        let batch_end = (batch_start + per_batch).min(units);
        let count = usize::try_from(batch_end - batch_start).unwrap_or(0);
        let first = usize::try_from(batch_start).unwrap_or(0);
        pool[..count].par_iter_mut().enumerate().filter(|(i, _)| stored[first + i]).try_for_each(|(i, buf)| {
            let u = batch_start + u64::try_from(i).unwrap_or(0);
            let (data, tail) = buf[front..].split_at_mut(unit_len(u));
            // A short last unit is padded with zeros to a whole block.
            tail.fill(0);
            read_live(chain, free, u * UNIT, data)
        })?;
        for (i, buf) in pool[..count].iter().enumerate().filter(|(i, _)| stored[first + i]) {
            target.write_at(buf, at)?;
            at += block_span;
            data_bytes += u64::try_from(unit_len(batch_start + u64::try_from(i).unwrap_or(0))).unwrap_or(0);
        }
        batch_start = batch_end;
        if !progress(size / 2 + (batch_start * UNIT).min(size) / 2, size) {
            return Err(interrupted());
        }
    }
    target.write_at(footer.as_bytes(), at)?;
    Ok(ExportStats {
        format: ExportFormat::Vhd,
        virtual_size: size,
        bytes_written: at + FOOTER_SIZE,
        data_bytes,
        zero_bytes: size - data_bytes,
        seconds: 0.0,
    })
}
