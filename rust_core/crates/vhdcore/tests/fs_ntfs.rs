//! NTFS fixtures from mkntfs + ntfscp over random bytes: the zeroed copy passes `ntfsfix -n` and every file reads
//! back identical through ntfscat; a volume marked dirty is kept whole.

mod fs_support;

use std::path::Path;

use fs_support::*;
use vhdcore::fs::{Decision, FsKind};

fn build_ntfs(img: &Path, size: u64, src: &Path, files: &[(String, Vec<u8>)], extra: &[&str]) {
    random_file(img, size, 33);
    let mut args = vec!["-F", "-Q", "-q"];
    args.extend_from_slice(extra);
    args.push(img.to_str().unwrap());
    run("mkntfs", &args);
    for (name, _) in files {
        run("ntfscp", &["-f", img.to_str().unwrap(), src.join(name).to_str().unwrap(), name]);
    }
}

fn ntfs_files_match(img: &Path, files: &[(String, Vec<u8>)]) {
    for (name, data) in files {
        let out = std::process::Command::new("ntfscat").args([img.to_str().unwrap(), name]).output().unwrap();
        assert!(out.status.success(), "ntfscat {name}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stdout == *data, "{name}: differs after zeroing the free ranges");
    }
}

fn make_files(dir: &Path, n: usize) -> Vec<(String, Vec<u8>)> {
    std::fs::create_dir_all(dir).unwrap();
    (0..n)
        .map(|i| {
            let data = random_bytes(1000 + i * 377_777 % 2_500_000, 900 + i as u64);
            let name = format!("n{i:02}.bin");
            std::fs::write(dir.join(&name), &data).unwrap();
            (name, data)
        })
        .collect()
}

fn variant(name: &str, extra: &[&str]) {
    if !have(&["mkntfs", "ntfscp", "ntfscat", "ntfsfix"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let files = make_files(&src, 12);
    let img = dir.path().join("ntfs.img");
    let size = 96 * MIB;
    build_ntfs(&img, size, &src, &files, extra);
    let u = usage_of(&img);
    assert_eq!(u.partitions[0].filesystem, FsKind::Ntfs);
    let free = dropped(&u, 0);
    let stored: u64 = files.iter().map(|f| f.1.len() as u64).sum();
    eprintln!("{name}: free {} MiB of {} MiB (files {} MiB)", free / MIB, size / MIB, stored / MIB);
    assert!(free >= (size - stored) * 8 / 10, "{name}: free {free}");
    assert!(u.free.iter().all(|&(s, l)| s >= 4096 && s + l <= size - 512), "boot sectors kept");
    let copy = dir.path().join("zeroed.img");
    zeroed_copy(&img, &u, &copy);
    let (code, text) = run_status("ntfsfix", &["-n", copy.to_str().unwrap()]);
    assert_eq!(code, 0, "ntfsfix -n:\n{text}");
    ntfs_files_match(&copy, &files);
}

#[test]
fn ntfs_default() {
    variant("ntfs 4k clusters", &[]);
}

#[test]
fn ntfs_small_clusters() {
    variant("ntfs 512-byte clusters", &["-c", "512"]);
}

#[test]
fn ntfs_large_clusters() {
    variant("ntfs 64k clusters", &["-c", "65536"]);
}

/// Sets VOLUME_IS_DIRTY in $Volume's volume information (record 3), as Windows leaves a volume it has mounted.
fn mark_dirty(bytes: &mut [u8]) {
    let le16 = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let le32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let bps = le16(bytes, 11);
    let cluster = bps * bytes[13] as usize;
    let mft = u64::from_le_bytes(bytes[0x30..0x38].try_into().unwrap()) as usize * cluster;
    let rec = mft + 3 * 1024;
    let mut off = rec + le16(bytes, rec + 20);
    while le32(bytes, off) != 0x70 {
        off += le32(bytes, off + 4);
    }
    let value = off + le16(bytes, off + 20);
    bytes[value + 10] |= 1;
}

#[test]
fn ntfs_dirty_keeps_whole() {
    if !have(&["mkntfs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ntfs.img");
    build_ntfs(&img, 32 * MIB, dir.path(), &[], &[]);
    let mut bytes = std::fs::read(&img).unwrap();
    assert!(matches!(vhdcore::fs::usage(&bytes).unwrap().partitions[0].decision, Decision::Dropped { .. }));
    mark_dirty(&mut bytes);
    let u = vhdcore::fs::usage(&bytes).unwrap();
    match &u.partitions[0].decision {
        Decision::KeepWhole { reason } => assert!(reason.contains("dirty"), "{reason}"),
        d => panic!("{d:?}"),
    }
    assert!(u.free.is_empty());
}
