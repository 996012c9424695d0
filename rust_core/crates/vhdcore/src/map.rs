//! The chain map: extents of the flattened disk, each with the layer that holds it, or none (zeros).

use rayon::prelude::*;

use crate::chain::Chain;
use crate::error::Result;
use crate::format::SECTOR_SIZE;
use crate::resolve::Run;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    /// Index into `Chain::layers` (0 = leaf), or None where no layer holds data.
    pub layer: Option<usize>,
}

impl Chain {
    /// Per window, whether any layer has anything allocated there (from the BATs alone, no I/O).
    pub fn occupancy(&self) -> Vec<bool> {
        self.occupancy_of(self.layers.len())
    }

    /// Like `occupancy`, counting only the top `count` layers (leaf first).
    pub fn occupancy_of(&self, count: usize) -> Vec<bool> {
        let windows = usize::try_from(self.window_count()).unwrap_or(0);
        let grain = self.grain();
        let mut occupied = vec![false; windows];
        for layer in self.layers.iter().take(count) {
            match &layer.sparse {
                None => {
                    let n = usize::try_from(layer.virtual_size.div_ceil(grain))
                        .unwrap_or(0)
                        .min(windows);
                    occupied[..n].fill(true);
                }
                Some(sparse) => {
                    let per_block = u64::from(sparse.block_size) / grain;
                    for &block in &sparse.allocated {
                        let first = u64::from(block) * per_block;
                        let from = usize::try_from(first).unwrap_or(usize::MAX).min(windows);
                        let to = usize::try_from(first + per_block)
                            .unwrap_or(usize::MAX)
                            .min(windows);
                        occupied[from..to].fill(true);
                    }
                }
            }
        }
        occupied
    }

    /// Extents covering the whole disk in order, adjacent extents of the same layer merged.
    pub fn map(&self) -> Result<Vec<Extent>> {
        let occupied = self.occupancy();
        let busy: Vec<u64> = occupied
            .iter()
            .enumerate()
            .filter(|(_, o)| **o)
            .map(|(w, _)| u64::try_from(w).unwrap_or(0))
            .collect();
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
                Some(last) if last.layer == layer && last.start + last.length == start => {
                    last.length += length
                }
                _ => extents.push(Extent {
                    start,
                    length,
                    layer,
                }),
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
