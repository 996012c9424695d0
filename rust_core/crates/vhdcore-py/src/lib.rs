//! Python bindings of vhdcore: thin wrappers, the GIL released around disk work, and the core's error kinds
//! mapped once, here, onto a Python exception hierarchy rooted at `VhdError`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict};

use vhdcore::{DiskType, ErrorKind, ExportFormat};

create_exception!(_vhdcore, VhdError, PyException, "Root of every error vhdcore raises.");
create_exception!(_vhdcore, VhdIoError, VhdError, "The disk could not be read or written.");
create_exception!(_vhdcore, VhdFormatError, VhdError, "A VHD structure is malformed.");
create_exception!(_vhdcore, ChecksumError, VhdFormatError, "A footer or header checksum does not match.");
create_exception!(_vhdcore, TruncatedError, VhdFormatError, "The file ends before a structure it must hold.");
create_exception!(_vhdcore, BatError, VhdFormatError, "A BAT entry points past the data or overlaps another.");
create_exception!(_vhdcore, UnsupportedError, VhdFormatError, "A valid but unsupported VHD feature.");
create_exception!(_vhdcore, ChainError, VhdError, "The chain of parents cannot be resolved.");
create_exception!(_vhdcore, MissingParentError, ChainError, "A differencing disk's parent is not found.");
create_exception!(_vhdcore, ParentMismatchError, ChainError, "The file found as parent has another UUID.");
create_exception!(_vhdcore, ChainCycleError, ChainError, "The chain loops back on itself.");
create_exception!(_vhdcore, ChainTooDeepError, ChainError, "The chain is deeper than the cap.");
create_exception!(_vhdcore, InvalidArgumentError, VhdError, "A request the disk cannot honour.");
create_exception!(
    _vhdcore,
    CoalescePendingError,
    ChainError,
    "A coalesce of the chain was interrupted and its journal is pending; run coalesce to finish it."
);

fn to_py_err(py: Python<'_>, err: vhdcore::VhdError) -> PyErr {
    let message = err.to_string();
    let py_err = match err.kind() {
        ErrorKind::Io => VhdIoError::new_err(message),
        ErrorKind::BadCookie | ErrorKind::InvalidField => VhdFormatError::new_err(message),
        ErrorKind::Checksum => ChecksumError::new_err(message),
        ErrorKind::Truncated => TruncatedError::new_err(message),
        ErrorKind::BatOutOfRange | ErrorKind::OverlappingBlocks => BatError::new_err(message),
        ErrorKind::Unsupported => UnsupportedError::new_err(message),
        ErrorKind::MissingParent => MissingParentError::new_err(message),
        ErrorKind::ParentMismatch => ParentMismatchError::new_err(message),
        ErrorKind::ChainCycle => ChainCycleError::new_err(message),
        ErrorKind::ChainTooDeep => ChainTooDeepError::new_err(message),
        ErrorKind::InvalidArgument => InvalidArgumentError::new_err(message),
        ErrorKind::CoalescePending => CoalescePendingError::new_err(message),
        ErrorKind::Interrupted => return pyo3::exceptions::PyKeyboardInterrupt::new_err("interrupted"),
    };
    let value = py_err.value(py);
    let attrs: [(&str, PyObject); 4] = [
        ("kind", err.kind().as_str().into_pyobject(py).map(|v| v.into_any().unbind()).unwrap_or_else(|_| py.None())),
        (
            "path",
            err.path()
                .map(|p| p.display().to_string())
                .into_pyobject(py)
                .map(|v| v.unbind())
                .unwrap_or_else(|_| py.None()),
        ),
        ("field", err.field().into_pyobject(py).map(|v| v.unbind()).unwrap_or_else(|_| py.None())),
        ("offset", err.offset().into_pyobject(py).map(|v| v.unbind()).unwrap_or_else(|_| py.None())),
    ];
    for (name, attr) in attrs {
        // Setting attributes on a fresh exception instance cannot fail in practice; keep the error if it does.
        let _ = value.setattr(name, attr);
    }
    py_err
}

