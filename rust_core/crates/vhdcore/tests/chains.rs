//! Chains written by our writer read back as a plain in-memory model of the disk says they must.

use std::path::{Path, PathBuf};

use vhdcore::{Chain, DiskType, ErrorKind, ExportFormat};

mod common;

use common::{BLOCK, SIZE};

fn build_chain(dir: &Path, depth: usize, seed: u64, base_type: DiskType) -> (Vec<PathBuf>, Vec<u8>) {
    common::build_chain(dir, depth, seed, base_type, 12)
}

#[test]
fn chains_flatten_to_the_model() {
    for (seed, base_type) in [(1, DiskType::Dynamic), (2, DiskType::Fixed), (3, DiskType::Dynamic)] {
        let dir = tempfile::tempdir().unwrap();
        let (paths, model) = build_chain(dir.path(), 5, seed, base_type);
        let chain = Chain::open(paths.last().unwrap(), vhdcore::MAX_CHAIN_DEPTH).unwrap();
        assert_eq!(chain.layers.len(), 5);
        let mut flat = vec![0u8; model.len()];
        chain.read_at(0, &mut flat).unwrap();
        assert!(flat == model, "seed {seed}: flattened chain differs from the model");

        let out = dir.path().join("flat.raw");
        vhdcore::export(&chain, &out, ExportFormat::Raw, &mut |_, _| true).unwrap();
        assert!(std::fs::read(&out).unwrap() == model, "seed {seed}: raw export differs from the model");

        let vhd = dir.path().join("flat.vhd");
        let stats = vhdcore::export(&chain, &vhd, ExportFormat::Vhd, &mut |_, _| true).unwrap();
        let exported = Chain::open(&vhd, 1).unwrap();
        let mut again = vec![0u8; model.len()];
        exported.read_at(0, &mut again).unwrap();
        assert!(again == model, "seed {seed}: vhd export differs from the model");
        assert_eq!(stats.bytes_written, std::fs::metadata(&vhd).unwrap().len());
    }
}

#[test]
fn map_names_the_layer_that_wrote_last() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    vhdcore::create(&base, SIZE, DiskType::Dynamic, BLOCK).unwrap();
    vhdcore::write(&base, 0, &[1u8; 4096]).unwrap();
    let child = dir.path().join("child.vhd");
    vhdcore::snapshot(&base, &child).unwrap();
    vhdcore::write(&child, 1000, &[2u8; 100]).unwrap();
    let chain = Chain::open(&child, 30).unwrap();
    let map = chain.map().unwrap();
    let owner = |offset: u64| map.iter().find(|e| e.start <= offset && offset < e.start + e.length).unwrap().layer;
    assert_eq!(owner(0), Some(1));
    assert_eq!(owner(1000), Some(0), "the child's partial sector write owns its whole sector");
    assert_eq!(owner(1536), Some(1));
    // The base is dynamic: its whole allocated block counts as data.
    assert_eq!(owner(u64::from(BLOCK) - 1), Some(1));
    assert_eq!(owner(u64::from(BLOCK)), None);
    assert_eq!(map.iter().map(|e| e.length).sum::<u64>(), SIZE);
}

#[test]
fn diff_skips_shared_layers_and_finds_changed_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(dir.path(), 3, 9, DiskType::Dynamic);
    let old = paths.last().unwrap().clone();
    let new = dir.path().join("next.vhd");
    vhdcore::snapshot(&old, &new).unwrap();
    vhdcore::write(&new, 4096 + 10, b"changed").unwrap();
    let a = Chain::open(&old, 30).unwrap();
    let b = Chain::open(&new, 30).unwrap();
    let result = vhdcore::diff(&a, &b).unwrap();
    assert_eq!(result.shared_layers, 3);
    assert_eq!(result.ranges, vec![(4096, 512)]);
}

#[test]
fn corrupt_footer_checksum_names_field_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    vhdcore::create(&path, SIZE, DiskType::Dynamic, BLOCK).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let footer_at = bytes.len() - 512;
    bytes[footer_at + 40] ^= 0xFF; // original_size, covered by the checksum
    std::fs::write(&path, &bytes).unwrap();
    let err = Chain::open(&path, 30).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Checksum);
    assert_eq!(err.field(), Some("footer.checksum"));
    assert_eq!(err.offset(), Some(u64::try_from(footer_at).unwrap() + 64));
}

#[test]
fn writes_past_the_end_are_refused_and_leave_the_disk_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    vhdcore::create(&path, SIZE, DiskType::Dynamic, BLOCK).unwrap();
    let before = std::fs::read(&path).unwrap();
    let err = vhdcore::write(&path, SIZE - 10, &[0u8; 11]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(std::fs::read(&path).unwrap() == before);
}

#[test]
fn reading_piece_by_piece_hands_over_the_same_bytes_in_order() {
    use vhdcore::LayerSource;
    let dir = tempfile::tempdir().unwrap();
    let (paths, model) = build_chain(dir.path(), 4, 7, DiskType::Dynamic);
    let chain = Chain::open(paths.last().unwrap(), vhdcore::MAX_CHAIN_DEPTH).unwrap();
    let len = model.len();
    for (offset, n) in [(0, len), (512, 3 * 1024 * 1024 + 1536), (len - 70_000, 70_000)] {
        for piece in [512usize, 4096, 65_536, 256 * 1024, 3 * 1024 * 1024, usize::MAX] {
            let mut buf = vec![0xAAu8; n];
            let mut seen: Vec<u8> = Vec::new();
            let mut ends = Vec::new();
            let at = u64::try_from(offset).unwrap();
            chain
                .read_at_by(at, &mut buf, piece, &mut |bytes| {
                    seen.extend_from_slice(bytes);
                    ends.push(seen.len());
                    Ok(())
                })
                .unwrap();
            assert!(buf == model[offset..offset + n], "offset {offset}, piece {piece}: wrong bytes");
            assert!(seen == buf, "offset {offset}, piece {piece}: pieces differ from the buffer");
            // Every piece ends on a multiple of `piece` of the buffer, but the last.
            let last = ends.pop().unwrap();
            assert_eq!(last, n);
            assert!(ends.iter().all(|e| e % piece == 0), "offset {offset}, piece {piece}: {ends:?}");
            assert_eq!(ends.len(), n.div_ceil(piece) - 1, "offset {offset}, piece {piece}");
        }
    }
}
