//! `Chain`: an opened chain of layers (leaf first) and what it does: map, read, export, usage, plan, compress,
//! estimate, snapshot bytes, merge layouts. `open_chain` (files) and `open_chain_from` (any reader, `reader.rs`) make one.

mod reader;
mod results;

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use vhdcore::ExportFormat;

use crate::errors::{InvalidArgumentError, OrRaise};
use crate::estimate::Estimate;
use crate::image::frame::{chunk_digest, ChunkFrame, ImageStats};
use crate::image::plan::ImagePlan;
use crate::layer::Layer;
use crate::progress::with_progress;
use crate::usage::DiskUsage;
pub(crate) use reader::open_chain_from;
use results::merge_pair;
pub(crate) use results::{ExportStats, Extent, MergeLayout};

#[pyclass(frozen, module = "vhdcore._vhdcore")]
pub(crate) struct Chain {
    pub(crate) inner: Arc<vhdcore::Chain>,
    #[pyo3(get)]
    pub(crate) layers: Vec<Layer>,
    #[pyo3(get)]
    pub(crate) virtual_size: u64,
    #[pyo3(get)]
    pub(crate) warnings: Vec<String>,
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
        let extents = py.allow_threads(|| inner.map()).or_raise()?;
        Ok(extents.into_iter().map(|e| Extent { start: e.start, length: e.length, layer: e.layer }).collect())
    }

    fn read<'py>(&self, py: Python<'py>, offset: u64, length: usize) -> PyResult<Bound<'py, PyBytes>> {
        let inner = Arc::clone(&self.inner);
        let mut buf = vec![0u8; length];
        py.allow_threads(|| inner.read_at(offset, &mut buf)).or_raise()?;
        Ok(PyBytes::new(py, &buf))
    }

    /// Flattens the chain into `out` (raw or VHD); with `usage` (from `usage()`), of the live data only: the ranges
    /// it proves free written as zeros.
    #[pyo3(signature = (out, format = "raw", progress = None, usage = None))]
    fn export(
        &self,
        py: Python<'_>,
        out: PathBuf,
        format: &str,
        progress: Option<PyObject>,
        usage: Option<PyRef<'_, DiskUsage>>,
    ) -> PyResult<ExportStats> {
        let format = match format {
            "raw" => ExportFormat::Raw,
            "vhd" => ExportFormat::Vhd,
            other => {
                return Err(InvalidArgumentError::new_err(format!("unknown export format {other:?}; use raw or vhd")))
            }
        };
        let inner = Arc::clone(&self.inner);
        let usage = usage.map(|u| Arc::clone(&u.inner));
        let stats = with_progress(py, progress, |report| match &usage {
            Some(usage) => vhdcore::export_live(&inner, &out, format, usage, report),
            None => vhdcore::export(&inner, &out, format, report),
        })?;
        Ok(ExportStats {
            format: stats.format.as_str().to_string(),
            virtual_size: stats.virtual_size,
            bytes_written: stats.bytes_written,
            data_bytes: stats.data_bytes,
            zero_bytes: stats.zero_bytes,
            seconds: stats.seconds,
        })
    }

    /// What the flattened disk's partitions and filesystems prove free (DESIGN §5, live data only).
    fn usage(&self, py: Python<'_>) -> PyResult<DiskUsage> {
        let inner = Arc::clone(&self.inner);
        let usage = py.allow_threads(|| vhdcore::fs::usage(inner.as_ref())).or_raise()?;
        Ok(DiskUsage { inner: Arc::new(usage) })
    }

    /// The chunk plan; with `usage` (from `usage()`), of the live data only: free ranges stored as zeros, never read.
    #[pyo3(
        signature = (chunk_size = vhdcore::DEFAULT_CHUNK_SIZE, usage = None),
        text_signature = "(self, chunk_size=67108864, usage=None)"
    )]
    fn plan(&self, py: Python<'_>, chunk_size: u64, usage: Option<PyRef<'_, DiskUsage>>) -> PyResult<ImagePlan> {
        let inner = Arc::clone(&self.inner);
        let usage = usage.map(|u| Arc::clone(&u.inner));
        let plan = py
            .allow_threads(|| match usage {
                Some(usage) => inner.plan_live(chunk_size, &usage),
                None => inner.plan(chunk_size),
            })
            .or_raise()?;
        Ok(ImagePlan { inner: Arc::new(plan) })
    }

    #[pyo3(
        signature = (
            out, level = vhdcore::DEFAULT_LEVEL, chunk_size = vhdcore::DEFAULT_CHUNK_SIZE, progress = None, usage = None
        ),
        text_signature = "(self, out, level=3, chunk_size=67108864, progress=None, usage=None)"
    )]
    fn compress(
        &self,
        py: Python<'_>,
        out: PathBuf,
        level: i32,
        chunk_size: u64,
        progress: Option<PyObject>,
        usage: Option<PyRef<'_, DiskUsage>>,
    ) -> PyResult<ImageStats> {
        let inner = Arc::clone(&self.inner);
        let usage = usage.map(|u| Arc::clone(&u.inner));
        let stats = with_progress(py, progress, |report| {
            let plan = match &usage {
                Some(usage) => inner.plan_live(chunk_size, usage)?,
                None => inner.plan(chunk_size)?,
            };
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
        let digest = chunk_digest(digest).or_raise()?;
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
        result.or_raise()
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
        let digest = chunk_digest(digest).or_raise()?;
        let inner = Arc::clone(&self.inner);
        let image_plan = Arc::clone(&plan.inner);
        let frame = py
            .allow_threads(|| {
                let chunk = image_plan.chunk(index)?;
                vhdcore::prefetch(&inner, chunk);
                vhdcore::compress_chunk(&*inner, &image_plan, chunk, level, digest)
            })
            .or_raise()?;
        Ok(ChunkFrame::from_core(py, frame))
    }

    #[pyo3(
        signature = (level = vhdcore::DEFAULT_LEVEL, chunk_size = vhdcore::DEFAULT_CHUNK_SIZE, seed = None, usage = None),
        text_signature = "(self, level=3, chunk_size=67108864, seed=None, usage=None)"
    )]
    fn estimate(
        &self,
        py: Python<'_>,
        level: i32,
        chunk_size: u64,
        seed: Option<u64>,
        usage: Option<PyRef<'_, DiskUsage>>,
    ) -> PyResult<Estimate> {
        let inner = Arc::clone(&self.inner);
        let mut opts = vhdcore::EstimateOptions { level, chunk_size, ..Default::default() };
        if let Some(seed) = seed {
            opts.seed = seed;
        }
        let usage = usage.map(|u| Arc::clone(&u.inner));
        let estimate = py
            .allow_threads(|| match usage {
                Some(usage) => vhdcore::estimate_live(&inner, &opts, &usage),
                None => vhdcore::estimate(&inner, &opts),
            })
            .or_raise()?;
        Ok(Estimate::from_core(level, estimate))
    }

    /// The whole file of a new, empty differencing child of this chain's leaf, whose locators name the leaf
    /// `relative_parent` (relative to the child's folder, e.g. `./leaf.vhd`): a snapshot to store elsewhere.
    fn snapshot_bytes<'py>(&self, py: Python<'py>, relative_parent: &str) -> PyResult<Bound<'py, PyBytes>> {
        let inner = Arc::clone(&self.inner);
        let bytes = py.allow_threads(|| vhdcore::snapshot_bytes(inner.leaf(), relative_parent)).or_raise()?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// How to write the merge of read-only layer `layer` (1 = the leaf's parent) into its parent as a new layer:
    /// see vhdcore's merge_copy.
    fn merge_layout(&self, py: Python<'_>, layer: usize) -> PyResult<MergeLayout> {
        let inner = Arc::clone(&self.inner);
        let (parent, child) = merge_pair(&inner, layer)?;
        let layout = py.allow_threads(|| vhdcore::merge_layout(parent, child)).or_raise()?;
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
            uuid: vhdcore::uuid_string(&layout.uuid),
            added_bytes: layout.added_bytes,
            merged_bytes: layout.merged_bytes,
            segments,
        })
    }

    /// Block `index` of the merge of `layer` into its parent (a `block` segment of merge_layout).
    fn merged_block<'py>(&self, py: Python<'py>, layer: usize, index: u64) -> PyResult<Bound<'py, PyBytes>> {
        let inner = Arc::clone(&self.inner);
        let (parent, child) = merge_pair(&inner, layer)?;
        let block = py.allow_threads(|| vhdcore::merged_block(parent, child, index)).or_raise()?;
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

pub(crate) fn wrap_chain(chain: vhdcore::Chain) -> Chain {
    let layers = chain.layers.iter().map(Layer::from_disk).collect();
    let virtual_size = chain.virtual_size();
    let warnings = chain.warnings.clone();
    Chain { inner: Arc::new(chain), layers, virtual_size, warnings }
}

#[pyfunction]
#[pyo3(signature = (path, max_depth = vhdcore::MAX_CHAIN_DEPTH), text_signature = "(path, max_depth=30)")]
pub(crate) fn open_chain(py: Python<'_>, path: PathBuf, max_depth: usize) -> PyResult<Chain> {
    let chain = py.allow_threads(|| vhdcore::Chain::open(&path, max_depth)).or_raise()?;
    Ok(wrap_chain(chain))
}
