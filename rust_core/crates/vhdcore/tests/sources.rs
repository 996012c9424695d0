//! Chains whose layers come from a caller's reader (here memory, standing for an object store): they open, map,
//! read, plan, estimate and compress exactly like the same chain opened from files.

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{build_chain, SIZE};
use vhdcore::{Chain, DiskType, ErrorKind, LayerStore, MemoryStore, ReadAt, VhdError, MAX_CHAIN_DEPTH};

const PREFIX: &str = "sr/web1";

/// The chain's files as a store under `sr/web1/`, by file name.
fn store_of(paths: &[PathBuf]) -> MemoryStore {
    let mut store = MemoryStore::new();
    for path in paths {
        let name = path.file_name().unwrap().to_str().unwrap();
        store.insert(format!("{PREFIX}/{name}"), std::fs::read(path).unwrap());
    }
    store
}

fn leaf_name(paths: &[PathBuf]) -> String {
    format!("{PREFIX}/{}", paths.last().unwrap().file_name().unwrap().to_str().unwrap())
}

#[test]
fn a_chain_in_a_store_reads_as_the_same_chain_in_files() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, model) = build_chain(dir.path(), 3, 11, DiskType::Dynamic, 12);
    let store = store_of(&paths);

    let chain = Chain::open_in(&store, &leaf_name(&paths), MAX_CHAIN_DEPTH).unwrap();
    let from_files = Chain::open(paths.last().unwrap(), MAX_CHAIN_DEPTH).unwrap();

    let names: Vec<PathBuf> = chain.layers.iter().map(|d| d.path.clone()).collect();
    let expected: Vec<PathBuf> = paths.iter().rev().map(|p| Path::new(PREFIX).join(p.file_name().unwrap())).collect();
    assert_eq!(names, expected);
    let mut flat = vec![0u8; usize::try_from(SIZE).unwrap()];
    chain.read_at(0, &mut flat).unwrap();
    assert!(flat == model, "the store's chain flattens to the model");
    assert_eq!(chain.map().unwrap(), from_files.map().unwrap());

    let plan = chain.plan(2 * 1024 * 1024).unwrap();
    let file_plan = from_files.plan(2 * 1024 * 1024).unwrap();
    assert_eq!(plan.chunks, file_plan.chunks);
    for chunk in &plan.chunks {
        let frame = vhdcore::compress_chunk(&chain, &plan, chunk, 3, vhdcore::ChunkDigest::Content).unwrap();
        let file_frame = vhdcore::compress_chunk(&from_files, &plan, chunk, 3, vhdcore::ChunkDigest::Content).unwrap();
        assert!(frame.frame == file_frame.frame, "chunk {} compresses to the same frame", chunk.index);
        assert_eq!(frame.sha256, file_frame.sha256);
    }

    let opts = vhdcore::EstimateOptions { seed: 5, ..Default::default() };
    let estimate = vhdcore::estimate(&chain, &opts).unwrap();
    let file_estimate = vhdcore::estimate(&from_files, &opts).unwrap();
    assert_eq!(estimate.compressed_bytes, file_estimate.compressed_bytes);
    assert_eq!(estimate.allocated_bytes, file_estimate.allocated_bytes);
}

#[test]
fn parents_are_found_by_relative_names_and_checked_by_uuid() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(dir.path(), 2, 3, DiskType::Dynamic, 2);
    let base = std::fs::read(&paths[0]).unwrap();
    let parent = disk_from_bytes("images/golden/base.vhd", base.clone());
    let child = vhdcore::snapshot_bytes(&parent, "../../images/golden/base.vhd").unwrap();
    let mut store = MemoryStore::new();
    store.insert("images/golden/base.vhd", base.clone());
    store.insert("sr/web1/leaf.vhd", child.clone());

    let chain = Chain::open_in(&store, "sr/web1/leaf.vhd", MAX_CHAIN_DEPTH).unwrap();
    assert_eq!(chain.layers.len(), 2);
    assert_eq!(chain.layers[1].path, PathBuf::from("images/golden/base.vhd"));
    assert_eq!(chain.layers[1].uuid(), parent.uuid());
    assert_eq!(chain.layers[0].allocated_blocks(), 0);

    // Another disk under the parent's name: refused by UUID.
    let other_dir = tempfile::tempdir().unwrap();
    let (other, _) = build_chain(other_dir.path(), 1, 4, DiskType::Dynamic, 1);
    let mut wrong = MemoryStore::new();
    wrong.insert("images/golden/base.vhd", std::fs::read(&other[0]).unwrap());
    wrong.insert("sr/web1/leaf.vhd", child.clone());
    let err = Chain::open_in(&wrong, "sr/web1/leaf.vhd", MAX_CHAIN_DEPTH).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ParentMismatch, "{err}");

    // No parent at all: the error lists the names tried, none outside the store.
    let mut orphan = MemoryStore::new();
    orphan.insert("sr/web1/leaf.vhd", child);
    match Chain::open_in(&orphan, "sr/web1/leaf.vhd", MAX_CHAIN_DEPTH).unwrap_err() {
        VhdError::MissingParent { path, tried, .. } => {
            assert_eq!(path, PathBuf::from("sr/web1/leaf.vhd"));
            assert_eq!(tried, vec![PathBuf::from("images/golden/base.vhd"), PathBuf::from("sr/web1/base.vhd")]);
        }
        other => panic!("expected MissingParent, got {other}"),
    }
}

