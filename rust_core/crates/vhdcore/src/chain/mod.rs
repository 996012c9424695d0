//! A chain of VHD layers resolved from its leaf: parents found through the header's locators and parent name,
//! confirmed by UUID, with a depth cap and cycle detection. Layers are files, or names in a [`LayerStore`].

pub(crate) mod check;
pub(crate) mod diff;
pub(crate) mod map;
pub(crate) mod pending;
pub(crate) mod resolve;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::disk::{Disk, Validator};
use crate::error::{Result, VhdError};
use crate::format::uuid_string;
use crate::source::{normalize_name, LayerStore};
use pending::canonical;

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

/// Where a chain's parents are looked for: files beside the child, or names in a store.
trait ParentLookup {
    /// The places a child's header hint may point to, in the order to try them.
    fn candidates(&self, child: &Path, hint: &str) -> Vec<PathBuf>;
    /// What identifies a candidate for cycle detection.
    fn identity(&self, candidate: &Path) -> PathBuf;
    fn exists(&self, candidate: &Path) -> Result<bool>;
    /// The disk at `candidate`, or None when there is nothing there.
    fn open(&self, candidate: &Path, v: &mut Validator) -> Result<Option<Disk>>;
}

struct FileLookup;

impl ParentLookup for FileLookup {
    fn candidates(&self, child: &Path, hint: &str) -> Vec<PathBuf> {
        candidate_paths(child, hint)
    }

    fn identity(&self, candidate: &Path) -> PathBuf {
        canonical(candidate)
    }

    fn exists(&self, candidate: &Path) -> Result<bool> {
        Ok(candidate.is_file())
    }

    fn open(&self, candidate: &Path, v: &mut Validator) -> Result<Option<Disk>> {
        Disk::open_validated(candidate, v, false).map(Some)
    }
}

struct StoreLookup<'a>(&'a dyn LayerStore);

impl ParentLookup for StoreLookup<'_> {
    /// As for files, relative to the child's name; a name that would leave the store (absolute, or climbing above
    /// its root) is only tried by its last segment beside the child.
    fn candidates(&self, child: &Path, hint: &str) -> Vec<PathBuf> {
        candidate_paths(child, hint)
            .into_iter()
            .filter_map(|candidate| normalize_name(candidate.to_str()?).map(PathBuf::from))
            .collect()
    }

    fn identity(&self, candidate: &Path) -> PathBuf {
        candidate.to_path_buf()
    }

    fn exists(&self, candidate: &Path) -> Result<bool> {
        Ok(self.source(candidate)?.is_some())
    }

    fn open(&self, candidate: &Path, v: &mut Validator) -> Result<Option<Disk>> {
        match self.source(candidate)? {
            Some(source) => Disk::from_source_validated(candidate, source, v).map(Some),
            None => Ok(None),
        }
    }
}

impl StoreLookup<'_> {
    fn source(&self, name: &Path) -> Result<Option<std::sync::Arc<dyn crate::source::ReadAt>>> {
        self.0.open(name.to_str().unwrap_or_default()).map_err(|e| VhdError::io(name, "open", e))
    }
}

fn pending_at(dir: PathBuf) -> Option<PathBuf> {
    pending::pending(&dir).then(|| pending::journal_path(&dir))
}

