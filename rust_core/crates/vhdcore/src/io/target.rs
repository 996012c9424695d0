//! [`Target`]: a staged file renamed into place, a file written in place, or a pipe or device written in order.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Result, VhdError};

/// Where the bytes go: a temporary file renamed into place, a file written in place, or a device or pipe written
/// front to back.
pub(crate) enum Target {
    Staged {
        file: File,
        temp: PathBuf,
        dest: PathBuf,
    },
    Stream {
        file: File,
        path: PathBuf,
    },
    /// A pipe, socket or device: written in order from its current position, holes as zeros; `at` is the offset
    /// (from where the output began) that the next byte lands on.
    Sequential {
        file: File,
        path: PathBuf,
        at: Mutex<u64>,
    },
}

/// Zeros written at most this many bytes at a time when a sequential output skips a hole.
const HOLE_PIECE: usize = 1024 * 1024;

impl Target {
    pub(crate) fn open(out: &Path, what: &str) -> Result<Target> {
        let special = std::fs::metadata(out).ok().filter(|m| !m.is_file());
        if let Some(meta) = special {
            let ft = meta.file_type();
            let streamable = ft.is_char_device() || ft.is_fifo() || ft.is_block_device();
            if !streamable {
                return Err(VhdError::invalid_argument(
                    Some(out),
                    format!("cannot export {what} to {}: not a regular file", out.display()),
                ));
            }
            let file = OpenOptions::new().write(true).open(out).map_err(|e| VhdError::io(out, "open", e))?;
            return Ok(Target::Sequential { file, path: out.to_path_buf(), at: Mutex::new(0) });
        }
        Target::staged(out)
    }

    /// A hidden temporary file beside `out`, renamed over it by `finish`: no partial output is ever visible.
    /// Refuses to replace anything but a regular file (renaming over `/dev/null` would remove the device).
    pub(crate) fn staged(out: &Path) -> Result<Target> {
        if std::fs::metadata(out).is_ok_and(|m| !m.is_file()) {
            return Err(VhdError::invalid_argument(
                Some(out),
                format!("cannot write to {}: not a regular file (this output needs one)", out.display()),
            ));
        }
        let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "export".into());
        let temp = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)
            .map_err(|e| VhdError::io(&temp, "create", e))?;
        Ok(Target::Staged { file, temp, dest: out.to_path_buf() })
    }

    /// The regular file `out` written in place: created when missing, never truncated (the caller decides what
    /// its bytes become and where it ends).
    pub(crate) fn in_place(out: &Path) -> Result<Target> {
        if std::fs::metadata(out).is_ok_and(|m| !m.is_file()) {
            return Err(VhdError::invalid_argument(
                Some(out),
                format!("cannot write to {}: not a regular file", out.display()),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(out)
            .map_err(|e| VhdError::io(out, "open", e))?;
        Ok(Target::Stream { file, path: out.to_path_buf() })
    }

    pub(crate) fn file(&self) -> &File {
        match self {
            Target::Staged { file, .. } | Target::Stream { file, .. } | Target::Sequential { file, .. } => file,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        match self {
            Target::Staged { temp, .. } => temp,
            Target::Stream { path, .. } | Target::Sequential { path, .. } => path,
        }
    }

    pub(crate) fn is_sequential(&self) -> bool {
        matches!(self, Target::Sequential { .. })
    }

    /// Writes `buf` at `offset`. A sequential output takes offsets in increasing order only: what lies between the
    /// last write and `offset` goes out as zeros.
    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let Target::Sequential { at, .. } = self else {
            return self.file().write_all_at(buf, offset).map_err(|e| VhdError::io(self.path(), "write", e));
        };
        let mut at = at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.fill_locked(&mut at, offset)?;
        self.append(buf)?;
        *at += u64::try_from(buf.len()).unwrap_or(u64::MAX);
        Ok(())
    }

    /// Brings a sequential output up to `end` with zeros (nothing to do for the others, whose holes read as zeros).
    pub(crate) fn fill_to(&self, end: u64) -> Result<()> {
        if let Target::Sequential { at, .. } = self {
            let mut at = at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.fill_locked(&mut at, end)?;
        }
        Ok(())
    }

    fn fill_locked(&self, at: &mut u64, offset: u64) -> Result<()> {
        if offset < *at {
            return Err(VhdError::invalid_argument(
                Some(self.path()),
                format!(
                    "cannot write at {offset} in {}: it is written in order, already at {}",
                    self.path().display(),
                    *at
                ),
            ));
        }
        let zeros = vec![0u8; usize::try_from(offset - *at).unwrap_or(usize::MAX).min(HOLE_PIECE)];
        while *at < offset {
            let piece = usize::try_from(offset - *at).unwrap_or(usize::MAX).min(zeros.len());
            self.append(&zeros[..piece])?;
            *at += u64::try_from(piece).unwrap_or(0);
        }
        Ok(())
    }

    fn append(&self, buf: &[u8]) -> Result<()> {
        let mut file = self.file();
        file.write_all(buf).map_err(|e| VhdError::io(self.path(), "write", e))
    }

    pub(crate) fn finish(self) -> Result<()> {
        if let Target::Staged { temp, dest, .. } = &self {
            std::fs::rename(temp, dest).map_err(|e| VhdError::io(dest, "rename into place", e))?;
        }
        Ok(())
    }

    /// Puts the output in place when `result` is Ok, removes the staged file when it is not.
    pub(crate) fn complete<T>(self, result: Result<T>) -> Result<T> {
        match result {
            Ok(value) => {
                self.finish()?;
                Ok(value)
            }
            Err(e) => {
                self.abandon();
                Err(e)
            }
        }
    }

    pub(crate) fn abandon(self) {
        if let Target::Staged { temp, .. } = &self {
            let _ = std::fs::remove_file(temp);
        }
    }
}
