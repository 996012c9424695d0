//! The compressed image decompresses to a VHD of exactly the flattened chain, and chunk plans executed one by one
//! from their reads give the same frames as the all-in-one path.

use std::io::Read;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};
use vhdcore::{Chain, ChunkDigest, DiskType};

const MIB: u64 = 1024 * 1024;

fn fill(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|i| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            // Half text-like (compressible), half noise.
            if (i / 4096) % 2 == 0 {
                b"the quick brown fox "[i % 20]
            } else {
                (x >> 33).to_le_bytes()[0]
            }
        })
        .collect()
}

fn sample_chain(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let size = 40 * MIB + 3 * 512; // not a multiple of the block size
    let mut model = vec![0u8; usize::try_from(size).unwrap()];
    let base = dir.join("base.vhd");
    vhdcore::create(&base, size, DiskType::Dynamic, 1024 * 1024).unwrap();
    let mut put = |path: &std::path::Path, offset: u64, data: Vec<u8>| {
        vhdcore::write(path, offset, &data).unwrap();
        let at = usize::try_from(offset).unwrap();
        model[at..at + data.len()].copy_from_slice(&data);
    };
    put(&base, 0, fill(1, 5 * 1024 * 1024));
    put(&base, 20 * MIB, vec![0u8; 2 * 1024 * 1024]); // allocated but all zero: must not be stored
    put(&base, size - 1000, fill(2, 1000));
    let leaf = dir.join("leaf.vhd");
    vhdcore::snapshot(&base, &leaf).unwrap();
    put(&leaf, 3 * MIB + 7, fill(3, 100_000));
    // Image block 16 (32-34 MiB): its first MiB zeros, then data: its hash starts after zero pieces of the block.
    put(&leaf, 33 * MIB, fill(4, 4096));
    (leaf, model)
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn decompress(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(bytes).unwrap().read_to_end(&mut out).unwrap();
    out
}

#[test]
fn image_decompresses_to_a_vhd_of_the_flattened_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (leaf, model) = sample_chain(dir.path());
    let chain = Chain::open(&leaf, 30).unwrap();
    let plan = chain.plan(8 * MIB).unwrap();
    let out = dir.path().join("image.vhd.zst");
    let stats = vhdcore::compress_image(&chain, &plan, 3, &out, &mut |_, _| true).unwrap();
    let compressed = std::fs::read(&out).unwrap();
    assert_eq!(stats.compressed_bytes, u64::try_from(compressed.len()).unwrap());
    let image = decompress(&compressed);
    assert_eq!(stats.image_bytes, u64::try_from(image.len()).unwrap());
    let vhd = dir.path().join("image.vhd");
    std::fs::write(&vhd, &image).unwrap();
    let back = Chain::open(&vhd, 1).unwrap();
    let mut flat = vec![0u8; model.len()];
    back.read_at(0, &mut flat).unwrap();
    assert!(flat == model, "the image does not hold the flattened chain");
    // The all-zero block and the never-written ones are left out.
    let stored: usize = stats.chunks.iter().map(|c| c.stored_blocks.len()).sum();
    assert_eq!(u64::from(back.layers[0].allocated_blocks()), u64::try_from(stored).unwrap());
    assert!(!stats.chunks.iter().any(|c| c.stored_blocks.contains(&10)), "zero block 10 was stored");
}

