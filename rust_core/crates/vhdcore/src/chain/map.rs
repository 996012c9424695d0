//! The chain map: extents of the flattened disk, each with the layer that holds it, or none (zeros).

use rayon::prelude::*;

use crate::chain::resolve::Run;
use crate::chain::Chain;
use crate::error::Result;
use crate::format::SECTOR_SIZE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    /// Index into `Chain::layers` (0 = leaf), or None where no layer holds data.
    pub layer: Option<usize>,
}

/// Byte ranges of the flattened disk where some layer has something allocated, sorted and merged. Its size
/// follows the number of allocated blocks, never the virtual size.
#[derive(Debug, Clone, Default)]
pub struct Occupancy {
    pub ranges: Vec<(u64, u64)>,
}

impl Occupancy {
    /// True when `[start, end)` meets an allocated range.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        let i = self.ranges.partition_point(|(_, e)| *e <= start);
        self.ranges.get(i).is_some_and(|(s, _)| *s < end)
    }

    /// Indices of the `grain`-sized windows that meet an allocated range, ascending.
    pub fn windows(&self, grain: u64) -> impl Iterator<Item = u64> + '_ {
        let mut last: Option<u64> = None;
        self.ranges.iter().flat_map(move |(s, e)| s / grain..e.div_ceil(grain)).filter(move |w| {
            let fresh = last.is_none_or(|l| *w > l);
            if fresh {
                last = Some(*w);
            }
            fresh
        })
    }
}

impl Chain {
    /// Where any layer has anything allocated (from the BATs alone, no I/O).
    pub fn occupancy(&self) -> Occupancy {
        self.occupancy_of(self.layers.len())
    }

    /// Like `occupancy`, counting only the top `count` layers (leaf first).
    pub fn occupancy_of(&self, count: usize) -> Occupancy {
        let size = self.virtual_size();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for layer in self.layers.iter().take(count) {
            let limit = layer.virtual_size.min(size);
            match &layer.sparse {
                None => ranges.push((0, limit)),
                Some(sparse) => {
                    let block = u64::from(sparse.block_size);
                    for &index in &sparse.allocated {
                        let start = u64::from(index) * block;
                        if start < limit {
                            ranges.push((start, (start + block).min(limit)));
                        }
                    }
                }
            }
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        Occupancy { ranges: merged }
    }

    /// Extents covering the whole disk in order, adjacent extents of the same layer merged.
    pub fn map(&self) -> Result<Vec<Extent>> {
        let busy: Vec<u64> = self.occupancy().windows(self.grain()).collect();
        let resolved: Vec<Vec<Run>> = busy
            .par_chunks(256)
            .map(|windows| {
                let mut runs = Vec::new();
                for &w in windows {
                    self.resolve_window(w, &mut runs)?;
                }
                Ok(runs)
            })
            .collect::<Result<_>>()?;
        let mut extents: Vec<Extent> = Vec::new();
        let mut push = |start: u64, length: u64, layer: Option<usize>| {
            if length == 0 {
                return;
            }
            match extents.last_mut() {
                Some(last) if last.layer == layer && last.start + last.length == start => last.length += length,
                _ => extents.push(Extent { start, length, layer }),
            }
        };
        let mut cursor = 0u64;
        for run in resolved.iter().flatten() {
            let start = run.start_sector * SECTOR_SIZE;
            push(cursor, start - cursor, None);
            push(start, run.sectors * SECTOR_SIZE, run.layer);
            cursor = start + run.sectors * SECTOR_SIZE;
        }
        push(cursor, self.virtual_size() - cursor, None);
        Ok(extents)
    }
}
