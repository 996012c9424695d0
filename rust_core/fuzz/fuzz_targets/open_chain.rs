//! Up to four files from one input (split at a marker): a leaf and the parents its locators may name.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "support.rs"]
mod support;

const MARKER: &[u8] = b"--next-layer--";
const NAMES: [&str; 4] = ["leaf.vhd", "layer1.vhd", "layer2.vhd", "layer3.vhd"];

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() < NAMES.len() - 1 {
        match rest.windows(MARKER.len()).position(|w| w == MARKER) {
            Some(at) => {
                parts.push(&rest[..at]);
                rest = &rest[at + MARKER.len()..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts
}

fuzz_target!(|data: &[u8]| {
    let dir = support::scratch();
    for name in NAMES {
        let _ = std::fs::remove_file(dir.join(name));
    }
    for (name, part) in NAMES.iter().zip(split(data)) {
        if std::fs::write(dir.join(name), part).is_err() {
            return;
        }
    }
    let leaf = dir.join(NAMES[0]);
    if let Ok(chain) = vhdcore::Chain::open(&leaf, 8) {
        support::exercise(&chain);
    }
    let _ = vhdcore::check(&leaf, 8);
});
