//! Merging a read-only layer into its parent as a new layer (for object stores): the merged layer, put in place of
//! the two, leaves the chain's flattened content unchanged, and is mostly the parent's bytes copied.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{build_chain, SIZE};
use vhdcore::{
    merge_layout, merged_block, Chain, Disk, DiskType, ErrorKind, MemoryStore, MergeSegment, MAX_CHAIN_DEPTH,
};

fn disk(path: &Path) -> Disk {
    Disk::from_source(Path::new(path.file_name().unwrap()), Arc::new(std::fs::read(path).unwrap())).unwrap()
}

/// The merged layer's bytes, assembled from its layout as an object store would.
fn assemble(parent: &Disk, layer: &Disk, parent_bytes: &[u8]) -> (Vec<u8>, u64) {
    let layout = merge_layout(parent, layer).unwrap();
    let mut out = Vec::new();
    let mut copied = 0;
    for segment in &layout.segments {
        assert_eq!(segment.offset(), u64::try_from(out.len()).unwrap(), "segments are contiguous");
        match segment {
            MergeSegment::Copy { offset, length } => {
                let (from, to) = (usize::try_from(*offset).unwrap(), usize::try_from(offset + length).unwrap());
                out.extend_from_slice(&parent_bytes[from..to]);
                copied += length;
            }
            MergeSegment::Bytes { data, .. } => out.extend_from_slice(data),
            MergeSegment::Block { index, length, .. } => {
                let block = merged_block(parent, layer, *index).unwrap();
                assert_eq!(u64::try_from(block.len()).unwrap(), *length);
                out.extend_from_slice(&block);
            }
        }
    }
    assert_eq!(u64::try_from(out.len()).unwrap(), layout.size);
    assert_eq!(layout.uuid, layer.uuid());
    (out, copied)
}

/// Merges layer `c` (index into `paths`, base first) into its parent, in a store holding the chain by file name;
/// the merged layer replaces the child under the child's name and the parent goes away.
fn merge_and_flatten(paths: &[PathBuf], c: usize) -> (Vec<u8>, u64, usize) {
    let (parent, layer) = (disk(&paths[c - 1]), disk(&paths[c]));
    let parent_bytes = std::fs::read(&paths[c - 1]).unwrap();
    let (merged, copied) = assemble(&parent, &layer, &parent_bytes);
    let mut store = MemoryStore::new();
    for (i, path) in paths.iter().enumerate() {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if i == c {
            store.insert(name, merged.clone());
        } else if i != c - 1 {
            store.insert(name, std::fs::read(path).unwrap());
        }
    }
    let leaf = paths.last().unwrap().file_name().unwrap().to_str().unwrap();
    let chain = Chain::open_in(&store, leaf, MAX_CHAIN_DEPTH).unwrap();
    let mut flat = vec![0u8; usize::try_from(SIZE).unwrap()];
    chain.read_at(0, &mut flat).unwrap();
    (flat, copied, chain.layers.len())
}

#[test]
fn merging_into_a_dynamic_base_keeps_the_content() {
    for seed in [1, 2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let (paths, model) = build_chain(dir.path(), 3, seed, DiskType::Dynamic, 10);
        let (flat, copied, depth) = merge_and_flatten(&paths, 1);
        assert_eq!(depth, 2);
        assert!(flat == model, "seed {seed}: the merged chain flattens to the model");
        assert!(copied > 0);
    }
}

#[test]
fn merging_into_a_differencing_parent_keeps_the_content() {
    for seed in [4, 5, 6] {
        let dir = tempfile::tempdir().unwrap();
        let (paths, model) = build_chain(dir.path(), 4, seed, DiskType::Dynamic, 10);
        let (flat, _, depth) = merge_and_flatten(&paths, 2);
        assert_eq!(depth, 3);
        assert!(flat == model, "seed {seed}: the merged chain flattens to the model");
    }
}

