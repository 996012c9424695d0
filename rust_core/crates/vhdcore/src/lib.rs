//! vhdcore: read, write, map, diff, flatten and coalesce VHD chains.
//!
//! A library a storage engineer can use alone, like `qemu-img`: it knows nothing of clouds, jobs or HTTP, only the
//! disks it is handed. Every malformed input gives a typed [`VhdError`] naming the field and offset.

pub mod chain;
pub mod check;
pub mod coalesce;
pub mod compress;
pub mod diff;
mod direct_writer;
pub mod disk;
pub mod early_abort;
pub mod error;
pub mod estimate;
pub mod export;
pub mod format;
pub mod frame_encoder;
pub mod fs;
pub mod journal;
pub mod long_match;
pub mod map;
pub mod merge_copy;
pub mod plan;
pub mod resolve;
pub mod rng;
pub mod source;
pub mod writer;

pub use chain::{Chain, MAX_CHAIN_DEPTH};
pub use check::check;
pub use coalesce::{coalesce, coalesce_step, Budget, CoalesceReport, Merge, Pending, Skipped, StepReport};
pub use compress::{
    build_chunk, build_head, compress_chunk, compress_chunks_into, compress_fetched_chunk, compress_head,
    compress_image, head_and_gap, head_length, head_room, ChunkDigest, ChunkFrame, ImageStats, Placed, CONTENT_LEAF,
    DEFAULT_LEVEL,
};
pub use diff::{diff, DiffResult};
pub use disk::Disk;
pub use error::{ErrorKind, Result, VhdError};
pub use estimate::{estimate, Estimate, EstimateOptions};
pub use export::{export, ExportFormat, ExportStats};
pub use format::{DiskType, DEFAULT_BLOCK_SIZE, MAX_VIRTUAL_SIZE};
pub use map::{Extent, Occupancy};
pub use merge_copy::{merge_layout, merged_block, MergeLayout, MergeSegment};
pub use plan::{ChunkPlan, FetchedChunk, ImagePlan, PlanLayer, SourceRead, DEFAULT_CHUNK_SIZE, IMAGE_BLOCK_SIZE};
pub use resolve::{LayerGeometry, LayerSource, Run};
pub use source::{LayerStore, MemoryStore, ReadAt};
pub use writer::{children, create, restamp, set_uuid, snapshot, snapshot_bytes, write};
