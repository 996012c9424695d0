//! One error type for the whole crate: every variant says what was wrong, in which file, and where.

use std::path::{Path, PathBuf};

/// Stable machine names of the error kinds; the Python binding maps each to one exception class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    Io,
    BadCookie,
    Checksum,
    Truncated,
    InvalidField,
    BatOutOfRange,
    OverlappingBlocks,
    Unsupported,
    MissingParent,
    ParentMismatch,
    ChainCycle,
    ChainTooDeep,
    InvalidArgument,
    Interrupted,
    CoalescePending,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::BadCookie => "bad_cookie",
            ErrorKind::Checksum => "checksum",
            ErrorKind::Truncated => "truncated",
            ErrorKind::InvalidField => "invalid_field",
            ErrorKind::BatOutOfRange => "bat_out_of_range",
            ErrorKind::OverlappingBlocks => "overlapping_blocks",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::MissingParent => "missing_parent",
            ErrorKind::ParentMismatch => "parent_mismatch",
            ErrorKind::ChainCycle => "chain_cycle",
            ErrorKind::ChainTooDeep => "chain_too_deep",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::Interrupted => "interrupted",
            ErrorKind::CoalescePending => "coalesce_pending",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VhdError {
    #[error("{}: cannot {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot read {length} bytes at offset {offset}: {source}", path.display())]
    Read {
        path: PathBuf,
        offset: u64,
        length: u64,
        #[source]
        source: std::io::Error,
    },
    /// `note`: what the file is instead, when it can be told (empty, or starting with "; ").
    #[error("{}: {field} at offset {offset}: expected cookie {expected:?}, found {found:?}{note}", path.display())]
    BadCookie { path: PathBuf, field: String, offset: u64, expected: String, found: String, note: Box<str> },
    #[error("{}: {field} at offset {offset}: expected checksum {expected:#010x}, found {found:#010x}", path.display())]
    Checksum { path: PathBuf, field: String, offset: u64, expected: u32, found: u32 },
    #[error("{}: {field} at offset {offset} needs {needed} bytes but the file has {file_size}", path.display())]
    Truncated { path: PathBuf, field: String, offset: u64, needed: u64, file_size: u64 },
    #[error("{}: {field} at offset {offset} is {value}: {reason}", path.display())]
    InvalidField { path: PathBuf, field: String, offset: u64, value: String, reason: String },
    #[error("{}: {field} at offset {offset} points to sector {sector}, whose block ends at byte {block_end}, past the data end {data_end}", path.display())]
    BatOutOfRange { path: PathBuf, field: String, offset: u64, sector: u32, block_end: u64, data_end: u64 },
    #[error("{}: {field} at offset {offset}: its block [{start}, {end}) overlaps {other}", path.display())]
    OverlappingBlocks { path: PathBuf, field: String, offset: u64, start: u64, end: u64, other: String },
    #[error("{}: {field} at offset {offset}: {what} is not supported", path.display())]
    Unsupported { path: PathBuf, field: String, offset: u64, what: String },
    #[error("{}: parent {parent_name:?} (uuid {parent_uuid}) not found; tried {}", path.display(), fmt_paths(tried))]
    MissingParent { path: PathBuf, offset: u64, parent_name: String, parent_uuid: String, tried: Vec<PathBuf> },
    #[error("{}: header.parent_uuid expects parent uuid {expected}, but {} has uuid {found}", path.display(), parent.display())]
    ParentMismatch { path: PathBuf, offset: u64, parent: PathBuf, expected: String, found: String },
    #[error("{}: parent {} is already in the chain (cycle)", path.display(), parent.display())]
    ChainCycle { path: PathBuf, offset: u64, parent: PathBuf },
    #[error("{}: chain is deeper than the cap of {max_depth} layers", path.display())]
    ChainTooDeep { path: PathBuf, max_depth: usize },
    #[error("{what}")]
    InvalidArgument { path: Option<PathBuf>, what: String },
    #[error("{}: interrupted", path.display())]
    Interrupted { path: PathBuf },
    #[error("{}: a coalesce of this chain was interrupted (journal {}); until it is finished: {cause}", path.display(), journal.display())]
    CoalescePending { path: PathBuf, journal: PathBuf, cause: String },
}