trait IntoPy<T> {
    fn or_raise(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPy<T> for vhdcore::Result<T> {
    fn or_raise(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py_err(py, e))
    }
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
#[derive(Clone)]
struct Layer {
    path: String,
    disk_type: String,
    virtual_size: u64,
    file_size: u64,
    block_size: Option<u32>,
    max_table_entries: u32,
    allocated_blocks: u32,
    uuid: String,
    timestamp: u32,
    creator_app: String,
    legacy_footer: bool,
    parent_uuid: Option<String>,
    parent_name: Option<String>,
    parent_timestamp: Option<u32>,
}

impl Layer {
    fn from_disk(disk: &vhdcore::Disk) -> Layer {
        Layer {
            path: disk.path.display().to_string(),
            disk_type: disk.disk_type.as_str().to_string(),
            virtual_size: disk.virtual_size,
            file_size: disk.file_size,
            block_size: disk.block_size(),
            max_table_entries: disk.sparse.as_ref().map_or(0, |s| s.header.max_table_entries.get()),
            allocated_blocks: disk.allocated_blocks(),
            uuid: disk.uuid_string(),
            timestamp: disk.footer.timestamp.get(),
            creator_app: String::from_utf8_lossy(&disk.footer.creator_app).trim_end_matches(['\0', ' ']).to_string(),
            legacy_footer: disk.legacy_footer,
            parent_uuid: disk.parent_uuid().map(|u| vhdcore::format::uuid_string(&u)),
            parent_name: disk.parent_name(),
            parent_timestamp: disk.parent_timestamp(),
        }
    }
}

#[pymethods]
impl Layer {
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("path", &self.path)?;
        d.set_item("disk_type", &self.disk_type)?;
        d.set_item("virtual_size", self.virtual_size)?;
        d.set_item("file_size", self.file_size)?;
        d.set_item("block_size", self.block_size)?;
        d.set_item("max_table_entries", self.max_table_entries)?;
        d.set_item("allocated_blocks", self.allocated_blocks)?;
        d.set_item("uuid", &self.uuid)?;
        d.set_item("timestamp", self.timestamp)?;
        d.set_item("creator_app", &self.creator_app)?;
        d.set_item("legacy_footer", self.legacy_footer)?;
        d.set_item("parent_uuid", &self.parent_uuid)?;
        d.set_item("parent_name", &self.parent_name)?;
        d.set_item("parent_timestamp", self.parent_timestamp)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("Layer(path={:?}, disk_type={:?}, virtual_size={})", self.path, self.disk_type, self.virtual_size)
    }
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
struct Extent {
    start: u64,
    length: u64,
    layer: Option<usize>,
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
struct ExportStats {
    format: String,
    virtual_size: u64,
    bytes_written: u64,
    data_bytes: u64,
    zero_bytes: u64,
    seconds: f64,
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
struct Diff {
    ranges: Vec<(u64, u64)>,
    total: u64,
    shared_layers: usize,
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
struct Problem {
    kind: String,
    path: String,
    field: Option<String>,
    offset: Option<u64>,
    message: String,
}

#[pymethods]
impl Problem {
    fn __repr__(&self) -> String {
        format!("Problem(kind={:?}, message={:?})", self.kind, self.message)
    }
}

#[pyclass(frozen, module = "vhdcore._vhdcore")]
struct Chain {
    inner: Arc<vhdcore::Chain>,
    #[pyo3(get)]
    layers: Vec<Layer>,
    #[pyo3(get)]
    virtual_size: u64,
    #[pyo3(get)]
    warnings: Vec<String>,
}

#[pymethods]
impl Chain {
    #[getter]
    fn depth(&self) -> usize {
        self.layers.len()
    }

    #[getter]
    fn leaf(&self) -> Layer {
        self.layers[0].clone()
    }

    fn map(&self, py: Python<'_>) -> PyResult<Vec<Extent>> {
        let inner = Arc::clone(&self.inner);
        let extents = py.allow_threads(|| inner.map()).or_raise(py)?;
        Ok(extents.into_iter().map(|e| Extent { start: e.start, length: e.length, layer: e.layer }).collect())
    }

    fn read<'py>(&self, py: Python<'py>, offset: u64, length: usize) -> PyResult<Bound<'py, PyBytes>> {
        let inner = Arc::clone(&self.inner);
        let mut buf = vec![0u8; length];
        py.allow_threads(|| inner.read_at(offset, &mut buf)).or_raise(py)?;
        Ok(PyBytes::new(py, &buf))
    }

    #[pyo3(signature = (out, format = "raw", progress = None))]
    fn export(&self, py: Python<'_>, out: PathBuf, format: &str, progress: Option<PyObject>) -> PyResult<ExportStats> {
        let format = match format {
            "raw" => ExportFormat::Raw,
            "vhd" => ExportFormat::Vhd,
            other => {
                return Err(InvalidArgumentError::new_err(format!("unknown export format {other:?}; use raw or vhd")))
            }
        };
        let inner = Arc::clone(&self.inner);
        let stats = with_progress(py, progress, |report| vhdcore::export(&inner, &out, format, report))?;
        Ok(ExportStats {
            format: stats.format.as_str().to_string(),
            virtual_size: stats.virtual_size,
            bytes_written: stats.bytes_written,
            data_bytes: stats.data_bytes,
            zero_bytes: stats.zero_bytes,
            seconds: stats.seconds,
        })
    }

    #[pyo3(signature = (chunk_size = vhdcore::DEFAULT_CHUNK_SIZE), text_signature = "(self, chunk_size=67108864)")]
    fn plan(&self, py: Python<'_>, chunk_size: u64) -> PyResult<ImagePlan> {
        let inner = Arc::clone(&self.inner);
        let plan = py.allow_threads(|| inner.plan(chunk_size)).or_raise(py)?;
        Ok(ImagePlan { inner: Arc::new(plan) })
    }

    #[pyo3(
        signature = (out, level = vhdcore::DEFAULT_LEVEL, chunk_size = vhdcore::DEFAULT_CHUNK_SIZE, progress = None),
        text_signature = "(self, out, level=3, chunk_size=67108864, progress=None)"
    )]
    fn compress(
        &self,
        py: Python<'_>,
        out: PathBuf,
        level: i32,
        chunk_size: u64,
        progress: Option<PyObject>,
    ) -> PyResult<ImageStats> {
        let inner = Arc::clone(&self.inner);
        let stats = with_progress(py, progress, |report| {
            let plan = inner.plan(chunk_size)?;
            vhdcore::compress_image(&inner, &plan, level, &out, report)
        })?;
        ImageStats::from_core(py, stats)
    }

    /// Compresses chunks `first .. first + count` of `plan` on all cores into the file `out` (created when missing,
    /// never truncated), their frames in chunk order from byte `offset`. `on_frame(frame)` sees each frame once
    /// written (its `object_offset` set, its `frame` bytes empty); `on_durable(end)` says every frame up to byte
    /// `end` is on the device, every `sync_bytes` of output and at the end. Returns the end of the last frame.
    #[pyo3(
        signature = (
            plan, first, count, out, offset, level = vhdcore::DEFAULT_LEVEL, digest = "content",
            sync_bytes = 256 * 1024 * 1024, on_frame = None, on_durable = None
        ),
        text_signature = "(self, plan, first, count, out, offset, level=3, digest='content', sync_bytes=268435456, \
                          on_frame=None, on_durable=None)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn compress_chunks_into(
        &self,
        py: Python<'_>,
        plan: &ImagePlan,
        first: usize,
        count: usize,
        out: PathBuf,
        offset: u64,
        level: i32,
        digest: &str,
        sync_bytes: u64,
        on_frame: Option<PyObject>,
        on_durable: Option<PyObject>,
    ) -> PyResult<u64> {
        let digest = chunk_digest(digest).or_raise(py)?;
        let inner = Arc::clone(&self.inner);
        let image_plan = Arc::clone(&plan.inner);
        let mut callback_error: Option<PyErr> = None;
        let result = py.allow_threads(|| {
            let mut events = |placed: vhdcore::Placed| {
                Python::with_gil(|py| {
                    let outcome = py.check_signals().and_then(|()| match (placed, &on_frame, &on_durable) {
                        (vhdcore::Placed::Written(frame), Some(cb), _) => {
                            cb.call1(py, (ChunkFrame::from_core(py, frame),)).map(|_| ())
                        }
                        (vhdcore::Placed::Durable { end }, _, Some(cb)) => cb.call1(py, (end,)).map(|_| ()),
                        _ => Ok(()),
                    });
                    outcome.map_err(|e| callback_error = Some(e)).is_ok()
                })
            };
            vhdcore::compress_chunks_into(
                &inner,
                &image_plan,
                first,
                count,
                level,
                digest,
                &out,
                offset,
                sync_bytes,
                &mut events,
            )
        });
        if let Some(e) = callback_error {
            return Err(e);
        }
        result.or_raise(py)
    }

