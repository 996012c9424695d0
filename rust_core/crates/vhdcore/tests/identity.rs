//! A disk given a new UUID (`set_uuid`): both footer copies carry it with a valid checksum, the content and every
//! other footer field stay, and a child made over the disk names the new UUID.

use vhdcore::{Chain, Disk, DiskType};

mod common;

use common::{BLOCK, SIZE};

fn footer_copies(path: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    (bytes[..512].to_vec(), bytes[bytes.len() - 512..].to_vec())
}

#[test]
fn set_uuid_rewrites_both_footers_and_keeps_the_content() {
    for (seed, disk_type) in [(31, DiskType::Dynamic), (32, DiskType::Fixed)] {
        let dir = tempfile::tempdir().unwrap();
        let (paths, model) = common::build_chain(dir.path(), 1, seed, disk_type, 8);
        let path = &paths[0];
        let before = Disk::open(path).unwrap();
        let (head_before, tail_before) = footer_copies(path);
        let uuid = *uuid::Uuid::new_v4().as_bytes();

        vhdcore::set_uuid(path, uuid).unwrap();

        let after = Disk::open(path).unwrap();
        assert_eq!(after.uuid(), uuid);
        assert_ne!(after.uuid(), before.uuid());
        assert_eq!(after.file_size, before.file_size);
        assert_eq!(after.footer.timestamp.get(), before.footer.timestamp.get());
        assert!(vhdcore::check(path, 1).is_empty(), "{disk_type:?}: check finds a problem");
        let (head, tail) = footer_copies(path);
        // Only the UUID (bytes 68..84) and the checksum (64..68) of the footer change.
        assert_eq!(tail_before[..64], tail[..64]);
        assert_eq!(tail_before[84..], tail[84..]);
        assert_eq!(tail[68..84], uuid);
        if disk_type == DiskType::Dynamic {
            assert_eq!(head, tail, "the copy at offset 0 is the footer");
        } else {
            assert_eq!(head, head_before, "a fixed disk's data is untouched");
        }
        let mut flat = vec![0u8; model.len()];
        Chain::open(path, 1).unwrap().read_at(0, &mut flat).unwrap();
        assert!(flat == model, "{disk_type:?}: content changed");

        let child = dir.path().join("child.vhd");
        vhdcore::snapshot(path, &child).unwrap();
        assert_eq!(Disk::open(&child).unwrap().parent_uuid(), Some(uuid));
        assert_eq!(Chain::open(&child, vhdcore::MAX_CHAIN_DEPTH).unwrap().layers.len(), 2);
    }
}

#[test]
fn set_uuid_refuses_the_nil_uuid_and_a_file_that_is_not_a_vhd() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    vhdcore::create(&path, SIZE, DiskType::Dynamic, BLOCK).unwrap();
    let before = std::fs::read(&path).unwrap();
    let err = vhdcore::set_uuid(&path, [0; 16]).unwrap_err();
    assert_eq!(err.kind(), vhdcore::ErrorKind::InvalidArgument, "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);

    let junk = dir.path().join("junk.vhd");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    assert!(vhdcore::set_uuid(&junk, [1; 16]).is_err());
    assert_eq!(std::fs::read(&junk).unwrap(), vec![7u8; 4096]);
}
