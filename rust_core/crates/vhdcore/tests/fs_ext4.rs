//! ext2/3/4 fixtures built by e2fsprogs: the ranges `fs::usage` reports free are zeroed in a copy, which must
//! still check clean and read back every file, and the free bytes must cover most of the deleted data.

mod fs_support;

use fs_support::*;
use vhdcore::fs::{Decision, FsKind, TableKind};

fn variant(name: &str, size: u64, mkfs: &[&str], expect: FsKind) {
    if !have(&["mke2fs", "debugfs", "e2fsck"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let files = make_tree(&src, size ^ 0x5eed, 40, 600_000);
    let img = dir.path().join("fs.img");
    let (live, deleted) = build_ext(&img, size, mkfs, &src, files, |i| i % 2 == 0);
    let u = usage_of(&img);
    assert_eq!(u.table, TableKind::None);
    assert_eq!(u.partitions.len(), 1);
    assert_eq!(u.partitions[0].filesystem, expect, "{name}");
    let free = dropped(&u, 0);
    eprintln!("{name}: {} MiB free of {} MiB; deleted {} KiB", free / MIB, size / MIB, deleted / 1024);
    assert!(free >= deleted * 9 / 10, "{name}: free {free} < 90% of deleted {deleted}");
    assert!(free < size, "{name}");
    let copy = dir.path().join("zeroed.img");
    zeroed_copy(&img, &u, &copy);
    ext4_check(&copy);
    ext4_files_match(&copy, &live, dir.path());
}

#[test]
fn ext4_default_1k_blocks() {
    variant("ext4 default", 48 * MIB, &["-t", "ext4"], FsKind::Ext4);
}

#[test]
fn ext4_64bit_metadata_csum_4k() {
    variant(
        "ext4 64bit,metadata_csum",
        96 * MIB,
        &["-t", "ext4", "-b", "4096", "-O", "64bit,metadata_csum"],
        FsKind::Ext4,
    );
}

#[test]
fn ext4_no_csum_no_flex_bg() {
    variant(
        "ext4 ^metadata_csum,^flex_bg",
        64 * MIB,
        &["-t", "ext4", "-b", "4096", "-O", "^metadata_csum,^flex_bg"],
        FsKind::Ext4,
    );
}

#[test]
fn ext4_meta_bg() {
    variant("ext4 meta_bg", 64 * MIB, &["-t", "ext4", "-b", "1024", "-O", "meta_bg,^resize_inode"], FsKind::Ext4);
}

#[test]
fn ext4_sparse_super2() {
    variant("ext4 sparse_super2", 64 * MIB, &["-t", "ext4", "-b", "1024", "-O", "sparse_super2"], FsKind::Ext4);
}

#[test]
fn ext2_without_journal() {
    variant("ext2", 40 * MIB, &["-t", "ext2", "-O", "^has_journal"], FsKind::Ext2);
}

#[test]
fn ext3() {
    variant("ext3", 40 * MIB, &["-t", "ext3"], FsKind::Ext3);
}

#[test]
fn filesystem_smaller_than_disk_keeps_the_tail() {
    if !have(&["mke2fs", "debugfs", "e2fsck"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let files = make_tree(&src, 3, 10, 100_000);
    let img = dir.path().join("fs.img");
    random_file(&img, 64 * MIB, 9);
    // A 32 MiB filesystem in a 64 MiB disk.
    run(
        "mke2fs",
        &["-q", "-F", "-E", "nodiscard", "-b", "4096", "-d", src.to_str().unwrap(), img.to_str().unwrap(), "8192"],
    );
    let u = usage_of(&img);
    dropped(&u, 0);
    assert!(u.free.iter().all(|&(s, l)| s + l <= 32 * MIB), "nothing past the filesystem is free");
    let _ = files;
}

#[test]
fn corrupt_superblock_keeps_whole() {
    if !have(&["mke2fs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    random_file(&img, 32 * MIB, 11);
    run("mke2fs", &["-q", "-F", "-E", "nodiscard", "-t", "ext4", "-O", "metadata_csum", img.to_str().unwrap()]);
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[1024 + 0x20] ^= 0x01; // s_blocks_per_group, under the superblock checksum
    let u = vhdcore::fs::usage(&bytes).unwrap();
    match &u.partitions[0].decision {
        Decision::KeepWhole { reason } => assert!(reason.contains("checksum"), "{reason}"),
        d => panic!("{d:?}"),
    }
    assert!(u.free.is_empty());
}

#[test]
fn through_a_vhd_chain() {
    if !have(&["mke2fs", "debugfs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let files = make_tree(&src, 17, 12, 300_000);
    let img = dir.path().join("fs.img");
    build_ext(&img, 32 * MIB, &["-t", "ext4"], &src, files, |i| i % 2 == 0);
    let raw = std::fs::read(&img).unwrap();
    // Base holds the filesystem, a child holds a later write to the first 4 MiB: the flattened chain is read.
    let base = dir.path().join("base.vhd");
    vhdcore::create(&base, 32 * MIB, vhdcore::DiskType::Dynamic, 2 << 20).unwrap();
    vhdcore::write(&base, 0, &raw).unwrap();
    let child = dir.path().join("child.vhd");
    vhdcore::snapshot(&base, &child).unwrap();
    vhdcore::write(&child, 0, &raw[..4 * MIB as usize]).unwrap();
    let chain = vhdcore::Chain::open(&child, vhdcore::MAX_CHAIN_DEPTH).unwrap();
    let from_chain = vhdcore::fs::usage(&chain).unwrap();
    let from_file = usage_of(&img);
    assert_eq!(from_chain.free, from_file.free);
    assert!(dropped(&from_chain, 0) > 0);
}

#[test]
fn corrupt_journal_inode_keeps_whole() {
    if !have(&["mke2fs", "dumpe2fs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    random_file(&img, 32 * MIB, 12);
    run(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-E",
            "nodiscard",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-O",
            "metadata_csum",
            "-I",
            "256",
            img.to_str().unwrap(),
        ],
    );
    let text = run("dumpe2fs", &[img.to_str().unwrap()]);
    let table: usize = text.split("Inode table at ").nth(1).unwrap().split('-').next().unwrap().parse().unwrap();
    let mut bytes = std::fs::read(&img).unwrap();
    dropped(&vhdcore::fs::usage(&bytes).unwrap(), 0);
    // Inode 8's i_block: an extent pointing one block further would go unnoticed without the inode checksum.
    let i_block = table * 4096 + 7 * 256 + 0x28;
    bytes[i_block + 12 + 8] = bytes[i_block + 12 + 8].wrapping_add(1);
    match &vhdcore::fs::usage(&bytes).unwrap().partitions[0].decision {
        Decision::KeepWhole { reason } => assert!(reason.contains("inode 8 checksum"), "{reason}"),
        d => panic!("{d:?}"),
    }
}