    #[pyo3(
        signature = (plan, index, level = vhdcore::DEFAULT_LEVEL, digest = "image"),
        text_signature = "(self, plan, index, level=3, digest='image')"
    )]
    fn compress_chunk(
        &self,
        py: Python<'_>,
        plan: &ImagePlan,
        index: usize,
        level: i32,
        digest: &str,
    ) -> PyResult<ChunkFrame> {
        let digest = chunk_digest(digest).or_raise(py)?;
        let inner = Arc::clone(&self.inner);
        let image_plan = Arc::clone(&plan.inner);
        let frame = py
            .allow_threads(|| {
                let chunk = image_plan.chunk(index)?;
                vhdcore::compress::prefetch(&inner, chunk);
                vhdcore::compress_chunk(&*inner, &image_plan, chunk, level, digest)
            })
            .or_raise(py)?;
        Ok(ChunkFrame::from_core(py, frame))
    }

    #[pyo3(
        signature = (level = vhdcore::DEFAULT_LEVEL, chunk_size = vhdcore::DEFAULT_CHUNK_SIZE, seed = None),
        text_signature = "(self, level=3, chunk_size=67108864, seed=None)"
    )]
    fn estimate(&self, py: Python<'_>, level: i32, chunk_size: u64, seed: Option<u64>) -> PyResult<Estimate> {
        let inner = Arc::clone(&self.inner);
        let mut opts = vhdcore::estimate::EstimateOptions { level, chunk_size, ..Default::default() };
        if let Some(seed) = seed {
            opts.seed = seed;
        }
        let estimate = py.allow_threads(|| vhdcore::estimate::estimate(&inner, &opts)).or_raise(py)?;
        Ok(Estimate::from_core(level, estimate))
    }

    /// The whole file of a new, empty differencing child of this chain's leaf, whose locators name the leaf
    /// `relative_parent` (relative to the child's folder, e.g. `./leaf.vhd`): a snapshot to store elsewhere.
    fn snapshot_bytes<'py>(&self, py: Python<'py>, relative_parent: &str) -> PyResult<Bound<'py, PyBytes>> {
        let inner = Arc::clone(&self.inner);
        let bytes = py.allow_threads(|| vhdcore::snapshot_bytes(inner.leaf(), relative_parent)).or_raise(py)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// How to write the merge of read-only layer `layer` (1 = the leaf's parent) into its parent as a new layer:
    /// see vhdcore's merge_copy.
    fn merge_layout(&self, py: Python<'_>, layer: usize) -> PyResult<MergeLayout> {
        let inner = Arc::clone(&self.inner);
        let (parent, child) = merge_pair(&inner, layer)?;
        let layout = py.allow_threads(|| vhdcore::merge_layout(parent, child)).or_raise(py)?;
        let segments = layout
            .segments
            .into_iter()
            .map(|segment| match segment {
                vhdcore::MergeSegment::Copy { offset, length } => ("copy", offset, length, None, None),
                vhdcore::MergeSegment::Block { offset, index, length } => ("block", offset, length, Some(index), None),
                vhdcore::MergeSegment::Bytes { offset, data } => {
                    let length = u64::try_from(data.len()).unwrap_or(u64::MAX);
                    ("bytes", offset, length, None, Some(PyBytes::new(py, &data).unbind()))
                }
            })
            .collect();
        Ok(MergeLayout {
            size: layout.size,
            uuid: vhdcore::format::uuid_string(&layout.uuid),
            added_bytes: layout.added_bytes,
            merged_bytes: layout.merged_bytes,
            segments,
        })
    }

    /// Block `index` of the merge of `layer` into its parent (a `block` segment of merge_layout).
    fn merged_block<'py>(&self, py: Python<'py>, layer: usize, index: u64) -> PyResult<Bound<'py, PyBytes>> {
        let inner = Arc::clone(&self.inner);
        let (parent, child) = merge_pair(&inner, layer)?;
        let block = py.allow_threads(|| vhdcore::merged_block(parent, child, index)).or_raise(py)?;
        Ok(PyBytes::new(py, &block))
    }

    fn __repr__(&self) -> String {
        format!(
            "Chain(leaf={:?}, depth={}, virtual_size={})",
            self.layers[0].path,
            self.layers.len(),
            self.virtual_size
        )
    }
}

