//! Malformed input: seeded random corruption of superblocks, group descriptors, bitmaps, journals, AG headers and
//! B+trees, MFT records and GPT headers. `fs::usage` must never panic or hang, and where the format checksums
//! what was corrupted (ext4 metadata_csum, XFS v5, GPT), it must never call free a byte the intact disk uses.

mod fs_support;

use fs_support::*;
use vhdcore::fs::{usage, Decision, DiskUsage};

/// Corrupts 1..=8 bytes inside `zones` (byte ranges) in place, runs `usage`, restores the bytes. With `strict`,
/// every free range must be free in `baseline` too.
fn fuzz(
    name: &str,
    bytes: &mut [u8],
    zones: &[(usize, usize)],
    baseline: &DiskUsage,
    seed: u64,
    rounds: usize,
    strict: bool,
) {
    let mut rng = SplitMix(seed);
    let mut kept_whole = 0;
    for round in 0..rounds {
        let flips = 1 + rng.below(8) as usize;
        let mut saved = Vec::new();
        for _ in 0..flips {
            let (s, l) = zones[rng.below(zones.len() as u64) as usize];
            let at = s + rng.below(l as u64) as usize;
            saved.push((at, bytes[at]));
            bytes[at] = match rng.below(4) {
                0 => 0,
                1 => 0xFF,
                2 => bytes[at] ^ (1 << rng.below(8)),
                _ => rng.next_u64() as u8,
            };
        }
        let view: &[u8] = bytes;
        let u = usage(&view).unwrap_or_else(|e| panic!("{name} round {round}: error {e}"));
        if u.partitions.iter().any(|p| matches!(p.decision, Decision::KeepWhole { .. })) {
            kept_whole += 1;
        }
        if strict {
            for &(s, l) in &u.free {
                assert!(baseline.is_free(s, l), "{name} round {round}: {s}+{l} reported free but used when intact");
            }
        }
        for (at, b) in saved.into_iter().rev() {
            bytes[at] = b;
        }
    }
    eprintln!("{name}: {rounds} rounds, {kept_whole} kept whole");
}

fn truncations(name: &str, bytes: &[u8], seed: u64) {
    let mut rng = SplitMix(seed);
    for _ in 0..20 {
        let len = rng.below(bytes.len() as u64) as usize;
        let u = usage(&bytes[..len].to_vec()).unwrap_or_else(|e| panic!("{name}: truncated to {len}: {e}"));
        let _ = u.free_blocks(2 << 20);
    }
}

fn bitmap_blocks(img: &std::path::Path) -> (usize, Vec<usize>) {
    let text = run("dumpe2fs", &[img.to_str().unwrap()]);
    let mut bs = 0;
    let mut blocks = Vec::new();
    for l in text.lines().map(str::trim) {
        if let Some(v) = l.strip_prefix("Block size:") {
            bs = v.trim().parse().unwrap();
        }
        if let Some(v) = l.strip_prefix("Block bitmap at ") {
            blocks.push(v.split_whitespace().next().unwrap().parse().unwrap());
        }
    }
    (bs, blocks)
}

