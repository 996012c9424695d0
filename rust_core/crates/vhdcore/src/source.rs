//! Where a layer's bytes come from: a local file, or a reader the caller supplies (an object store read by ranges,
//! memory in tests). Parsing, planning, mapping and reading a chain go through [`ReadAt`]; writing and coalescing
//! still need a local file.

use std::collections::HashMap;
use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Random-access reads of one layer's bytes.
pub trait ReadAt: Debug + Send + Sync {
    /// Fills `buf` with the bytes at `offset`; an error (`UnexpectedEof`) when the layer ends before.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// The layer's size in bytes.
    fn size(&self) -> io::Result<u64>;

    /// The local file behind the reader, if there is one: for writing, and for hints to the kernel (prefetch).
    fn file(&self) -> Option<&File> {
        None
    }
}

impl ReadAt for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn file(&self) -> Option<&File> {
        Some(self)
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).ok();
        let slice = start.and_then(|s| self.get(s..s.checked_add(buf.len())?)).ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, format!("{} bytes at {offset} are past the end", buf.len()))
        })?;
        buf.copy_from_slice(slice);
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        u64::try_from(self.len()).map_err(io::Error::other)
    }
}

/// Layers found by name, for chains that do not live in a file system (an object store's keys). A child names its
/// parent relative to its own name, as locators do with paths: `sr/a/leaf.vhd` + `./base.vhd` = `sr/a/base.vhd`.
pub trait LayerStore: Send + Sync {
    /// The layer called `name`, or None when there is no such layer.
    fn open(&self, name: &str) -> io::Result<Option<Arc<dyn ReadAt>>>;
}

/// Layers held in memory, by name.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    layers: HashMap<String, Arc<Vec<u8>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, bytes: Vec<u8>) {
        self.layers.insert(name.into(), Arc::new(bytes));
    }
}

impl LayerStore for MemoryStore {
    fn open(&self, name: &str) -> io::Result<Option<Arc<dyn ReadAt>>> {
        Ok(self.layers.get(name).map(|bytes| Arc::clone(bytes) as Arc<dyn ReadAt>))
    }
}

/// `name` with `.` and `..` segments resolved, or None when it climbs above the store's root or is absolute.
pub(crate) fn normalize_name(name: &str) -> Option<String> {
    if name.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for segment in name.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            other => parts.push(other),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_resolved_within_the_store() {
        assert_eq!(normalize_name("sr/a/./base.vhd").as_deref(), Some("sr/a/base.vhd"));
        assert_eq!(normalize_name("sr/a/../b/base.vhd").as_deref(), Some("sr/b/base.vhd"));
        assert_eq!(normalize_name("sr/../../etc/passwd"), None);
        assert_eq!(normalize_name("/etc/passwd"), None);
    }

    #[test]
    fn memory_reads_past_the_end_fail() {
        let bytes = vec![1u8, 2, 3];
        let mut buf = [0u8; 2];
        assert!(ReadAt::read_at(&bytes, &mut buf, 1).is_ok());
        assert_eq!(buf, [2, 3]);
        let err = ReadAt::read_at(&bytes, &mut buf, 2).err().map(|e| e.kind());
        assert_eq!(err, Some(io::ErrorKind::UnexpectedEof));
    }
}
