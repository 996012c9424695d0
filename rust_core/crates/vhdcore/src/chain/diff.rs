//! Byte ranges (at sector granularity) where two disks or chains differ. Layers both chains share are never read:
//! only the blocks that some layer above the shared base allocated can differ.

use rayon::prelude::*;

use crate::chain::Chain;
use crate::error::{Result, VhdError};
use crate::format::SECTOR_SIZE;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffResult {
    /// Sorted, merged `(start, length)` byte ranges.
    pub ranges: Vec<(u64, u64)>,
    pub total: u64,
    /// Number of base layers the two chains have in common.
    pub shared_layers: usize,
}

const BATCH_UNITS: usize = 16;

fn same_layer(a: &crate::disk::Disk, b: &crate::disk::Disk) -> bool {
    let canon = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    a.uuid() == b.uuid() && a.file_size == b.file_size && canon(&a.path) == canon(&b.path)
}

pub fn diff(old: &Chain, new: &Chain) -> Result<DiffResult> {
    let size = old.virtual_size();
    if new.virtual_size() != size {
        return Err(VhdError::invalid_argument(
            Some(&new.leaf().path),
            format!("cannot diff disks of different sizes: {} and {}", size, new.virtual_size()),
        ));
    }
    let shared = old.layers.iter().rev().zip(new.layers.iter().rev()).take_while(|(a, b)| same_layer(a, b)).count();
    let unit = old.grain().max(new.grain());
    let units = size.div_ceil(unit);
    let busy_old = old.occupancy_of(old.layers.len() - shared);
    let busy_new = new.occupancy_of(new.layers.len() - shared);
    let mut candidates: Vec<u64> =
        busy_old.windows(unit).chain(busy_new.windows(unit)).filter(|u| *u < units).collect();
    candidates.sort_unstable();
    candidates.dedup();
    let unit_len = usize::try_from(unit).unwrap_or(0);
    let per_unit: Vec<Vec<(u64, u64)>> = candidates
        .par_chunks(BATCH_UNITS)
        .map(|chunk| {
            let mut a = vec![0u8; unit_len];
            let mut b = vec![0u8; unit_len];
            let mut found = Vec::new();
            for &u in chunk {
                let start = u * unit;
                let len = usize::try_from(unit.min(size - start)).unwrap_or(0);
                old.read_at(start, &mut a[..len])?;
                new.read_at(start, &mut b[..len])?;
                if a[..len] == b[..len] {
                    continue;
                }
                for (i, (sa, sb)) in a[..len].chunks(512).zip(b[..len].chunks(512)).enumerate() {
                    if sa != sb {
                        found.push((start + u64::try_from(i).unwrap_or(0) * SECTOR_SIZE, SECTOR_SIZE));
                    }
                }
            }
            Ok(found)
        })
        .collect::<Result<_>>()?;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (start, len) in per_unit.into_iter().flatten() {
        match ranges.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += len,
            _ => ranges.push((start, len)),
        }
    }
    let total = ranges.iter().map(|r| r.1).sum();
    Ok(DiffResult { ranges, total, shared_layers: shared })
}