/// Layer `layer` of `chain` (not the leaf) and its parent.
fn merge_pair(chain: &vhdcore::Chain, layer: usize) -> PyResult<(&vhdcore::Disk, &vhdcore::Disk)> {
    match (chain.layers.get(layer), chain.layers.get(layer + 1)) {
        (Some(child), Some(parent)) if layer > 0 => Ok((parent, child)),
        _ => Err(InvalidArgumentError::new_err(format!(
            "layer {layer} is not a read-only layer with a parent (the chain has {} layers; 0 is the leaf)",
            chain.layers.len()
        ))),
    }
}

/// One segment of a MergeLayout: `(kind, offset, length, block index, bytes)`.
type MergeSegmentTuple = (&'static str, u64, u64, Option<u64>, Option<Py<PyBytes>>);

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
struct MergeLayout {
    size: u64,
    uuid: String,
    added_bytes: u64,
    merged_bytes: u64,
    /// `(kind, offset, length, block index, bytes)`: kind `copy` (the parent's bytes at that offset), `block`
    /// (Chain.merged_block) or `bytes` (given).
    segments: Vec<MergeSegmentTuple>,
}

/// Runs `work` without the GIL, giving it a progress callback that calls `progress` (with the GIL) and stops the
/// work when that raises or a signal (Ctrl-C) is pending.
fn with_progress<T: Send>(
    py: Python<'_>,
    progress: Option<PyObject>,
    work: impl FnOnce(&mut dyn FnMut(u64, u64) -> bool) -> vhdcore::Result<T> + Send,
) -> PyResult<T> {
    let mut callback_error: Option<PyErr> = None;
    let result = py.allow_threads(|| {
        let mut report = |done: u64, total: u64| {
            Python::with_gil(|py| {
                let outcome = py.check_signals().and_then(|()| match &progress {
                    Some(cb) => cb.call1(py, (done, total)).map(|_| ()),
                    None => Ok(()),
                });
                match outcome {
                    Ok(()) => true,
                    Err(e) => {
                        callback_error = Some(e);
                        false
                    }
                }
            })
        };
        work(&mut report)
    });
    if let Some(e) = callback_error {
        return Err(e);
    }
    result.or_raise(py)
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
struct SourceRead {
    layer: usize,
    file_offset: u64,
    length: u64,
    first_block: u64,
    blocks: u64,
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
struct ChunkPlan {
    index: usize,
    start: u64,
    length: u64,
    reads: Vec<Py<SourceRead>>,
    unallocated: Vec<(u64, u64)>,
    read_bytes: u64,
}

#[pyclass(frozen, module = "vhdcore._vhdcore")]
struct ImagePlan {
    inner: Arc<vhdcore::ImagePlan>,
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
                })
            })
            .collect()
    }

    /// Bytes kept at the start of the image for its head frame, compressed last, and the skippable frame
    /// closing the room (the first chunk's frame starts here).
    #[getter]
    fn head_room(&self, py: Python<'_>) -> PyResult<u64> {
        vhdcore::head_room(&self.inner).or_raise(py)
    }

    fn to_json(&self) -> String {
        self.inner.to_json()
    }

    #[staticmethod]
    fn from_json(py: Python<'_>, text: &str) -> PyResult<ImagePlan> {
        let plan = vhdcore::ImagePlan::from_json(text).or_raise(py)?;
        Ok(ImagePlan { inner: Arc::new(plan) })
    }

    fn __len__(&self) -> usize {
        self.inner.chunks.len()
    }
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
struct ChunkFrame {
    index: Option<usize>,
    frame: Py<PyBytes>,
    logical_bytes: u64,
    sha256: Option<String>,
    content_sha256: Option<String>,
    crc32c: u32,
    stored_blocks: Vec<u64>,
    virtual_bytes: u64,
    read_bytes: u64,
    compressed_bytes: u64,
    object_offset: Option<u64>,
}