fn fmt_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "no candidate path".to_string();
    }
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

pub type Result<T> = std::result::Result<T, VhdError>;

impl VhdError {
    pub fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        VhdError::Io { path: path.to_path_buf(), op, source }
    }

    pub fn invalid_argument(path: Option<&Path>, what: impl Into<String>) -> Self {
        VhdError::InvalidArgument { path: path.map(Path::to_path_buf), what: what.into() }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            VhdError::Io { .. } | VhdError::Read { .. } => ErrorKind::Io,
            VhdError::BadCookie { .. } => ErrorKind::BadCookie,
            VhdError::Checksum { .. } => ErrorKind::Checksum,
            VhdError::Truncated { .. } => ErrorKind::Truncated,
            VhdError::InvalidField { .. } => ErrorKind::InvalidField,
            VhdError::BatOutOfRange { .. } => ErrorKind::BatOutOfRange,
            VhdError::OverlappingBlocks { .. } => ErrorKind::OverlappingBlocks,
            VhdError::Unsupported { .. } => ErrorKind::Unsupported,
            VhdError::MissingParent { .. } => ErrorKind::MissingParent,
            VhdError::ParentMismatch { .. } => ErrorKind::ParentMismatch,
            VhdError::ChainCycle { .. } => ErrorKind::ChainCycle,
            VhdError::ChainTooDeep { .. } => ErrorKind::ChainTooDeep,
            VhdError::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            VhdError::Interrupted { .. } => ErrorKind::Interrupted,
            VhdError::CoalescePending { .. } => ErrorKind::CoalescePending,
        }
    }

    pub fn path(&self) -> Option<&Path> {
        match self {
            VhdError::Io { path, .. }
            | VhdError::Read { path, .. }
            | VhdError::BadCookie { path, .. }
            | VhdError::Checksum { path, .. }
            | VhdError::Truncated { path, .. }
            | VhdError::InvalidField { path, .. }
            | VhdError::BatOutOfRange { path, .. }
            | VhdError::OverlappingBlocks { path, .. }
            | VhdError::Unsupported { path, .. }
            | VhdError::MissingParent { path, .. }
            | VhdError::ParentMismatch { path, .. }
            | VhdError::ChainCycle { path, .. }
            | VhdError::ChainTooDeep { path, .. }
            | VhdError::Interrupted { path }
            | VhdError::CoalescePending { path, .. } => Some(path),
            VhdError::InvalidArgument { path, .. } => path.as_deref(),
        }
    }

    /// The on-disk field the error is about, in the spec's words (`footer.checksum`, `bat[17]`, ...).
    pub fn field(&self) -> Option<&str> {
        match self {
            VhdError::BadCookie { field, .. }
            | VhdError::Checksum { field, .. }
            | VhdError::Truncated { field, .. }
            | VhdError::InvalidField { field, .. }
            | VhdError::BatOutOfRange { field, .. }
            | VhdError::OverlappingBlocks { field, .. }
            | VhdError::Unsupported { field, .. } => Some(field),
            VhdError::MissingParent { .. } => Some("header.parent_locator"),
            VhdError::ParentMismatch { .. } => Some("header.parent_uuid"),
            VhdError::ChainCycle { .. } | VhdError::ChainTooDeep { .. } => Some("header.parent_uuid"),
            VhdError::Io { .. }
            | VhdError::Read { .. }
            | VhdError::InvalidArgument { .. }
            | VhdError::Interrupted { .. }
            | VhdError::CoalescePending { .. } => None,
        }
    }

    /// Byte offset in the file of the field the error is about.
    pub fn offset(&self) -> Option<u64> {
        match self {
            VhdError::Read { offset, .. }
            | VhdError::BadCookie { offset, .. }
            | VhdError::Checksum { offset, .. }
            | VhdError::Truncated { offset, .. }
            | VhdError::InvalidField { offset, .. }
            | VhdError::BatOutOfRange { offset, .. }
            | VhdError::OverlappingBlocks { offset, .. }
            | VhdError::Unsupported { offset, .. }
            | VhdError::MissingParent { offset, .. }
            | VhdError::ParentMismatch { offset, .. }
            | VhdError::ChainCycle { offset, .. } => Some(*offset),
            _ => None,
        }
    }
}
