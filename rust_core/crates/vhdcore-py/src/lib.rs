//! Python bindings of vhdcore (the native module `vhdcore._vhdcore`): thin wrappers that release the GIL around
//! disk work. Only registration lives here; each Python class has its module, and vhdcore's errors become Python
//! exceptions in one place, `errors.rs`.
//!
//! - `chain/`: `Chain` (map, read, export, plan, compress, estimate, merge layouts), `open_chain`,
//!   `open_chain_from` (layers read through a Python object); its results `Extent`, `ExportStats`, `MergeLayout`.
//! - `layer.rs`: `Layer`. `disk.rs`: functions on disks by path (create, snapshot, write, restamp, set_uuid,
//!   children, check, diff).
//! - `image/`: `ImagePlan`, `ChunkPlan`, `SourceRead` (`plan.rs`); `ChunkFrame`, `ImageStats` and the workers'
//!   functions (`frame.rs`). `estimate.rs`: `Estimate`. `coalesce.rs`: coalesce and its reports.
//! - `usage.rs`: `DiskUsage`, `Partition` (`Chain.usage()`: what the disk's filesystems prove free).
//! - `errors.rs`: the exception tree and the error translation; `progress.rs`: progress callbacks off the GIL.

use pyo3::prelude::*;

mod chain;
mod coalesce;
mod disk;
mod errors;
mod estimate;
mod image;
mod layer;
mod progress;
mod usage;

#[pymodule]
fn _vhdcore(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add("DEFAULT_BLOCK_SIZE", vhdcore::DEFAULT_BLOCK_SIZE)?;
    m.add("MAX_CHAIN_DEPTH", vhdcore::MAX_CHAIN_DEPTH)?;
    m.add("MAX_VIRTUAL_SIZE", vhdcore::MAX_VIRTUAL_SIZE)?;
    m.add_class::<layer::Layer>()?;
    m.add_class::<chain::Extent>()?;
    m.add_class::<chain::ExportStats>()?;
    m.add_class::<disk::Diff>()?;
    m.add_class::<disk::Problem>()?;
    m.add_class::<chain::Chain>()?;
    m.add_class::<image::plan::SourceRead>()?;
    m.add_class::<image::plan::ChunkPlan>()?;
    m.add_class::<image::plan::ImagePlan>()?;
    m.add_class::<image::frame::ChunkFrame>()?;
    m.add_class::<image::frame::ImageStats>()?;
    m.add_class::<estimate::Estimate>()?;
    m.add_class::<usage::DiskUsage>()?;
    m.add_class::<usage::Partition>()?;
    m.add_class::<coalesce::CoalesceMerge>()?;
    m.add_class::<coalesce::PendingMerge>()?;
    m.add_class::<coalesce::SkippedLayer>()?;
    m.add_class::<coalesce::CoalesceStep>()?;
    m.add_class::<coalesce::CoalesceReport>()?;
    m.add_class::<chain::MergeLayout>()?;
    m.add("CONTENT_LEAF_SIZE", vhdcore::CONTENT_LEAF)?;
    m.add("DEFAULT_CHUNK_SIZE", vhdcore::DEFAULT_CHUNK_SIZE)?;
    m.add("DEFAULT_LEVEL", vhdcore::DEFAULT_LEVEL)?;
    m.add_function(wrap_pyfunction!(image::frame::compress_fetched_chunk, m)?)?;
    m.add_function(wrap_pyfunction!(image::frame::compress_head, m)?)?;
    m.add_function(wrap_pyfunction!(image::frame::head_region, m)?)?;
    m.add_function(wrap_pyfunction!(chain::open_chain, m)?)?;
    m.add_function(wrap_pyfunction!(chain::open_chain_from, m)?)?;
    m.add_function(wrap_pyfunction!(disk::check, m)?)?;
    m.add_function(wrap_pyfunction!(disk::diff, m)?)?;
    m.add_function(wrap_pyfunction!(disk::create, m)?)?;
    m.add_function(wrap_pyfunction!(disk::snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(disk::write, m)?)?;
    m.add_function(wrap_pyfunction!(disk::restamp, m)?)?;
    m.add_function(wrap_pyfunction!(disk::set_uuid, m)?)?;
    m.add_function(wrap_pyfunction!(disk::children, m)?)?;
    m.add_function(wrap_pyfunction!(coalesce::coalesce_step, m)?)?;
    m.add_function(wrap_pyfunction!(coalesce::coalesce, m)?)?;
    Ok(())
}
