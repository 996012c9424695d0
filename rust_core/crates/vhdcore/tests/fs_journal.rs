//! Crash consistency: ext4 fixtures whose last transactions are committed only in the jbd2 journal, the way a
//! snapshot of a mounted filesystem finds them. Each seed builds a filesystem, applies a few operations with
//! debugfs (new files, deletes, rewrites, across groups), records the bitmap, descriptor and superblock blocks after
//! each, writes every changed set of blocks as a committed journal transaction, and puts the on-disk copies back to
//! an earlier state (as if only part was checkpointed). Half of the seeds rotate the log so that it wraps around
//! the journal's end. The ranges `fs::usage` calls free are zeroed in a copy; after the journal is replayed
//! (`e2fsck -E journal_only`), `e2fsck -fn` must pass and every file must read back identical: 0 lost bytes.

mod fs_support;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use fs_support::*;

/// Block size and the blocks that hold the superblock, descriptors and bitmaps, from dumpe2fs.
fn meta_blocks(img: &Path) -> (u64, Vec<u64>) {
    let text = run("dumpe2fs", &[img.to_str().unwrap()]);
    let mut bs = 0;
    let mut blocks = Vec::new();
    let num = |s: &str| s.trim().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse::<u64>().unwrap();
    for line in text.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Block size:") {
            bs = num(v);
        }
        if let Some(rest) = l.strip_prefix("Primary superblock at ") {
            blocks.push(num(rest));
            if let Some(gd) = rest.split("Group descriptors at ").nth(1) {
                let mut it = gd.split('-');
                let a = num(it.next().unwrap());
                let b = it.next().map(num).unwrap_or(a);
                blocks.extend(a..=b);
            }
        }
        for key in ["Block bitmap at ", "Inode bitmap at "] {
            if let Some(rest) = l.strip_prefix(key) {
                blocks.push(num(rest));
            }
        }
    }
    blocks.sort_unstable();
    blocks.dedup();
    (bs, blocks)
}

fn snapshot(img: &Path, bs: u64, blocks: &[u64]) -> Vec<Vec<u8>> {
    let f = std::fs::File::open(img).unwrap();
    blocks
        .iter()
        .map(|&b| {
            let mut buf = vec![0u8; bs as usize];
            f.read_exact_at(&mut buf, b * bs).unwrap();
            buf
        })
        .collect()
}

fn restore(img: &Path, bs: u64, blocks: &[u64], state: &[Vec<u8>]) {
    let f = OpenOptions::new().write(true).open(img).unwrap();
    for (b, data) in blocks.iter().zip(state) {
        f.write_all_at(data, b * bs).unwrap();
    }
}

/// Logical -> physical blocks of the journal inode, from `debugfs stat <8>`.
fn journal_map(img: &Path) -> Vec<(u64, u64, u64)> {
    let text = run("debugfs", &["-R", "stat <8>", img.to_str().unwrap()]);
    let mut runs = Vec::new();
    let after = text.split("EXTENTS:").nth(1).or_else(|| text.split("BLOCKS:").nth(1)).unwrap();
    for item in after.split(',') {
        let item = item.trim();
        let Some((l, p)) = item.strip_prefix('(').and_then(|s| s.split_once("):")) else { continue };
        if l.starts_with("IND") || l.starts_with("DIND") || l.starts_with("TIND") || l.starts_with("ETB") {
            continue;
        }
        let range = |s: &str| {
            let mut it = s.trim().split('-');
            let a: u64 = it.next().unwrap().trim().parse().unwrap();
            let b: u64 = it.next().map(|x| x.trim().parse().unwrap()).unwrap_or(a);
            (a, b)
        };
        let (la, lb) = range(l);
        let (pa, _) = range(p.split_whitespace().next().unwrap());
        runs.push((la, pa, lb - la + 1));
    }
    runs
}

/// Rotates the journal's log ring so that its transactions wrap around the end; fixes the superblock checksum.
fn rotate_journal(img: &Path, bs: u64) -> bool {
    let map = journal_map(img);
    let phys = |l: u64| {
        let r = map.iter().find(|r| r.0 <= l && l < r.0 + r.2).unwrap();
        r.1 + (l - r.0)
    };
    let f = OpenOptions::new().read(true).write(true).open(img).unwrap();
    let read = |l: u64| {
        let mut b = vec![0u8; bs as usize];
        f.read_exact_at(&mut b, phys(l) * bs).unwrap();
        b
    };
    let mut jsb = read(0);
    let be = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap()) as u64;
    let (maxlen, first, start) = (be(&jsb, 0x10), be(&jsb, 0x14), be(&jsb, 0x1C));
    if start == 0 {
        return false;
    }
    let ring: Vec<Vec<u8>> = (first..maxlen).map(read).collect();
    let len = maxlen - first;
    let mut last_commit = None;
    for (i, b) in ring.iter().enumerate() {
        if be(b, 0) == 0xC03B_3998 && be(b, 4) == 2 {
            last_commit = Some(i as u64);
        }
    }
    let used = last_commit.unwrap() + 1 - (start - first);
    let shift = len - (start - first) - (used / 2).max(1);
    for (i, b) in ring.iter().enumerate() {
        let to = first + (i as u64 + shift) % len;
        f.write_all_at(b, phys(to) * bs).unwrap();
    }
    let new_start = first + (start - first + shift) % len;
    jsb[0x1C..0x20].copy_from_slice(&(new_start as u32).to_be_bytes());
    let incompat = be(&jsb, 0x28);
    if incompat & 0x18 != 0 {
        jsb[0xFC..0x100].fill(0);
        let c = !crc32c::crc32c(&jsb[..1024]);
        jsb[0xFC..0x100].copy_from_slice(&c.to_be_bytes());
    }
    f.write_all_at(&jsb, phys(0) * bs).unwrap();
    assert!(new_start + used > maxlen, "the log wraps");
    true
}