#[test]
fn chunk_plans_from_fetched_reads_match_the_all_in_one_path() {
    let dir = tempfile::tempdir().unwrap();
    let (leaf, _) = sample_chain(dir.path());
    let chain = Chain::open(&leaf, 30).unwrap();
    let plan = vhdcore::ImagePlan::from_json(&chain.plan(8 * MIB).unwrap().to_json()).unwrap();
    let files: Vec<std::fs::File> = plan.layers.iter().map(|l| std::fs::File::open(&l.path).unwrap()).collect();
    assert!(plan.chunks.iter().any(|c| c.reads.is_empty()), "no chunk without data: the zero-digest path is untested");
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
        assert_eq!(remote.sha256, local.sha256);
        assert_eq!(remote.sha256, Some(hex(&Sha256::digest(decompress(&remote.frame)))));
        assert_eq!(remote.crc32c, crc32c::crc32c(&remote.frame));
        // The content digest is of the flattened disk's bytes in the chunk's range, zeros included: the sha256 of
        // the sha256 of each 2 MiB slice.
        let mut content = vec![0u8; usize::try_from(chunk.length).unwrap()];
        chain.read_at(chunk.start, &mut content).unwrap();
        let mut tree = Sha256::new();
        for leaf in content.chunks(2 * 1024 * 1024) {
            tree.update(Sha256::digest(leaf));
        }
        let by_content = vhdcore::compress_fetched_chunk(&plan, chunk.index, &data, 3, ChunkDigest::Content).unwrap();
        assert_eq!(by_content.content_sha256, Some(hex(&tree.finalize())), "chunk {}", chunk.index);
        assert_eq!((by_content.sha256, remote.content_sha256), (None, None));
        assert_eq!(by_content.frame, remote.frame);
        let local_content = vhdcore::compress_chunk(&chain, &plan, chunk, 3, ChunkDigest::Content).unwrap();
        assert_eq!(local_content.content_sha256, by_content.content_sha256);
    }
}

#[test]
fn a_worker_given_short_reads_gets_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let (leaf, _) = sample_chain(dir.path());
    let chain = Chain::open(&leaf, 30).unwrap();
    let plan = chain.plan(8 * MIB).unwrap();
    let chunk = plan.chunks.iter().find(|c| !c.reads.is_empty()).unwrap();
    let short: Vec<Vec<u8>> = chunk.reads.iter().map(|r| vec![0u8; usize::try_from(r.length).unwrap() - 1]).collect();
    let err = vhdcore::compress_fetched_chunk(&plan, chunk.index, &short, 3, ChunkDigest::Image).unwrap_err();
    assert_eq!(err.kind(), vhdcore::ErrorKind::InvalidArgument);
}

/// Noise from a seed: what already-compressed or encrypted data looks like.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    vhdcore::rng::SplitMix(seed).fill(&mut out);
    out
}

/// Text-like bytes with some variety, so zstd has real work to do.
fn prose(seed: u64, n: usize) -> Vec<u8> {
    let words: [&[u8]; 8] = [b"server ", b"image ", b"chain ", b"block ", b"kernel\n", b"config=", b"42 ", b"disk "];
    let mut rng = vhdcore::rng::SplitMix(seed);
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        out.extend_from_slice(words[usize::try_from(rng.below(8)).unwrap()]);
    }
    out.truncate(n);
    out
}

fn zstd_cli(args: &[&str], input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("zstd")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the zstd command (run .ci/setup)");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "zstd {args:?} failed");
    out.stdout
}

#[test]
fn incompressible_regions_are_stored_raw_and_the_image_still_decompresses_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let size = 24 * MIB;
    let base = dir.path().join("base.vhd");
    vhdcore::create(&base, size, DiskType::Dynamic, 2 * 1024 * 1024).unwrap();
    let mut model = vec![0u8; usize::try_from(size).unwrap()];
    let mut put = |offset: u64, data: Vec<u8>| {
        vhdcore::write(&base, offset, &data).unwrap();
        let at = usize::try_from(offset).unwrap();
        model[at..at + data.len()].copy_from_slice(&data);
    };
    // Chunk 0 (8 MiB): noise only. Chunk 1: text only. Chunk 2: 256 KiB runs of noise and text, then 4 KiB ones.
    put(0, noise(1, 8 * 1024 * 1024));
    put(8 * MIB, prose(2, 8 * 1024 * 1024));
    let mut mixed = Vec::new();
    for i in 0..12 {
        mixed.extend(if i % 2 == 0 { noise(10 + i, 256 * 1024) } else { prose(10 + i, 256 * 1024) });
    }
    for i in 0..256 {
        mixed.extend(if i % 2 == 0 { noise(100 + i, 4096) } else { prose(100 + i, 4096) });
    }
    put(16 * MIB, mixed);
    let chain = Chain::open(&base, 1).unwrap();
    let plan = chain.plan(8 * MIB).unwrap();
    // Early abort at the default level and a higher one, and none at a negative (fast) level.
    for level in [3, 9, -1] {
        check_mixed_image(&chain, &plan, level, &model, dir.path());
    }
}