impl ChunkFrame {
    fn from_core(py: Python<'_>, f: vhdcore::ChunkFrame) -> ChunkFrame {
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
struct ImageStats {
    level: i32,
    virtual_size: u64,
    image_bytes: u64,
    compressed_bytes: u64,
    data_bytes: u64,
    read_bytes: u64,
    head: Py<ChunkFrame>,
    chunks: Vec<Py<ChunkFrame>>,
    seconds: f64,
}

impl ImageStats {
    fn from_core(py: Python<'_>, s: vhdcore::ImageStats) -> PyResult<ImageStats> {
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
fn compress_fetched_chunk(
    py: Python<'_>,
    plan: &ImagePlan,
    index: usize,
    reads: Vec<PyBackedBytes>,
    level: i32,
    digest: &str,
) -> PyResult<ChunkFrame> {
    let digest = chunk_digest(digest).or_raise(py)?;
    let image_plan = Arc::clone(&plan.inner);
    // Taken as bytes buffers (one memcpy each): extracting `Vec<u8>` would convert element by element, ~20 ns a
    // byte under the GIL, slower than the compression itself.
    let reads: Vec<Vec<u8>> = reads.iter().map(|read| read.to_vec()).collect();
    let frame =
        py.allow_threads(|| vhdcore::compress_fetched_chunk(&image_plan, index, &reads, level, digest)).or_raise(py)?;
    Ok(ChunkFrame::from_core(py, frame))
}

/// The digest a compressed chunk carries, by its Python name.
fn chunk_digest(name: &str) -> vhdcore::Result<vhdcore::ChunkDigest> {
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
fn compress_head(py: Python<'_>, plan: &ImagePlan, chunks: Vec<(Vec<u64>, u64)>, level: i32) -> PyResult<ChunkFrame> {
    let image_plan = Arc::clone(&plan.inner);
    let frame = py.allow_threads(|| vhdcore::compress_head(&image_plan, &chunks, level)).or_raise(py)?;
    Ok(ChunkFrame::from_core(py, frame))
}

/// The first `room` bytes of an image: its head frame, then the skippable frame that fills the rest of the room
/// (its payload, never written, reads as the file's zeros).
#[pyfunction]
fn head_region(py: Python<'_>, head_frame: &[u8], room: u64) -> PyResult<Py<PyBytes>> {
    let bytes = vhdcore::head_and_gap(head_frame, room).or_raise(py)?;
    Ok(PyBytes::new(py, &bytes).unbind())
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
struct Estimate {
    level: i32,
    virtual_size: u64,
    allocated_bytes: u64,
    unallocated_bytes: u64,
    sampled_bytes: u64,
    samples: usize,
    spans: usize,
    zero_fraction: f64,
    estimated_nonzero_bytes: u64,
    candidate_blocks: u64,
    image_blocks: u64,
    image_bytes: u64,
    compressed_bytes: u64,
    low: u64,
    high: u64,
    context_correction: f64,
    sampling_error: f64,
    correction_error: f64,
    seconds_spent: f64,
    predicted_seconds: f64,
    threads: usize,
}

impl Estimate {
    fn from_core(level: i32, e: vhdcore::estimate::Estimate) -> Estimate {
        Estimate {
            level,
            virtual_size: e.virtual_size,
            allocated_bytes: e.allocated_bytes,
            unallocated_bytes: e.unallocated_bytes,
            sampled_bytes: e.sampled_bytes,
            samples: e.samples,
            spans: e.spans,
            zero_fraction: e.zero_fraction,
            estimated_nonzero_bytes: e.estimated_nonzero_bytes,
            candidate_blocks: e.candidate_blocks,
            image_blocks: e.image_blocks,
            image_bytes: e.image_bytes,
            compressed_bytes: e.compressed_bytes,
            low: e.low,
            high: e.high,
            context_correction: e.context_correction,
            sampling_error: e.sampling_error,
            correction_error: e.correction_error,
            seconds_spent: e.seconds_spent,
            predicted_seconds: e.predicted_seconds,
            threads: e.threads,
        }
    }
}

fn wrap_chain(chain: vhdcore::Chain) -> Chain {
    let layers = chain.layers.iter().map(Layer::from_disk).collect();
    let virtual_size = chain.virtual_size();
    let warnings = chain.warnings.clone();
    Chain { inner: Arc::new(chain), layers, virtual_size, warnings }
}

#[pyfunction]
#[pyo3(signature = (path, max_depth = vhdcore::MAX_CHAIN_DEPTH), text_signature = "(path, max_depth=30)")]
fn open_chain(py: Python<'_>, path: PathBuf, max_depth: usize) -> PyResult<Chain> {
    let chain = py.allow_threads(|| vhdcore::Chain::open(&path, max_depth)).or_raise(py)?;
    Ok(wrap_chain(chain))
}

/// Layers read through a Python object with `size(name) -> int | None` (None: no such layer) and
/// `read(name, offset, length) -> bytes`; the GIL is taken only around those calls.
struct PyLayerStore {
    reader: Arc<Py<PyAny>>,
}

/// One layer of a [`PyLayerStore`].
struct PyLayer {
    reader: Arc<Py<PyAny>>,
    name: String,
    size: u64,
}

impl std::fmt::Debug for PyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyLayer").field("name", &self.name).field("size", &self.size).finish()
    }
}

/// A Python exception from the reader, as the I/O error vhdcore reports with the layer's name and offset.
fn reader_error(call: &str, err: &PyErr) -> std::io::Error {
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
fn open_chain_from(
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
        .or_raise(py)?;
    Ok(wrap_chain(chain))
}

#[pyfunction]
#[pyo3(signature = (path, max_depth = vhdcore::MAX_CHAIN_DEPTH), text_signature = "(path, max_depth=30)")]
fn check(py: Python<'_>, path: PathBuf, max_depth: usize) -> Vec<Problem> {
    let problems = py.allow_threads(|| vhdcore::check(&path, max_depth));
    problems
        .into_iter()
        .map(|p| Problem {
            kind: p.kind().as_str().to_string(),
            path: p.path().map_or_else(|| path.display().to_string(), |q| q.display().to_string()),
            field: p.field().map(str::to_string),
            offset: p.offset(),
            message: p.to_string(),
        })
        .collect()
}

#[pyfunction]
#[pyo3(signature = (old, new, max_depth = vhdcore::MAX_CHAIN_DEPTH), text_signature = "(old, new, max_depth=30)")]
fn diff(py: Python<'_>, old: PathBuf, new: PathBuf, max_depth: usize) -> PyResult<Diff> {
    let result = py
        .allow_threads(|| {
            let a = vhdcore::Chain::open(&old, max_depth)?;
            let b = vhdcore::Chain::open(&new, max_depth)?;
            vhdcore::diff(&a, &b)
        })
        .or_raise(py)?;
    Ok(Diff { ranges: result.ranges, total: result.total, shared_layers: result.shared_layers })
}

#[pyfunction]
#[pyo3(signature = (path, size, disk_type = "dynamic", block_size = vhdcore::DEFAULT_BLOCK_SIZE))]
fn create(py: Python<'_>, path: PathBuf, size: u64, disk_type: &str, block_size: u32) -> PyResult<Layer> {
    let kind = match disk_type {
        "dynamic" => DiskType::Dynamic,
        "fixed" => DiskType::Fixed,
        other => {
            return Err(InvalidArgumentError::new_err(format!("unknown disk type {other:?}; use dynamic or fixed")))
        }
    };
    let disk = py.allow_threads(|| vhdcore::create(&path, size, kind, block_size)).or_raise(py)?;
    Ok(Layer::from_disk(&disk))
}

#[pyfunction]
fn snapshot(py: Python<'_>, parent: PathBuf, child: PathBuf) -> PyResult<Layer> {
    let disk = py.allow_threads(|| vhdcore::snapshot(&parent, &child)).or_raise(py)?;
    Ok(Layer::from_disk(&disk))
}

#[pyfunction]
fn restamp(py: Python<'_>, path: PathBuf) -> PyResult<u32> {
    py.allow_threads(|| vhdcore::restamp(&path)).or_raise(py)
}

/// Gives the disk at `path` the UUID `uuid` (a new random one when None) in both footer copies; returns it.
#[pyfunction]
#[pyo3(signature = (path, uuid = None))]
fn set_uuid(py: Python<'_>, path: PathBuf, uuid: Option<&str>) -> PyResult<String> {
    let uuid = match uuid {
        Some(text) => uuid::Uuid::parse_str(text)
            .map_err(|e| InvalidArgumentError::new_err(format!("{text:?} is not a UUID: {e}")))?,
        None => uuid::Uuid::new_v4(),
    };
    py.allow_threads(|| vhdcore::set_uuid(&path, *uuid.as_bytes())).or_raise(py)?;
    Ok(uuid.hyphenated().to_string())
}

#[pyfunction]
fn children(py: Python<'_>, path: PathBuf, candidates: Vec<PathBuf>) -> PyResult<Vec<String>> {
    let found = py.allow_threads(|| vhdcore::children(&path, &candidates)).or_raise(py)?;
    Ok(found.iter().map(|p| p.display().to_string()).collect())
}

#[pyfunction]
fn write(py: Python<'_>, path: PathBuf, offset: u64, data: &[u8]) -> PyResult<()> {
    let owned = data.to_vec();
    py.allow_threads(|| vhdcore::write(Path::new(&path), offset, &owned)).or_raise(py)
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
#[derive(Clone)]
struct CoalesceMerge {
    layer: String,
    parent: String,
    child: String,
    duplicate_bytes: u64,
    bytes_copied: u64,
    file_bytes_freed: u64,
    file_bytes_added: u64,
}

impl CoalesceMerge {
    fn from_core(m: &vhdcore::Merge) -> CoalesceMerge {
        CoalesceMerge {
            layer: m.layer.display().to_string(),
            parent: m.parent.display().to_string(),
            child: m.child.display().to_string(),
            duplicate_bytes: m.duplicate_bytes,
            bytes_copied: m.bytes_copied,
            file_bytes_freed: m.file_bytes_freed,
            file_bytes_added: m.file_bytes_added,
        }
    }
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
#[derive(Clone)]
struct PendingMerge {
    layer: String,
    parent: String,
    phase: String,
    bytes_copied: u64,
    bytes_total: u64,
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
#[derive(Clone)]
struct SkippedLayer {
    layer: String,
    reason: String,
}

fn skipped_from_core(skipped: &[vhdcore::Skipped]) -> Vec<SkippedLayer> {
    skipped.iter().map(|s| SkippedLayer { layer: s.layer.display().to_string(), reason: s.reason.clone() }).collect()
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
struct CoalesceStep {
    done: bool,
    recovered: bool,
    merges: Vec<CoalesceMerge>,
    bytes_copied: u64,
    pending: Option<PendingMerge>,
    skipped: Vec<SkippedLayer>,
    depth: usize,
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
struct CoalesceReport {
    merges: Vec<CoalesceMerge>,
    steps: u64,
    recovered: bool,
    skipped: Vec<SkippedLayer>,
    depth_before: usize,
    depth: usize,
    duplicate_bytes: u64,
    bytes_copied: u64,
    file_bytes_freed: u64,
    file_bytes_added: u64,
}

fn budget_duration(seconds: Option<f64>) -> PyResult<Option<std::time::Duration>> {
    seconds
        .map(|s| {
            std::time::Duration::try_from_secs_f64(s).map_err(|_| {
                InvalidArgumentError::new_err(format!("budget_seconds must be a finite number >= 0, not {s}"))
            })
        })
        .transpose()
}

/// One bounded slice of coalescing: resumes a pending journal, then merges until the budget is spent.
/// `siblings` are the files that may be other children of the chain's layers (required: they protect those).
#[pyfunction]
#[pyo3(signature = (leaf, siblings, budget_bytes = None, budget_seconds = None))]
fn coalesce_step(
    py: Python<'_>,
    leaf: PathBuf,
    siblings: Vec<PathBuf>,
    budget_bytes: Option<u64>,
    budget_seconds: Option<f64>,
) -> PyResult<CoalesceStep> {
    let budget = vhdcore::Budget { bytes: budget_bytes, time: budget_duration(budget_seconds)? };
    let step = py.allow_threads(|| vhdcore::coalesce_step(&leaf, &siblings, budget)).or_raise(py)?;
    Ok(CoalesceStep {
        done: step.done,
        recovered: step.recovered,
        merges: step.merges.iter().map(CoalesceMerge::from_core).collect(),
        bytes_copied: step.bytes_copied,
        pending: step.pending.map(|p| PendingMerge {
            layer: p.layer.display().to_string(),
            parent: p.parent.display().to_string(),
            phase: p.phase.as_str().to_string(),
            bytes_copied: p.bytes_copied,
            bytes_total: p.bytes_total,
        }),
        skipped: skipped_from_core(&step.skipped),
        depth: step.depth,
    })
}

/// Coalesces the chain of `leaf` as far as it goes, in steps of `step_bytes` (resumable after a crash).
#[pyfunction]
#[pyo3(signature = (leaf, siblings, step_bytes = None))]
fn coalesce(
    py: Python<'_>,
    leaf: PathBuf,
    siblings: Vec<PathBuf>,
    step_bytes: Option<u64>,
) -> PyResult<CoalesceReport> {
    let report = py.allow_threads(|| vhdcore::coalesce(&leaf, &siblings, step_bytes)).or_raise(py)?;
    Ok(CoalesceReport {
        merges: report.merges.iter().map(CoalesceMerge::from_core).collect(),
        steps: report.steps,
        recovered: report.recovered,
        skipped: skipped_from_core(&report.skipped),
        depth_before: report.depth_before,
        depth: report.depth,
        duplicate_bytes: report.duplicate_bytes(),
        bytes_copied: report.bytes_copied(),
        file_bytes_freed: report.file_bytes_freed(),
        file_bytes_added: report.file_bytes_added(),
    })
}

#[pymodule]
fn _vhdcore(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("VhdError", py.get_type::<VhdError>())?;
    m.add("VhdIoError", py.get_type::<VhdIoError>())?;
    m.add("VhdFormatError", py.get_type::<VhdFormatError>())?;
    m.add("ChecksumError", py.get_type::<ChecksumError>())?;
    m.add("TruncatedError", py.get_type::<TruncatedError>())?;
    m.add("BatError", py.get_type::<BatError>())?;
    m.add("UnsupportedError", py.get_type::<UnsupportedError>())?;
    m.add("ChainError", py.get_type::<ChainError>())?;
    m.add("MissingParentError", py.get_type::<MissingParentError>())?;
    m.add("ParentMismatchError", py.get_type::<ParentMismatchError>())?;
    m.add("ChainCycleError", py.get_type::<ChainCycleError>())?;
    m.add("ChainTooDeepError", py.get_type::<ChainTooDeepError>())?;
    m.add("InvalidArgumentError", py.get_type::<InvalidArgumentError>())?;
    m.add("CoalescePendingError", py.get_type::<CoalescePendingError>())?;
    m.add("DEFAULT_BLOCK_SIZE", vhdcore::DEFAULT_BLOCK_SIZE)?;
    m.add("MAX_CHAIN_DEPTH", vhdcore::MAX_CHAIN_DEPTH)?;
    m.add("MAX_VIRTUAL_SIZE", vhdcore::MAX_VIRTUAL_SIZE)?;
    m.add_class::<Layer>()?;
    m.add_class::<Extent>()?;
    m.add_class::<ExportStats>()?;
    m.add_class::<Diff>()?;
    m.add_class::<Problem>()?;
    m.add_class::<Chain>()?;
    m.add_class::<SourceRead>()?;
    m.add_class::<ChunkPlan>()?;
    m.add_class::<ImagePlan>()?;
    m.add_class::<ChunkFrame>()?;
    m.add_class::<ImageStats>()?;
    m.add_class::<Estimate>()?;
    m.add_class::<CoalesceMerge>()?;
    m.add_class::<PendingMerge>()?;
    m.add_class::<SkippedLayer>()?;
    m.add_class::<CoalesceStep>()?;
    m.add_class::<CoalesceReport>()?;
    m.add_class::<MergeLayout>()?;
    m.add("CONTENT_LEAF_SIZE", vhdcore::CONTENT_LEAF)?;
    m.add("DEFAULT_CHUNK_SIZE", vhdcore::DEFAULT_CHUNK_SIZE)?;
    m.add("DEFAULT_LEVEL", vhdcore::DEFAULT_LEVEL)?;
    m.add_function(wrap_pyfunction!(compress_fetched_chunk, m)?)?;
    m.add_function(wrap_pyfunction!(compress_head, m)?)?;
    m.add_function(wrap_pyfunction!(head_region, m)?)?;
    m.add_function(wrap_pyfunction!(open_chain, m)?)?;
    m.add_function(wrap_pyfunction!(open_chain_from, m)?)?;
    m.add_function(wrap_pyfunction!(check, m)?)?;
    m.add_function(wrap_pyfunction!(diff, m)?)?;
    m.add_function(wrap_pyfunction!(create, m)?)?;
    m.add_function(wrap_pyfunction!(snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(write, m)?)?;
    m.add_function(wrap_pyfunction!(restamp, m)?)?;
    m.add_function(wrap_pyfunction!(set_uuid, m)?)?;
    m.add_function(wrap_pyfunction!(children, m)?)?;
    m.add_function(wrap_pyfunction!(coalesce_step, m)?)?;
    m.add_function(wrap_pyfunction!(coalesce, m)?)?;
    Ok(())
}
