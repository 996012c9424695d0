//! Which layer holds each sector of the flattened disk, window by window, and reading the flattened bytes.
//!
//! A window is `grain()` bytes (the smallest block size in the chain), so it never straddles a block of any layer:
//! each layer answers for a window with one state (absent, full, or a bitmap of present sectors).
//!
//! The logic is written once over [`LayerSource`]: the files of an open [`Chain`], or the bytes a worker fetched
//! for its chunk plan (see `plan`), so both paths build the very same bytes.

use crate::chain::Chain;
use crate::disk::Disk;
use crate::error::{Result, VhdError};
use crate::format::{DiskType, DEFAULT_BLOCK_SIZE, SECTOR_SIZE};

/// What one layer holds of one window.
#[derive(Debug, Clone)]
pub enum LayerState {
    Absent,
    /// Every sector of the window is in this layer, contiguous in the file from `offset`.
    Full {
        offset: u64,
    },
    /// Only the sectors whose bit is set (MSB-first, bit i = window sector i); data contiguous from `offset`.
    Partial {
        offset: u64,
        bits: Vec<u8>,
    },
}

fn bit(bits: &[u8], i: usize) -> bool {
    bits[i / 8] & (0x80 >> (i % 8)) != 0
}

/// Bits for sectors `[0, present)` of an `n`-sector window, the rest clear.
fn prefix_bits(n: usize, present: usize) -> Vec<u8> {
    let mut bits = vec![0u8; n.div_ceil(8)];
    for i in 0..present.min(n) {
        bits[i / 8] |= 0x80 >> (i % 8);
    }
    bits
}

/// The shape of a layer: all the resolver needs besides its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerGeometry {
    #[serde(with = "disk_type_name")]
    pub disk_type: DiskType,
    pub virtual_size: u64,
    /// Zero for fixed disks.
    pub block_size: u32,
    pub bitmap_size: u64,
}

mod disk_type_name {
    use crate::format::DiskType;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DiskType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(t.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DiskType, D::Error> {
        let name = String::deserialize(d)?;
        match name.as_str() {
            "fixed" => Ok(DiskType::Fixed),
            "dynamic" => Ok(DiskType::Dynamic),
            "differencing" => Ok(DiskType::Differencing),
            other => Err(serde::de::Error::custom(format!("unknown disk type {other:?}"))),
        }
    }
}

impl Disk {
    pub fn geometry(&self) -> LayerGeometry {
        LayerGeometry {
            disk_type: self.disk_type,
            virtual_size: self.virtual_size,
            block_size: self.block_size().unwrap_or(0),
            bitmap_size: self.sparse.as_ref().map_or(0, |s| s.bitmap_size),
        }
    }

    /// File offset of `sector`'s bytes in this layer, or None when the layer does not hold it.
    pub(crate) fn sector_location(&self, sector: u64) -> Result<Option<u64>> {
        if sector >= self.virtual_size / SECTOR_SIZE {
            return Ok(None);
        }
        let Some(sparse) = &self.sparse else {
            return Ok(Some(sector * SECTOR_SIZE));
        };
        let spb = sparse.sectors_per_block();
        let Some(block_offset) = sparse.block_offset(sector / spb) else {
            return Ok(None);
        };
        let within = sector % spb;
        let data = block_offset + sparse.bitmap_size + within * SECTOR_SIZE;
        if self.disk_type == DiskType::Dynamic {
            return Ok(Some(data));
        }
        let mut byte = [0u8; 1];
        self.read_exact_at(&mut byte, block_offset + within / 8)?;
        Ok((byte[0] & (0x80 >> (within % 8)) != 0).then_some(data))
    }
}

/// A run of sectors of the flattened disk and where its bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start_sector: u64,
    pub sectors: u64,
    /// Index into the layers (0 = leaf), or None when no layer holds these sectors (they read as zeros).
    pub layer: Option<usize>,
    pub file_offset: u64,
}

/// Where the layers' bytes come from. Offsets are the layers' own file offsets.
pub trait LayerSource: Sync {
    fn layer_count(&self) -> usize;
    fn geometry(&self, layer: usize) -> LayerGeometry;
    /// File offset of the bitmap of block `index` of a sparse layer, None when the block is not allocated.
    fn block_location(&self, layer: usize, index: u64) -> Option<u64>;
    fn read(&self, layer: usize, offset: u64, dst: &mut [u8]) -> Result<()>;

    fn virtual_size(&self) -> u64 {
        self.geometry(0).virtual_size
    }

    /// The unit of work for mapping and copying: the smallest block size in the chain.
    fn grain(&self) -> u64 {
        let smallest = (0..self.layer_count())
            .map(|l| self.geometry(l).block_size)
            .filter(|b| *b != 0)
            .min()
            .unwrap_or(DEFAULT_BLOCK_SIZE);
        u64::from(smallest)
    }

