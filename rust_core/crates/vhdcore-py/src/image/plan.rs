//! `ImagePlan`, `ChunkPlan`, `SourceRead`: what each chunk of an image reads, computed from metadata alone.

use std::sync::Arc;

use pyo3::prelude::*;

use crate::errors::OrRaise;

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
pub(crate) struct SourceRead {
    pub(crate) layer: usize,
    pub(crate) file_offset: u64,
    pub(crate) length: u64,
    pub(crate) first_block: u64,
    pub(crate) blocks: u64,
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
pub(crate) struct ChunkPlan {
    pub(crate) index: usize,
    pub(crate) start: u64,
    pub(crate) length: u64,
    pub(crate) reads: Vec<Py<SourceRead>>,
    pub(crate) unallocated: Vec<(u64, u64)>,
    pub(crate) read_bytes: u64,
    /// Ranges a filesystem proves free (a live-data plan): stored as zeros, wholly free blocks never read.
    pub(crate) free: Vec<(u64, u64)>,
}

#[pyclass(frozen, module = "vhdcore._vhdcore")]
pub(crate) struct ImagePlan {
    pub(crate) inner: Arc<vhdcore::ImagePlan>,
}

#[pymethods]
impl ImagePlan {
    #[getter]
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size
    }

    #[getter]
    fn chunk_size(&self) -> u64 {
        self.inner.chunk_size
    }

    /// The layers' paths, leaf first, as the plan's reads number them.
    #[getter]
    fn layer_paths(&self) -> Vec<String> {
        self.inner.layers.iter().map(|l| l.path.clone()).collect()
    }

    #[getter]
    fn chunks(&self, py: Python<'_>) -> PyResult<Vec<ChunkPlan>> {
        self.inner
            .chunks
            .iter()
            .map(|c| {
                let reads = c
                    .reads
                    .iter()
                    .map(|r| {
                        let read = SourceRead {
                            layer: r.layer,
                            file_offset: r.file_offset,
                            length: r.length,
                            first_block: r.first_block,
                            blocks: r.blocks,
                        };
                        Py::new(py, read)
                    })
                    .collect::<PyResult<_>>()?;
                Ok(ChunkPlan {
                    index: c.index,
                    start: c.start,
                    length: c.length,
                    reads,
                    unallocated: c.unallocated.clone(),
                    read_bytes: c.read_bytes(),
                    free: c.free.clone(),
                })
            })
            .collect()
    }

    /// Bytes kept at the start of the image for its head frame, compressed last, and the skippable frame
    /// closing the room (the first chunk's frame starts here).
    #[getter]
    fn head_room(&self) -> PyResult<u64> {
        vhdcore::head_room(&self.inner).or_raise()
    }

    /// Bytes the plan stores as zeros because a filesystem proves them free (0 for a plan of every block).
    #[getter]
    fn free_bytes(&self) -> u64 {
        self.inner.chunks.iter().map(|c| c.free_bytes()).fold(0u64, u64::saturating_add)
    }

    fn to_json(&self) -> String {
        self.inner.to_json()
    }

    #[staticmethod]
    fn from_json(text: &str) -> PyResult<ImagePlan> {
        let plan = vhdcore::ImagePlan::from_json(text).or_raise()?;
        Ok(ImagePlan { inner: Arc::new(plan) })
    }

    fn __len__(&self) -> usize {
        self.inner.chunks.len()
    }
}