#[test]
fn a_locator_that_climbs_out_of_the_store_is_only_tried_beside_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(dir.path(), 1, 6, DiskType::Dynamic, 1);
    let base = std::fs::read(&paths[0]).unwrap();
    let parent = disk_from_bytes("base.vhd", base.clone());
    let child = vhdcore::snapshot_bytes(&parent, "../../../outside/base.vhd").unwrap();
    let mut store = MemoryStore::new();
    store.insert("sr/web1/leaf.vhd", child);
    store.insert("sr/web1/base.vhd", base);
    let chain = Chain::open_in(&store, "sr/web1/leaf.vhd", MAX_CHAIN_DEPTH).unwrap();
    assert_eq!(chain.layers[1].path, PathBuf::from("sr/web1/base.vhd"));

    let err = Chain::open_in(&store, "../etc/leaf.vhd", MAX_CHAIN_DEPTH).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let err = Chain::open_in(&store, "sr/web1/absent.vhd", MAX_CHAIN_DEPTH).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert_eq!(err.path(), Some(Path::new("sr/web1/absent.vhd")));
}

/// A reader whose reads fail once `budget` of them have succeeded, like a store going away mid-chain.
#[derive(Debug)]
struct Failing {
    bytes: Vec<u8>,
    budget: Arc<AtomicUsize>,
}

impl ReadAt for Failing {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let left = self.budget.load(Ordering::SeqCst);
        if left == 0 {
            return Err(io::Error::other("the store is unreachable"));
        }
        self.budget.store(left - 1, Ordering::SeqCst);
        self.bytes.read_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        self.bytes.size()
    }
}

struct FailingStore {
    inner: MemoryStore,
    budget: Arc<AtomicUsize>,
}

impl LayerStore for FailingStore {
    fn open(&self, name: &str) -> io::Result<Option<Arc<dyn ReadAt>>> {
        let Some(layer) = self.inner.open(name)? else { return Ok(None) };
        let size = usize::try_from(layer.size()?).unwrap();
        let mut bytes = vec![0u8; size];
        layer.read_at(&mut bytes, 0)?;
        Ok(Some(Arc::new(Failing { bytes, budget: Arc::clone(&self.budget) })))
    }
}

#[test]
fn a_failing_reader_gives_a_typed_error_naming_the_layer_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(dir.path(), 2, 9, DiskType::Dynamic, 4);
    for budget in [0, 1, 3] {
        let store = FailingStore { inner: store_of(&paths), budget: Arc::new(AtomicUsize::new(budget)) };
        let err = Chain::open_in(&store, &leaf_name(&paths), MAX_CHAIN_DEPTH).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io, "{err}");
        assert!(err.to_string().contains("the store is unreachable"), "{err}");
        assert!(err.path().unwrap().starts_with(PREFIX), "{err}");
        assert!(err.offset().is_some(), "{err}");
    }
    // Opened whole, then failing while reading the flattened disk.
    let budget = Arc::new(AtomicUsize::new(1_000));
    let store = FailingStore { inner: store_of(&paths), budget: Arc::clone(&budget) };
    let chain = Chain::open_in(&store, &leaf_name(&paths), MAX_CHAIN_DEPTH).unwrap();
    budget.store(0, Ordering::SeqCst);
    let mut buf = vec![0u8; usize::try_from(SIZE).unwrap()];
    let err = chain.read_at(0, &mut buf).unwrap_err();
    match err {
        VhdError::Read { path, offset, length, .. } => {
            assert!(path.starts_with(PREFIX));
            assert!(length > 0 && offset > 0);
        }
        other => panic!("expected a read error, got {other}"),
    }
}

#[test]
fn a_store_layer_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(dir.path(), 1, 2, DiskType::Dynamic, 1);
    let disk = disk_from_bytes("sr/web1/layer0.vhd", std::fs::read(&paths[0]).unwrap());
    assert!(disk.source.file().is_none());
}

fn disk_from_bytes(name: &str, bytes: Vec<u8>) -> vhdcore::Disk {
    vhdcore::Disk::from_source(Path::new(name), Arc::new(bytes)).unwrap()
}