    /// The state of `layer` over the window of `n` sectors at `start` (a multiple of `n`, `n` dividing the block).
    #[doc(hidden)]
    fn window_state(&self, layer: usize, start: u64, n: u64) -> Result<LayerState> {
        let geometry = self.geometry(layer);
        let size_sectors = geometry.virtual_size / SECTOR_SIZE;
        if start >= size_sectors {
            return Ok(LayerState::Absent);
        }
        let inside = (size_sectors - start).min(n);
        let n_usize = usize::try_from(n).unwrap_or(usize::MAX);
        let inside_usize = usize::try_from(inside).unwrap_or(usize::MAX);
        let clip = |offset: u64| {
            if inside == n {
                LayerState::Full { offset }
            } else {
                LayerState::Partial { offset, bits: prefix_bits(n_usize, inside_usize) }
            }
        };
        if geometry.disk_type == DiskType::Fixed {
            return Ok(clip(start * SECTOR_SIZE));
        }
        let spb = u64::from(geometry.block_size) / SECTOR_SIZE;
        let block = start / spb;
        let Some(block_offset) = self.block_location(layer, block) else {
            return Ok(LayerState::Absent);
        };
        let within = start % spb;
        let data = block_offset + geometry.bitmap_size + within * SECTOR_SIZE;
        if geometry.disk_type == DiskType::Dynamic {
            // Like qemu, a dynamic disk's allocated block is all data; its bitmap is not consulted.
            return Ok(clip(data));
        }
        let mut bits = vec![0u8; n_usize.div_ceil(8)];
        self.read(layer, block_offset + within / 8, &mut bits)?;
        if inside < n {
            let mask = prefix_bits(n_usize, inside_usize);
            bits.iter_mut().zip(mask).for_each(|(b, m)| *b &= m);
        }
        Ok(if bits.iter().all(|b| *b == 0xFF) {
            LayerState::Full { offset: data }
        } else if bits.iter().all(|b| *b == 0) {
            LayerState::Absent
        } else {
            LayerState::Partial { offset: data, bits }
        })
    }

    fn window_count(&self) -> u64 {
        self.virtual_size().div_ceil(self.grain())
    }

    /// Appends to `runs` the runs of window `w`, in order, covering it exactly.
    fn resolve_window(&self, w: u64, runs: &mut Vec<Run>) -> Result<()> {
        let spw = self.grain() / SECTOR_SIZE;
        self.resolve_sectors(w * spw, spw, runs)
    }

