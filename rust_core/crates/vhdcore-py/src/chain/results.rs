//! What `Chain`'s methods return: extents of the map, export statistics, merge layouts.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::InvalidArgumentError;

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
pub(crate) struct Extent {
    pub(crate) start: u64,
    pub(crate) length: u64,
    pub(crate) layer: Option<usize>,
}

#[pymethods]
impl Extent {
    fn __repr__(&self) -> String {
        match self.layer {
            Some(layer) => format!("Extent(start={}, length={}, layer={layer})", self.start, self.length),
            None => format!("Extent(start={}, length={}, layer=None)", self.start, self.length),
        }
    }
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
pub(crate) struct ExportStats {
    pub(crate) format: String,
    pub(crate) virtual_size: u64,
    pub(crate) bytes_written: u64,
    pub(crate) data_bytes: u64,
    pub(crate) zero_bytes: u64,
    pub(crate) seconds: f64,
}

/// Layer `layer` of `chain` (not the leaf) and its parent.
pub(crate) fn merge_pair(chain: &vhdcore::Chain, layer: usize) -> PyResult<(&vhdcore::Disk, &vhdcore::Disk)> {
    match (chain.layers.get(layer), chain.layers.get(layer + 1)) {
        (Some(child), Some(parent)) if layer > 0 => Ok((parent, child)),
        _ => Err(InvalidArgumentError::new_err(format!(
            "layer {layer} is not a read-only layer with a parent (the chain has {} layers; 0 is the leaf)",
            chain.layers.len()
        ))),
    }
}

/// One segment of a MergeLayout: `(kind, offset, length, block index, bytes)`.
pub(crate) type MergeSegmentTuple = (&'static str, u64, u64, Option<u64>, Option<Py<PyBytes>>);

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
pub(crate) struct MergeLayout {
    pub(crate) size: u64,
    pub(crate) uuid: String,
    pub(crate) added_bytes: u64,
    pub(crate) merged_bytes: u64,
    /// `(kind, offset, length, block index, bytes)`: kind `copy` (the parent's bytes at that offset), `block`
    /// (Chain.merged_block) or `bytes` (given).
    pub(crate) segments: Vec<MergeSegmentTuple>,
}
