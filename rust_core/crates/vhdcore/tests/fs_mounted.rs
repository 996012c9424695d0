//! The kernel's own crash-consistent state: a loop-mounted filesystem is written (per-file fsync), then its image
//! is copied while still mounted, as a snapshot of a running server finds it. Needs root and loop devices;
//! skipped with the reason where mount is refused.

mod fs_support;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use fs_support::*;
use vhdcore::fs::Decision;

struct Mounted<'a>(&'a Path);

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let out = Command::new("umount").arg(self.0).output();
        if let Ok(o) = out {
            if !o.status.success() {
                eprintln!("umount {}: {}", self.0.display(), String::from_utf8_lossy(&o.stderr).trim());
            }
        }
    }
}

fn try_mount(img: &Path, at: &Path, fstype: &str) -> Option<Mounted<'static>> {
    std::fs::create_dir_all(at).unwrap();
    let out =
        Command::new("mount").args(["-t", fstype, "-o", "loop", img.to_str().unwrap(), at.to_str().unwrap()]).output();
    match out {
        Ok(o) if o.status.success() => Some(Mounted(Box::leak(at.to_path_buf().into_boxed_path()))),
        Ok(o) => {
            eprintln!("skipped: mount refused: {}", String::from_utf8_lossy(&o.stderr).trim());
            None
        }
        Err(e) => {
            eprintln!("skipped: mount: {e}");
            None
        }
    }
}

fn write_synced(dir: &Path, files: &[(String, Vec<u8>)]) {
    for (name, data) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }
}

#[test]
fn ext4_copied_while_mounted() {
    if !have(&["mke2fs", "debugfs", "e2fsck", "dumpe2fs", "mount"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    random_file(&img, 96 * MIB, 81);
    run(
        "mke2fs",
        &["-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", "-t", "ext4", img.to_str().unwrap()],
    );
    let mnt = dir.path().join("mnt");
    let Some(guard) = try_mount(&img, &mnt, "ext4") else { return };
    // Old data that is then deleted, and new files written after it, across several groups.
    let old: Vec<(String, Vec<u8>)> =
        (0..12).map(|i| (format!("old/o{i}.bin"), random_bytes(1_500_000 + i * 10_000, 500 + i as u64))).collect();
    write_synced(&mnt, &old);
    std::fs::remove_dir_all(mnt.join("old")).unwrap();
    let new: Vec<(String, Vec<u8>)> =
        (0..29).map(|i| (format!("d{}/n{i}.bin", i % 3), random_bytes(200_000 + i * 37_000, 700 + i as u64))).collect();
    // Per-file fsync commits each transaction to the journal; no syncfs (`sync -f` also writes the metadata home,
    // the checkpoint state this test must not reach).
    write_synced(&mnt, &new);
    let snap = dir.path().join("snap.img");
    std::fs::copy(&img, &snap).unwrap();
    drop(guard);

    let header = run("dumpe2fs", &["-h", snap.to_str().unwrap()]);
    eprintln!("copied while mounted: needs_recovery = {}", header.contains("needs_recovery"));
    let u = usage_of(&snap);
    let free = dropped(&u, 0);
    eprintln!("free {} MiB of 96 MiB", free / MIB);
    let copy = dir.path().join("zeroed.img");
    zeroed_copy(&snap, &u, &copy);
    ext4_check(&copy);
    ext4_files_match(&copy, &new, dir.path());
}

#[test]
fn xfs_copied_while_mounted_is_kept_whole() {
    if !have(&["mkfs.xfs", "mount"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("xfs.img");
    random_file(&img, 320 * MIB, 82);
    run("mkfs.xfs", &["-q", "-f", img.to_str().unwrap()]);
    let mnt = dir.path().join("mnt");
    let Some(guard) = try_mount(&img, &mnt, "xfs") else { return };
    let files: Vec<(String, Vec<u8>)> = (0..5).map(|i| (format!("x{i}.bin"), random_bytes(300_000, 900 + i))).collect();
    write_synced(&mnt, &files);
    run("sync", &["-f", mnt.join("x0.bin").to_str().unwrap()]);
    let snap = dir.path().join("snap.img");
    std::fs::copy(&img, &snap).unwrap();
    drop(guard);
    let u = usage_of(&snap);
    match &u.partitions[0].decision {
        Decision::KeepWhole { reason } => eprintln!("mounted XFS kept whole: {reason}"),
        d => panic!("an XFS copied while mounted has a dirty log: {d:?}"),
    }
    assert!(u.free.is_empty());
    // Unmounted cleanly: the log is clean again.
    let u = usage_of(&img);
    dropped(&u, 0);
}

/// Fragmented XFS free space (thousands of small files, every other one deleted) gives multi-level bnobts; the
/// zeroed copy must pass `xfs_repair -n` and, mounted again, read back every remaining file.
#[test]
fn xfs_fragmented_free_space() {
    if !have(&["mkfs.xfs", "xfs_repair", "xfs_db", "mount"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("xfs.img");
    random_file(&img, 320 * MIB, 83);
    run("mkfs.xfs", &["-q", "-f", "-d", "agcount=2", img.to_str().unwrap()]);
    let mnt = dir.path().join("mnt");
    let Some(guard) = try_mount(&img, &mnt, "xfs") else { return };
    let mut kept = Vec::new();
    for i in 0..6000u64 {
        let name = format!("d/f{i}.bin");
        let data = random_bytes(4096 + (i as usize % 3) * 4096, 5000 + i);
        std::fs::create_dir_all(mnt.join("d")).unwrap();
        std::fs::write(mnt.join(&name), &data).unwrap();
        kept.push((name, data));
    }
    run("sync", &[]);
    let mut live = Vec::new();
    for (i, f) in kept.into_iter().enumerate() {
        if i % 2 == 0 {
            std::fs::remove_file(mnt.join(&f.0)).unwrap();
        } else {
            live.push(f);
        }
    }
    drop(guard);
    let levels = run("xfs_db", &["-r", "-c", "agf 0", "-c", "p bnolevel", img.to_str().unwrap()]);
    eprintln!("AG 0 {}", levels.trim());
    assert!(!levels.contains("= 1"), "a multi-level bnobt: {levels}");
    let u = usage_of(&img);
    let free = dropped(&u, 0);
    eprintln!("fragmented XFS: {} MiB free in {} ranges", free / MIB, u.free.len());
    assert!(u.free.len() > 2000, "the free space is fragmented");
    let copy = dir.path().join("zeroed.img");
    zeroed_copy(&img, &u, &copy);
    let (code, text) = run_status("xfs_repair", &["-n", "-f", copy.to_str().unwrap()]);
    assert_eq!(code, 0, "xfs_repair -n:\n{text}");
    let mnt2 = dir.path().join("mnt2");
    let Some(_guard2) = try_mount(&copy, &mnt2, "xfs") else { return };
    for (name, data) in &live {
        assert!(std::fs::read(mnt2.join(name)).unwrap() == *data, "{name} differs");
    }
}
