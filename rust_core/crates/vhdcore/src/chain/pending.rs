//! Where a coalesce journal of a chain lies (beside the leaf or any layer) and whether one is pending: what opening a
//! chain needs to know of coalesce, without depending on it.

use std::path::{Path, PathBuf};

use super::Chain;

/// The file name of a coalesce journal, in the folder of a layer it concerns.
pub const JOURNAL_NAME: &str = ".vhdcore-coalesce.journal";

/// The journal's path in `dir`.
pub fn journal_path(dir: &Path) -> PathBuf {
    dir.join(JOURNAL_NAME)
}

/// Whether a journal lies in `dir`.
pub fn pending(dir: &Path) -> bool {
    journal_path(dir).exists()
}

/// `path` resolved (symbolic links, `..`), or as given when it does not resolve (removed meanwhile).
pub(crate) fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

pub(crate) fn dir_of(path: &Path) -> PathBuf {
    path.parent().filter(|d| !d.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The directories whose journal concerns the chain of `leaf`, an already opened chain (or the leaf's directory
/// alone): the leaf's, then each layer's.
pub(crate) fn journal_dirs_of(leaf: &Path, chain: Option<&Chain>) -> Vec<PathBuf> {
    let mut dirs = vec![canonical(&dir_of(leaf))];
    if let Some(chain) = chain {
        for layer in &chain.layers {
            let dir = canonical(&dir_of(&layer.path));
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    dirs
}
