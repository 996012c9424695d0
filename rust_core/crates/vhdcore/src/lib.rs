//! vhdcore: read, write, map, diff, flatten, compress and coalesce VHD chains.
//!
//! A library a storage engineer can use alone, like `qemu-img`: it knows nothing of clouds, jobs or HTTP, only the
//! disks it is handed. Every malformed input gives a typed [`VhdError`] naming the field and offset.
//!
//! The modules depend one way, each only on those before it:
//! - `error`; `format/` (footer, header, BAT entries, geometry, checksums in the spec's words; `layout`: the layouts
//!   of new disks); `io/` (output targets, the all-zero test);
//! - `source` (where layer bytes come from: files, memory, any [`LayerStore`]), `disk` (one opened VHD);
//! - `chain/` (a chain of layers found by UUID and locators; `resolve`: which layer holds each sector; `map`,
//!   `diff`, `check`; `pending`: where a coalesce journal of the chain would lie);
//! - `fs/` (partition tables and filesystems of a flattened disk: the ranges they prove free);
//! - `export` (flattening to raw or VHD), `image/` (the image's plan, chunks, frames, the direct writer; a live-data
//!   plan leaves out what `fs` proves free), `estimate/` (the image's size and time before it is made);
//! - `writer` (new disks, snapshots, writes, restamp, set_uuid), `coalesce/` (journaled merges, their merge copy).
//!
//! The public API is the list of `pub use` below; the modules themselves are private.

mod chain;
mod coalesce;
mod disk;
mod error;
mod estimate;
mod export;
mod format;
pub mod fs;
mod image;
mod io;
#[cfg(any(test, feature = "test-utils"))]
pub mod rng;
#[cfg(not(any(test, feature = "test-utils")))]
mod rng;
mod source;
mod writer;

pub use chain::check::check;
pub use chain::diff::{diff, DiffResult};
pub use chain::map::{Extent, Occupancy};
pub use chain::pending::JOURNAL_NAME;
pub use chain::resolve::{LayerGeometry, LayerSource, Run};
pub use chain::{Chain, MAX_CHAIN_DEPTH};
pub use coalesce::merge_copy::{merge_layout, merged_block, MergeLayout, MergeSegment};
pub use coalesce::{
    coalesce, coalesce_step, coalesce_step_with, Budget, CoalesceReport, Faults, Merge, Pending, Skipped, StepReport,
    CRASH_ENV, LOCK_NAME,
};
pub use disk::Disk;
pub use error::{ErrorKind, Result, VhdError};
pub use estimate::{estimate, estimate_live, Estimate, EstimateOptions};
pub use export::{export, export_live, ExportFormat, ExportStats};
pub use format::{uuid_string, DiskType, DEFAULT_BLOCK_SIZE, MAX_VIRTUAL_SIZE};
pub use image::compress::{
    build_chunk, build_head, compress_chunk, compress_chunks_into, compress_fetched_chunk, compress_head,
    compress_image, head_and_gap, head_length, head_room, prefetch, ChunkDigest, ChunkFrame, ImageStats, Placed,
    CONTENT_LEAF, DEFAULT_LEVEL,
};
pub use image::plan::{
    ChunkPlan, FetchedChunk, ImagePlan, PlanLayer, SourceRead, DEFAULT_CHUNK_SIZE, IMAGE_BLOCK_SIZE,
};
pub use source::{LayerStore, MemoryStore, ReadAt};
pub use writer::{children, create, restamp, set_uuid, snapshot, snapshot_bytes, write};
