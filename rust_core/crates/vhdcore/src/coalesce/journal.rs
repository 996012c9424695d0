//! The coalesce journal: the plan and progress of one merge, kept beside the chain so that a run killed at any
//! point is finished by the next.
//!
//! # Format
//!
//! One file per directory, `.vhdcore-coalesce.journal`, in the directory of the parent being merged into:
//!
//! ```text
//! VHDCORE-COALESCE-JOURNAL 1\n
//! crc32c XXXXXXXX\n          (CRC-32C of the JSON body, 8 lowercase hex digits)
//! { ...JSON body... }        ([`Journal`], serde field names)
//! ```
//!
//! It is replaced atomically: written to `.vhdcore-coalesce.journal.tmp`, fsynced, renamed over the journal, and
//! the directory fsynced. A journal that fails its checksum is reported, never guessed at.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub(crate) use crate::chain::pending::journal_path;
use crate::error::{Result, VhdError};

const TEMP_SUFFIX: &str = ".tmp";
const MAGIC: &str = "VHDCORE-COALESCE-JOURNAL 1";
/// A journal holds paths, one header and counters: anything bigger is not one of ours.
const MAX_JOURNAL_BYTES: u64 = 1024 * 1024;

/// Where a merge stands. Each phase is redone from its start (or from `blocks_done`) after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Copying the merged layer's sectors into the parent; invisible to readers while the layer is in the chain.
    Copy,
    /// Rewriting the child's header to point at the parent.
    Relink,
    /// Deleting the merged layer, now out of the chain.
    Remove,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Copy => "copy",
            Phase::Relink => "relink",
            Phase::Remove => "remove",
        }
    }
}

/// One file of the merge, with the identity it must still have when the journal is replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub path: PathBuf,
    pub uuid: String,
    /// The file's size when the merge was planned.
    pub size: u64,
}

/// The child's new header and parent locator data, fixed before any of it is written so a redo writes the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelinkPlan {
    pub header_offset: u64,
    /// The 1024 header bytes, hex.
    pub header_hex: String,
    /// Locator data to write first: (file offset, bytes as hex).
    pub locators: Vec<(u64, String)>,
    /// When the locators did not fit in place they are appended, and the child's footer moves past them.
    pub moved_footer: Option<MovedFooter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedFooter {
    pub old_at: u64,
    pub new_at: u64,
    /// The child's footer (512 bytes), hex.
    pub footer_hex: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub phase: Phase,
    /// The leaf the coalesce was started from (informational).
    pub leaf: PathBuf,
    /// The layer being merged away.
    pub layer: FileRef,
    /// The layer it is merged into; the journal sits in its directory.
    pub parent: FileRef,
    /// The merged layer's only child, relinked to the parent.
    pub child: FileRef,
    /// Allocated blocks of the layer, and how many of them (in BAT order) are durably in the parent.
    pub blocks_total: u64,
    pub blocks_done: u64,
    /// Bytes of sectors the layer holds, and how many of them were copied so far.
    pub bytes_total: u64,
    pub bytes_copied: u64,
    /// Bytes of the parent that the layer's sectors overwrite (counted before any write).
    pub duplicate_bytes: u64,
    /// The parent's file size that no BAT entry points past: a torn append beyond it is cut off on resume.
    pub parent_end: u64,
    pub relink: Option<RelinkPlan>,
}

fn invalid(path: &Path, field: &str, value: String, reason: &str) -> VhdError {
    VhdError::InvalidField {
        path: path.to_path_buf(),
        field: format!("journal.{field}"),
        offset: 0,
        value,
        reason: reason.to_string(),
    }
}

pub fn encode(journal: &Journal) -> Result<Vec<u8>> {
    let body = serde_json::to_vec_pretty(journal)
        .map_err(|e| VhdError::invalid_argument(None, format!("cannot encode the coalesce journal: {e}")))?;
    let mut out = format!("{MAGIC}\ncrc32c {:08x}\n", crc32c::crc32c(&body)).into_bytes();
    out.extend_from_slice(&body);
    Ok(out)
}

