//! Test chains written by our own writer, with the in-memory model of the disk they must flatten to.

use std::path::{Path, PathBuf};

use vhdcore::rng::SplitMix;
use vhdcore::DiskType;

pub const SIZE: u64 = 8 * 1024 * 1024;
pub const BLOCK: u32 = 512 * 1024;

/// A chain of `depth` layers (base first) with `writes` writes in each, mixing whole blocks, single sectors and
/// unaligned spans that cross block boundaries, and the bytes its flattened disk must hold.
pub fn build_chain(dir: &Path, depth: usize, seed: u64, base_type: DiskType, writes: usize) -> (Vec<PathBuf>, Vec<u8>) {
    let mut rng = SplitMix(seed);
    let mut model = vec![0u8; usize::try_from(SIZE).unwrap()];
    let base = dir.join("layer0.vhd");
    vhdcore::create(&base, SIZE, base_type, BLOCK).unwrap();
    let mut paths = vec![base];
    for level in 0..depth {
        let leaf = paths.last().unwrap().clone();
        for _ in 0..writes {
            let len = match rng.below(3) {
                0 => u64::from(BLOCK),
                1 => 512,
                _ => 1 + rng.below(3 * u64::from(BLOCK)),
            };
            let offset = rng.below(SIZE - len);
            let mut data = vec![0u8; usize::try_from(len).unwrap()];
            rng.fill(&mut data);
            vhdcore::write(&leaf, offset, &data).unwrap();
            let at = usize::try_from(offset).unwrap();
            model[at..at + data.len()].copy_from_slice(&data);
        }
        if level + 1 < depth {
            let child = dir.join(format!("layer{}.vhd", level + 1));
            vhdcore::snapshot(&leaf, &child).unwrap();
            paths.push(child);
        }
    }
    (paths, model)
}
