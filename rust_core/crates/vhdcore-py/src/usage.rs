//! `DiskUsage` and `Partition`: which byte ranges of a flattened disk its filesystems prove free, from
//! `Chain.usage()`; handed to `Chain.plan`, `Chain.compress` and `Chain.estimate` as `usage=` for a live-data image.

use std::sync::Arc;

use pyo3::prelude::*;
use vhdcore::fs::Decision;

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
pub(crate) struct Partition {
    /// MBR: 1-4 primary, 5.. logical; GPT: entry number from 1; 0 for a whole disk without a table.
    pub(crate) index: u32,
    pub(crate) start: u64,
    pub(crate) length: u64,
    /// The table's type (`mbr:0x83`, a GPT type GUID), empty without a table.
    pub(crate) type_id: String,
    pub(crate) filesystem: String,
    /// `dropped` (its free bytes are left out) or `keep_whole` (for `reason`).
    pub(crate) decision: String,
    pub(crate) reason: Option<String>,
    pub(crate) used_bytes: u64,
    pub(crate) free_bytes: u64,
}

#[pymethods]
impl Partition {
    fn __repr__(&self) -> String {
        format!(
            "Partition(index={}, start={}, length={}, filesystem={:?}, decision={:?}, free_bytes={})",
            self.index, self.start, self.length, self.filesystem, self.decision, self.free_bytes
        )
    }
}

#[pyclass(frozen, module = "vhdcore._vhdcore")]
pub(crate) struct DiskUsage {
    pub(crate) inner: Arc<vhdcore::fs::DiskUsage>,
}

#[pymethods]
impl DiskUsage {
    #[getter]
    fn size(&self) -> u64 {
        self.inner.size
    }

    /// `none`, `mbr` or `gpt`.
    #[getter]
    fn table(&self) -> &'static str {
        match self.inner.table {
            vhdcore::fs::TableKind::None => "none",
            vhdcore::fs::TableKind::Mbr => "mbr",
            vhdcore::fs::TableKind::Gpt => "gpt",
        }
    }

    #[getter]
    fn partitions(&self) -> Vec<Partition> {
        self.inner
            .partitions
            .iter()
            .map(|p| {
                let (decision, reason, free_bytes) = match &p.decision {
                    Decision::Dropped { free_bytes } => ("dropped", None, *free_bytes),
                    Decision::KeepWhole { reason } => ("keep_whole", Some(reason.clone()), 0),
                };
                Partition {
                    index: p.index,
                    start: p.start,
                    length: p.length,
                    type_id: p.type_id.clone(),
                    filesystem: p.filesystem.as_str().to_string(),
                    decision: decision.to_string(),
                    reason,
                    used_bytes: p.used_bytes,
                    free_bytes,
                }
            })
            .collect()
    }

    /// The free byte ranges `(start, length)`: sorted, merged, 512-byte aligned.
    #[getter]
    fn free(&self) -> Vec<(u64, u64)> {
        self.inner.free.clone()
    }

    #[getter]
    fn free_bytes(&self) -> u64 {
        self.inner.free_bytes()
    }

    #[getter]
    fn warnings(&self) -> Vec<String> {
        self.inner.warnings.clone()
    }

    /// Whether the whole range `[start, start + length)` is free.
    fn is_free(&self, start: u64, length: u64) -> bool {
        self.inner.is_free(start, length)
    }

    /// The free bytes of `[start, start + length)`.
    fn free_within(&self, start: u64, length: u64) -> u64 {
        self.inner.free_within(start, length)
    }

    /// Per block of `block_size` bytes, whether it is wholly free.
    fn free_blocks(&self, block_size: u64) -> Vec<bool> {
        self.inner.free_blocks(block_size)
    }

    fn to_json(&self) -> String {
        self.inner.to_json()
    }

    fn __repr__(&self) -> String {
        format!(
            "DiskUsage(size={}, table={:?}, partitions={}, free_bytes={})",
            self.inner.size,
            self.table(),
            self.inner.partitions.len(),
            self.inner.free_bytes()
        )
    }
}