    /// Appends to `runs` the runs of the `spw` sectors at `start` (clipped to the disk), in order, covering them
    /// exactly: a whole window, or a part of one that `spw` divides, at least 8 sectors (one bitmap byte) long and
    /// starting at a multiple of `spw`.
    #[doc(hidden)]
    fn resolve_sectors(&self, start: u64, spw: u64, runs: &mut Vec<Run>) -> Result<()> {
        let total = self.virtual_size() / SECTOR_SIZE;
        let count = spw.min(total.saturating_sub(start));
        if count == 0 {
            return Ok(());
        }
        let count_usize = usize::try_from(count).unwrap_or(usize::MAX);
        let mut unresolved: Option<Vec<u8>> = None; // None = every sector still unresolved
        let mut owners: Vec<(usize, u64, Vec<u8>)> = Vec::new();
        for index in 0..self.layer_count() {
            let state = self.window_state(index, start, spw)?;
            match (state, &mut unresolved) {
                (LayerState::Absent, _) => continue,
                (LayerState::Full { offset }, None) => {
                    runs.push(Run { start_sector: start, sectors: count, layer: Some(index), file_offset: offset });
                    return Ok(());
                }
                (LayerState::Full { offset }, Some(left)) => {
                    owners.push((index, offset, std::mem::take(left)));
                    break;
                }
                (LayerState::Partial { offset, bits }, None) => {
                    unresolved = Some(bits.iter().map(|b| !b).collect());
                    owners.push((index, offset, bits));
                }
                (LayerState::Partial { offset, bits }, Some(left)) => {
                    let take: Vec<u8> = bits.iter().zip(left.iter()).map(|(b, l)| b & l).collect();
                    left.iter_mut().zip(&bits).for_each(|(l, b)| *l &= !b);
                    if take.iter().any(|b| *b != 0) {
                        owners.push((index, offset, take));
                    }
                }
            }
            if unresolved.as_ref().is_some_and(|left| left.iter().all(|b| *b == 0)) {
                break;
            }
        }
        if owners.is_empty() {
            runs.push(Run { start_sector: start, sectors: count, layer: None, file_offset: 0 });
            return Ok(());
        }
        let owner_of = |i: usize| owners.iter().find(|(_, _, bits)| bit(bits, i));
        let mut i = 0usize;
        while i < count_usize {
            let owner = owner_of(i).map(|(layer, offset, _)| (*layer, *offset));
            let mut j = i + 1;
            while j < count_usize && owner_of(j).map(|(layer, offset, _)| (*layer, *offset)) == owner {
                j += 1;
            }
            let rel = u64::try_from(i).unwrap_or(0);
            let len = u64::try_from(j - i).unwrap_or(0);
            runs.push(match owner {
                Some((layer, offset)) => Run {
                    start_sector: start + rel,
                    sectors: len,
                    layer: Some(layer),
                    file_offset: offset + rel * SECTOR_SIZE,
                },
                None => Run { start_sector: start + rel, sectors: len, layer: None, file_offset: 0 },
            });
            i = j;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of the flattened disk at byte `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_at_by(offset, buf, usize::MAX, &mut |_| Ok(()))
    }

    /// Reads `buf.len()` bytes of the flattened disk at byte `offset`, `piece` bytes of `buf` at a time, handing
    /// each piece to `visit` as soon as it is read, in order (the last may be shorter): work on the bytes while they
    /// are still in the CPU's cache.
    fn read_at_by(
        &self,
        offset: u64,
        buf: &mut [u8],
        piece: usize,
        visit: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        let end = offset.checked_add(len).filter(|end| *end <= self.virtual_size()).ok_or_else(|| {
            VhdError::invalid_argument(
                None,
                format!("read of {len} bytes at offset {offset} is past the disk's end ({})", self.virtual_size()),
            )
        })?;
        let piece = piece.max(1);
        let grain = self.grain();
        let spw = grain / SECTOR_SIZE;
        let total = self.virtual_size() / SECTOR_SIZE;
        let mut runs = Vec::new();
        let mut pos = offset;
        let mut visited = 0usize;
        while pos < end {
            // The window holding `pos`, or, for a read that ends well inside it, the smallest aligned part of it
            // that holds the read: a 4 KiB read resolves 4 KiB, not the 2 MiB around it.
            let first = pos / SECTOR_SIZE;
            let last = (end.min((pos / grain + 1) * grain) - 1) / SECTOR_SIZE;
            let mut n = spw;
            if spw.is_power_of_two() {
                n = (last - first + 1).next_power_of_two().max(8);
                while n < spw && first / n != last / n {
                    n *= 2;
                }
                n = n.min(spw);
            }
            let start = first - first % n;
            runs.clear();
            self.resolve_sectors(start, n, &mut runs)?;
            let count = n.min(total.saturating_sub(start));
            let stop = end.min((start + count) * SECTOR_SIZE);
            // Only the part of each run that was asked for is read: a window may be far larger than the request.
            for run in &runs {
                let run_start = run.start_sector * SECTOR_SIZE;
                let from = run_start.max(pos);
                let to = (run_start + run.sectors * SECTOR_SIZE).min(stop);
                if from >= to {
                    continue;
                }
                let first = usize::try_from(from - offset).unwrap_or(usize::MAX);
                let last = usize::try_from(to - offset).unwrap_or(usize::MAX);
                let mut at = first;
                while at < last {
                    let next = (at / piece).saturating_add(1).saturating_mul(piece).min(last);
                    let dst = &mut buf[at..next];
                    match run.layer {
                        Some(layer) => {
                            let skip = u64::try_from(at - first).unwrap_or(u64::MAX);
                            self.read(layer, run.file_offset + (from - run_start) + skip, dst)?;
                        }
                        None => dst.fill(0),
                    }
                    at = next;
                    if at % piece == 0 {
                        visit(&buf[visited..at])?;
                        visited = at;
                    }
                }
            }
            pos = stop;
        }
        if visited < buf.len() {
            visit(&buf[visited..])?;
        }
        Ok(())
    }
}

impl LayerSource for Chain {
    fn layer_count(&self) -> usize {
        self.layers.len()
    }

    fn geometry(&self, layer: usize) -> LayerGeometry {
        self.layers[layer].geometry()
    }

    fn block_location(&self, layer: usize, index: u64) -> Option<u64> {
        self.layers[layer].sparse.as_ref()?.block_offset(index)
    }

    fn read(&self, layer: usize, offset: u64, dst: &mut [u8]) -> Result<()> {
        let disk = &self.layers[layer];
        disk.read_exact_at(dst, offset)
    }
}

impl Chain {
    pub fn virtual_size(&self) -> u64 {
        self.leaf().virtual_size
    }

    pub fn grain(&self) -> u64 {
        LayerSource::grain(self)
    }

    pub fn window_count(&self) -> u64 {
        LayerSource::window_count(self)
    }

    pub fn resolve_window(&self, w: u64, runs: &mut Vec<Run>) -> Result<()> {
        LayerSource::resolve_window(self, w, runs)
    }

    /// Reads `buf.len()` bytes of the flattened disk at byte `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        LayerSource::read_at(self, offset, buf)
    }
}
