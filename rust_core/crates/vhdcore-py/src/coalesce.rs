//! Coalesce: `coalesce_step` (bounded, resumable slices) and `coalesce`, with their reports.

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::errors::{InvalidArgumentError, OrRaise};

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
#[derive(Clone)]
pub(crate) struct CoalesceMerge {
    pub(crate) layer: String,
    pub(crate) parent: String,
    pub(crate) child: String,
    pub(crate) duplicate_bytes: u64,
    pub(crate) bytes_copied: u64,
    pub(crate) file_bytes_freed: u64,
    pub(crate) file_bytes_added: u64,
}

impl CoalesceMerge {
    pub(crate) fn from_core(m: &vhdcore::Merge) -> CoalesceMerge {
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
pub(crate) struct PendingMerge {
    pub(crate) layer: String,
    pub(crate) parent: String,
    pub(crate) phase: String,
    pub(crate) bytes_copied: u64,
    pub(crate) bytes_total: u64,
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
#[derive(Clone)]
pub(crate) struct SkippedLayer {
    pub(crate) layer: String,
    pub(crate) reason: String,
}

pub(crate) fn skipped_from_core(skipped: &[vhdcore::Skipped]) -> Vec<SkippedLayer> {
    skipped.iter().map(|s| SkippedLayer { layer: s.layer.display().to_string(), reason: s.reason.clone() }).collect()
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
pub(crate) struct CoalesceStep {
    pub(crate) done: bool,
    pub(crate) recovered: bool,
    pub(crate) merges: Vec<CoalesceMerge>,
    pub(crate) bytes_copied: u64,
    pub(crate) pending: Option<PendingMerge>,
    pub(crate) skipped: Vec<SkippedLayer>,
    pub(crate) depth: usize,
}

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
pub(crate) struct CoalesceReport {
    pub(crate) merges: Vec<CoalesceMerge>,
    pub(crate) steps: u64,
    pub(crate) recovered: bool,
    pub(crate) skipped: Vec<SkippedLayer>,
    pub(crate) depth_before: usize,
    pub(crate) depth: usize,
    pub(crate) duplicate_bytes: u64,
    pub(crate) bytes_copied: u64,
    pub(crate) file_bytes_freed: u64,
    pub(crate) file_bytes_added: u64,
}

pub(crate) fn budget_duration(seconds: Option<f64>) -> PyResult<Option<std::time::Duration>> {
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
pub(crate) fn coalesce_step(
    py: Python<'_>,
    leaf: PathBuf,
    siblings: Vec<PathBuf>,
    budget_bytes: Option<u64>,
    budget_seconds: Option<f64>,
) -> PyResult<CoalesceStep> {
    let budget = vhdcore::Budget { bytes: budget_bytes, time: budget_duration(budget_seconds)? };
    let step = py.allow_threads(|| vhdcore::coalesce_step(&leaf, &siblings, budget)).or_raise()?;
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
pub(crate) fn coalesce(
    py: Python<'_>,
    leaf: PathBuf,
    siblings: Vec<PathBuf>,
    step_bytes: Option<u64>,
) -> PyResult<CoalesceReport> {
    let report = py.allow_threads(|| vhdcore::coalesce(&leaf, &siblings, step_bytes)).or_raise()?;
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