fn check_mixed_image(chain: &Chain, plan: &vhdcore::ImagePlan, level: i32, model: &[u8], dir: &std::path::Path) {
    let out = dir.join("image.vhd.zst");
    let stats = vhdcore::compress_image(chain, plan, level, &out, &mut |_, _| true).unwrap();
    let compressed = std::fs::read(&out).unwrap();
    let image = zstd_cli(&["-d", "-q", "-c"], &compressed);
    let vhd = dir.join("image.vhd");
    std::fs::write(&vhd, &image).unwrap();
    let mut flat = vec![0u8; model.len()];
    Chain::open(&vhd, 1).unwrap().read_at(0, &mut flat).unwrap();
    assert!(flat == model, "level {level}: the image does not hold the disk");
    let frame_of = |c: &vhdcore::ChunkFrame| {
        let at = usize::try_from(c.object_offset.unwrap()).unwrap();
        &compressed[at..at + usize::try_from(c.compressed_bytes).unwrap()]
    };
    // All noise: stored raw, 3 bytes per 128 KiB block plus the frame header and checksum.
    let noisy = &stats.chunks[0];
    let blocks = noisy.logical_bytes.div_ceil(128 * 1024);
    assert!(noisy.compressed_bytes <= noisy.logical_bytes + 3 * blocks + 32, "level {level}: {noisy:?}");
    // Text, and the mix, within 1% of the `zstd` command at that level of the same bytes (the decompressed frame).
    for chunk in &stats.chunks[1..] {
        let logical = zstd_cli(&["-d", "-q", "-c"], frame_of(chunk));
        let flag = if level < 0 { format!("--fast={}", -level) } else { format!("-{level}") };
        let reference = zstd_cli(&[&flag, "-q", "-c"], &logical);
        let ratio = chunk.compressed_bytes as f64 / reference.len() as f64;
        assert!(ratio <= 1.01, "level {level}, chunk {}: {ratio:.4} of zstd's size", chunk.index);
    }
}

#[test]
fn an_output_that_is_not_a_regular_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (leaf, _) = sample_chain(dir.path());
    let chain = Chain::open(&leaf, 30).unwrap();
    let plan = chain.plan(8 * MIB).unwrap();
    let folder = dir.path().join("a-folder");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("inside"), b"kept").unwrap();
    let err = vhdcore::compress_image(&chain, &plan, 3, &folder, &mut |_, _| true).unwrap_err();
    assert_eq!(err.kind(), vhdcore::ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("not a regular file"), "{err}");
    assert_eq!(std::fs::read(folder.join("inside")).unwrap(), b"kept");
}

#[test]
fn the_image_file_is_the_same_whether_the_file_system_takes_direct_writes_or_not() {
    // /tmp takes O_DIRECT here (ext4); tmpfs (/dev/shm) refuses it, and the writer falls back to buffered writes.
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (leaf, _) = sample_chain(dir.path());
    let chain = Chain::open(&leaf, 30).unwrap();
    let plan = chain.plan(8 * MIB).unwrap();
    let on_disk = dir.path().join("image.vhd.zst");
    vhdcore::compress_image(&chain, &plan, 3, &on_disk, &mut |_, _| true).unwrap();
    let memory = tempfile::tempdir_in(shm).unwrap();
    let in_memory = memory.path().join("image.vhd.zst");
    vhdcore::compress_image(&chain, &plan, 3, &in_memory, &mut |_, _| true).unwrap();
    assert!(std::fs::read(&on_disk).unwrap() == std::fs::read(&in_memory).unwrap());
}

