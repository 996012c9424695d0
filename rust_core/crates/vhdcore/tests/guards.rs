//! What protects a chain from careless writes: a foreign image named by its format, children found by UUID, a
//! parent restamped after a write reported by `check` on its children.

use vhdcore::{DiskType, ErrorKind};

#[test]
fn foreign_images_are_named_in_the_bad_cookie_error() {
    let dir = tempfile::tempdir().unwrap();
    for (magic, name) in [
        (&b"QFI\xfb\0\0\0\x03"[..], "qcow2"),
        (b"KDMV\x01\0\0\0", "VMDK"),
        (b"# Disk DescriptorFile\n", "VMDK (descriptor)"),
        (b"vhdxfile", "VHDX"),
    ] {
        let path = dir.path().join("disk.img");
        let mut bytes = magic.to_vec();
        bytes.resize(64 * 1024, 0);
        std::fs::write(&path, &bytes).unwrap();
        let err = vhdcore::Disk::open(&path).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadCookie);
        let text = err.to_string();
        assert!(text.contains(&format!("this is a {name} image, not a VHD")), "{text}");
        assert!(text.contains("qemu-img convert -O vpc"), "{text}");
    }
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![7u8; 4096]).unwrap();
    let text = vhdcore::Disk::open(&raw).unwrap_err().to_string();
    assert!(text.contains("no known disk image signature"), "{text}");
}

#[test]
fn children_are_found_by_parent_uuid_and_a_restamped_parent_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let leaf = dir.path().join("leaf.vhd");
    let other = dir.path().join("other.vhd");
    vhdcore::create(&base, 4 << 20, DiskType::Dynamic, vhdcore::DEFAULT_BLOCK_SIZE).unwrap();
    vhdcore::snapshot(&base, &leaf).unwrap();
    vhdcore::create(&other, 4 << 20, DiskType::Dynamic, vhdcore::DEFAULT_BLOCK_SIZE).unwrap();
    let candidates = vec![base.clone(), leaf.clone(), other.clone(), dir.path().join("missing.vhd")];
    assert_eq!(vhdcore::children(&base, &candidates).unwrap(), vec![leaf.clone()]);
    assert!(vhdcore::children(&leaf, &candidates).unwrap().is_empty());
    assert!(vhdcore::check(&leaf, 30).is_empty());

    let before = vhdcore::Disk::open(&base).unwrap().footer.timestamp.get();
    let stamp = vhdcore::restamp(&base).unwrap();
    assert!(stamp > before);
    assert!(vhdcore::check(&base, 30).is_empty(), "the restamped layer itself stays valid");
    let problems = vhdcore::check(&leaf, 30);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].to_string().contains("changed after this child was made"), "{}", problems[0]);
}
