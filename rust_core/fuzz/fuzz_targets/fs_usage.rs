//! Arbitrary bytes as a whole flattened disk: partition tables (MBR, EBR chains, GPT) and filesystem metadata
//! (ext2/3/4 superblock, descriptors, bitmaps, jbd2 journal; XFS; NTFS; swap) all come from the fuzzer.
//! `vhdcore::fs::usage` must return (a decision or an error), never panic, hang or allocate without bound, and
//! its free ranges must stay sorted, disjoint, 512-aligned and inside the disk.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let disk: &[u8] = data;
    if let Ok(u) = vhdcore::fs::usage(&disk) {
        let mut end = 0u64;
        for &(s, l) in &u.free {
            assert!(s >= end && l > 0 && s % 512 == 0 && l % 512 == 0);
            end = s + l;
            assert!(end <= u.size);
        }
        let _ = u.free_blocks(4096);
    }
});
