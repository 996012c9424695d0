//! Bounds-checked field readers and the small checksums the on-disk formats use. Every helper returns a doubt
//! (never panics) when a field would lie outside its buffer.

use super::{doubt, FsResult};

fn field<const N: usize>(b: &[u8], off: usize) -> FsResult<[u8; N]> {
    let end = off.checked_add(N).ok_or_else(|| doubt(format!("field offset {off} overflows")))?;
    let s = b.get(off..end).ok_or_else(|| doubt(format!("field at {off}..{end} is past a {}-byte buffer", b.len())))?;
    let mut out = [0u8; N];
    out.copy_from_slice(s);
    Ok(out)
}

pub(crate) fn le16(b: &[u8], off: usize) -> FsResult<u16> {
    field::<2>(b, off).map(u16::from_le_bytes)
}

pub(crate) fn le32(b: &[u8], off: usize) -> FsResult<u32> {
    field::<4>(b, off).map(u32::from_le_bytes)
}

pub(crate) fn le64(b: &[u8], off: usize) -> FsResult<u64> {
    field::<8>(b, off).map(u64::from_le_bytes)
}

pub(crate) fn be16(b: &[u8], off: usize) -> FsResult<u16> {
    field::<2>(b, off).map(u16::from_be_bytes)
}

pub(crate) fn be32(b: &[u8], off: usize) -> FsResult<u32> {
    field::<4>(b, off).map(u32::from_be_bytes)
}

pub(crate) fn be64(b: &[u8], off: usize) -> FsResult<u64> {
    field::<8>(b, off).map(u64::from_be_bytes)
}

pub(crate) fn u8_at(b: &[u8], off: usize) -> FsResult<u8> {
    field::<1>(b, off).map(|a| a[0])
}

/// `b[off..off+len]`, or a doubt.
pub(crate) fn slice(b: &[u8], off: usize, len: usize) -> FsResult<&[u8]> {
    let end = off.checked_add(len).ok_or_else(|| doubt("slice end overflows"))?;
    b.get(off..end).ok_or_else(|| doubt(format!("bytes {off}..{end} are past a {}-byte buffer", b.len())))
}

/// A disk-supplied number as a buffer index.
pub(crate) fn usize_of(v: u64, what: &str) -> FsResult<usize> {
    usize::try_from(v).map_err(|_| doubt(format!("{what} {v} does not fit in memory")))
}

pub(crate) fn u64_of(v: usize) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

pub(crate) fn mul(a: u64, b: u64, what: &str) -> FsResult<u64> {
    a.checked_mul(b).ok_or_else(|| doubt(format!("{what}: {a} * {b} overflows")))
}

/// The CRC-32 of zlib/GPT (reflected polynomial 0xEDB88320, initial and final inversion).
pub(crate) fn crc32_ieee(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[usize::from((crc as u8) ^ b)] ^ (crc >> 8);
    }
    !crc
}

/// CRC-16 (ANSI, reflected 0xA001) as ext4's `uninit_bg`/`gdt_csum` group descriptor checksums use it.
pub(crate) fn crc16(mut crc: u16, data: &[u8]) -> u16 {
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xA001 } else { crc >> 1 };
        }
    }
    crc
}

/// The raw CRC-32C register update the Linux kernel calls `crc32c(seed, data)` (no final inversion), as ext4 and
/// jbd2 chain it.
pub(crate) fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}