pub fn decode(path: &Path, bytes: &[u8]) -> Result<Journal> {
    let mut lines = bytes.splitn(3, |b| *b == b'\n');
    let magic = lines.next().unwrap_or_default();
    if magic != MAGIC.as_bytes() {
        return Err(VhdError::BadCookie {
            path: path.to_path_buf(),
            field: "journal.magic".into(),
            offset: 0,
            expected: MAGIC.into(),
            found: String::from_utf8_lossy(&magic[..magic.len().min(40)]).into_owned(),
            note: "".into(),
        });
    }
    let crc_line = lines.next().unwrap_or_default();
    let crc_text = std::str::from_utf8(crc_line).unwrap_or_default();
    let expected =
        crc_text.strip_prefix("crc32c ").and_then(|hex| u32::from_str_radix(hex, 16).ok()).ok_or_else(|| {
            invalid(path, "crc32c", crc_text.chars().take(40).collect(), "expected `crc32c` and 8 hex digits")
        })?;
    let body = lines.next().unwrap_or_default();
    let found = crc32c::crc32c(body);
    if found != expected {
        return Err(VhdError::Checksum {
            path: path.to_path_buf(),
            field: "journal.crc32c".into(),
            offset: u64::try_from(MAGIC.len() + 1).unwrap_or(0),
            expected,
            found,
        });
    }
    serde_json::from_slice(body).map_err(|e| invalid(path, "body", e.to_string(), "not a coalesce journal"))
}

/// The journal in `dir`, if there is one.
pub fn load(dir: &Path) -> Result<Option<Journal>> {
    let path = journal_path(dir);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(VhdError::io(&path, "open", e)),
    };
    let size = file.metadata().map_err(|e| VhdError::io(&path, "stat", e))?.len();
    if size > MAX_JOURNAL_BYTES {
        return Err(invalid(&path, "size", size.to_string(), "a coalesce journal is at most 1 MiB"));
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_JOURNAL_BYTES), &mut bytes)
        .map_err(|e| VhdError::io(&path, "read", e))?;
    decode(&path, &bytes).map(Some)
}

/// True when `dir` holds a journal (a coalesce in progress or interrupted).
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| VhdError::io(dir, "sync directory", e))
}

/// Replaces the journal in `dir` atomically (write temp, fsync, rename, fsync the directory).
pub(crate) fn store(dir: &Path, journal: &Journal, crash: &dyn Fn() -> Result<()>) -> Result<()> {
    let path = journal_path(dir);
    let mut temp = path.clone().into_os_string();
    temp.push(TEMP_SUFFIX);
    let temp = PathBuf::from(temp);
    let bytes = encode(journal)?;
    let mut file = File::create(&temp).map_err(|e| VhdError::io(&temp, "create", e))?;
    crash()?;
    file.write_all(&bytes).map_err(|e| VhdError::io(&temp, "write", e))?;
    file.sync_all().map_err(|e| VhdError::io(&temp, "sync", e))?;
    drop(file);
    crash()?;
    std::fs::rename(&temp, &path).map_err(|e| VhdError::io(&path, "rename", e))?;
    sync_dir(dir)
}

/// Deletes the journal of `dir` once its merge is complete.
pub(crate) fn remove(dir: &Path, crash: &dyn Fn() -> Result<()>) -> Result<()> {
    crash()?;
    let path = journal_path(dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(VhdError::io(&path, "remove", e)),
    }
    sync_dir(dir)
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn from_hex(path: &Path, field: &str, text: &str) -> Result<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 2 * 65_536 {
        return Err(invalid(path, field, format!("{} hex digits", text.len()), "expected an even count up to 131072"));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| invalid(path, field, text.chars().skip(i).take(2).collect(), "not hex"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Journal {
        let file = |name: &str| FileRef { path: PathBuf::from(name), uuid: "u".into(), size: 1 };
        Journal {
            phase: Phase::Copy,
            leaf: PathBuf::from("/sr/leaf.vhd"),
            layer: file("/sr/mid.vhd"),
            parent: file("/sr/base.vhd"),
            child: file("/sr/leaf.vhd"),
            blocks_total: 3,
            blocks_done: 1,
            bytes_total: 4096,
            bytes_copied: 512,
            duplicate_bytes: 0,
            parent_end: 4096,
            relink: None,
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&sample()).unwrap_or_default();
        assert_eq!(decode(Path::new("j"), &bytes).ok(), Some(sample()));
    }

    #[test]
    fn a_flipped_byte_is_a_checksum_error() {
        let mut bytes = encode(&sample()).unwrap_or_default();
        let last = bytes.len() - 3;
        bytes[last] ^= 1;
        let err = decode(Path::new("j"), &bytes).err();
        assert!(matches!(err, Some(VhdError::Checksum { .. })), "{err:?}");
    }

    #[test]
    fn hex_round_trip_and_rejects_garbage() {
        let data = [0u8, 1, 0xab, 0xff];
        assert_eq!(from_hex(Path::new("j"), "x", &to_hex(&data)).ok(), Some(data.to_vec()));
        assert!(from_hex(Path::new("j"), "x", "zz").is_err());
        assert!(from_hex(Path::new("j"), "x", "abc").is_err());
    }
}
