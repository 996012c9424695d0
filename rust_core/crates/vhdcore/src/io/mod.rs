//! Output targets: where exported and compressed bytes go (a file staged and renamed into place, a file written in
//! place, a pipe or device written in order), and the all-zero test every writer uses to leave holes.

mod target;

pub(crate) use target::Target;

pub(crate) fn is_zero(buf: &[u8]) -> bool {
    // OR-folding fixed 64-byte chunks is what the compiler vectorizes best.
    let mut chunks = buf.chunks_exact(64);
    chunks.by_ref().all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0) && chunks.remainder().iter().all(|b| *b == 0)
}
