//! Shared by the fuzz targets: the fuzz input becomes files in a private scratch folder.

use std::path::PathBuf;

pub fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vhdcore-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Exercises everything a reader does with an opened chain, bounded in work.
pub fn exercise(chain: &vhdcore::Chain) {
    let _ = chain.map();
    let mut buf = vec![0u8; 64 * 1024];
    let len = usize::try_from(chain.virtual_size()).unwrap_or(usize::MAX).min(buf.len());
    let _ = chain.read_at(0, &mut buf[..len]);
}