impl Chain {
    /// Opens the chain of `leaf`. A coalesce journal beside it (a merge interrupted or under way) adds a warning
    /// when the chain reads consistently, and turns a failure to open into [`VhdError::CoalescePending`].
    pub fn open(leaf: &Path, max_depth: usize) -> Result<Chain> {
        match Chain::open_unchecked(leaf, max_depth) {
            Ok(mut chain) => {
                if let Some(journal) = pending::journal_dirs_of(leaf, Some(&chain)).into_iter().find_map(pending_at) {
                    chain.warnings.push(format!(
                        "a coalesce of this chain is pending (journal {}); its content reads the same, and \
                         `imaging vhd coalesce` finishes it",
                        journal.display()
                    ));
                }
                Ok(chain)
            }
            Err(cause) => match pending::journal_dirs_of(leaf, None).into_iter().find_map(pending_at) {
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
        Chain::resolve(first, &FileLookup, max_depth, v)
    }

    /// Opens the chain whose leaf is called `leaf` in `store`: parents are looked up there, by the names the
    /// child's locators give relative to the child's name, and confirmed by UUID, as for files.
    pub fn open_in(store: &dyn LayerStore, leaf: &str, max_depth: usize) -> Result<Chain> {
        let name = normalize_name(leaf).ok_or_else(|| {
            VhdError::invalid_argument(None, format!("{leaf:?} is not a layer name (relative, inside the store)"))
        })?;
        let lookup = StoreLookup(store);
        let v = &mut Validator::fail_fast();
        let first = lookup.open(Path::new(&name), v)?.ok_or_else(|| {
            VhdError::io(Path::new(&name), "open", std::io::Error::from(std::io::ErrorKind::NotFound))
        })?;
        Chain::resolve(first, &lookup, max_depth, v)
    }

    /// Opens the chain made of exactly the layers called `names` in `store`, leaf first (a chain record kept by the
    /// caller, e.g. after a merge gave a layer a new name): each child's parent UUID must be the next layer's, and
    /// the last layer must have no parent.
    pub fn open_listed(store: &dyn LayerStore, names: &[String], max_depth: usize) -> Result<Chain> {
        let first = names.first().ok_or_else(|| VhdError::invalid_argument(None, "a chain has at least its leaf"))?;
        let leaf = PathBuf::from(first);
        if names.len() > max_depth {
            return Err(VhdError::ChainTooDeep { path: leaf, max_depth });
        }
        let lookup = StoreLookup(store);
        let v = &mut Validator::fail_fast();
        let mut layers: Vec<Disk> = Vec::with_capacity(names.len());
        let mut warnings = Vec::new();
        for name in names {
            let normalized = normalize_name(name).filter(|n| n == name).ok_or_else(|| {
                VhdError::invalid_argument(None, format!("{name:?} is not a layer name (relative, inside the store)"))
            })?;
            let path = PathBuf::from(normalized);
            let opened = lookup.open(&path, v)?;
            let Some(child) = layers.last() else {
                let disk = opened
                    .ok_or_else(|| VhdError::io(&path, "open", std::io::Error::from(std::io::ErrorKind::NotFound)))?;
                layers.push(disk);
                continue;
            };
            let header_offset = child.sparse.as_ref().map_or(0, |s| s.header_offset);
            let Some(parent_uuid) = child.parent_uuid() else {
                return Err(VhdError::invalid_argument(
                    Some(&child.path),
                    format!("{} has no parent, but the chain lists {} after it", child.path.display(), path.display()),
                ));
            };
            if layers.iter().any(|layer| layer.path == path) {
                return Err(VhdError::ChainCycle {
                    path: child.path.clone(),
                    offset: header_offset + 40,
                    parent: path,
                });
            }
            let Some(parent) = opened else {
                return Err(VhdError::MissingParent {
                    path: child.path.clone(),
                    offset: header_offset + 576,
                    parent_name: child.parent_name().unwrap_or_default(),
                    parent_uuid: uuid_string(&parent_uuid),
                    tried: vec![path],
                });
            };
            if parent.uuid() != parent_uuid {
                return Err(VhdError::ParentMismatch {
                    path: child.path.clone(),
                    offset: header_offset + 40,
                    parent: path,
                    expected: uuid_string(&parent_uuid),
                    found: uuid_string(&parent.uuid()),
                });
            }
            warnings.extend(timestamp_warning(child, &parent));
            layers.push(parent);
        }
        if let Some(last) = layers.last().filter(|l| l.parent_uuid().is_some()) {
            let header_offset = last.sparse.as_ref().map_or(0, |s| s.header_offset);
            return Err(VhdError::MissingParent {
                path: last.path.clone(),
                offset: header_offset + 576,
                parent_name: last.parent_name().unwrap_or_default(),
                parent_uuid: last.parent_uuid().map(|u| uuid_string(&u)).unwrap_or_default(),
                tried: Vec::new(),
            });
        }
        Ok(Chain { layers, warnings })
    }

    /// Follows `first`'s parents through `lookup` until a layer without a parent.
    fn resolve(first: Disk, lookup: &dyn ParentLookup, max_depth: usize, v: &mut Validator) -> Result<Chain> {
        let leaf = first.path.clone();
        let mut seen: HashSet<PathBuf> = HashSet::from([lookup.identity(&leaf)]);
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
            let parent = find_parent(child, parent_uuid, lookup, &mut seen, v)?;
            warnings.extend(timestamp_warning(child, &parent));
            layers.push(parent);
        }
        Ok(Chain { layers, warnings })
    }

    pub fn leaf(&self) -> &Disk {
        &self.layers[0]
    }
}

/// Real chains carry zero or stale parent timestamps: the UUID decides, the timestamp only warns.
fn timestamp_warning(child: &Disk, parent: &Disk) -> Option<String> {
    let expected_ts = child.parent_timestamp().unwrap_or(0);
    let actual_ts = parent.footer.timestamp.get();
    if expected_ts == 0 {
        Some(format!(
            "{}: zero parent timestamp; parent {} matched by uuid",
            child.path.display(),
            parent.path.display()
        ))
    } else if expected_ts != actual_ts {
        Some(format!(
            "{}: stale parent timestamp {} (parent {} has {}); parent matched by uuid",
            child.path.display(),
            expected_ts,
            parent.path.display(),
            actual_ts
        ))
    } else {
        None
    }
}

fn find_parent(
    child: &Disk,
    parent_uuid: [u8; 16],
    lookup: &dyn ParentLookup,
    seen: &mut HashSet<PathBuf>,
    v: &mut Validator,
) -> Result<Disk> {
    let hints = child.parent_path_hints()?;
    let header_offset = child.sparse.as_ref().map_or(0, |s| s.header_offset);
    let uuid_offset = header_offset + 40;
    let mut tried: Vec<PathBuf> = Vec::new();
    let mut mismatch: Option<(PathBuf, [u8; 16])> = None;
    for hint in &hints {
        for candidate in lookup.candidates(&child.path, hint) {
            if tried.contains(&candidate) {
                continue;
            }
            tried.push(candidate.clone());
            if !lookup.exists(&candidate)? {
                continue;
            }
            let identity = lookup.identity(&candidate);
            if seen.contains(&identity) {
                return Err(VhdError::ChainCycle { path: child.path.clone(), offset: uuid_offset, parent: candidate });
            }
            let Some(parent) = lookup.open(&candidate, v)? else {
                continue;
            };
            if parent.uuid() != parent_uuid {
                mismatch.get_or_insert((candidate, parent.uuid()));
                continue;
            }
            seen.insert(identity);
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
