//! The estimate against the size the image format (DESIGN §5) really compresses to, on generated disks of
//! realistic mixes: zeros, holes, text, ELF binaries, already-compressed files and random bytes.
//!
//! The truth is the size of the image the compressor then produces (`compress_image`, as `imaging vhd export
//! --format vhd.zst` makes it), as the acceptance criterion reads.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use vhdcore::rng::SplitMix;
use vhdcore::{estimate, Chain, DiskType, Estimate, EstimateOptions, DEFAULT_BLOCK_SIZE, MAX_CHAIN_DEPTH};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const BLOCK: u64 = DEFAULT_BLOCK_SIZE as u64;
const CHUNK: u64 = 64 * MIB;
const LEVEL: i32 = 3;

/// Lengths of written extents: log-uniform in `[lo, hi]`, rounded to sectors.
trait LogUniform {
    fn log_uniform(&mut self, lo: u64, hi: u64) -> u64;
}

impl LogUniform for SplitMix {
    fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let (l, h) = ((lo as f64).ln(), (hi as f64).ln());
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let v = (l + (h - l) * u).exp() as u64;
        (v / 512).max(1) * 512
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Content pools: real files of this machine when there are enough, synthetic stand-ins otherwise.

struct Pools {
    text: Vec<u8>,
    elf: Vec<u8>,
    gz: Vec<u8>,
    /// Where each pool came from, for the report.
    origin: [&'static str; 3],
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_dir() {
            walk(&entry.path(), out);
        } else if ft.is_file() {
            out.push(entry.path());
        }
    }
}

/// Concatenates accepted files, in a seeded order, up to `limit` bytes; files whose content was already taken
/// are skipped (packages ship many identical changelogs and headers, which would plant duplicates closer together
/// than they sit on a real disk).
fn collect(dirs: &[&str], accept: &dyn Fn(&Path, &[u8]) -> bool, limit: usize, seed: u64) -> Vec<u8> {
    let mut files = Vec::new();
    for dir in dirs {
        walk(Path::new(dir), &mut files);
    }
    let mut rng = SplitMix(seed);
    for i in (1..files.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        files.swap(i, j);
    }
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for file in files {
        if out.len() >= limit {
            break;
        }
        let Ok(meta) = std::fs::metadata(&file) else { continue };
        if meta.len() < 4096 || meta.len() > 16 * MIB {
            continue;
        }
        let Ok(bytes) = std::fs::read(&file) else { continue };
        if accept(&file, &bytes) && seen.insert(content_hash(&bytes)) {
            out.extend_from_slice(&bytes);
        }
    }
    out.truncate(limit);
    out
}

fn content_hash(bytes: &[u8]) -> (u64, u64) {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    (h.finish(), bytes.len() as u64)
}

/// Text of a seeded word generator (Zipf-like vocabulary, lines, numbers): the stand-in for real text.
fn synthetic_text(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix(seed);
    let vocab: Vec<Vec<u8>> = (0..4000)
        .map(|_| {
            let n = 2 + rng.below(9) as usize;
            (0..n).map(|_| b'a' + rng.below(26) as u8).collect()
        })
        .collect();
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        let r = rng.below(1 << 20) as f64 / (1u64 << 20) as f64;
        let idx = ((vocab.len() as f64).powf(r) as usize).min(vocab.len() - 1);
        out.extend_from_slice(&vocab[idx]);
        out.push(match rng.below(12) {
            0 => b'\n',
            1 => b',',
            2 => b'.',
            _ => b' ',
        });
        if rng.below(40) == 0 {
            out.extend_from_slice(format!("{} ", rng.below(100_000)).as_bytes());
        }
    }
    out.truncate(len);
    out
}

