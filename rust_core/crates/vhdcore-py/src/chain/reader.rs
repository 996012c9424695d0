//! Chains read through a Python object (an object store read by ranges): `open_chain_from`.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;

use super::{wrap_chain, Chain};
use crate::errors::{InvalidArgumentError, OrRaise};

/// Layers read through a Python object with `size(name) -> int | None` (None: no such layer) and
/// `read(name, offset, length) -> bytes`; the GIL is taken only around those calls.
pub(crate) struct PyLayerStore {
    pub(crate) reader: Arc<Py<PyAny>>,
}

/// One layer of a [`PyLayerStore`].
pub(crate) struct PyLayer {
    pub(crate) reader: Arc<Py<PyAny>>,
    pub(crate) name: String,
    pub(crate) size: u64,
}

impl std::fmt::Debug for PyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyLayer").field("name", &self.name).field("size", &self.size).finish()
    }
}

/// A Python exception from the reader, as the I/O error vhdcore reports with the layer's name and offset.
pub(crate) fn reader_error(call: &str, err: &PyErr) -> std::io::Error {
    std::io::Error::other(format!("{call} raised {err}"))
}

impl vhdcore::ReadAt for PyLayer {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        Python::with_gil(|py| {
            let data = self
                .reader
                .call_method1(py, "read", (&self.name, offset, buf.len()))
                .and_then(|out| out.extract::<PyBackedBytes>(py))
                .map_err(|e| reader_error("read", &e))?;
            if data.len() != buf.len() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("read returned {} of {} bytes", data.len(), buf.len()),
                ));
            }
            buf.copy_from_slice(&data);
            Ok(())
        })
    }

    fn size(&self) -> std::io::Result<u64> {
        Ok(self.size)
    }
}

impl vhdcore::LayerStore for PyLayerStore {
    fn open(&self, name: &str) -> std::io::Result<Option<Arc<dyn vhdcore::ReadAt>>> {
        let size = Python::with_gil(|py| {
            self.reader
                .call_method1(py, "size", (name,))
                .and_then(|out| out.extract::<Option<u64>>(py))
                .map_err(|e| reader_error("size", &e))
        })?;
        Ok(size.map(|size| {
            Arc::new(PyLayer { reader: Arc::clone(&self.reader), name: name.to_string(), size })
                as Arc<dyn vhdcore::ReadAt>
        }))
    }
}

/// Opens the chain whose leaf is called `leaf` in `reader` (see PyLayerStore): an object store read by ranges.
/// Parents are found by the names the locators give, or, with `layers` (leaf first), are exactly those.
#[pyfunction]
#[pyo3(
    signature = (reader, leaf, max_depth = vhdcore::MAX_CHAIN_DEPTH, layers = None),
    text_signature = "(reader, leaf, max_depth=30, layers=None)"
)]
pub(crate) fn open_chain_from(
    py: Python<'_>,
    reader: PyObject,
    leaf: &str,
    max_depth: usize,
    layers: Option<Vec<String>>,
) -> PyResult<Chain> {
    let store = PyLayerStore { reader: Arc::new(reader) };
    if let Some(first) = layers.as_ref().and_then(|l| l.first()).filter(|first| first.as_str() != leaf) {
        return Err(InvalidArgumentError::new_err(format!("layers start with {first:?}, not the leaf {leaf:?}")));
    }
    let chain = py
        .allow_threads(|| match &layers {
            Some(names) => vhdcore::Chain::open_listed(&store, names, max_depth),
            None => vhdcore::Chain::open_in(&store, leaf, max_depth),
        })
        .or_raise()?;
    Ok(wrap_chain(chain))
}