#[test]
fn ext4_corruption() {
    if !have(&["mke2fs", "debugfs", "dumpe2fs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let files = make_tree(&src, 8, 20, 300_000);
    let img = dir.path().join("fs.img");
    build_ext(&img, 32 * MIB, &["-t", "ext4", "-b", "4096", "-O", "64bit,metadata_csum"], &src, files, |i| i % 2 == 0);
    let (bs, bitmaps) = bitmap_blocks(&img);
    let mut bytes = std::fs::read(&img).unwrap();
    let baseline = usage(&bytes).unwrap();
    assert!(baseline.free_bytes() > 0);
    // Superblock, descriptors, bitmaps: all under metadata_csum.
    let mut zones = vec![(1024, 1024), (bs, bs)];
    zones.extend(bitmaps.iter().map(|&b| (b * bs, bs)));
    fuzz("ext4 metadata", &mut bytes, &zones, &baseline, 1, 300, true);
    // Anything in the first 8 MiB (inode tables, the journal, directories): no panic.
    fuzz("ext4 anywhere", &mut bytes, &[(0, 8 * MIB as usize)], &baseline, 2, 200, false);
    truncations("ext4", &bytes, 3);
}

#[test]
fn ext4_journal_corruption() {
    if !have(&["mke2fs", "debugfs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let files = make_tree(&src, 9, 10, 200_000);
    let img = dir.path().join("fs.img");
    build_ext(&img, 32 * MIB, &["-t", "ext4", "-b", "1024"], &src, files, |i| i % 2 == 0);
    // A few committed transactions (copies of the first bitmap and descriptor block), one uncommitted.
    let (bs, bitmaps) = bitmap_blocks(&img);
    let blk = dir.path().join("blocks.bin");
    let disk = std::fs::read(&img).unwrap();
    let mut data = disk[bitmaps[0] * bs..(bitmaps[0] + 1) * bs].to_vec();
    data.extend_from_slice(&disk[2 * bs..3 * bs]);
    std::fs::write(&blk, data).unwrap();
    let cmds = dir.path().join("j.cmds");
    let list = format!("{},2", bitmaps[0]);
    std::fs::write(
        &cmds,
        format!("jo\njw -b {list} {b}\njw -b {list} {b}\njw -b {list} -c {b}\njc\n", b = blk.display()),
    )
    .unwrap();
    run("debugfs", &["-w", "-f", cmds.to_str().unwrap(), img.to_str().unwrap()]);
    let journal = run("debugfs", &["-R", "stat <8>", img.to_str().unwrap()]);
    let first: usize = journal
        .split("EXTENTS:")
        .nth(1)
        .unwrap()
        .split(':')
        .nth(1)
        .unwrap()
        .split('-')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut bytes = std::fs::read(&img).unwrap();
    let baseline = usage(&bytes).unwrap();
    dropped(&baseline, 0);
    fuzz("ext4 journal", &mut bytes, &[(first * bs, 64 * bs), (1024, 1024)], &baseline, 4, 300, false);
}

#[test]
fn xfs_corruption() {
    if !have(&["mkfs.xfs", "xfs_db"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("xfs.img");
    random_file(&img, 320 * MIB, 12);
    run("mkfs.xfs", &["-q", "-f", img.to_str().unwrap()]);
    let mut bytes = std::fs::read(&img).unwrap();
    let baseline = usage(&bytes).unwrap();
    dropped(&baseline, 0);
    let field = |f: &str| -> usize {
        let out = run("xfs_db", &["-r", "-c", "sb 0", "-c", &format!("p {f}"), img.to_str().unwrap()]);
        out.split('=').nth(1).unwrap().trim().parse().unwrap()
    };
    let (agcount, agblocks, bs) = (field("agcount"), field("agblocks"), field("blocksize"));
    // Superblock, AGF, AGFL and the first B+tree blocks of every AG (all CRC-protected in v5).
    let zones: Vec<(usize, usize)> = (0..agcount).map(|a| (a * agblocks * bs, 4 * bs)).collect();
    fuzz("xfs v5", &mut bytes, &zones, &baseline, 5, 300, true);
    truncations("xfs", &bytes, 6);
}

#[test]
fn ntfs_corruption() {
    if !have(&["mkntfs"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ntfs.img");
    random_file(&img, 32 * MIB, 13);
    run("mkntfs", &["-F", "-Q", "-q", img.to_str().unwrap()]);
    let mut bytes = std::fs::read(&img).unwrap();
    let baseline = usage(&bytes).unwrap();
    dropped(&baseline, 0);
    let cluster = 512 * bytes[13] as usize;
    let mft = u64::from_le_bytes(bytes[0x30..0x38].try_into().unwrap()) as usize * cluster;
    fuzz("ntfs", &mut bytes, &[(0, 512), (mft, 16 * 1024)], &baseline, 7, 300, false);
    truncations("ntfs", &bytes, 8);
}

#[test]
fn gpt_corruption() {
    if !have(&["sgdisk", "mkswap"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    random_file(&disk, 16 * MIB, 14);
    run("sgdisk", &["-n", "1:2048:+4M", "-t", "1:8200", "-n", "2:0:+4M", "-n", "3:0:0", disk.to_str().unwrap()]);
    let mut bytes = std::fs::read(&disk).unwrap();
    let swap = dir.path().join("swap.img");
    std::fs::write(&swap, vec![0u8; 4 * MIB as usize]).unwrap();
    run("mkswap", &[swap.to_str().unwrap()]);
    let s = std::fs::read(&swap).unwrap();
    bytes[MIB as usize..5 * MIB as usize].copy_from_slice(&s);
    let baseline = usage(&bytes).unwrap();
    dropped(&baseline, 0);
    let end = bytes.len();
    let zones = [(0, 34 * 512), (end - 33 * 512, 33 * 512)];
    fuzz("gpt", &mut bytes, &zones, &baseline, 9, 400, true);
    truncations("gpt", &bytes, 10);
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = SplitMix(15);
    for round in 0..200 {
        let len = rng.below(3 * MIB) as usize;
        let mut bytes = vec![0u8; len];
        rng.fill(&mut bytes);
        // Plant a magic now and then so the parsers get past their first check.
        let plant: &[(usize, &[u8])] = &[
            (0x438, &[0x53, 0xEF]),
            (0, b"XFSB"),
            (3, b"NTFS    "),
            (512, b"EFI PART"),
            (510, &[0x55, 0xAA]),
            (4086, b"SWAPSPACE2"),
        ];
        let (at, magic) = plant[round % plant.len()];
        if at + magic.len() <= len {
            bytes[at..at + magic.len()].copy_from_slice(magic);
        }
        let _ = usage(&bytes).unwrap();
    }
}