#[test]
fn compressing_from_inside_a_rayon_pool_of_one_thread_finishes() {
    // That thread is busy writing frames; the workers must not wait for it to be free.
    let dir = tempfile::tempdir().unwrap();
    let (leaf, model) = sample_chain(dir.path());
    let out = dir.path().join("image.vhd.zst");
    let (done, finished) = std::sync::mpsc::channel();
    let worker_out = out.clone();
    std::thread::spawn(move || {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let result = pool.install(|| {
            let chain = Chain::open(&leaf, 30).unwrap();
            let plan = chain.plan(8 * MIB).unwrap();
            vhdcore::compress_image(&chain, &plan, 3, &worker_out, &mut |_, _| true).map(|s| s.compressed_bytes)
        });
        let _ = done.send(result);
    });
    let compressed = finished
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("compress_image run inside a one-thread rayon pool did not finish")
        .unwrap();
    assert_eq!(compressed, std::fs::metadata(&out).unwrap().len());
    let vhd = dir.path().join("image.vhd");
    std::fs::write(&vhd, decompress(&std::fs::read(&out).unwrap())).unwrap();
    let mut flat = vec![0u8; model.len()];
    Chain::open(&vhd, 1).unwrap().read_at(0, &mut flat).unwrap();
    assert!(flat == model);
}

#[test]
fn an_image_written_in_place_in_two_runs_is_the_image_written_in_one() {
    let dir = tempfile::tempdir().unwrap();
    let (leaf, _) = sample_chain(dir.path());
    let chain = Chain::open(&leaf, 30).unwrap();
    let plan = chain.plan(8 * MIB).unwrap();
    let whole = dir.path().join("whole.vhd.zst");
    vhdcore::compress_image(&chain, &plan, 3, &whole, &mut |_, _| true).unwrap();

    // The first run stops after two frames are durable (a crash after its sync point); the second resumes after
    // them, at an offset that is not a multiple of the direct writes' alignment.
    let out = dir.path().join("in-place.vhd.zst");
    let room = vhdcore::head_room(&plan).unwrap();
    let mut frames: Vec<vhdcore::ChunkFrame> = Vec::new();
    let mut durable_end = None;
    let stopped = vhdcore::compress_chunks_into(
        &chain,
        &plan,
        0,
        plan.chunks.len(),
        3,
        ChunkDigest::Image,
        &out,
        room,
        1,
        &mut |placed| match placed {
            vhdcore::Placed::Written(frame) => {
                frames.push(frame);
                true
            }
            vhdcore::Placed::Durable { end } => {
                durable_end = Some(end);
                frames.len() < 2
            }
        },
    );
    assert!(matches!(stopped, Err(vhdcore::VhdError::Interrupted { .. })), "{stopped:?}");
    frames.truncate(2);
    let resume_at = durable_end.unwrap();
    assert_ne!(resume_at % 4096, 0, "the test wants an unaligned resume point");
    // Bytes past the durable point may be anything: the resumed run overwrites them.
    std::fs::OpenOptions::new().write(true).open(&out).unwrap().write_all_at(&[0xAB; 8192], resume_at).unwrap();
    let end = vhdcore::compress_chunks_into(
        &chain,
        &plan,
        2,
        plan.chunks.len() - 2,
        3,
        ChunkDigest::Image,
        &out,
        resume_at,
        u64::MAX,
        &mut |placed| {
            if let vhdcore::Placed::Written(frame) = placed {
                frames.push(frame);
            }
            true
        },
    )
    .unwrap();
    let summary: Vec<(Vec<u64>, u64)> = frames.iter().map(|f| (f.stored_blocks.clone(), f.logical_bytes)).collect();
    let head = vhdcore::compress_head(&plan, &summary, 3).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
    file.write_all_at(&vhdcore::head_and_gap(&head.frame, room).unwrap(), 0).unwrap();
    file.set_len(end).unwrap();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&whole).unwrap(), "in place differs from compress_image");
}