fn pools() -> &'static Pools {
    static POOLS: OnceLock<Pools> = OnceLock::new();
    POOLS.get_or_init(|| {
        let min = 8 * MIB as usize;
        let is_text = |p: &Path, b: &[u8]| {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            matches!(ext, "h" | "py" | "txt" | "c" | "pm" | "pl")
                && b.iter().take(4096).all(|c| c.is_ascii_graphic() || c.is_ascii_whitespace())
        };
        let is_elf = |_: &Path, b: &[u8]| b.starts_with(b"\x7fELF");
        let is_gz = |p: &Path, b: &[u8]| p.extension().is_some_and(|e| e == "gz") && b.starts_with(&[0x1f, 0x8b]);
        let mut text = collect(&["/usr/include", "/usr/lib/python3", "/usr/share/perl"], &is_text, 48 << 20, 1);
        let mut elf = collect(&["/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/lib"], &is_elf, 64 << 20, 2);
        let mut gz = collect(&["/usr/share/doc", "/usr/share/man", "/var/lib/apt/lists"], &is_gz, 48 << 20, 3);
        let mut origin = ["files", "files", "files"];
        if text.len() < min {
            text = synthetic_text(32 << 20, 11);
            origin[0] = "synthetic";
        }
        if elf.len() < min {
            // Structured binary stand-in: little-endian integers of skewed sizes and repeated opcode runs.
            let mut rng = SplitMix(12);
            elf = (0..(32 << 20) / 8).flat_map(|_| (rng.next_u64() & 0x0000_00FF_00FF_0F3F).to_le_bytes()).collect();
            origin[1] = "synthetic";
        }
        if gz.len() < min {
            gz = vec![0u8; 32 << 20];
            SplitMix(13).fill(&mut gz);
            origin[2] = "synthetic";
        }
        Pools { text, elf, gz, origin }
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Disks of a given mix.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Never written: unallocated unless a neighbour's write allocates its block.
    Hole,
    /// Written zeros: allocated, all zero.
    Zero,
    Text,
    Elf,
    Gz,
    Random,
    /// Log lines: timestamps and repeated phrases, where long context pays.
    Log,
}

struct Mix {
    name: &'static str,
    size: u64,
    weights: &'static [(Kind, u32)],
    extent: (u64, u64),
    /// Extra layers (differencing children), each overwriting this fraction (percent) of the disk.
    layers: &'static [u32],
}

/// Where the next extent of each pool kind starts: pools are consumed in order from a seeded start, as files laid
/// out on a disk, so the same content comes back only a pool's length later (beyond any zstd window).
struct Cursors([usize; 3]);

fn fill(kind: Kind, buf: &mut [u8], rng: &mut SplitMix, cursors: &mut Cursors) {
    let p = pools();
    let from_pool = |pool: &[u8], buf: &mut [u8], at: &mut usize| {
        let mut done = 0;
        while done < buf.len() {
            *at %= pool.len();
            let n = (buf.len() - done).min(pool.len() - *at);
            buf[done..done + n].copy_from_slice(&pool[*at..*at + n]);
            done += n;
            *at += n;
        }
    };
    match kind {
        Kind::Text => from_pool(&p.text, buf, &mut cursors.0[0]),
        Kind::Elf => from_pool(&p.elf, buf, &mut cursors.0[1]),
        Kind::Gz => from_pool(&p.gz, buf, &mut cursors.0[2]),
        Kind::Hole | Kind::Zero => buf.fill(0),
        Kind::Random => rng.fill(buf),
        Kind::Log => {
            let phrases = ["GET /api/v1/items", "POST /login", "worker started", "cache miss", "timeout after"];
            let mut t = 1_700_000_000_000u64 + rng.below(1 << 30);
            let mut line = Vec::new();
            let mut done = 0;
            while done < buf.len() {
                line.clear();
                t += rng.below(5000);
                let msg = phrases[rng.below(phrases.len() as u64) as usize];
                let text = format!(
                    "{t} host-{} INFO {msg} id={} took={}ms\n",
                    rng.below(8),
                    rng.next_u64() % 1_000_000,
                    rng.below(900)
                );
                line.extend_from_slice(text.as_bytes());
                let n = line.len().min(buf.len() - done);
                buf[done..done + n].copy_from_slice(&line[..n]);
                done += n;
            }
        }
    }
}

fn pick(weights: &[(Kind, u32)], rng: &mut SplitMix) -> Kind {
    let total: u32 = weights.iter().map(|(_, w)| w).sum();
    let mut r = rng.below(u64::from(total)) as u32;
    for (kind, w) in weights {
        if r < *w {
            return *kind;
        }
        r -= w;
    }
    weights[0].0
}

/// Writes the mix's extents over `[0, size)` into the disk at `path` (the leaf of its chain); `percent` of the
/// disk when overwriting a child layer (extents placed at random), all of it for the base.
fn write_layer(path: &Path, mix: &Mix, percent: u32, rng: &mut SplitMix) {
    let size = mix.size;
    let p = pools();
    let mut cursors = Cursors([
        rng.below(p.text.len() as u64) as usize,
        rng.below(p.elf.len() as u64) as usize,
        rng.below(p.gz.len() as u64) as usize,
    ]);
    let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut emit = |offset: u64, kind: Kind, len: u64, rng: &mut SplitMix| {
        if kind == Kind::Hole {
            return;
        }
        let mut buf = vec![0u8; len as usize];
        fill(kind, &mut buf, rng, &mut cursors);
        pending.push((offset, buf));
    };
    if percent >= 100 {
        let mut pos = 0;
        while pos < size {
            let len = rng.log_uniform(mix.extent.0, mix.extent.1).min(size - pos);
            let kind = pick(mix.weights, rng);
            emit(pos, kind, len, rng);
            pos += len;
        }
    } else {
        let mut budget = size / 100 * u64::from(percent);
        while budget > 0 {
            let len = rng.log_uniform(mix.extent.0, mix.extent.1).min(budget).min(size);
            let pos = rng.below((size - len) / 512 + 1) * 512;
            let kind = pick(mix.weights, rng);
            emit(pos, kind, len, rng);
            budget -= len;
        }
    }
    // Adjacent writes merged into one call, at most 16 MiB each.
    pending.sort_by_key(|(o, _)| *o);
    let mut run: Option<(u64, Vec<u8>)> = None;
    for (offset, data) in pending {
        match &mut run {
            Some((start, buf)) if *start + buf.len() as u64 == offset && buf.len() < 16 << 20 => {
                buf.extend_from_slice(&data)
            }
            _ => {
                if let Some((start, buf)) = run.take() {
                    vhdcore::write(path, start, &buf).unwrap();
                }
                run = Some((offset, data));
            }
        }
    }
    if let Some((start, buf)) = run {
        vhdcore::write(path, start, &buf).unwrap();
    }
}

/// Builds the mix's chain in `dir`; returns its leaf.
fn build(dir: &Path, mix: &Mix, seed: u64) -> PathBuf {
    let mut rng = SplitMix(seed);
    let base = dir.join(format!("{}-0.vhd", mix.name));
    vhdcore::create(&base, mix.size, DiskType::Dynamic, DEFAULT_BLOCK_SIZE).unwrap();
    write_layer(&base, mix, 100, &mut rng);
    let mut leaf = base;
    for (i, percent) in mix.layers.iter().enumerate() {
        let child = dir.join(format!("{}-{}.vhd", mix.name, i + 1));
        vhdcore::snapshot(&leaf, &child).unwrap();
        write_layer(&child, mix, *percent, &mut rng);
        leaf = child;
    }
    leaf
}

// ---------------------------------------------------------------------------------------------------------------
// The reference compressor: the size of the image, computed from the format's definition.

#[derive(Clone, Copy)]
struct Truth {
    bytes: u64,
    data_blocks: u64,
    seconds: f64,
}

fn true_size(chain: &Chain, level: i32) -> Truth {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let plan = chain.plan(CHUNK).unwrap();
    let stats =
        vhdcore::compress_image(chain, &plan, level, &dir.path().join("image.vhd.zst"), &mut |_, _| true).unwrap();
    Truth {
        bytes: stats.compressed_bytes,
        data_blocks: stats.chunks.iter().map(|c| c.stored_blocks.len() as u64).sum(),
        seconds: started.elapsed().as_secs_f64(),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The mixes.

use Kind::*;

const MIXES: &[Mix] = &[
    Mix {
        name: "office",
        size: 192 * MIB,
        weights: &[(Text, 35), (Elf, 20), (Zero, 15), (Hole, 15), (Gz, 10), (Random, 5)],
        extent: (64 * KIB, 4 * MIB),
        layers: &[],
    },
    Mix {
        name: "binaries",
        size: 192 * MIB,
        weights: &[(Elf, 70), (Text, 10), (Hole, 20)],
        extent: (256 * KIB, 8 * MIB),
        layers: &[],
    },
    Mix {
        name: "media",
        size: 192 * MIB,
        weights: &[(Gz, 50), (Random, 30), (Text, 10), (Hole, 10)],
        extent: (MIB, 16 * MIB),
        layers: &[],
    },
    Mix {
        name: "mostly-zero",
        size: 256 * MIB,
        weights: &[(Zero, 55), (Hole, 25), (Text, 10), (Elf, 10)],
        extent: (128 * KIB, 8 * MIB),
        layers: &[],
    },
    Mix {
        name: "fragmented",
        size: 128 * MIB,
        weights: &[(Text, 25), (Elf, 25), (Zero, 20), (Gz, 15), (Random, 10), (Log, 5)],
        extent: (4 * KIB, 64 * KIB),
        layers: &[],
    },
    Mix {
        name: "random-heavy",
        size: 128 * MIB,
        weights: &[(Random, 80), (Text, 20)],
        extent: (512 * KIB, 8 * MIB),
        layers: &[],
    },
    Mix { name: "text", size: 192 * MIB, weights: &[(Text, 90), (Hole, 10)], extent: (MIB, 8 * MIB), layers: &[] },
    Mix { name: "logs", size: 128 * MIB, weights: &[(Log, 80), (Zero, 20)], extent: (MIB, 8 * MIB), layers: &[] },
    Mix {
        name: "chain-3",
        size: 256 * MIB,
        weights: &[(Text, 25), (Elf, 25), (Hole, 20), (Zero, 10), (Gz, 10), (Random, 10)],
        extent: (64 * KIB, 8 * MIB),
        layers: &[25, 15],
    },
    Mix {
        name: "big-extents",
        size: 256 * MIB,
        weights: &[(Text, 20), (Elf, 20), (Gz, 20), (Random, 10), (Zero, 10), (Hole, 20)],
        extent: (8 * MIB, 48 * MIB),
        layers: &[],
    },
];

// ---------------------------------------------------------------------------------------------------------------
// The tests.

struct Row {
    name: String,
    truth: Truth,
    est: Estimate,
}

impl Row {
    fn error(&self) -> f64 {
        self.est.compressed_bytes as f64 / self.truth.bytes as f64 - 1.0
    }

    fn in_range(&self) -> bool {
        (self.est.low..=self.est.high).contains(&self.truth.bytes)
    }
}

fn print_table(rows: &[Row]) {
    eprintln!(
        "{:13} {:>6} {:>6} {:>11} {:>11} {:>7} {:>23} {:>6} {:>5} {:>9} {:>7} {:>7} {:>6} {:>7} {:>8}",
        "mix",
        "alloc",
        "zero",
        "true bytes",
        "estimate",
        "error",
        "low-high",
        "±",
        "c",
        "blocks",
        "est s",
        "full s",
        "est %",
        "pred s",
        "read MiB"
    );
    for r in rows {
        let e = &r.est;
        eprintln!(
            "{:13} {:>5}M {:>5.1}% {:>11} {:>11} {:>+6.2}% {:>11}-{:<11} {:>5.1}% {:>5.3} {:>4}/{:<4} {:>7.3} {:>7.3} {:>5.1}% {:>7.3} {:>8}{}",
            r.name,
            e.allocated_bytes >> 20,
            e.zero_fraction * 100.0,
            r.truth.bytes,
            e.compressed_bytes,
            r.error() * 100.0,
            e.low,
            e.high,
            (e.high - e.low) as f64 / e.compressed_bytes as f64 * 50.0,
            e.context_correction,
            e.image_blocks,
            r.truth.data_blocks,
            e.seconds_spent,
            r.truth.seconds,
            e.seconds_spent / r.truth.seconds * 100.0,
            e.predicted_seconds,
            e.sampled_bytes >> 20,
            if r.in_range() { "" } else { "  OUT OF RANGE" }
        );
    }
}

fn chain_of(leaf: &Path) -> Chain {
    Chain::open(leaf, MAX_CHAIN_DEPTH).unwrap()
}

/// Seeds each mix is estimated with: the default first, then two more, so that the bounds below judge the
/// estimator and not one draw (its spread over seeds is 0.1-1.8% by mix; one draw can land at twice that).
fn test_seeds() -> [u64; 3] {
    [EstimateOptions::default().seed, 7920, 15_839]
}

/// Over every mix and three seeds: the truth inside [low, high] every time, a root-mean-square error under 1.5%
/// and a worst error under 4% (regression bounds: 0.9% and 3.3% at the last run, 1.1% and 3.6% for the previous
/// estimator; issue 3's target is a worst error of 2% on bench/bench_image.py's mixes, which `--seeds` measures).
#[test]
fn estimate_matches_the_image_size_on_realistic_mixes() {
    let dir = tempfile::tempdir().unwrap();
    let p = pools();
    eprintln!(
        "content pools: text {} MiB ({}), elf {} MiB ({}), gz {} MiB ({})",
        p.text.len() >> 20,
        p.origin[0],
        p.elf.len() >> 20,
        p.origin[1],
        p.gz.len() >> 20,
        p.origin[2]
    );
    let rows: Vec<Row> = MIXES
        .iter()
        .enumerate()
        .flat_map(|(i, mix)| {
            let chain = chain_of(&build(dir.path(), mix, 100 + i as u64));
            let truth = true_size(&chain, LEVEL);
            test_seeds()
                .into_iter()
                .map(|seed| {
                    let est = estimate(&chain, &EstimateOptions { seed, ..EstimateOptions::default() }).unwrap();
                    Row { name: format!("{} #{seed}", mix.name), truth, est }
                })
                .collect::<Vec<Row>>()
        })
        .collect();
    print_table(&rows);
    assert!(rows.len() >= 8 * test_seeds().len());
    let outside: Vec<&str> = rows.iter().filter(|r| !r.in_range()).map(|r| r.name.as_str()).collect();
    assert!(outside.is_empty(), "truth outside [low, high] for {outside:?}");
    let rms = (rows.iter().map(|r| r.error().powi(2)).sum::<f64>() / rows.len() as f64).sqrt();
    let worst = rows.iter().map(|r| r.error().abs()).fold(0.0, f64::max);
    eprintln!("rms error {:.2}%, worst {:.2}% over {} estimates", rms * 100.0, worst * 100.0, rows.len());
    assert!(rms <= 0.015, "root-mean-square error {:.2}% > 1.5%", rms * 100.0);
    assert!(worst <= 0.04, "worst relative error {:.2}% > 4%", worst * 100.0);
    for r in &rows {
        let e = &r.est;
        assert_eq!(e.allocated_bytes + e.unallocated_bytes, e.virtual_size);
        assert!(e.image_blocks <= e.candidate_blocks);
        assert!(e.predicted_seconds > 0.0 && e.threads >= 1);
    }
}

/// Default options, or those of the `ESTIMATE_SAMPLES`, `ESTIMATE_SAMPLE_KIB`, `ESTIMATE_PREFIX_KIB` and
/// `ESTIMATE_SPANS` variables (to compare settings with the slow tests below).
fn options_from_env() -> EstimateOptions {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
    let mut opts = EstimateOptions::default();
    if let Some(v) = var("ESTIMATE_SAMPLES") {
        opts.samples = v;
    }
    if let Some(v) = var("ESTIMATE_SAMPLE_KIB") {
        opts.sample_size = v << 10;
    }
    if let Some(v) = var("ESTIMATE_PREFIX_KIB") {
        opts.prefix_size = v << 10;
    }
    if let Some(v) = var("ESTIMATE_SPANS") {
        opts.spans = v;
    }
    opts
}

/// The estimator's spread over seeds on each mix (slow: run with `--ignored`, in release): mean and standard
/// deviation of the error, the worst error, and the truth inside [low, high] every time.
#[test]
#[ignore]
fn estimate_over_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let seeds: u64 = std::env::var("ESTIMATE_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let opts = options_from_env();
    let mut outside = Vec::new();
    let mut worst_all: f64 = 0.0;
    for (i, mix) in MIXES.iter().enumerate() {
        let chain = chain_of(&build(dir.path(), mix, 100 + i as u64));
        let truth = true_size(&chain, opts.level);
        let (mut errs, mut width, mut secs, mut read) = (Vec::new(), 0.0, 0.0, 0u64);
        for seed in 0..seeds {
            let e = estimate(&chain, &EstimateOptions { seed: seed * 7919 + 1, ..opts.clone() }).unwrap();
            errs.push(e.compressed_bytes as f64 / truth.bytes as f64 - 1.0);
            if !(e.low..=e.high).contains(&truth.bytes) {
                outside.push((mix.name, seed));
            }
            width += (e.high - e.low) as f64 / e.compressed_bytes as f64 * 50.0 / seeds as f64;
            secs += e.seconds_spent / seeds as f64;
            read = read.max(e.sampled_bytes);
        }
        let n = errs.len() as f64;
        let mean = errs.iter().sum::<f64>() / n;
        let sd = (errs.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
        let worst = errs.iter().map(|e| e.abs()).fold(0.0, f64::max);
        worst_all = worst_all.max(worst);
        eprintln!(
            "{:13} error mean {:+.2}% sd {:.2}% worst {:.2}% | range ±{:.1}% | estimate {:.3}s (read ≤ {} MiB) vs full {:.3}s",
            mix.name,
            mean * 100.0,
            sd * 100.0,
            worst * 100.0,
            width,
            secs,
            read >> 20,
            truth.seconds
        );
    }
    eprintln!("worst error over {} estimates: {:.2}%", seeds * MIXES.len() as u64, worst_all * 100.0);
    assert!(outside.is_empty(), "truth outside [low, high] for {outside:?}");
}

/// Cost does not follow the disk's size: a 32 GiB disk with a few hundred MiB allocated in scattered extents
/// reads a bounded number of bytes, and the estimate still holds.
#[test]
fn sampled_bytes_stay_bounded_on_a_large_sparse_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.vhd");
    let size = 32 * 1024 * MIB;
    vhdcore::create(&path, size, DiskType::Dynamic, DEFAULT_BLOCK_SIZE).unwrap();
    let mut rng = SplitMix(32);
    let mut cursors = Cursors([0, 0, 0]);
    let mut written = 0;
    while written < 320 * MIB {
        let len = rng.log_uniform(MIB, 8 * MIB);
        let offset = rng.below((size - len) / BLOCK) * BLOCK;
        let kind = pick(&[(Text, 3), (Elf, 3), (Gz, 2), (Zero, 1), (Random, 1)], &mut rng);
        let mut buf = vec![0u8; len as usize];
        fill(kind, &mut buf, &mut rng, &mut cursors);
        vhdcore::write(&path, offset, &buf).unwrap();
        written += len;
    }
    let chain = chain_of(&path);
    let opts = EstimateOptions::default();
    let est = estimate(&chain, &opts).unwrap();
    let truth = true_size(&chain, opts.level);
    let row = Row { name: "sparse-32g".into(), truth, est };
    print_table(std::slice::from_ref(&row));
    let e = &row.est;
    assert_eq!(e.virtual_size, size);
    assert!(e.unallocated_bytes > 31 * 1024 * MIB);
    // Class looks read a unit's first 4 KiB; compressed units (a few more than `samples` where classes are small)
    // their bytes and prefix; spans their target and context.
    let looks = (7 * opts.looks * 4096) as u64; // 4 KiB a look, up to 1 + 2 + 4 times the strata
    let compressed = ((opts.samples + 64) * (opts.sample_size + opts.prefix_size)) as u64;
    let spans = (opts.spans * (opts.span_size + opts.context_size)) as u64;
    let bound = looks + compressed + spans;
    assert!(e.sampled_bytes <= bound, "read {} bytes, bound {bound}", e.sampled_bytes);
    assert!(e.samples <= opts.samples + 64);
    assert!(row.in_range(), "truth {} outside [{}, {}]", row.truth.bytes, e.low, e.high);
    assert!(row.error().abs() <= 0.03, "error {:.2}%", row.error() * 100.0);
}

/// A disk with nothing allocated is its head room and empty frames, estimated to the byte; one with only zeros
/// written is too, give or take a byte per frame (a chunk with allocated zeros is counted as a data frame).
#[test]
fn empty_and_zero_disks() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.vhd");
    vhdcore::create(&empty, 256 * MIB, DiskType::Dynamic, DEFAULT_BLOCK_SIZE).unwrap();
    let zeros = dir.path().join("zeros.vhd");
    vhdcore::create(&zeros, 256 * MIB, DiskType::Dynamic, DEFAULT_BLOCK_SIZE).unwrap();
    vhdcore::write(&zeros, 8 * MIB, &vec![0u8; 24 * MIB as usize]).unwrap();
    for path in [&empty, &zeros] {
        let chain = chain_of(path);
        let e = estimate(&chain, &EstimateOptions::default()).unwrap();
        let truth = true_size(&chain, LEVEL);
        assert!(
            (e.low..=e.high).contains(&truth.bytes),
            "{path:?}: truth {} outside [{}, {}]",
            truth.bytes,
            e.low,
            e.high
        );
        assert!(e.compressed_bytes.abs_diff(truth.bytes) <= 4, "{path:?}: {} for {}", e.compressed_bytes, truth.bytes);
        assert_eq!(e.image_blocks, 0);
        assert_eq!(e.spans, 0);
    }
    // The empty disk to the byte, but for the footer's UUID and timestamp, which the image draws itself.
    let chain = chain_of(&empty);
    let (e, truth) = (estimate(&chain, &EstimateOptions::default()).unwrap(), true_size(&chain, LEVEL));
    assert!(e.compressed_bytes.abs_diff(truth.bytes) <= 2, "{} for {}", e.compressed_bytes, truth.bytes);
    let e = estimate(&chain_of(&zeros), &EstimateOptions::default()).unwrap();
    assert_eq!(e.allocated_bytes, 24 * MIB);
    assert_eq!(e.zero_fraction, 1.0);
    assert_eq!(e.estimated_nonzero_bytes, 0);
}

/// A fixed disk and a tiny one (smaller than a sample) are estimated like the others; the same seed gives the
/// same estimate.
#[test]
fn fixed_tiny_and_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let fixed = dir.path().join("fixed.vhd");
    vhdcore::create(&fixed, 48 * MIB, DiskType::Fixed, DEFAULT_BLOCK_SIZE).unwrap();
    let mut rng = SplitMix(5);
    let mut cursors = Cursors([0, 0, 0]);
    let mut text = vec![0u8; 20 * MIB as usize];
    fill(Text, &mut text, &mut rng, &mut cursors);
    vhdcore::write(&fixed, 3 * MIB, &text).unwrap();
    let tiny = dir.path().join("tiny.vhd");
    vhdcore::create(&tiny, 8 * MIB, DiskType::Dynamic, 4096).unwrap();
    vhdcore::write(&tiny, 4096, &text[..8192]).unwrap();
    for path in [&fixed, &tiny] {
        let chain = chain_of(path);
        let a = estimate(&chain, &EstimateOptions::default()).unwrap();
        let b = estimate(&chain, &EstimateOptions::default()).unwrap();
        assert_eq!((a.compressed_bytes, a.low, a.high, a.samples), (b.compressed_bytes, b.low, b.high, b.samples));
        let truth = true_size(&chain, LEVEL);
        assert!(
            (a.low..=a.high).contains(&truth.bytes),
            "{path:?}: truth {} outside [{}, {}]",
            truth.bytes,
            a.low,
            a.high
        );
    }
    let e = estimate(&chain_of(&tiny), &EstimateOptions::default()).unwrap();
    assert_eq!(e.allocated_bytes, 8192);
    assert_eq!(e.samples, 1);
}

#[test]
fn bad_options_are_invalid_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    vhdcore::create(&path, 16 * MIB, DiskType::Dynamic, DEFAULT_BLOCK_SIZE).unwrap();
    let chain = chain_of(&path);
    let base = EstimateOptions::default();
    for bad in [
        EstimateOptions { level: 99, ..base.clone() },
        EstimateOptions { sample_size: 10, ..base.clone() },
        EstimateOptions { samples: 0, ..base.clone() },
        EstimateOptions { span_size: 1024, ..base.clone() },
        EstimateOptions { chunk_size: 3 * MIB, ..base.clone() },
        EstimateOptions { prefix_size: 1 << 30, ..base.clone() },
    ] {
        let err = estimate(&chain, &bad).unwrap_err();
        assert_eq!(err.kind(), vhdcore::ErrorKind::InvalidArgument, "{bad:?}: {err}");
    }
}

