//! `ChunkFrame` and `ImageStats`: compressed chunks and whole images; the worker-side functions
//! (`compress_fetched_chunk`, `compress_head`, `head_region`).

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;

use super::plan::ImagePlan;
use crate::errors::OrRaise;

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
pub(crate) struct ChunkFrame {
    pub(crate) index: Option<usize>,
    pub(crate) frame: Py<PyBytes>,
    pub(crate) logical_bytes: u64,
    pub(crate) sha256: Option<String>,
    pub(crate) content_sha256: Option<String>,
    pub(crate) crc32c: u32,
    pub(crate) stored_blocks: Vec<u64>,
    pub(crate) virtual_bytes: u64,
    pub(crate) read_bytes: u64,
    pub(crate) compressed_bytes: u64,
    pub(crate) object_offset: Option<u64>,
}

impl ChunkFrame {
    pub(crate) fn from_core(py: Python<'_>, f: vhdcore::ChunkFrame) -> ChunkFrame {
        ChunkFrame {
            index: (f.index != usize::MAX).then_some(f.index),
            frame: PyBytes::new(py, &f.frame).unbind(),
            logical_bytes: f.logical_bytes,
            sha256: f.sha256,
            content_sha256: f.content_sha256,
            crc32c: f.crc32c,
            stored_blocks: f.stored_blocks,
            virtual_bytes: f.virtual_bytes,
            read_bytes: f.read_bytes,
            compressed_bytes: f.compressed_bytes,
            object_offset: f.object_offset,
        }
    }
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
pub(crate) struct ImageStats {
    pub(crate) level: i32,
    pub(crate) virtual_size: u64,
    pub(crate) image_bytes: u64,
    pub(crate) compressed_bytes: u64,
    pub(crate) data_bytes: u64,
    pub(crate) read_bytes: u64,
    pub(crate) head: Py<ChunkFrame>,
    pub(crate) chunks: Vec<Py<ChunkFrame>>,
    pub(crate) seconds: f64,
}

impl ImageStats {
    pub(crate) fn from_core(py: Python<'_>, s: vhdcore::ImageStats) -> PyResult<ImageStats> {
        let wrap = |f: vhdcore::ChunkFrame| Py::new(py, ChunkFrame::from_core(py, f));
        Ok(ImageStats {
            level: s.level,
            virtual_size: s.virtual_size,
            image_bytes: s.image_bytes,
            compressed_bytes: s.compressed_bytes,
            data_bytes: s.data_bytes,
            read_bytes: s.read_bytes,
            head: wrap(s.head)?,
            chunks: s.chunks.into_iter().map(wrap).collect::<PyResult<_>>()?,
            seconds: s.seconds,
        })
    }
}

/// A worker's job: the plan, the chunk's index and the bytes of its reads (in the plan's order) in; the frame out.
#[pyfunction]
#[pyo3(
    signature = (plan, index, reads, level = vhdcore::DEFAULT_LEVEL, digest = "image"),
    text_signature = "(plan, index, reads, level=3, digest='image')"
)]
pub(crate) fn compress_fetched_chunk(
    py: Python<'_>,
    plan: &ImagePlan,
    index: usize,
    reads: Vec<PyBackedBytes>,
    level: i32,
    digest: &str,
) -> PyResult<ChunkFrame> {
    let digest = chunk_digest(digest).or_raise()?;
    let image_plan = Arc::clone(&plan.inner);
    // Taken as bytes buffers (one memcpy each): extracting `Vec<u8>` would convert element by element, ~20 ns a
    // byte under the GIL, slower than the compression itself.
    let reads: Vec<Vec<u8>> = reads.iter().map(|read| read.to_vec()).collect();
    let frame =
        py.allow_threads(|| vhdcore::compress_fetched_chunk(&image_plan, index, &reads, level, digest)).or_raise()?;
    Ok(ChunkFrame::from_core(py, frame))
}

/// The digest a compressed chunk carries, by its Python name.
pub(crate) fn chunk_digest(name: &str) -> vhdcore::Result<vhdcore::ChunkDigest> {
    match name {
        "image" => Ok(vhdcore::ChunkDigest::Image),
        "content" => Ok(vhdcore::ChunkDigest::Content),
        other => Err(vhdcore::VhdError::invalid_argument(
            None,
            format!("digest must be 'image' (of the frame's bytes) or 'content' (of the disk's), not {other:?}"),
        )),
    }
}

/// The head frame (footer copy, header, BAT) once every chunk is done: `(stored_blocks, logical_bytes)` per chunk.
#[pyfunction]
#[pyo3(signature = (plan, chunks, level = vhdcore::DEFAULT_LEVEL), text_signature = "(plan, chunks, level=3)")]
pub(crate) fn compress_head(
    py: Python<'_>,
    plan: &ImagePlan,
    chunks: Vec<(Vec<u64>, u64)>,
    level: i32,
) -> PyResult<ChunkFrame> {
    let image_plan = Arc::clone(&plan.inner);
    let frame = py.allow_threads(|| vhdcore::compress_head(&image_plan, &chunks, level)).or_raise()?;
    Ok(ChunkFrame::from_core(py, frame))
}

/// The first `room` bytes of an image: its head frame, then the skippable frame that fills the rest of the room
/// (its payload, never written, reads as the file's zeros).
#[pyfunction]
pub(crate) fn head_region(py: Python<'_>, head_frame: &[u8], room: u64) -> PyResult<Py<PyBytes>> {
    let bytes = vhdcore::head_and_gap(head_frame, room).or_raise()?;
    Ok(PyBytes::new(py, &bytes).unbind())
}
