//! Functions on disks by path: create, snapshot, write, restamp, set_uuid, children, check (`Problem`), diff
//! (`Diff`).

use std::path::{Path, PathBuf};

use pyo3::prelude::*;
use vhdcore::DiskType;

use crate::errors::{InvalidArgumentError, OrRaise};
use crate::layer::Layer;

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
pub(crate) struct Diff {
    pub(crate) ranges: Vec<(u64, u64)>,
    pub(crate) total: u64,
    pub(crate) shared_layers: usize,
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
pub(crate) struct Problem {
    pub(crate) kind: String,
    pub(crate) path: String,
    pub(crate) field: Option<String>,
    pub(crate) offset: Option<u64>,
    pub(crate) message: String,
}

#[pymethods]
impl Problem {
    fn __repr__(&self) -> String {
        format!("Problem(kind={:?}, message={:?})", self.kind, self.message)
    }
}

#[pyfunction]
#[pyo3(signature = (path, max_depth = vhdcore::MAX_CHAIN_DEPTH), text_signature = "(path, max_depth=30)")]
pub(crate) fn check(py: Python<'_>, path: PathBuf, max_depth: usize) -> Vec<Problem> {
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
pub(crate) fn diff(py: Python<'_>, old: PathBuf, new: PathBuf, max_depth: usize) -> PyResult<Diff> {
    let result = py
        .allow_threads(|| {
            let a = vhdcore::Chain::open(&old, max_depth)?;
            let b = vhdcore::Chain::open(&new, max_depth)?;
            vhdcore::diff(&a, &b)
        })
        .or_raise()?;
    Ok(Diff { ranges: result.ranges, total: result.total, shared_layers: result.shared_layers })
}

#[pyfunction]
#[pyo3(signature = (path, size, disk_type = "dynamic", block_size = vhdcore::DEFAULT_BLOCK_SIZE))]
pub(crate) fn create(py: Python<'_>, path: PathBuf, size: u64, disk_type: &str, block_size: u32) -> PyResult<Layer> {
    let kind = match disk_type {
        "dynamic" => DiskType::Dynamic,
        "fixed" => DiskType::Fixed,
        other => {
            return Err(InvalidArgumentError::new_err(format!("unknown disk type {other:?}; use dynamic or fixed")))
        }
    };
    let disk = py.allow_threads(|| vhdcore::create(&path, size, kind, block_size)).or_raise()?;
    Ok(Layer::from_disk(&disk))
}

#[pyfunction]
pub(crate) fn snapshot(py: Python<'_>, parent: PathBuf, child: PathBuf) -> PyResult<Layer> {
    let disk = py.allow_threads(|| vhdcore::snapshot(&parent, &child)).or_raise()?;
    Ok(Layer::from_disk(&disk))
}

#[pyfunction]
pub(crate) fn restamp(py: Python<'_>, path: PathBuf) -> PyResult<u32> {
    py.allow_threads(|| vhdcore::restamp(&path)).or_raise()
}

/// Gives the disk at `path` the UUID `uuid` (a new random one when None) in both footer copies; returns it.
#[pyfunction]
#[pyo3(signature = (path, uuid = None))]
pub(crate) fn set_uuid(py: Python<'_>, path: PathBuf, uuid: Option<&str>) -> PyResult<String> {
    let uuid = match uuid {
        Some(text) => uuid::Uuid::parse_str(text)
            .map_err(|e| InvalidArgumentError::new_err(format!("{text:?} is not a UUID: {e}")))?,
        None => uuid::Uuid::new_v4(),
    };
    py.allow_threads(|| vhdcore::set_uuid(&path, *uuid.as_bytes())).or_raise()?;
    Ok(uuid.hyphenated().to_string())
}

#[pyfunction]
pub(crate) fn children(py: Python<'_>, path: PathBuf, candidates: Vec<PathBuf>) -> PyResult<Vec<String>> {
    let found = py.allow_threads(|| vhdcore::children(&path, &candidates)).or_raise()?;
    Ok(found.iter().map(|p| p.display().to_string()).collect())
}

#[pyfunction]
pub(crate) fn write(py: Python<'_>, path: PathBuf, offset: u64, data: &[u8]) -> PyResult<()> {
    let owned = data.to_vec();
    py.allow_threads(|| vhdcore::write(Path::new(&path), offset, &owned)).or_raise()
}
