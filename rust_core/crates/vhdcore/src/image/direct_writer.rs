//! Appending the compressed image to its file without the page cache (`O_DIRECT`), in large aligned writes.
//!
//! Why: a buffered write copies every output byte into the page cache and leaves the kernel to write it back, which
//! on incompressible data (output as large as the input) measured about a fifth of the compressor's CPU; a direct
//! write hands the device an aligned buffer instead. Frames of any size are gathered in an aligned buffer and
//! written whole blocks at a time; the unaligned tail, and everything on a file system that refuses `O_DIRECT`
//! (tmpfs), goes through the ordinary buffered path.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use crate::error::{Result, VhdError};
use crate::io::Target;

/// Alignment of direct writes (buffer address, file offset and length): the largest logical block size in use.
const ALIGN: usize = 4096;
/// Bytes gathered before a direct write.
const GATHER: usize = 8 << 20;

/// Writes bytes one after the other from a starting offset of `target`.
pub(crate) struct AppendWriter<'a> {
    target: &'a Target,
    direct: Option<File>,
    /// Over-allocated by ALIGN so that `buf[aligned..]` starts on an aligned address.
    buf: Vec<u8>,
    aligned: usize,
    /// Bytes gathered at `buf[aligned..aligned + len]`, which belong at `file_offset` onwards.
    len: usize,
    file_offset: u64,
    /// Where the next appended byte goes.
    end: u64,
}

impl<'a> AppendWriter<'a> {
    pub(crate) fn new(target: &'a Target, start: u64) -> Result<AppendWriter<'a>> {
        let direct = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(target.path()).ok();
        let buf = if direct.is_some() { vec![0u8; GATHER + 2 * ALIGN] } else { Vec::new() };
        // The buffer's address is only used to find its first aligned byte.
        let aligned = (ALIGN - buf.as_ptr() as usize % ALIGN) % ALIGN;
        let align = u64::try_from(ALIGN).unwrap_or(4096);
        let file_offset = start - start % align;
        let mut writer = AppendWriter { target, direct, buf, aligned, len: 0, file_offset, end: start };
        if writer.direct.is_some() {
            // The bytes between the aligned offset and `start` are the file's (a frame written before, or zeros of
            // room the caller fills later): the first direct write rewrites them as they are.
            let keep = usize::try_from(start - file_offset).unwrap_or(0);
            let head = &mut writer.buf[aligned..aligned + keep];
            let mut read = 0;
            while read < keep {
                let at = file_offset + u64::try_from(read).unwrap_or(0);
                match target.file().read_at(&mut head[read..], at) {
                    Ok(0) => break, // past the end: zeros
                    Ok(n) => read += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(VhdError::io(target.path(), "read", e)),
                }
            }
            head[read..].fill(0);
            writer.len = keep;
        }
        Ok(writer)
    }

    /// Puts every byte appended so far on the device: the gathered partial block goes through the buffered path
    /// (it stays gathered, and the next direct write of that block rewrites it), then `fdatasync`.
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.flush_blocks()?;
        if self.direct.is_some() && self.len > 0 {
            self.target.write_at(&self.buf[self.aligned..self.aligned + self.len], self.file_offset)?;
        }
        self.target.file().sync_data().map_err(|e| VhdError::io(self.target.path(), "sync", e))
    }

    pub(crate) fn append(&mut self, mut bytes: &[u8]) -> Result<()> {
        let at = self.end;
        self.end = at
            .checked_add(u64::try_from(bytes.len()).unwrap_or(u64::MAX))
            .ok_or_else(|| VhdError::invalid_argument(None, "image larger than 2^64 bytes"))?;
        if self.direct.is_none() {
            return self.target.write_at(bytes, at);
        }
        while !bytes.is_empty() {
            let room = GATHER + ALIGN - self.len;
            let take = room.min(bytes.len());
            let start = self.aligned + self.len;
            self.buf[start..start + take].copy_from_slice(&bytes[..take]);
            self.len += take;
            bytes = &bytes[take..];
            if self.len >= GATHER {
                self.flush_blocks()?;
            }
        }
        Ok(())
    }

    /// Writes the whole aligned blocks gathered so far; the partial block left over moves to the buffer's start.
    fn flush_blocks(&mut self) -> Result<()> {
        let whole = self.len - self.len % ALIGN;
        if whole == 0 {
            return Ok(());
        }
        let Some(direct) = &self.direct else { return Ok(()) };
        let blocks = &self.buf[self.aligned..self.aligned + whole];
        if let Err(error) = direct.write_all_at(blocks, self.file_offset) {
            if error.raw_os_error() != Some(libc::EINVAL) {
                return Err(VhdError::io(self.target.path(), "write", error));
            }
            // Refused after all (an alignment this file system wants bigger): buffered from here on.
            self.target.write_at(blocks, self.file_offset)?;
            self.direct = None;
        }
        self.file_offset += u64::try_from(whole).unwrap_or(0);
        self.buf.copy_within(self.aligned + whole..self.aligned + self.len, self.aligned);
        self.len -= whole;
        if self.direct.is_none() && self.len > 0 {
            self.target.write_at(&self.buf[self.aligned..self.aligned + self.len], self.file_offset)?;
            self.len = 0;
        }
        Ok(())
    }

    /// Writes what is still gathered and returns the end of the appended bytes.
    pub(crate) fn finish(mut self) -> Result<u64> {
        self.flush_blocks()?;
        if self.len > 0 {
            self.target.write_at(&self.buf[self.aligned..self.aligned + self.len], self.file_offset)?;
        }
        Ok(self.end)
    }
}