/// Blocks of the filesystem that the on-disk bitmaps call free (dumpe2fs "Free blocks:").
fn on_disk_free(img: &Path) -> Vec<(u64, u64)> {
    let text = run("dumpe2fs", &[img.to_str().unwrap()]);
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(list) = line.trim().strip_prefix("Free blocks:") else { continue };
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let mut it = item.split('-');
            let a: u64 = it.next().unwrap().parse().unwrap();
            let b: u64 = it.next().map(|x| x.parse().unwrap()).unwrap_or(a);
            out.push((a, b));
        }
    }
    out
}

fn file_blocks(img: &Path, name: &str) -> Vec<u64> {
    let text = run("debugfs", &["-R", &format!("blocks /{name}"), img.to_str().unwrap()]);
    text.split_whitespace().filter_map(|w| w.parse().ok()).collect()
}

/// Builds and checks the fixture of `seed`; returns the bytes a bitmap-only reader would have lost.
fn crash_seed(seed: u64) -> u64 {
    let mut rng = SplitMix(seed);
    let dir = tempfile::tempdir().unwrap();
    let bs = if rng.below(2) == 0 { 1024 } else { 4096 };
    let csum = rng.below(2) == 0;
    let wide = rng.below(2) == 0;
    let features =
        format!("{},{}", if csum { "metadata_csum" } else { "^metadata_csum" }, if wide { "64bit" } else { "^64bit" });
    let bs_arg = bs.to_string();
    let src = dir.path().join("src");
    let files = make_tree(&src, seed, 12, 400_000);
    let img = dir.path().join("fs.img");
    let (live, _) =
        build_ext(&img, 48 * MIB, &["-t", "ext4", "-b", &bs_arg, "-O", &features], &src, files, |i| i % 3 == 0);
    let mut live: BTreeMap<String, Vec<u8>> = live.into_iter().collect();
    let (bs_read, meta) = meta_blocks(&img);
    assert_eq!(bs_read, bs);
    let mut states = vec![snapshot(&img, bs, &meta)];
    let ops = 3 + rng.below(5) as usize;
    let mut written_at: BTreeMap<String, usize> = BTreeMap::new();
    for op in 1..=ops {
        let mut script = String::new();
        let names: Vec<String> = live.keys().cloned().collect();
        let pick = rng.below(100);
        if pick < 25 && !names.is_empty() {
            let name = names[rng.below(names.len() as u64) as usize].clone();
            script.push_str(&format!("rm /{name}\n"));
            live.remove(&name);
        } else {
            let rewrite = pick < 40 && !names.is_empty();
            let name = if rewrite {
                names[rng.below(names.len() as u64) as usize].clone()
            } else {
                format!("{}n{seed}_{op}.bin", if rng.below(2) == 0 { "sub/" } else { "" })
            };
            let max = if rng.below(4) == 0 { 9 * MIB } else { 1500 * 1024 };
            let len = 1 + rng.below(max) as usize;
            let data = random_bytes(len, seed * 7919 + op as u64);
            let host = dir.path().join(format!("op{op}.bin"));
            std::fs::write(&host, &data).unwrap();
            if rewrite {
                script.push_str(&format!("rm /{name}\n"));
            }
            let (parent, leaf) =
                name.rsplit_once('/').map_or(("/".to_string(), name.as_str()), |(p, l)| (format!("/{p}"), l));
            script.push_str(&format!("cd {parent}\nwrite {} {leaf}\n", host.display()));
            live.insert(name.clone(), data);
            written_at.insert(name, op);
        }
        let cmds = dir.path().join("op.cmds");
        std::fs::write(&cmds, script).unwrap();
        run("debugfs", &["-w", "-f", cmds.to_str().unwrap(), img.to_str().unwrap()]);
        states.push(snapshot(&img, bs, &meta));
    }
    // The on-disk metadata goes back to state k; transactions k+1.. (and earlier ones) live in the journal.
    let k = rng.below(ops as u64) as usize;
    // Journal checksums (v2 or v3 tags) on half of the metadata_csum seeds.
    let mut script = match (csum, rng.below(3)) {
        (true, 0) => String::from("jo -c -v 2\n"),
        (true, 1) => String::from("jo -c -v 3\n"),
        _ => String::from("jo\n"),
    };
    let mut txns = 0;
    for i in 1..=ops {
        let changed: Vec<usize> = (0..meta.len()).filter(|&m| states[i][m] != states[i - 1][m]).collect();
        if changed.is_empty() {
            continue;
        }
        let data: Vec<u8> = changed.iter().flat_map(|&m| states[i][m].clone()).collect();
        let host = dir.path().join(format!("txn{i}.bin"));
        std::fs::write(&host, data).unwrap();
        let list: Vec<String> = changed.iter().map(|&m| meta[m].to_string()).collect();
        script.push_str(&format!("jw -b {} {}\n", list.join(","), host.display()));
        txns += 1;
    }
    script.push_str("jc\n");
    restore(&img, bs, &meta, &states[k]);
    let cmds = dir.path().join("journal.cmds");
    std::fs::write(&cmds, script).unwrap();
    run("debugfs", &["-w", "-f", cmds.to_str().unwrap(), img.to_str().unwrap()]);
    let header = run("dumpe2fs", &["-h", img.to_str().unwrap()]);
    assert!(header.contains("needs_recovery"), "seed {seed}: the fixture needs recovery");
    let wrapped = rng.below(2) == 0 && rotate_journal(&img, bs);

    // What a reader of the on-disk bitmaps alone would drop of the files written after state k.
    let naive_free = on_disk_free(&img);
    let mut naive_lost = 0u64;
    for (name, &op) in &written_at {
        if op > k && live.contains_key(name) {
            for b in file_blocks(&img, name) {
                if naive_free.iter().any(|&(a, z)| a <= b && b <= z) {
                    naive_lost += bs;
                }
            }
        }
    }

    let u = usage_of(&img);
    let free = dropped(&u, 0);
    eprintln!(
        "seed {seed}: bs {bs} {features} ops {ops} k {k} txns {txns} wrapped {wrapped}: free {} KiB, bitmap-only would lose {} KiB",
        free / 1024,
        naive_lost / 1024
    );
    let copy = dir.path().join("zeroed.img");
    zeroed_copy(&img, &u, &copy);
    ext4_check(&copy);
    let files: Vec<(String, Vec<u8>)> = live.into_iter().collect();
    ext4_files_match(&copy, &files, dir.path());
    naive_lost
}

