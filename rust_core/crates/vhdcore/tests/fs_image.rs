//! Live-data imaging: a chain whose flattened disk holds an ext4 with deleted files, planned with its disk usage
//! (`Chain::plan_live`), gives an image that decompresses to a VHD of the disk with the free ranges zeroed, smaller
//! than the image of every block; the plan's JSON carries the free ranges to workers elsewhere, who build the same
//! frames; the estimate counts only what is stored.

mod fs_support;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fs_support::*;
use sha2::{Digest, Sha256};
use vhdcore::fs::Decision;
use vhdcore::{Chain, ChunkDigest, DiskType, EstimateOptions, ImagePlan};

/// An ext4 (4 KiB blocks) of `size` bytes over random bytes, half its files deleted, written into a chain of two
/// dynamic VHDs (1 MiB blocks: layer blocks smaller than the image's): the leaf holds the second half of the disk.
fn ext4_chain(dir: &Path, size: u64) -> (PathBuf, PathBuf, Vec<(String, Vec<u8>)>) {
    let src = dir.join("src");
    let files = make_tree(&src, 77, 40, 900_000);
    let raw = dir.join("fs.img");
    let (live, _) = build_ext(&raw, size, &["-t", "ext4", "-b", "4096"], &src, files, |i| i % 2 == 0);
    let bytes = std::fs::read(&raw).unwrap();
    let base = dir.join("base.vhd");
    vhdcore::create(&base, size, DiskType::Dynamic, 1024 * 1024).unwrap();
    let half = bytes.len() / 2;
    vhdcore::write(&base, 0, &bytes[..half]).unwrap();
    let leaf = dir.join("leaf.vhd");
    vhdcore::snapshot(&base, &leaf).unwrap();
    vhdcore::write(&leaf, u64::try_from(half).unwrap(), &bytes[half..]).unwrap();
    (leaf, raw, live)
}

