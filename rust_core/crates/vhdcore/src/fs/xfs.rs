//! XFS (placeholder).
use super::{doubt, FsResult, Region};
pub(crate) fn free_ranges(_region: Region<'_>) -> FsResult<Vec<(u64, u64)>> {
    Err(doubt("xfs: not yet"))
}