#[test]
fn crash_consistent_journal_20_seeds() {
    if !have(&["mke2fs", "debugfs", "e2fsck", "dumpe2fs"]) {
        return;
    }
    let lost: u64 = (1..=20).map(crash_seed).sum();
    assert!(lost > 0, "the fixtures must hold blocks that only the journal marks used");
}

#[test]
#[ignore = "long: 50 seeds (cargo test --test fs_journal -- --ignored)"]
fn crash_consistent_journal_50_seeds() {
    if !have(&["mke2fs", "debugfs", "e2fsck", "dumpe2fs"]) {
        return;
    }
    let lost: u64 = (1000..1050).map(crash_seed).sum();
    assert!(lost > 0);
}

/// A journaled block that starts with the jbd2 magic is escaped in the log (its first word zeroed,
/// JBD2_FLAG_ESCAPE in its tag): the walker must restore the magic, whose bits mark blocks used.
#[test]
fn escaped_bitmap_copy_restores_the_magic() {
    if !have(&["mke2fs", "debugfs", "dumpe2fs"]) {
        return;
    }
    for (features, jo) in [("metadata_csum,64bit", "jo -c -v 3"), ("^metadata_csum,^64bit", "jo")] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        random_file(&img, 48 * MIB, 90);
        run(
            "mke2fs",
            &["-q", "-F", "-E", "nodiscard", "-t", "ext4", "-b", "1024", "-O", features, img.to_str().unwrap()],
        );
        let text = run("dumpe2fs", &[img.to_str().unwrap()]);
        // Group 4 is BLOCK_UNINIT and wholly free (group 2 holds the journal).
        let group4 = text.split("Group 4:").nth(1).unwrap();
        let bitmap: u64 =
            group4.split("Block bitmap at ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
        let first: u64 = group4.split("(Blocks ").nth(1).unwrap().split('-').next().unwrap().parse().unwrap();
        let mut copy = vec![0u8; 1024];
        copy[..4].copy_from_slice(&0xC03B_3998u32.to_be_bytes());
        let host = dir.path().join("copy.bin");
        std::fs::write(&host, &copy).unwrap();
        let cmds = dir.path().join("j.cmds");
        std::fs::write(&cmds, format!("{jo}\njw -b {bitmap} {}\njc\n", host.display())).unwrap();
        run("debugfs", &["-w", "-f", cmds.to_str().unwrap(), img.to_str().unwrap()]);
        let u = usage_of(&img);
        dropped(&u, 0);
        for bit in 0..32u64 {
            let used = copy[(bit / 8) as usize] & (1 << (bit % 8)) != 0;
            let free = u.is_free((first + bit) * 1024, 1024);
            assert_eq!(free, !used, "{features}: block {} (bit {bit} of the escaped word)", first + bit);
        }
    }
}
