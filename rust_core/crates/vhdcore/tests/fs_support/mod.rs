//! Fixtures for the filesystem tests: real tools (e2fsprogs, fdisk, gdisk, xfsprogs, ntfs-3g) over files
//! pre-filled with random bytes, so free space holds "deleted" data. A missing tool skips a test with a reason.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vhdcore::fs::{Decision, DiskUsage};

/// SplitMix64, so fixtures replay exactly from a seed (the tests' own copy: no test hooks of the crate needed).
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

pub const MIB: u64 = 1024 * 1024;

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

/// Whether every tool is installed; prints why the test is skipped when one is not.
pub fn have(tools: &[&str]) -> bool {
    for t in tools {
        if find_tool(t).is_none() {
            eprintln!("skipped: {t} is not installed (apt-get install e2fsprogs fdisk gdisk xfsprogs ntfs-3g)");
            return false;
        }
    }
    true
}

/// Runs a tool; its exit status and combined output.
pub fn run_status(cmd: &str, args: &[&str]) -> (i32, String) {
    let tool = find_tool(cmd).unwrap_or_else(|| PathBuf::from(cmd));
    let out = Command::new(tool).args(args).env("LC_ALL", "C").output().expect("spawn");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Runs a tool that must succeed; its output.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let (code, text) = run_status(cmd, args);
    assert_eq!(code, 0, "{cmd} {args:?} failed:\n{text}");
    text
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    SplitMix(seed).fill(&mut v);
    v
}

/// A file of `size` random bytes.
pub fn random_file(path: &Path, size: u64, seed: u64) {
    let mut f = File::create(path).unwrap();
    let mut rng = SplitMix(seed);
    let mut buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
}

/// `count` files of random sizes up to `max` bytes in `dir` (named f000.bin...), some in a subfolder.
pub fn make_tree(dir: &Path, seed: u64, count: usize, max: usize) -> Vec<(String, Vec<u8>)> {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let mut rng = SplitMix(seed);
    let mut files = Vec::new();
    for i in 0..count {
        let len = 1 + rng.below(max as u64) as usize;
        let name = if i % 3 == 2 { format!("sub/f{i:03}.bin") } else { format!("f{i:03}.bin") };
        let data = random_bytes(len, seed.wrapping_mul(1000).wrapping_add(i as u64));
        std::fs::write(dir.join(&name), &data).unwrap();
        files.push((name, data));
    }
    files
}

/// Copies `bytes` of `src` at `offset` into `dst` at `at` (dd conv=notrunc).
pub fn place(src: &Path, dst: &Path, at: u64) {
    let data = std::fs::read(src).unwrap();
    let f = OpenOptions::new().write(true).open(dst).unwrap();
    f.write_all_at(&data, at).unwrap();
}

/// A file holding `len` bytes of `disk` at `start`.
pub fn extract(disk: &Path, start: u64, len: u64, out: &Path) {
    let f = File::open(disk).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, start).unwrap();
    std::fs::write(out, buf).unwrap();
}

/// A copy of `disk` whose free ranges are zeroed (as a restored image reads).
pub fn zeroed_copy(disk: &Path, u: &DiskUsage, out: &Path) {
    std::fs::copy(disk, out).unwrap();
    let f = OpenOptions::new().write(true).open(out).unwrap();
    let zeros = vec![0u8; 4 * MIB as usize];
    for &(s, l) in &u.free {
        let mut off = 0;
        while off < l {
            let n = (l - off).min(zeros.len() as u64);
            f.write_all_at(&zeros[..n as usize], s + off).unwrap();
            off += n;
        }
    }
}

pub fn usage_of(disk: &Path) -> DiskUsage {
    let f = File::open(disk).unwrap();
    vhdcore::fs::usage(&f).unwrap()
}

pub fn dropped(u: &DiskUsage, i: usize) -> u64 {
    match &u.partitions[i].decision {
        Decision::Dropped { free_bytes } => *free_bytes,
        Decision::KeepWhole { reason } => panic!("partition {i} kept whole: {reason}"),
    }
}

/// Replays the journal of an ext2/3/4 image (as the restored server's kernel would), then `e2fsck -fn` must pass.
pub fn ext4_check(img: &Path) {
    let (code, text) = run_status("e2fsck", &["-fy", "-E", "journal_only", img.to_str().unwrap()]);
    assert!(code <= 1, "e2fsck -E journal_only: {code}\n{text}");
    let (code, text) = run_status("e2fsck", &["-fn", img.to_str().unwrap()]);
    assert_eq!(code, 0, "e2fsck -fn after zeroing the free ranges:\n{text}");
}

/// Every file reads back byte-identical through debugfs.
pub fn ext4_files_match(img: &Path, files: &[(String, Vec<u8>)], scratch: &Path) {
    let cmds = scratch.join("dump.cmds");
    let mut script = String::new();
    for (i, (name, _)) in files.iter().enumerate() {
        script.push_str(&format!("dump /{name} {}\n", scratch.join(format!("out{i}")).display()));
    }
    std::fs::write(&cmds, script).unwrap();
    run("debugfs", &["-f", cmds.to_str().unwrap(), img.to_str().unwrap()]);
    for (i, (name, data)) in files.iter().enumerate() {
        let out = scratch.join(format!("out{i}"));
        let got = std::fs::read(&out).unwrap_or_else(|e| panic!("{name}: not dumped: {e}"));
        assert!(got == *data, "{name}: {} bytes read back differ from the {} written", got.len(), data.len());
        std::fs::remove_file(out).unwrap();
    }
}

/// Builds an ext2/3/4 image of `size` bytes over random bytes from `files`, then deletes every file with
/// `delete(i)`; returns (live files, deleted bytes).
pub fn build_ext(
    img: &Path,
    size: u64,
    mkfs_args: &[&str],
    src: &Path,
    files: Vec<(String, Vec<u8>)>,
    delete: impl Fn(usize) -> bool,
) -> (Vec<(String, Vec<u8>)>, u64) {
    random_file(img, size, 7);
    let mut args = vec!["-q", "-F", "-E", "nodiscard", "-d", src.to_str().unwrap()];
    args.extend_from_slice(mkfs_args);
    args.push(img.to_str().unwrap());
    run("mke2fs", &args);
    let mut live = Vec::new();
    let mut deleted = 0u64;
    let mut script = String::new();
    for (i, (name, data)) in files.into_iter().enumerate() {
        if delete(i) {
            script.push_str(&format!("rm /{name}\n"));
            deleted += data.len() as u64;
        } else {
            live.push((name, data));
        }
    }
    let cmds = img.with_extension("rm.cmds");
    std::fs::write(&cmds, script).unwrap();
    run("debugfs", &["-w", "-f", cmds.to_str().unwrap(), img.to_str().unwrap()]);
    (live, deleted)
}
