//! Linux swap: after the header page, nothing a restored system reads (swap is rewritten from scratch at boot),
//! unless the area holds a hibernation image, which resume would read: then it is kept whole.

use super::{doubt, FsResult, Region};

const PAGE_SIZES: [usize; 4] = [4096, 8192, 16384, 65536];

/// The page size whose last 10 bytes carry a swap signature, and the signature.
fn signature(head: &[u8]) -> Option<(usize, &[u8])> {
    PAGE_SIZES.iter().find_map(|&p| {
        let sig = head.get(p.checked_sub(10)?..p)?;
        let known = [&b"SWAPSPACE2"[..], b"SWAP-SPACE", b"S1SUSPEND\0", b"S2SUSPEND\0", b"ULSUSPEND\0"];
        if known.contains(&sig)
            || sig.starts_with(b"S1SUSP")
            || sig.starts_with(b"S2SUSP")
            || sig.starts_with(b"LINHIB")
        {
            Some((p, sig))
        } else {
            None
        }
    })
}

pub(crate) fn is_swap(head: &[u8]) -> bool {
    signature(head).is_some()
}

pub(crate) fn free_ranges(region: Region<'_>, head: &[u8]) -> FsResult<Vec<(u64, u64)>> {
    let (page, sig) = signature(head).ok_or_else(|| doubt("no swap signature"))?;
    if sig != b"SWAPSPACE2" {
        return Err(doubt(format!(
            "swap area holds a hibernation image or an old format ({})",
            String::from_utf8_lossy(sig)
        )));
    }
    let last_page = u64::from(super::bytes::le32(head, 1028)?);
    let page = super::bytes::u64_of(page);
    // The area is pages 0..=last_page; a partition tail past it is kept.
    let end =
        last_page.checked_add(1).and_then(|n| n.checked_mul(page)).ok_or_else(|| doubt("swap last_page overflows"))?;
    let end = end.min(region.len);
    if end <= page {
        return Ok(Vec::new());
    }
    Ok(vec![(page, end - page)])
}
