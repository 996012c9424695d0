//! Partitioned disks: MBR with an extended partition and logical partitions (sfdisk), GPT (sgdisk), each holding
//! real filesystems. Only ranges inside partitions that proved them free are dropped; the boot-loader gap, EBRs,
//! unknown partitions and the backup GPT are kept; the zeroed copy's filesystems check and read back.

mod fs_support;

use std::path::Path;

use fs_support::*;
use vhdcore::fs::{Decision, FsKind, TableKind};

/// An ext4 image of `size` bytes with files from `src`, half of them deleted: (live files, image path).
fn ext4_image(dir: &Path, name: &str, size: u64, seed: u64) -> (Vec<(String, Vec<u8>)>, std::path::PathBuf) {
    let src = dir.join(format!("{name}.src"));
    let files = make_tree(&src, seed, 16, 500_000);
    let img = dir.join(format!("{name}.img"));
    let (live, _) = build_ext(&img, size, &["-t", "ext4"], &src, files, |i| i % 2 == 1);
    (live, img)
}

fn swap_image(dir: &Path, size: u64) -> std::path::PathBuf {
    let img = dir.join("swap.img");
    random_file(&img, size, 44);
    run("mkswap", &[img.to_str().unwrap()]);
    img
}

/// Partition (start, size) in bytes from `sfdisk -J`.
fn layout(disk: &Path) -> Vec<(u64, u64)> {
    let text = run("sfdisk", &["-J", disk.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let sector = v["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
    v["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["start"].as_u64().unwrap() * sector, p["size"].as_u64().unwrap() * sector))
        .collect()
}

fn no_free_in(u: &vhdcore::fs::DiskUsage, start: u64, len: u64) {
    assert_eq!(u.free_within(start, len), 0, "bytes {start}+{len} must be kept");
}

#[test]
fn mbr_with_logical_partitions() {
    if !have(&["sfdisk", "mke2fs", "debugfs", "e2fsck", "mkswap"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    random_file(&disk, 160 * MIB, 55);
    let d = disk.display();
    let script = format!(
        "label: dos\n{d}1 : start=2048, size=40MiB, type=83\n{d}2 : size=100MiB, type=5\n\
         {d}5 : size=40MiB, type=83\n{d}6 : size=16MiB, type=82\n"
    );
    let (code, text) = {
        let mut child = std::process::Command::new("sfdisk")
            .args(["-q", disk.to_str().unwrap()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    assert_eq!(code, Some(0), "sfdisk: {text}");
    let parts = layout(&disk);
    assert_eq!(parts.len(), 4, "{parts:?}");
    let (p1, p5, p6) = (parts[0], parts[2], parts[3]);
    let (live1, img1) = ext4_image(dir.path(), "p1", p1.1, 1);
    let (live5, img5) = ext4_image(dir.path(), "p5", p5.1, 5);
    let swap = swap_image(dir.path(), p6.1);
    place(&img1, &disk, p1.0);
    place(&img5, &disk, p5.0);
    place(&swap, &disk, p6.0);

    let u = usage_of(&disk);
    assert_eq!(u.table, TableKind::Mbr);
    let idx: Vec<u32> = u.partitions.iter().map(|p| p.index).collect();
    assert_eq!(idx, vec![1, 2, 5, 6]);
    assert_eq!(u.partitions[1].filesystem, FsKind::Extended);
    assert!(matches!(u.partitions[1].decision, Decision::KeepWhole { .. }));
    assert_eq!(u.partitions[1].used_bytes, parts[1].1 - p5.1 - p6.1, "the container counts its EBRs and gaps only");
    assert_eq!((u.partitions[2].start, u.partitions[2].length), p5);
    assert_eq!(u.partitions[3].filesystem, FsKind::Swap);
    let swap_free = dropped(&u, 3);
    assert!(swap_free >= p6.1 - 8192, "swap: {swap_free}");
    dropped(&u, 0);
    dropped(&u, 2);
    // The boot-loader gap, the EBRs (between the extended start and each logical partition) are kept.
    no_free_in(&u, 0, p1.0);
    no_free_in(&u, parts[1].0, p5.0 - parts[1].0);
    no_free_in(&u, p5.0 + p5.1, p6.0 - (p5.0 + p5.1));
    no_free_in(&u, p6.0, 4096);

    let copy = dir.path().join("zeroed.img");
    zeroed_copy(&disk, &u, &copy);
    assert_eq!(layout(&copy), parts, "the partition table is unchanged");
    for (p, live, name) in [(p1, &live1, "p1"), (p5, &live5, "p5")] {
        let part = dir.path().join(format!("{name}.check"));
        extract(&copy, p.0, p.1, &part);
        ext4_check(&part);
        ext4_files_match(&part, live, dir.path());
    }
    let part = dir.path().join("swap.check");
    extract(&copy, p6.0, p6.1, &part);
    let (code, text) = run_status("swaplabel", &[part.to_str().unwrap()]);
    assert!(code == 0 || !have(&["swaplabel"]), "swap signature: {text}");
}

#[test]
fn gpt_with_unknown_partition_and_backup() {
    if !have(&["sgdisk", "sfdisk", "mke2fs", "debugfs", "e2fsck", "mkswap", "mkntfs", "ntfsfix"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let size = 160 * MIB;
    random_file(&disk, size, 66);
    run(
        "sgdisk",
        &[
            "-n",
            "1:2048:+40M",
            "-t",
            "1:8300",
            "-n",
            "2:0:+16M",
            "-t",
            "2:8200",
            "-n",
            "3:0:+24M",
            "-t",
            "3:8300",
            "-n",
            "4:0:+40M",
            "-t",
            "4:0700",
            disk.to_str().unwrap(),
        ],
    );
    let parts = layout(&disk);
    assert_eq!(parts.len(), 4);
    let (live1, img1) = ext4_image(dir.path(), "g1", parts[0].1, 11);
    place(&img1, &disk, parts[0].0);
    place(&swap_image(dir.path(), parts[1].1), &disk, parts[1].0);
    // Partition 3 keeps its random bytes: unknown content.
    let ntfs = dir.path().join("ntfs.img");
    random_file(&ntfs, parts[3].1, 77);
    run("mkntfs", &["-F", "-Q", "-q", ntfs.to_str().unwrap()]);
    place(&ntfs, &disk, parts[3].0);

    let u = usage_of(&disk);
    assert_eq!(u.table, TableKind::Gpt);
    assert!(u.warnings.is_empty(), "{:?}", u.warnings);
    assert_eq!(u.partitions.len(), 4);
    assert_eq!(u.partitions[0].type_id, "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
    assert_eq!(u.partitions[2].filesystem, FsKind::Unknown);
    assert!(matches!(u.partitions[2].decision, Decision::KeepWhole { .. }));
    assert_eq!(u.partitions[3].filesystem, FsKind::Ntfs);
    dropped(&u, 0);
    dropped(&u, 1);
    dropped(&u, 3);
    no_free_in(&u, 0, parts[0].0);
    no_free_in(&u, parts[2].0, parts[2].1);
    no_free_in(&u, size - 33 * 512, 33 * 512);
    let last_end = parts[3].0 + parts[3].1;
    no_free_in(&u, last_end, size - last_end);

    let copy = dir.path().join("zeroed.img");
    zeroed_copy(&disk, &u, &copy);
    let (code, text) = run_status("sgdisk", &["-v", copy.to_str().unwrap()]);
    assert!(code == 0 && text.contains("No problems found"), "sgdisk -v: {text}");
    let part = dir.path().join("g1.check");
    extract(&copy, parts[0].0, parts[0].1, &part);
    ext4_check(&part);
    ext4_files_match(&part, &live1, dir.path());
    let part = dir.path().join("ntfs.check");
    extract(&copy, parts[3].0, parts[3].1, &part);
    let (code, text) = run_status("ntfsfix", &["-n", part.to_str().unwrap()]);
    assert_eq!(code, 0, "ntfsfix -n: {text}");

    // A damaged primary header: the backup is used, with a warning.
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[512 + 40] ^= 0xFF;
    let u2 = vhdcore::fs::usage(&bytes).unwrap();
    assert_eq!(u2.partitions.len(), 4);
    assert!(u2.warnings.iter().any(|w| w.contains("backup")), "{:?}", u2.warnings);
    // Both damaged: nothing is dropped.
    let at = bytes.len() - 512 + 40;
    bytes[at] ^= 0xFF;
    let u3 = vhdcore::fs::usage(&bytes).unwrap();
    assert!(u3.free.is_empty() && u3.partitions.is_empty(), "{:?}", u3.warnings);
}
