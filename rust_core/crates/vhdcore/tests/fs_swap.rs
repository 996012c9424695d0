//! Linux swap (mkswap) and the contents kept whole by kind: a hibernation image, LUKS, LVM, btrfs, unknown.

mod fs_support;

use fs_support::*;
use vhdcore::fs::{usage, Decision, FsKind};

#[test]
fn swap_after_the_header_page_is_free() {
    if !have(&["mkswap"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("swap.img");
    random_file(&img, 16 * MIB, 1);
    run("mkswap", &[img.to_str().unwrap()]);
    let bytes = std::fs::read(&img).unwrap();
    let u = usage(&bytes).unwrap();
    assert_eq!(u.partitions[0].filesystem, FsKind::Swap);
    assert_eq!(dropped(&u, 0), 16 * MIB - 4096);
    assert_eq!(u.free, vec![(4096, 16 * MIB - 4096)]);

    // A hibernation image in the swap area: resume reads it, so it is all kept.
    for sig in [&b"S1SUSPEND\0"[..], b"S2SUSPEND\0"] {
        let mut hib = bytes.clone();
        hib[4086..4096].copy_from_slice(sig);
        let u = usage(&hib).unwrap();
        match &u.partitions[0].decision {
            Decision::KeepWhole { reason } => assert!(reason.contains("hibernation"), "{reason}"),
            d => panic!("{d:?}"),
        }
        assert!(u.free.is_empty());
    }
}

#[test]
fn swap_smaller_than_its_partition_keeps_the_tail() {
    if !have(&["mkswap"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("swap.img");
    random_file(&img, 16 * MIB, 2);
    // An 8 MiB swap area (size in KiB) at the start of a 16 MiB disk.
    run("mkswap", &[img.to_str().unwrap(), "8192"]);
    let u = usage(&std::fs::read(&img).unwrap()).unwrap();
    assert_eq!(u.free, vec![(4096, 8 * MIB - 4096)]);
}

#[test]
fn other_contents_are_kept_whole_and_named() {
    let cases: [(usize, &[u8], FsKind); 4] = [
        (0, b"LUKS\xba\xbe", FsKind::Luks),
        (0x218, b"LVM2 001", FsKind::Lvm),
        (0x10040, b"_BHRfS_M", FsKind::Btrfs),
        (0, b"", FsKind::Unknown),
    ];
    for (at, magic, kind) in cases {
        let mut bytes = random_bytes(4 * MIB as usize, 3);
        bytes[510] = 0; // not an MBR
        bytes[at..at + magic.len()].copy_from_slice(magic);
        let u = usage(&bytes).unwrap();
        assert_eq!(u.partitions[0].filesystem, kind);
        assert!(matches!(u.partitions[0].decision, Decision::KeepWhole { .. }));
        assert_eq!(u.partitions[0].used_bytes, 4 * MIB);
        assert!(u.free.is_empty());
    }
}
