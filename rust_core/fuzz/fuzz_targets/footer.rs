//! Arbitrary bytes as a whole VHD file: footer, header, BAT and blocks all come from the fuzzer.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "support.rs"]
mod support;

fuzz_target!(|data: &[u8]| {
    let path = support::scratch().join("disk.vhd");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(chain) = vhdcore::Chain::open(&path, 4) {
        support::exercise(&chain);
    }
    let _ = vhdcore::check(&path, 4);
});
