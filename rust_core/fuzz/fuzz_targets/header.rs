//! A valid dynamic-disk footer around fuzzed bytes, so the dynamic header, BAT and bitmaps are what get fuzzed.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "support.rs"]
mod support;

fn footer(disk_type: u32, size: u64) -> [u8; 512] {
    let mut f = [0u8; 512];
    f[..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[16..24].copy_from_slice(&512u64.to_be_bytes());
    f[28..32].copy_from_slice(b"fuzz");
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    f[60..64].copy_from_slice(&disk_type.to_be_bytes());
    let sum = f.iter().fold(0u32, |acc, b| acc.wrapping_add(u32::from(*b)));
    f[64..68].copy_from_slice(&(!sum).to_be_bytes());
    f
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let size = u64::from(u32::from_be_bytes([data[0], data[1], data[2], data[3]])) * 512;
    let disk_type = if data[4] & 1 == 0 { 3 } else { 4 };
    let body = &data[5..];
    let foot = footer(disk_type, size);
    let mut file = Vec::with_capacity(body.len() + 1024);
    file.extend_from_slice(&foot);
    file.extend_from_slice(body);
    file.extend_from_slice(&foot);
    let path = support::scratch().join("header.vhd");
    if std::fs::write(&path, &file).is_err() {
        return;
    }
    if let Ok(chain) = vhdcore::Chain::open(&path, 4) {
        support::exercise(&chain);
    }
    let _ = vhdcore::check(&path, 4);
});