/// Time of the estimate against a full compression (the reference compressor, chunks in parallel) on a 1 GiB
/// disk, and on a 32 GiB sparse-but-realistic one (4 GiB allocated, or `ESTIMATE_BENCH_GIB`). Slow: run with
/// `--ignored`, in release.
#[test]
#[ignore]
fn bench_estimate_time() {
    let dir = tempfile::tempdir().unwrap();
    let weights: &'static [(Kind, u32)] =
        &[(Text, 30), (Elf, 25), (Zero, 15), (Hole, 10), (Gz, 10), (Random, 5), (Log, 5)];
    let one = Mix { name: "office-1g", size: 1024 * MIB, weights, extent: (64 * KIB, 8 * MIB), layers: &[10] };
    let leaf = build(dir.path(), &one, 7);
    let chain = chain_of(&leaf);
    let _warm = true_size(&chain, LEVEL);
    let mut rows = Vec::new();
    for _ in 0..3 {
        let est = estimate(&chain, &options_from_env()).unwrap();
        let truth = true_size(&chain, LEVEL);
        rows.push(Row { name: one.name.into(), truth, est });
    }
    // 32 GiB virtual, 4 GiB allocated (or `ESTIMATE_BENCH_GIB`): regions of 16 MiB of office-like data spread
    // over the disk.
    let regions = std::env::var("ESTIMATE_BENCH_GIB").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(4) * 64;
    let path = dir.path().join("sparse-32g.vhd");
    let size = 32 * 1024 * MIB;
    vhdcore::create(&path, size, DiskType::Dynamic, DEFAULT_BLOCK_SIZE).unwrap();
    let mut rng = SplitMix(33);
    let mut cursors = Cursors([0, 0, 0]);
    let mut region = vec![0u8; 16 * MIB as usize];
    for i in 0..regions {
        let mut pos = 0usize;
        while pos < region.len() {
            let len = (rng.log_uniform(64 * KIB, 4 * MIB) as usize).min(region.len() - pos);
            fill(pick(weights, &mut rng), &mut region[pos..pos + len], &mut rng, &mut cursors);
            pos += len;
        }
        let stride = size / regions / BLOCK;
        vhdcore::write(&path, (i * stride + rng.below(stride - 7)) * BLOCK, &region).unwrap();
    }
    let chain = chain_of(&path);
    let _warm = true_size(&chain, LEVEL);
    for _ in 0..2 {
        let est = estimate(&chain, &options_from_env()).unwrap();
        let truth = true_size(&chain, LEVEL);
        rows.push(Row { name: "sparse-32g".into(), truth, est });
    }
    print_table(&rows);
}
