//! XFS fixtures from mkfs.xfs (populated with a protofile over random bytes): the zeroed copy passes
//! `xfs_repair -n` and every file's extents (from `xfs_db bmap`) read back identical; a dirty log keeps it whole.

mod fs_support;

use std::path::Path;

use fs_support::*;
use vhdcore::fs::{Decision, FsKind};

fn xfs_field(img: &Path, field: &str) -> u64 {
    let out = run("xfs_db", &["-r", "-c", "sb 0", "-c", &format!("p {field}"), img.to_str().unwrap()]);
    out.split('=').nth(1).unwrap().trim().parse().unwrap()
}

/// Builds an XFS image of `size` bytes holding `files` (flat, in the root).
fn build_xfs(img: &Path, size: u64, src: &Path, files: &[(String, Vec<u8>)], extra: &[&str]) {
    random_file(img, size, 21);
    let mut proto = String::from("/dev/null\n0 0\nd--755 0 0\n");
    for (name, _) in files {
        proto.push_str(&format!("{name} ---644 0 0 {}\n", src.join(name).display()));
    }
    proto.push_str("$\n");
    let pf = img.with_extension("proto");
    std::fs::write(&pf, proto).unwrap();
    let mut args = vec!["-q", "-f", "-p", pf.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push(img.to_str().unwrap());
    run("mkfs.xfs", &args);
}

/// Every file's data, read through its extent map, equals the source.
fn xfs_files_match(img: &Path, files: &[(String, Vec<u8>)]) {
    let bs = xfs_field(img, "blocksize");
    let agblocks = xfs_field(img, "agblocks");
    let disk = std::fs::read(img).unwrap();
    for (name, data) in files {
        let out = run("xfs_db", &["-r", "-c", &format!("path /{name}"), "-c", "bmap", img.to_str().unwrap()]);
        let mut got = vec![0u8; data.len()];
        for line in out.lines().filter(|l| l.starts_with("data offset")) {
            let w: Vec<&str> = line.split_whitespace().collect();
            let offset: u64 = w[2].parse().unwrap();
            let (ag, agbno) = w[5].trim_matches(|c| c == '(' || c == ')').split_once('/').unwrap();
            let count: u64 = w[7].parse().unwrap();
            let at = ((ag.parse::<u64>().unwrap() * agblocks + agbno.parse::<u64>().unwrap()) * bs) as usize;
            let from = (offset * bs) as usize;
            let to = (((offset + count) * bs) as usize).min(data.len());
            if from < to {
                got[from..to].copy_from_slice(&disk[at..at + (to - from)]);
            }
        }
        assert!(got == *data, "{name}: differs after zeroing the free ranges");
    }
}

fn files_in(dir: &Path, seed: u64, n: usize, max: usize) -> Vec<(String, Vec<u8>)> {
    std::fs::create_dir_all(dir).unwrap();
    (0..n)
        .map(|i| {
            let data = random_bytes(1 + (seed as usize * 7919 + i * 104_729) % max, seed * 100 + i as u64);
            let name = format!("x{i:02}.bin");
            std::fs::write(dir.join(&name), &data).unwrap();
            (name, data)
        })
        .collect()
}

fn check_variant(name: &str, extra: &[&str]) {
    if !have(&["mkfs.xfs", "xfs_db", "xfs_repair"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let files = files_in(&src, 5, 20, 3_000_000);
    let img = dir.path().join("xfs.img");
    let size = 320 * MIB;
    build_xfs(&img, size, &src, &files, extra);
    let u = usage_of(&img);
    assert_eq!(u.partitions[0].filesystem, FsKind::Xfs);
    let free = dropped(&u, 0);
    let stored: u64 = files.iter().map(|f| f.1.len() as u64).sum();
    let log = xfs_field(&img, "logblocks") * xfs_field(&img, "blocksize");
    eprintln!(
        "{name}: free {} MiB of {} MiB (files {} MiB, log {} MiB)",
        free / MIB,
        size / MIB,
        stored / MIB,
        log / MIB
    );
    assert!(free >= (size - stored - log) * 9 / 10, "{name}: free {free}");
    let copy = dir.path().join("zeroed.img");
    zeroed_copy(&img, &u, &copy);
    let (code, text) = run_status("xfs_repair", &["-n", "-f", copy.to_str().unwrap()]);
    assert_eq!(code, 0, "xfs_repair -n:\n{text}");
    xfs_files_match(&copy, &files);
}

#[test]
fn xfs_v5_default() {
    check_variant("xfs v5", &[]);
}

#[test]
fn xfs_v5_rmapbt_small_blocks() {
    check_variant("xfs v5 rmapbt 1k", &["-b", "size=1024", "-m", "rmapbt=1"]);
}

#[test]
fn xfs_v4() {
    check_variant("xfs v4", &["-m", "crc=0", "-n", "ftype=0"]);
}

#[test]
fn xfs_inprogress_or_bad_log_keeps_whole() {
    if !have(&["mkfs.xfs", "xfs_db"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let files = files_in(&src, 2, 3, 100_000);
    let img = dir.path().join("xfs.img");
    build_xfs(&img, 320 * MIB, &src, &files, &[]);
    let clean = std::fs::read(&img).unwrap();
    // sb_inprogress set (the CRC no longer matches either).
    let mut bytes = clean.clone();
    bytes[126] = 1;
    let u = vhdcore::fs::usage(&bytes).unwrap();
    assert!(matches!(u.partitions[0].decision, Decision::KeepWhole { .. }));
    assert!(u.free.is_empty());
    // A log whose head block is overwritten with a newer cycle: not provably clean.
    let logstart = xfs_field(&img, "logstart");
    let agblklog = xfs_field(&img, "agblklog");
    let agblocks = xfs_field(&img, "agblocks");
    let bs = xfs_field(&img, "blocksize");
    let log_at = (((logstart >> agblklog) * agblocks + (logstart & ((1 << agblklog) - 1))) * bs) as usize;
    let mut bytes = clean.clone();
    for i in 0..64 {
        let at = log_at + 512 * (8 + i);
        bytes[at..at + 4].copy_from_slice(&1u32.to_be_bytes());
    }
    let u = vhdcore::fs::usage(&bytes).unwrap();
    match &u.partitions[0].decision {
        Decision::KeepWhole { reason } => eprintln!("dirty log: {reason}"),
        d => panic!("a log with blocks past its unmount record must keep the filesystem whole: {d:?}"),
    }
}