fn decompress(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(bytes).unwrap().read_to_end(&mut out).unwrap();
    out
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The flattened disk of the VHD image `image` (a compressed image file).
fn restored(image: &Path, dir: &Path) -> Vec<u8> {
    let vhd = dir.join("restored.vhd");
    std::fs::write(&vhd, decompress(&std::fs::read(image).unwrap())).unwrap();
    let chain = Chain::open(&vhd, 1).unwrap();
    let mut disk = vec![0u8; usize::try_from(chain.virtual_size()).unwrap()];
    chain.read_at(0, &mut disk).unwrap();
    disk
}

#[test]
fn a_live_image_is_the_disk_with_its_free_ranges_zeroed_and_smaller() {
    if !have(&["mke2fs", "debugfs", "e2fsck"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let (leaf, raw, live) = ext4_chain(dir.path(), size);
    let chain = Chain::open(&leaf, 30).unwrap();
    let usage = vhdcore::fs::usage(&chain).unwrap();
    assert!(matches!(usage.partitions[0].decision, Decision::Dropped { .. }), "{:?}", usage.partitions);
    let free = usage.free_bytes();
    assert!(free > 20 * MIB, "only {free} bytes free");
    assert!(usage.free_blocks(2 * MIB).iter().any(|b| *b), "no wholly free 2 MiB block: the skip is untested");

    let all = chain.plan(8 * MIB).unwrap();
    let plan = chain.plan_live(8 * MIB, &usage).unwrap();
    // Fewer reads: layer blocks wholly free are never fetched.
    let reads = |p: &ImagePlan| p.chunks.iter().map(|c| c.read_bytes()).sum::<u64>();
    assert!(reads(&plan) < reads(&all), "live plan reads {} of {}", reads(&plan), reads(&all));
    assert_eq!(plan.chunks.iter().map(|c| c.free_bytes()).sum::<u64>(), free);
    // Without a map the plan's JSON is as it always was; with one, the free ranges round-trip.
    assert!(!all.to_json().contains("\"free\""));
    let plan = ImagePlan::from_json(&plan.to_json()).unwrap();
    assert_eq!(plan.chunks.iter().map(|c| c.free.clone()).collect::<Vec<_>>(), {
        let p = chain.plan_live(8 * MIB, &usage).unwrap();
        p.chunks.into_iter().map(|c| c.free).collect::<Vec<_>>()
    });

    let whole_out = dir.path().join("all.vhd.zst");
    let whole = vhdcore::compress_image(&chain, &all, 3, &whole_out, &mut |_, _| true).unwrap();
    let live_out = dir.path().join("live.vhd.zst");
    let stats = vhdcore::compress_image(&chain, &plan, 3, &live_out, &mut |_, _| true).unwrap();
    eprintln!(
        "all blocks {} bytes ({} stored), live {} bytes ({} stored), {free} bytes free",
        whole.compressed_bytes, whole.data_bytes, stats.compressed_bytes, stats.data_bytes
    );
    assert!(stats.compressed_bytes < whole.compressed_bytes);
    assert!(whole.compressed_bytes - stats.compressed_bytes > free * 8 / 10, "the free bytes were not left out");
    assert!(stats.data_bytes < whole.data_bytes, "no 2 MiB block left out of the image's VHD");
    assert!(stats.read_bytes < whole.read_bytes);

    // The image is the source disk with its free ranges zeroed.
    let mut expected = std::fs::read(&raw).unwrap();
    for &(s, l) in &usage.free {
        let (s, l) = (usize::try_from(s).unwrap(), usize::try_from(l).unwrap());
        expected[s..s + l].fill(0);
    }
    let got = restored(&live_out, dir.path());
    assert!(got == expected, "the live image is not the disk with its free ranges zeroed");
    // The default is the disk itself.
    assert!(restored(&whole_out, dir.path()) == std::fs::read(&raw).unwrap());
    // ... which checks clean and reads every file back.
    let back = dir.path().join("back.img");
    std::fs::write(&back, &got).unwrap();
    ext4_check(&back);
    ext4_files_match(&back, &live, dir.path());

    // Workers elsewhere, given only the plan's JSON and their reads, build the same frames; digests cover the
    // bytes stored.
    let files: Vec<std::fs::File> = plan.layers.iter().map(|l| std::fs::File::open(&l.path).unwrap()).collect();
    for chunk in &plan.chunks {
        let data: Vec<Vec<u8>> = chunk
            .reads
            .iter()
            .map(|r| {
                let mut buf = vec![0u8; usize::try_from(r.length).unwrap()];
                files[r.layer].read_exact_at(&mut buf, r.file_offset).unwrap();
                buf
            })
            .collect();
        let remote = vhdcore::compress_fetched_chunk(&plan, chunk.index, &data, 3, ChunkDigest::Image).unwrap();
        let local = vhdcore::compress_chunk(&chain, &plan, chunk, 3, ChunkDigest::Image).unwrap();
        assert_eq!(remote.frame, local.frame, "chunk {}", chunk.index);
        assert_eq!(remote.sha256, Some(hex(&Sha256::digest(decompress(&remote.frame)))));
        let start = usize::try_from(chunk.start).unwrap();
        let content = &expected[start..start + usize::try_from(chunk.length).unwrap()];
        let mut tree = Sha256::new();
        for leaf in content.chunks(2 * 1024 * 1024) {
            tree.update(Sha256::digest(leaf));
        }
        let by_content = vhdcore::compress_fetched_chunk(&plan, chunk.index, &data, 3, ChunkDigest::Content).unwrap();
        assert_eq!(by_content.content_sha256, Some(hex(&tree.finalize())), "chunk {}", chunk.index);
        let local_content = vhdcore::compress_chunk(&chain, &plan, chunk, 3, ChunkDigest::Content).unwrap();
        assert_eq!(local_content.content_sha256, by_content.content_sha256);
    }

    // Written in place in one run (the job's path): the same image.
    let in_place = dir.path().join("in_place.vhd.zst");
    let room = vhdcore::head_room(&plan).unwrap();
    let mut frames = Vec::new();
    vhdcore::compress_chunks_into(
        &chain,
        &plan,
        0,
        plan.chunks.len(),
        3,
        ChunkDigest::Image,
        &in_place,
        room,
        u64::MAX,
        &mut |placed| {
            if let vhdcore::Placed::Written(frame) = placed {
                frames.push((frame.stored_blocks, frame.logical_bytes));
            }
            true
        },
    )
    .unwrap();
    let head = vhdcore::compress_head(&plan, &frames, 3).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&in_place).unwrap();
    f.write_all_at(&vhdcore::head_and_gap(&head.frame, room).unwrap(), 0).unwrap();
    assert!(restored(&in_place, dir.path()) == expected);

    // The estimate with the same map counts only what is stored.
    let opts = EstimateOptions { chunk_size: 8 * MIB, ..Default::default() };
    let est_all = vhdcore::estimate(&chain, &opts).unwrap();
    let est_live = vhdcore::estimate_live(&chain, &opts, &usage).unwrap();
    eprintln!(
        "estimate all {} [{}, {}], live {} [{}, {}]",
        est_all.compressed_bytes, est_all.low, est_all.high, est_live.compressed_bytes, est_live.low, est_live.high
    );
    assert!(est_live.allocated_bytes + free <= est_all.allocated_bytes + 2 * MIB);
    let err = |e: u64, truth: u64| (e as f64 - truth as f64).abs() / truth as f64;
    assert!(
        err(est_live.compressed_bytes, stats.compressed_bytes) < 0.05,
        "{est_live:?} vs {}",
        stats.compressed_bytes
    );
    assert!(est_live.low <= stats.compressed_bytes && stats.compressed_bytes <= est_live.high);
}

#[test]
fn a_live_plan_of_a_disk_nothing_proves_free_is_the_plan_of_every_block() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    vhdcore::create(&path, 16 * MIB, DiskType::Dynamic, 2 * 1024 * 1024).unwrap();
    vhdcore::write(&path, 0, &random_bytes(5 * MIB as usize, 3)).unwrap();
    let chain = Chain::open(&path, 30).unwrap();
    let usage = vhdcore::fs::usage(&chain).unwrap();
    assert!(matches!(usage.partitions[0].decision, Decision::KeepWhole { .. }));
    let mut live = chain.plan_live(4 * MIB, &usage).unwrap();
    let all = chain.plan(4 * MIB).unwrap();
    (live.image_uuid, live.timestamp) = (all.image_uuid, all.timestamp);
    assert_eq!(live.to_json(), all.to_json());
    // A plan with a free range outside its chunk is refused.
    let mut bad = all.clone();
    bad.chunks[0].free = vec![(8 * MIB, 512)];
    assert!(ImagePlan::from_json(&bad.to_json()).is_err());
}

#[test]
fn a_live_export_is_the_disk_with_its_free_ranges_zeroed() {
    if !have(&["mke2fs", "debugfs", "e2fsck"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (leaf, raw, _) = ext4_chain(dir.path(), 32 * MIB);
    let chain = Chain::open(&leaf, 30).unwrap();
    let usage = vhdcore::fs::usage(&chain).unwrap();
    assert!(usage.free_bytes() > 8 * MIB);
    let mut expected = std::fs::read(&raw).unwrap();
    for &(s, l) in &usage.free {
        let (s, l) = (usize::try_from(s).unwrap(), usize::try_from(l).unwrap());
        expected[s..s + l].fill(0);
    }
    let out = dir.path().join("live.raw");
    let stats = vhdcore::export_live(&chain, &out, vhdcore::ExportFormat::Raw, &usage, &mut |_, _| true).unwrap();
    assert!(std::fs::read(&out).unwrap() == expected);
    let vhd = dir.path().join("live.vhd");
    let as_vhd = vhdcore::export_live(&chain, &vhd, vhdcore::ExportFormat::Vhd, &usage, &mut |_, _| true).unwrap();
    let exported = Chain::open(&vhd, 1).unwrap();
    let mut got = vec![0u8; expected.len()];
    exported.read_at(0, &mut got).unwrap();
    assert!(got == expected);
    let whole = dir.path().join("all.vhd");
    let all = vhdcore::export(&chain, &whole, vhdcore::ExportFormat::Vhd, &mut |_, _| true).unwrap();
    assert!(as_vhd.data_bytes < all.data_bytes && stats.data_bytes < all.data_bytes);
}