#[test]
fn the_merged_layer_is_mostly_the_parents_bytes_copied() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(dir.path(), 2, 8, DiskType::Dynamic, 40);
    let (parent, layer) = (disk(&paths[0]), disk(&paths[1]));
    let layout = merge_layout(&parent, &layer).unwrap();
    let copied: u64 = layout
        .segments
        .iter()
        .filter_map(|s| match s {
            MergeSegment::Copy { length, .. } => Some(*length),
            _ => None,
        })
        .sum();
    let parent_blocks = u64::from(parent.allocated_blocks()) * u64::from(parent.block_size().unwrap());
    assert!(copied + layout.merged_bytes >= parent_blocks, "every parent block is copied or merged");
    assert_eq!(layout.added_bytes + layout.merged_bytes, u64::from(layer.allocated_blocks()) * 512 * 1024);
    let merged = Disk::from_source(
        Path::new("merged.vhd"),
        Arc::new(assemble(&parent, &layer, &std::fs::read(&paths[0]).unwrap()).0),
    )
    .unwrap();
    assert_eq!(merged.uuid(), layer.uuid());
    assert_eq!(merged.disk_type, DiskType::Dynamic);
    assert_eq!(merged.footer.timestamp.get(), layer.footer.timestamp.get());
}

#[test]
fn only_a_child_is_merged_into_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(dir.path(), 3, 9, DiskType::Dynamic, 2);
    let (base, middle, leaf) = (disk(&paths[0]), disk(&paths[1]), disk(&paths[2]));
    assert_eq!(merge_layout(&base, &leaf).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(merge_layout(&middle, &base).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert!(merge_layout(&middle, &leaf).is_ok());
}

#[test]
fn a_listed_chain_takes_the_merged_layer_under_a_new_name() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, model) = build_chain(dir.path(), 4, 12, DiskType::Dynamic, 8);
    let (parent, layer) = (disk(&paths[1]), disk(&paths[2]));
    let (merged, _) = assemble(&parent, &layer, &std::fs::read(&paths[1]).unwrap());
    let mut store = MemoryStore::new();
    for path in &paths {
        store.insert(format!("sr/a/{}", path.file_name().unwrap().to_str().unwrap()), std::fs::read(path).unwrap());
    }
    store.insert("sr/a/merged.vhd", merged);
    let names = |list: &[&str]| list.iter().map(|n| format!("sr/a/{n}")).collect::<Vec<String>>();

    let chain =
        Chain::open_listed(&store, &names(&["layer3.vhd", "merged.vhd", "layer0.vhd"]), MAX_CHAIN_DEPTH).unwrap();
    let mut flat = vec![0u8; usize::try_from(SIZE).unwrap()];
    chain.read_at(0, &mut flat).unwrap();
    assert!(flat == model, "the listed chain with the merged layer flattens to the model");
    let before =
        Chain::open_listed(&store, &names(&["layer3.vhd", "layer2.vhd", "layer1.vhd", "layer0.vhd"]), 30).unwrap();
    assert_eq!(before.layers.len(), 4);

    let kind = |list: &[&str]| Chain::open_listed(&store, &names(list), MAX_CHAIN_DEPTH).unwrap_err().kind();
    assert_eq!(kind(&["layer3.vhd", "layer1.vhd", "layer0.vhd"]), ErrorKind::ParentMismatch);
    assert_eq!(kind(&["layer3.vhd", "merged.vhd"]), ErrorKind::MissingParent); // ends before the base
    assert_eq!(kind(&["layer3.vhd", "gone.vhd", "layer0.vhd"]), ErrorKind::MissingParent);
    assert_eq!(kind(&["layer0.vhd", "layer0.vhd"]), ErrorKind::InvalidArgument); // the base has no parent
    assert_eq!(kind(&["layer3.vhd", "../a/merged.vhd", "layer0.vhd"]), ErrorKind::InvalidArgument);
    let too_deep = Chain::open_listed(&store, &names(&["layer3.vhd", "merged.vhd", "layer0.vhd"]), 2).unwrap_err();
    assert_eq!(too_deep.kind(), ErrorKind::ChainTooDeep);
}
