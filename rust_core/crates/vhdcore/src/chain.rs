//! A chain of VHD layers resolved from its leaf: parents found through the header's locators and parent name,
//! confirmed by UUID, with a depth cap and cycle detection.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::disk::{Disk, Validator};
use crate::error::{Result, VhdError};
use crate::format::uuid_string;

/// xapi refuses chains deeper than this; so do we unless told otherwise.
pub const MAX_CHAIN_DEPTH: usize = 30;

#[derive(Debug)]
pub struct Chain {
    /// Leaf first, base last.
    pub layers: Vec<Disk>,
    pub warnings: Vec<String>,
}

/// Where a hint from a child's header may point, relative to the child's folder.
fn candidate_paths(child: &Path, hint: &str) -> Vec<PathBuf> {
    let dir = child.parent().map(Path::to_path_buf).unwrap_or_default();
    let unified = hint.replace('\\', "/");
    let mut out = Vec::new();
    let is_windows_absolute = unified.len() >= 2 && unified.as_bytes()[1] == b':' || unified.starts_with("//");
    if unified.starts_with('/') && !unified.starts_with("//") {
        out.push(PathBuf::from(&unified));
    } else if !is_windows_absolute {
        let relative = unified.trim_start_matches("./");
        out.push(dir.join(relative));
    }
    // Absolute paths from another machine: the parent usually sits beside the child under the same name.
    if let Some(name) = unified.rsplit('/').next().filter(|n| !n.is_empty()) {
        out.push(dir.join(name));
    }
    out
}

fn pending_at(dir: PathBuf) -> Option<PathBuf> {
    crate::journal::pending(&dir).then(|| crate::journal::journal_path(&dir))
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

impl Chain {
    /// Opens the chain of `leaf`. A coalesce journal beside it (a merge interrupted or under way) adds a warning
    /// when the chain reads consistently, and turns a failure to open into [`VhdError::CoalescePending`].
    pub fn open(leaf: &Path, max_depth: usize) -> Result<Chain> {
        match Chain::open_unchecked(leaf, max_depth) {
            Ok(mut chain) => {
                if let Some(journal) =
                    crate::coalesce::journal_dirs_of(leaf, Some(&chain)).into_iter().find_map(pending_at)
                {
                    chain.warnings.push(format!(
                        "a coalesce of this chain is pending (journal {}); its content reads the same, and \
                         `imaging vhd coalesce` finishes it",
                        journal.display()
                    ));
                }
                Ok(chain)
            }
            Err(cause) => match crate::coalesce::journal_dirs_of(leaf, None).into_iter().find_map(pending_at) {
                Some(journal) => {
                    Err(VhdError::CoalescePending { path: leaf.to_path_buf(), journal, cause: cause.to_string() })
                }
                None => Err(cause),
            },
        }
    }

    /// Opens the chain of `leaf` without looking for a coalesce journal.
    pub fn open_unchecked(leaf: &Path, max_depth: usize) -> Result<Chain> {
        Chain::open_validated(leaf, max_depth, &mut Validator::fail_fast())
    }

    pub(crate) fn open_validated(leaf: &Path, max_depth: usize, v: &mut Validator) -> Result<Chain> {
        let first = Disk::open_validated(leaf, v, false)?;
        let mut seen: HashSet<PathBuf> = HashSet::from([canonical(leaf)]);
        let mut layers = vec![first];
        let mut warnings = Vec::new();
        loop {
            let child = layers.last().unwrap_or_else(|| unreachable!("the chain has its leaf"));
            let Some(parent_uuid) = child.parent_uuid() else {
                break;
            };
            if layers.len() >= max_depth {
                return Err(VhdError::ChainTooDeep { path: leaf.to_path_buf(), max_depth });
            }
            let parent = find_parent(child, parent_uuid, &mut seen, v)?;
            let expected_ts = child.parent_timestamp().unwrap_or(0);
            let actual_ts = parent.footer.timestamp.get();
            if expected_ts == 0 {
                warnings.push(format!(
                    "{}: zero parent timestamp; parent {} matched by uuid",
                    child.path.display(),
                    parent.path.display()
                ));
            } else if expected_ts != actual_ts {
                warnings.push(format!(
                    "{}: stale parent timestamp {} (parent {} has {}); parent matched by uuid",
                    child.path.display(),
                    expected_ts,
                    parent.path.display(),
                    actual_ts
                ));
            }
            layers.push(parent);
        }
        Ok(Chain { layers, warnings })
    }

    pub fn leaf(&self) -> &Disk {
        &self.layers[0]
    }
}

fn find_parent(child: &Disk, parent_uuid: [u8; 16], seen: &mut HashSet<PathBuf>, v: &mut Validator) -> Result<Disk> {
    let hints = child.parent_path_hints()?;
    let header_offset = child.sparse.as_ref().map_or(0, |s| s.header_offset);
    let uuid_offset = header_offset + 40;
    let mut tried: Vec<PathBuf> = Vec::new();
    let mut mismatch: Option<(PathBuf, [u8; 16])> = None;
    for hint in &hints {
        for candidate in candidate_paths(&child.path, hint) {
            if tried.contains(&candidate) {
                continue;
            }
            tried.push(candidate.clone());
            if !candidate.is_file() {
                continue;
            }
            let canon = canonical(&candidate);
            if seen.contains(&canon) {
                return Err(VhdError::ChainCycle { path: child.path.clone(), offset: uuid_offset, parent: candidate });
            }
            let parent = Disk::open_validated(&candidate, v, false)?;
            if parent.uuid() != parent_uuid {
                mismatch.get_or_insert((candidate, parent.uuid()));
                continue;
            }
            seen.insert(canon);
            return Ok(parent);
        }
    }
    if let Some((parent, found)) = mismatch {
        return Err(VhdError::ParentMismatch {
            path: child.path.clone(),
            offset: uuid_offset,
            parent,
            expected: uuid_string(&parent_uuid),
            found: uuid_string(&found),
        });
    }
    Err(VhdError::MissingParent {
        path: child.path.clone(),
        offset: header_offset + 576,
        parent_name: child.parent_name().unwrap_or_default(),
        parent_uuid: uuid_string(&parent_uuid),
        tried,
    })
}

#[cfg(test)]
mod tests {
    use super::candidate_paths;
    use std::path::{Path, PathBuf};

    #[test]
    fn relative_windows_locator_resolves_beside_child() {
        let got = candidate_paths(Path::new("/sr/a/child.vhd"), ".\\parent.vhd");
        assert_eq!(got[0], PathBuf::from("/sr/a/parent.vhd"));
    }

    #[test]
    fn absolute_windows_locator_falls_back_to_file_name() {
        let got = candidate_paths(Path::new("/sr/a/child.vhd"), "C:\\vms\\base.vhd");
        assert_eq!(got, vec![PathBuf::from("/sr/a/base.vhd")]);
    }
}
