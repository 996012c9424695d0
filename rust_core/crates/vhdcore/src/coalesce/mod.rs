//! Coalescing a chain of local VHD files: merge a read-only layer into its parent, relink the layer's child to the
//! parent, delete the layer; bottom-up, so each layer's data is copied once.
//!
//! Crash safety rests on one fact: while the merged layer is still in the chain, every sector it holds is read from
//! it, so writing those sectors into the parent changes nothing a reader sees. The ordering is therefore:
//!
//! 1. **plan**: the journal (see [`crate::coalesce::journal`]) is made durable before the parent is touched;
//! 2. **copy**: each present sector of the layer is written into the parent at the same place. A new parent block is
//!    appended past the data: a new footer at the new end first, then its bitmap over the old footer, the data, an
//!    fsync, a journal record of the parent's new end, and only then the BAT entry. Redone from the journal's
//!    `blocks_done` after a crash (copying the same bytes twice is harmless);
//! 3. **relink**: the child's new header and locators are recorded in the journal, then written (locators, fsync,
//!    header, fsync). From here the child reads the parent directly, which now holds the same bytes;
//! 4. **remove**: the layer (out of the chain) is deleted, then the journal.
//!
//! Work is done in bounded steps ([`coalesce_step`]), each resumable from the journal. A lock file in the leaf's
//! folder keeps two coalesces from running the same journal at once.
//!
//! Assumptions: the layers below the leaf are read-only (as in any VHD chain); the leaf may be written between
//! steps, but not during the relink step when it is the merged layer's child (its header is rewritten then, as
//! tapdisk's pause/unpause does around a coalesce); a merge resumed later refuses to go on if the parent gained
//! another child meanwhile. Simulated crashes (the [`CRASH_ENV`] hook, torn writes) are tested at every write
//! point; the fsync ordering against power loss is argued above, not tested.

pub(crate) mod journal;
pub(crate) mod merge_copy;

use std::cell::Cell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use zerocopy::{FromBytes, IntoBytes};

use crate::chain::pending::{canonical, dir_of, journal_dirs_of};
use crate::chain::{Chain, MAX_CHAIN_DEPTH};
use crate::disk::{read_exact_at, Disk};
use crate::error::{ErrorKind, Result, VhdError};
use crate::format::{
    encode_utf16, DiskType, Footer, Header, ParentLocatorEntry, BAT_UNUSED, FOOTER_COOKIE, FOOTER_SIZE, HEADER_SIZE,
    PARENT_LOCATOR_COUNT, PLATFORM_MACX, PLATFORM_NONE, PLATFORM_W2KU, PLATFORM_W2RU, PLATFORM_WI2K, PLATFORM_WI2R,
    SECTOR_SIZE,
};
use crate::writer::relative_parent_name;
use journal::{FileRef, Journal, MovedFooter, Phase, RelinkPlan};

/// Blocks of the layer copied between two journal checkpoints (64 MiB with 2 MiB blocks).
const CHECKPOINT_BLOCKS: u64 = 32;
/// The environment variable of the crash hook: the process aborts at that write, sync, rename or unlink
/// (counted from 1; a write of 1 KiB or more is torn: its first half is written, then the process aborts).
pub const CRASH_ENV: &str = "VHDCORE_COALESCE_CRASH_AFTER";

/// How much one step may do. `None` is unbounded; a step always makes some progress (one block at least).
#[derive(Debug, Clone, Copy, Default)]
pub struct Budget {
    pub bytes: Option<u64>,
    pub time: Option<Duration>,
}

/// One layer merged into its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merge {
    pub layer: PathBuf,
    pub parent: PathBuf,
    pub child: PathBuf,
    /// Bytes of the parent that the layer overwrote (stored twice before the merge).
    pub duplicate_bytes: u64,
    /// Bytes of sectors copied from the layer into the parent.
    pub bytes_copied: u64,
    /// Size of the deleted layer file.
    pub file_bytes_freed: u64,
    /// Growth of the parent and child files.
    pub file_bytes_added: u64,
}

/// A merge under way when a step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub layer: PathBuf,
    pub parent: PathBuf,
    pub phase: Phase,
    pub bytes_copied: u64,
    pub bytes_total: u64,
}

/// A layer left alone, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub layer: PathBuf,
    pub reason: String,
}

#[derive(Debug, Clone, Default)]
pub struct StepReport {
    /// Nothing is left to merge (and no journal is pending).
    pub done: bool,
    /// The step finished a journal left by an earlier, interrupted run.
    pub recovered: bool,
    /// Merges completed in this step.
    pub merges: Vec<Merge>,
    /// Bytes copied in this step (including merges still pending).
    pub bytes_copied: u64,
    pub pending: Option<Pending>,
    pub skipped: Vec<Skipped>,
    /// Layers in the chain after this step.
    pub depth: usize,
}

/// The totals of a whole coalesce.
#[derive(Debug, Clone, Default)]
pub struct CoalesceReport {
    pub merges: Vec<Merge>,
    pub steps: u64,
    pub recovered: bool,
    pub skipped: Vec<Skipped>,
    pub depth_before: usize,
    pub depth: usize,
}

impl CoalesceReport {
    pub fn duplicate_bytes(&self) -> u64 {
        self.merges.iter().map(|m| m.duplicate_bytes).sum()
    }

    pub fn bytes_copied(&self) -> u64 {
        self.merges.iter().map(|m| m.bytes_copied).sum()
    }

    pub fn file_bytes_freed(&self) -> u64 {
        self.merges.iter().map(|m| m.file_bytes_freed).sum()
    }

    pub fn file_bytes_added(&self) -> u64 {
        self.merges.iter().map(|m| m.file_bytes_added).sum()
    }
}

/// The coalesce's mutating operations (writes, syncs, truncations, renames, unlinks). With the `test-utils` feature
/// (tests only: the release module and the Lambda layer are built without it) they carry a hook that simulates a
/// crash at the n-th one: the process aborts, or the step fails with `Interrupted`. Without it, `from_env` reads
/// nothing and nothing is ever due.
pub struct Faults {
    #[cfg(any(test, feature = "test-utils"))]
    after: Option<u64>,
    count: Cell<u64>,
    #[cfg(any(test, feature = "test-utils"))]
    abort: bool,
}

impl Faults {
    pub fn none() -> Faults {
        Faults {
            #[cfg(any(test, feature = "test-utils"))]
            after: None,
            count: Cell::new(0),
            #[cfg(any(test, feature = "test-utils"))]
            abort: false,
        }
    }

    /// Fails with [`VhdError::Interrupted`] at the n-th mutating operation (counted from 1).
    #[cfg(any(test, feature = "test-utils"))]
    pub fn fail_at(n: u64) -> Faults {
        Faults { after: Some(n), count: Cell::new(0), abort: false }
    }

    /// Aborts the process at the operation named by [`CRASH_ENV`], if set.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn from_env() -> Faults {
        let after = std::env::var(CRASH_ENV).ok().and_then(|v| v.trim().parse::<u64>().ok()).filter(|n| *n > 0);
        Faults { after, count: Cell::new(0), abort: true }
    }

    /// No hook in a build without `test-utils`: [`CRASH_ENV`] is not read.
    #[cfg(not(any(test, feature = "test-utils")))]
    pub fn from_env() -> Faults {
        Faults::none()
    }

    /// Mutating operations seen so far.
    pub fn operations(&self) -> u64 {
        self.count.get()
    }

    fn due(&self) -> bool {
        let n = self.count.get().saturating_add(1);
        self.count.set(n);
        #[cfg(any(test, feature = "test-utils"))]
        return self.after == Some(n);
        #[cfg(not(any(test, feature = "test-utils")))]
        false
    }

    fn crash(&self, path: &Path) -> VhdError {
        #[cfg(any(test, feature = "test-utils"))]
        if self.abort {
            std::process::abort();
        }
        VhdError::Interrupted { path: path.to_path_buf() }
    }

    fn point(&self, path: &Path) -> Result<()> {
        if self.due() {
            return Err(self.crash(path));
        }
        Ok(())
    }

    fn write_at(&self, file: &File, path: &Path, buf: &[u8], offset: u64) -> Result<()> {
        if self.due() {
            // A torn write: whole sectors of the first half reach the file.
            let torn = buf.len() / 2 / 512 * 512;
            let _ = file.write_all_at(&buf[..torn], offset);
            return Err(self.crash(path));
        }
        file.write_all_at(buf, offset).map_err(|e| VhdError::io(path, "write", e))
    }

    fn sync(&self, file: &File, path: &Path) -> Result<()> {
        self.point(path)?;
        file.sync_all().map_err(|e| VhdError::io(path, "sync", e))
    }

    fn set_len(&self, file: &File, path: &Path, len: u64) -> Result<()> {
        self.point(path)?;
        file.set_len(len).map_err(|e| VhdError::io(path, "truncate", e))
    }
}

fn file_ref(disk: &Disk) -> FileRef {
    FileRef { path: canonical(&disk.path), uuid: disk.uuid_string(), size: disk.file_size }
}

fn file_size(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).map_err(|e| VhdError::io(path, "stat", e))?.len())
}

/// The directories whose journal concerns the chain of `leaf`: the leaf's, then each layer's that opens.
pub fn journal_dirs(leaf: &Path) -> Vec<PathBuf> {
    let chain = Chain::open_unchecked(leaf, MAX_CHAIN_DEPTH).ok();
    journal_dirs_of(leaf, chain.as_ref())
}

/// A journal left beside the chain of `leaf`, if any: `(its directory, the journal)`.
pub fn pending_journal(leaf: &Path) -> Result<Option<(PathBuf, Journal)>> {
    for dir in journal_dirs(leaf) {
        if let Some(j) = journal::load(&dir)? {
            return Ok(Some((dir, j)));
        }
    }
    Ok(None)
}

/// Merges the chain of `leaf` as far as it goes (no budget), step after step.
pub fn coalesce(leaf: &Path, siblings: &[PathBuf], step_bytes: Option<u64>) -> Result<CoalesceReport> {
    let faults = Faults::from_env();
    let depth_before = Chain::open_unchecked(leaf, MAX_CHAIN_DEPTH).map(|c| c.layers.len()).unwrap_or(0);
    let mut report = CoalesceReport { depth_before, ..Default::default() };
    let budget = Budget { bytes: step_bytes, time: None };
    let start = Instant::now();
    loop {
        let step = coalesce_step_with(leaf, siblings, budget, &|| start.elapsed(), &faults)?;
        report.steps += 1;
        // Only the first step can find an earlier run's journal: later ones resume this run's own paused merge.
        if report.steps == 1 {
            report.recovered = step.recovered;
        }
        report.merges.extend(step.merges);
        report.depth = step.depth;
        if step.done {
            report.skipped = step.skipped;
            return Ok(report);
        }
    }
}

/// Does at most `budget` of coalescing work on the chain of `leaf`, resuming any journal first.
///
/// `siblings` are the files that may be other children of the chain's layers (e.g. the other files of the leaf's
/// directory): a layer whose parent has another child, or which has another child itself, is left alone.
pub fn coalesce_step(leaf: &Path, siblings: &[PathBuf], budget: Budget) -> Result<StepReport> {
    let start = Instant::now();
    coalesce_step_with(leaf, siblings, budget, &|| start.elapsed(), &Faults::from_env())
}

/// [`coalesce_step`] with an injected clock (time since the step began) and fault hook, for tests.
pub fn coalesce_step_with(
    leaf: &Path,
    siblings: &[PathBuf],
    budget: Budget,
    clock: &dyn Fn() -> Duration,
    faults: &Faults,
) -> Result<StepReport> {
    let _lock = lock_folder(&dir_of(leaf))?;
    let mut step = Step { budget, clock, faults, copied: 0, blocks: 0 };
    let mut report = StepReport::default();
    let mut planned_here = false;
    loop {
        if let Some((dir, journal)) = pending_journal(leaf)? {
            if !planned_here && journal.phase == Phase::Copy {
                refuse_new_children(&journal, siblings)?;
            }
            report.recovered |= !planned_here;
            match run_merge(&dir, journal, &mut step)? {
                MergeOutcome::Finished(merge) => report.merges.push(merge),
                MergeOutcome::Paused(pending) => {
                    report.pending = Some(pending);
                    break;
                }
            }
            planned_here = false;
            if step.exhausted() {
                break;
            }
            continue;
        }
        let chain = Chain::open(leaf, MAX_CHAIN_DEPTH)?;
        let (candidate, skipped) = choose(&chain, siblings);
        report.skipped = skipped;
        let Some(k) = candidate else {
            report.done = true;
            break;
        };
        let journal = plan(leaf, &chain, k)?;
        let dir = dir_of(&journal.parent.path);
        journal::store(&dir, &journal, &|| faults.point(&dir))?;
        planned_here = true;
    }
    report.bytes_copied = step.copied;
    report.depth = Chain::open_unchecked(leaf, MAX_CHAIN_DEPTH).map(|c| c.layers.len()).unwrap_or(0);
    Ok(report)
}

/// The lock file that keeps two coalesces of one folder from running the same journal at once.
pub const LOCK_NAME: &str = ".vhdcore-coalesce.lock";

/// Takes the folder's coalesce lock (released when the file is dropped, or when the process dies).
fn lock_folder(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_NAME);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| VhdError::io(&path, "create", e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(VhdError::invalid_argument(
            Some(&path),
            format!("{}: another coalesce is running in this folder; wait for it to finish", path.display()),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(VhdError::io(&path, "lock", e)),
    }
}

struct Step<'a> {
    budget: Budget,
    clock: &'a dyn Fn() -> Duration,
    faults: &'a Faults,
    copied: u64,
    /// Blocks copied in this step: the first is always allowed, so every step makes progress.
    blocks: u64,
}

impl Step<'_> {
    fn exhausted(&self) -> bool {
        let bytes = self.budget.bytes.is_some_and(|b| self.copied >= b);
        let time = self.budget.time.is_some_and(|t| (self.clock)() >= t);
        bytes || time
    }
}

/// The deepest layer that can merge into its parent: index into the chain (leaf = 0), and the layers left alone.
fn choose(chain: &Chain, siblings: &[PathBuf]) -> (Option<usize>, Vec<Skipped>) {
    let others: Vec<(PathBuf, [u8; 16])> = siblings
        .iter()
        .filter_map(|p| {
            let disk = Disk::open(p).ok()?;
            Some((canonical(p), disk.parent_uuid()?))
        })
        .collect();
    let other_child = |of: &Disk, except: &Disk| {
        let except = canonical(&except.path);
        others.iter().find(|(path, parent)| *parent == of.uuid() && *path != except).map(|(p, _)| p.clone())
    };
    let mut skipped = Vec::new();
    let base = chain.layers.len().saturating_sub(1);
    for k in (1..base).rev() {
        let (child, layer, parent) = (&chain.layers[k - 1], &chain.layers[k], &chain.layers[k + 1]);
        let reason = if layer.virtual_size != parent.virtual_size {
            Some(format!("its size {} differs from its parent's {}", layer.virtual_size, parent.virtual_size))
        } else if let Some(other) = other_child(parent, layer) {
            Some(format!("its parent {} has another child, {}", parent.path.display(), other.display()))
        } else {
            other_child(layer, child).map(|other| format!("it has another child, {}", other.display()))
        };
        match reason {
            Some(reason) => skipped.push(Skipped { layer: layer.path.clone(), reason }),
            None => return (Some(k), skipped),
        }
    }
    (None, skipped)
}

/// A merge resumed in a later run must still be the parent's only child: a snapshot of the parent taken meanwhile
/// would see the copied sectors. (The layer is still in the chain, so stopping here loses nothing.)
fn refuse_new_children(journal: &Journal, siblings: &[PathBuf]) -> Result<()> {
    for path in siblings {
        let Ok(disk) = Disk::open(path) else { continue };
        let Some(parent_uuid) = disk.parent_uuid() else { continue };
        if crate::format::uuid_string(&parent_uuid) == journal.parent.uuid && canonical(path) != journal.layer.path {
            return Err(VhdError::invalid_argument(
                Some(path),
                format!(
                    "{} became a child of {} while {} was being merged into it; the merge cannot go on \
                     (the chain's content is intact; remove {} to abandon the merge)",
                    path.display(),
                    journal.parent.path.display(),
                    journal.layer.path.display(),
                    journal::journal_path(&dir_of(&journal.parent.path)).display()
                ),
            ));
        }
    }
    Ok(())
}

/// What a parent holds of one sector, before the merge.
fn parent_holds(parent: &Disk, sector: u64, cache: &mut Option<(u64, Vec<u8>)>) -> Result<bool> {
    let Some(sparse) = &parent.sparse else {
        return Ok(true);
    };
    let spb = sparse.sectors_per_block();
    let index = sector / spb;
    let Some(at) = sparse.block_offset(index) else {
        return Ok(false);
    };
    if parent.disk_type == DiskType::Dynamic {
        return Ok(true);
    }
    if cache.as_ref().is_none_or(|(i, _)| *i != index) {
        let mut bits = vec![0u8; usize::try_from(sparse.bitmap_size).unwrap_or(0)];
        parent.read_exact_at(&mut bits, at)?;
        *cache = Some((index, bits));
    }
    let within = sector % spb;
    Ok(cache.as_ref().is_some_and(|(_, bits)| bit_set(bits, within)))
}

fn bit_set(bits: &[u8], i: u64) -> bool {
    usize::try_from(i / 8).ok().and_then(|b| bits.get(b)).is_some_and(|byte| byte & (0x80 >> (i % 8)) != 0)
}

/// A layer's block read whole: its bitmap and data, and the number of its sectors inside the disk.
struct LayerBlock {
    first_sector: u64,
    sectors: u64,
    bitmap: Vec<u8>,
    data: Vec<u8>,
}

impl LayerBlock {
    /// The block's bitmap only (`data` left empty): what planning needs.
    fn read_bitmap(layer: &Disk, position: usize) -> Result<LayerBlock> {
        LayerBlock::read_parts(layer, position, false)
    }

    fn read(layer: &Disk, position: usize) -> Result<LayerBlock> {
        LayerBlock::read_parts(layer, position, true)
    }

    fn read_parts(layer: &Disk, position: usize, with_data: bool) -> Result<LayerBlock> {
        let sparse = layer.sparse.as_ref().ok_or_else(|| not_sparse(layer))?;
        let index = u64::from(sparse.allocated[position]);
        let at = u64::from(sparse.sectors[position]) * SECTOR_SIZE;
        let spb = sparse.sectors_per_block();
        let first_sector = index * spb;
        let sectors = spb.min((layer.virtual_size / SECTOR_SIZE).saturating_sub(first_sector));
        let mut bitmap = vec![0u8; usize::try_from(sparse.bitmap_size).unwrap_or(0)];
        layer.read_exact_at(&mut bitmap, at)?;
        let mut data = Vec::new();
        if with_data {
            data = vec![0u8; usize::try_from(sectors * SECTOR_SIZE).unwrap_or(0)];
            layer.read_exact_at(&mut data, at + sparse.bitmap_size)?;
        }
        Ok(LayerBlock { first_sector, sectors, bitmap, data })
    }

    /// Runs `[start, end)` of present sectors, relative to the block.
    fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < self.sectors {
            if !bit_set(&self.bitmap, i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < self.sectors && bit_set(&self.bitmap, i) {
                i += 1;
            }
            runs.push((start, i));
        }
        runs
    }
}

fn not_sparse(disk: &Disk) -> VhdError {
    VhdError::invalid_argument(Some(&disk.path), format!("{} is not a sparse disk", disk.path.display()))
}

fn plan(leaf: &Path, chain: &Chain, k: usize) -> Result<Journal> {
    let (child, layer, parent) = (&chain.layers[k - 1], &chain.layers[k], &chain.layers[k + 1]);
    let sparse = layer.sparse.as_ref().ok_or_else(|| not_sparse(layer))?;
    let mut bytes_total = 0u64;
    let mut duplicate_sectors = 0u64;
    let mut cache = None;
    for position in 0..sparse.allocated.len() {
        let block = LayerBlock::read_bitmap(layer, position)?;
        for (start, end) in block.runs() {
            bytes_total += (end - start) * SECTOR_SIZE;
            for s in start..end {
                if parent_holds(parent, block.first_sector + s, &mut cache)? {
                    duplicate_sectors += 1;
                }
            }
        }
    }
    Ok(Journal {
        phase: Phase::Copy,
        leaf: canonical(leaf),
        layer: file_ref(layer),
        parent: file_ref(parent),
        child: file_ref(child),
        blocks_total: u64::try_from(sparse.allocated.len()).unwrap_or(u64::MAX),
        blocks_done: 0,
        bytes_total,
        bytes_copied: 0,
        duplicate_bytes: duplicate_sectors * SECTOR_SIZE,
        parent_end: parent.file_size,
        relink: None,
    })
}

enum MergeOutcome {
    Finished(Merge),
    Paused(Pending),
}

fn mismatch(path: &Path, what: &str, expected: &str, found: &str) -> VhdError {
    VhdError::InvalidField {
        path: path.to_path_buf(),
        field: format!("journal.{what}.uuid"),
        offset: 0,
        value: found.to_string(),
        reason: format!("the coalesce journal expects uuid {expected}: the file changed since the merge was planned"),
    }
}

fn open_checked(file: &FileRef, what: &str, writable: bool) -> Result<Disk> {
    let disk = if writable { Disk::open_writable(&file.path)? } else { Disk::open(&file.path)? };
    if disk.uuid_string() != file.uuid {
        return Err(mismatch(&file.path, what, &file.uuid, &disk.uuid_string()));
    }
    Ok(disk)
}

fn run_merge(dir: &Path, mut journal: Journal, step: &mut Step<'_>) -> Result<MergeOutcome> {
    let faults = step.faults;
    let store = |j: &Journal| journal::store(dir, j, &|| faults.point(dir));
    if journal.phase == Phase::Copy {
        let layer = open_checked(&journal.layer, "layer", false)?;
        let parent = open_parent(&journal, faults)?;
        let mut writer = ParentWriter { disk: parent, new_blocks: Vec::new(), faults };
        let total = layer.sparse.as_ref().map_or(0, |s| s.allocated.len());
        if u64::try_from(total).ok() != Some(journal.blocks_total) {
            return Err(mismatch(&journal.layer.path, "layer", &journal.layer.uuid, "a layer with other blocks"));
        }
        let (mut done, mut copied) = (journal.blocks_done, journal.bytes_copied);
        while done < journal.blocks_total && !(step.blocks > 0 && step.exhausted()) {
            let block = LayerBlock::read(&layer, usize::try_from(done).unwrap_or(usize::MAX))?;
            let bytes = writer.copy(&block)?;
            step.copied += bytes;
            step.blocks += 1;
            done += 1;
            copied += bytes;
            if (done - journal.blocks_done) >= CHECKPOINT_BLOCKS {
                writer.checkpoint(&mut journal, done, copied, &store)?;
            }
        }
        writer.checkpoint(&mut journal, done, copied, &store)?;
        if journal.blocks_done < journal.blocks_total {
            return Ok(MergeOutcome::Paused(pending(&journal)));
        }
        let child = open_checked(&journal.child, "child", false)?;
        journal.relink = Some(relink_plan(&child, &writer.disk, &layer)?);
        journal.phase = Phase::Relink;
        store(&journal)?;
    }
    if journal.phase == Phase::Relink {
        if step.blocks > 0 && step.exhausted() {
            return Ok(MergeOutcome::Paused(pending(&journal)));
        }
        apply_relink(&journal, faults)?;
        journal.phase = Phase::Remove;
        store(&journal)?;
    }
    remove_layer(&journal, faults)?;
    journal::remove(dir, &|| faults.point(dir))?;
    let grown = |f: &FileRef| file_size(&f.path).map(|now| now.saturating_sub(f.size));
    Ok(MergeOutcome::Finished(Merge {
        layer: journal.layer.path.clone(),
        parent: journal.parent.path.clone(),
        child: journal.child.path.clone(),
        duplicate_bytes: journal.duplicate_bytes,
        bytes_copied: journal.bytes_total,
        file_bytes_freed: journal.layer.size,
        file_bytes_added: grown(&journal.parent)? + grown(&journal.child)?,
    }))
}

fn pending(journal: &Journal) -> Pending {
    Pending {
        layer: journal.layer.path.clone(),
        parent: journal.parent.path.clone(),
        phase: journal.phase,
        bytes_copied: journal.bytes_copied,
        bytes_total: journal.bytes_total,
    }
}

/// Opens the parent for writing, first restoring its footer at the journal's recorded end if a crash tore it
/// while a block was being appended (nothing past that end is referenced by the BAT).
fn open_parent(journal: &Journal, faults: &Faults) -> Result<Disk> {
    let path = &journal.parent.path;
    match open_checked(&journal.parent, "parent", true) {
        Ok(disk) => Ok(disk),
        Err(e) if matches!(e.kind(), ErrorKind::BadCookie | ErrorKind::Checksum | ErrorKind::Truncated) => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| VhdError::io(path, "open", e))?;
            let mut copy = [0u8; 512];
            read_exact_at(&file, path, &mut copy, 0)?;
            let footer = Footer::read_from_bytes(&copy[..]).unwrap_or_else(|_| unreachable!("512-byte buffer"));
            let valid = &footer.cookie == FOOTER_COOKIE && footer.computed_checksum() == footer.checksum.get();
            let end = journal.parent_end;
            if !valid || end < FOOTER_SIZE || file_size(path)? < end.saturating_sub(FOOTER_SIZE) {
                return Err(e);
            }
            faults.write_at(&file, path, &copy, end - FOOTER_SIZE)?;
            faults.set_len(&file, path, end)?;
            faults.sync(&file, path)?;
            open_checked(&journal.parent, "parent", true)
        }
        Err(e) => Err(e),
    }
}

/// Writes a layer's sectors into its parent, appending the parent's new blocks crash-safely.
struct ParentWriter<'a> {
    disk: Disk,
    /// Blocks appended since the last checkpoint, whose BAT entries are not written yet: (index, sector).
    new_blocks: Vec<(u64, u32)>,
    faults: &'a Faults,
}

impl ParentWriter<'_> {
    /// Copies the present sectors of `block`; returns the bytes copied.
    fn copy(&mut self, block: &LayerBlock) -> Result<u64> {
        let mut copied = 0;
        for (start, end) in block.runs() {
            let mut s = start;
            while s < end {
                let written = self.write_run(block.first_sector + s, end - s, &block.data, s)?;
                s += written;
                copied += written * SECTOR_SIZE;
            }
        }
        Ok(copied)
    }

    /// Writes up to `count` sectors at disk sector `sector` (stopping at a parent block's end); returns how many.
    fn write_run(&mut self, sector: u64, count: u64, data: &[u8], data_sector: u64) -> Result<u64> {
        let from = usize::try_from(data_sector * SECTOR_SIZE).unwrap_or(usize::MAX);
        let path = self.disk.path.clone();
        let Some(sparse) = &self.disk.sparse else {
            let to = from + usize::try_from(count * SECTOR_SIZE).unwrap_or(0);
            self.faults.write_at(self.disk.file()?, &path, &data[from..to], sector * SECTOR_SIZE)?;
            return Ok(count);
        };
        let spb = sparse.sectors_per_block();
        let index = sector / spb;
        let within = sector % spb;
        let n = count.min(spb - within);
        let bitmap_size = sparse.bitmap_size;
        let at = match sparse.block_offset(index) {
            Some(at) => at,
            None => self.allocate(index)?,
        };
        let to = from + usize::try_from(n * SECTOR_SIZE).unwrap_or(0);
        self.faults.write_at(self.disk.file()?, &path, &data[from..to], at + bitmap_size + within * SECTOR_SIZE)?;
        // The bitmap after the data: set bits always name sectors that hold the layer's bytes.
        let mut bits = vec![0u8; usize::try_from(bitmap_size).unwrap_or(0)];
        self.disk.read_exact_at(&mut bits, at)?;
        let before = bits.clone();
        for i in within..within + n {
            if let Some(byte) = usize::try_from(i / 8).ok().and_then(|b| bits.get_mut(b)) {
                *byte |= 0x80 >> (i % 8);
            }
        }
        if bits != before {
            self.faults.write_at(self.disk.file()?, &path, &bits, at)?;
        }
        Ok(n)
    }

    /// Appends block `index` past the data: the new footer at the new end first (the file always ends with a
    /// footer), then the bitmap over the old footer. The data area is a hole (zeros). The BAT entry waits for
    /// the checkpoint, after an fsync.
    fn allocate(&mut self, index: u64) -> Result<u64> {
        let path = self.disk.path.clone();
        let sparse = self.disk.sparse.as_ref().ok_or_else(|| not_sparse(&self.disk))?;
        let at = self.disk.footer_offset.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let span = sparse.bitmap_size + u64::from(sparse.block_size);
        let footer_at = at
            .checked_add(span)
            .ok_or_else(|| VhdError::invalid_argument(Some(&path), "disk file too large for another block"))?;
        let sector = u32::try_from(at / SECTOR_SIZE)
            .ok()
            .filter(|s| *s != BAT_UNUSED)
            .ok_or_else(|| VhdError::invalid_argument(Some(&path), "disk file too large for another block"))?;
        let fill = if self.disk.disk_type == DiskType::Dynamic { 0xFF } else { 0x00 };
        let bitmap = vec![fill; usize::try_from(sparse.bitmap_size).unwrap_or(0)];
        let footer = self.disk.footer.as_bytes().to_vec();
        self.faults.write_at(self.disk.file()?, &path, &footer, footer_at)?;
        self.faults.write_at(self.disk.file()?, &path, &bitmap, at)?;
        self.disk.footer_offset = footer_at;
        self.disk.file_size = footer_at + FOOTER_SIZE;
        if let Some(sparse) = self.disk.sparse.as_mut() {
            sparse.set_block(u32::try_from(index).unwrap_or(u32::MAX), sector);
        }
        self.new_blocks.push((index, sector));
        Ok(at)
    }

    /// Makes the copied data durable, then the new blocks' BAT entries, then the journal's progress (`done`
    /// blocks, `copied` bytes), so the journal never claims more than the files hold.
    fn checkpoint(&mut self, journal: &mut Journal, done: u64, copied: u64, store: &Store<'_>) -> Result<()> {
        if done == journal.blocks_done && self.new_blocks.is_empty() {
            return Ok(());
        }
        let path = self.disk.path.clone();
        self.faults.sync(self.disk.file()?, &path)?;
        if !self.new_blocks.is_empty() {
            // Record the parent's new end before any BAT entry points past the old one (see `open_parent`).
            journal.parent_end = self.disk.file_size;
            store(journal)?;
            let sparse = self.disk.sparse.as_ref().ok_or_else(|| not_sparse(&self.disk))?;
            let table_offset = sparse.table_offset;
            for (index, sector) in std::mem::take(&mut self.new_blocks) {
                self.faults.write_at(self.disk.file()?, &path, &sector.to_be_bytes(), table_offset + index * 4)?;
            }
            self.faults.sync(self.disk.file()?, &path)?;
        }
        journal.blocks_done = done;
        journal.bytes_copied = copied;
        store(journal)
    }
}

type Store<'a> = dyn Fn(&Journal) -> Result<()> + 'a;

/// Percent-encodes a path for a MacX `file://` URL (unreserved characters and `/` kept).
fn file_url(path: &str) -> String {
    let mut out = String::from("file://");
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The byte range of the child that a locator's data may be rewritten in without touching anything else.
fn locator_room(child: &Disk, entry: &ParentLocatorEntry) -> u64 {
    let offset = entry.platform_data_offset.get();
    let length = u64::from(entry.platform_data_length.get());
    let space = u64::from(entry.platform_data_space.get());
    // The space is in sectors per the spec, in bytes as Windows writes it: take the smaller reading that holds the
    // data, and never more than the sectors the data already starts in.
    let space_bytes = if space * SECTOR_SIZE >= length && space < SECTOR_SIZE { space * SECTOR_SIZE } else { space };
    let room = space_bytes.max(length);
    let end = offset.saturating_add(room);
    let Some(sparse) = &child.sparse else {
        return length;
    };
    let table_end = sparse.table_offset + u64::from(sparse.header.max_table_entries.get()) * 4;
    let header = (sparse.header_offset, sparse.header_offset + HEADER_SIZE);
    let overlaps = |s: u64, e: u64| offset < e && s < end;
    let blocked = overlaps(0, FOOTER_SIZE)
        || overlaps(header.0, header.1)
        || overlaps(sparse.table_offset, table_end)
        || overlaps(child.footer_offset, child.footer_offset + FOOTER_SIZE)
        || sparse.sectors.iter().any(|s| {
            let b = u64::from(*s) * SECTOR_SIZE;
            overlaps(b, b + sparse.bitmap_size + u64::from(sparse.block_size))
        });
    if blocked {
        length
    } else {
        room
    }
}

/// The child's new header (parent uuid, timestamp, name, locators) and where its locator data goes.
fn relink_plan(child: &Disk, parent: &Disk, layer: &Disk) -> Result<RelinkPlan> {
    let sparse = child.sparse.as_ref().ok_or_else(|| not_sparse(child))?;
    let mut header: Header = sparse.header.clone();
    if header.parent_unique_id != layer.uuid() {
        return Err(mismatch(
            &child.path,
            "child.parent",
            &layer.uuid_string(),
            &crate::format::uuid_string(&header.parent_unique_id),
        ));
    }
    let relative = relative_parent_name(&parent.path, &child.path)?;
    let windows = relative.replace('/', "\\");
    let name = relative.rsplit('/').next().unwrap_or(&relative).to_string();
    header.parent_unique_id = parent.uuid();
    header.parent_timestamp.set(parent.footer.timestamp.get());
    header.parent_unicode_name = [0u8; 512];
    let encoded = encode_utf16(&name, true);
    let n = encoded.len().min(header.parent_unicode_name.len());
    header.parent_unicode_name[..n].copy_from_slice(&encoded[..n]);

    let old = sparse.header.parent_locators;
    let had_macx = old.iter().any(|e| e.platform_code.get() == PLATFORM_MACX);
    let mut wanted: Vec<(u32, Vec<u8>)> =
        vec![(PLATFORM_W2RU, encode_utf16(&windows, false)), (PLATFORM_W2KU, encode_utf16(&windows, false))];
    if had_macx {
        wanted.push((PLATFORM_MACX, file_url(&relative).into_bytes()));
    }
    // Stale path locators of other kinds would name the merged layer: drop them.
    let mut entries = old;
    for entry in entries.iter_mut() {
        if [PLATFORM_WI2R, PLATFORM_WI2K].contains(&entry.platform_code.get()) {
            *entry = ParentLocatorEntry::default();
        }
    }
    let mut locators = Vec::new();
    let mut append_at = child.footer_offset.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    let first_append = append_at;
    for (code, data) in wanted {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        let slot = entries
            .iter()
            .position(|e| e.platform_code.get() == code)
            .or_else(|| entries.iter().position(|e| e.platform_code.get() == PLATFORM_NONE))
            .ok_or_else(|| VhdError::Unsupported {
                path: child.path.clone(),
                field: "header.parent_locator".into(),
                offset: sparse.header_offset + 576,
                what: format!("a header with no free parent locator slot among {PARENT_LOCATOR_COUNT}"),
            })?;
        let existing = entries[slot];
        let in_place = existing.platform_code.get() == code && locator_room(child, &existing) >= len;
        let (offset, room) = if in_place {
            (existing.platform_data_offset.get(), locator_room(child, &existing))
        } else {
            let room = len.div_ceil(SECTOR_SIZE).max(1) * SECTOR_SIZE;
            let at = append_at;
            append_at += room;
            (at, room)
        };
        let mut padded = data.clone();
        padded.resize(usize::try_from(room).unwrap_or(0), 0);
        locators.push((offset, journal::to_hex(&padded)));
        let mut entry = ParentLocatorEntry::default();
        entry.platform_code.set(code);
        let space_sectors =
            if in_place { existing.platform_data_space.get() } else { u32::try_from(room / SECTOR_SIZE).unwrap_or(1) };
        entry.platform_data_space.set(space_sectors);
        entry.platform_data_length.set(u32::try_from(len).unwrap_or(u32::MAX));
        entry.platform_data_offset.set(offset);
        entries[slot] = entry;
    }
    header.parent_locators = entries;
    header.seal();
    let moved_footer = (append_at != first_append).then(|| MovedFooter {
        old_at: child.footer_offset,
        new_at: append_at,
        footer_hex: journal::to_hex(child.footer.as_bytes()),
    });
    Ok(RelinkPlan {
        header_offset: sparse.header_offset,
        header_hex: journal::to_hex(header.as_bytes()),
        locators,
        moved_footer,
    })
}

/// Writes the child's new locators and header from the journal; safe to repeat.
fn apply_relink(journal: &Journal, faults: &Faults) -> Result<()> {
    let path = &journal.child.path;
    let plan = journal.relink.as_ref().ok_or_else(|| VhdError::InvalidField {
        path: journal::journal_path(&dir_of(&journal.parent.path)),
        field: "journal.relink".into(),
        offset: 0,
        value: "null".into(),
        reason: "the relink phase needs the child's new header".into(),
    })?;
    let file =
        std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(|e| VhdError::io(path, "open", e))?;
    let header = journal::from_hex(path, "relink.header_hex", &plan.header_hex)?;
    let mut current = vec![0u8; header.len()];
    read_exact_at(&file, path, &mut current, plan.header_offset)?;
    if current == header {
        return Ok(());
    }
    if let Some(moved) = &plan.moved_footer {
        let size = file_size(path)?;
        let (old_end, new_end) = (moved.old_at.saturating_add(FOOTER_SIZE), moved.new_at.saturating_add(FOOTER_SIZE));
        if size < old_end || size > new_end {
            return Err(VhdError::InvalidField {
                path: path.clone(),
                field: "footer".into(),
                offset: size.saturating_sub(FOOTER_SIZE),
                value: format!("file size {size}"),
                reason: format!(
                    "the coalesce journal expects the file to end between {} and {}: it changed during the relink",
                    old_end, new_end
                ),
            });
        }
        let footer = journal::from_hex(path, "relink.moved_footer.footer_hex", &moved.footer_hex)?;
        faults.write_at(&file, path, &footer, moved.new_at)?;
    }
    for (offset, hex) in &plan.locators {
        faults.write_at(&file, path, &journal::from_hex(path, "relink.locators", hex)?, *offset)?;
    }
    faults.sync(&file, path)?;
    faults.write_at(&file, path, &header, plan.header_offset)?;
    faults.sync(&file, path)
}

/// Deletes the merged layer if it is still there and still the file the journal names.
fn remove_layer(journal: &Journal, faults: &Faults) -> Result<()> {
    let path = &journal.layer.path;
    if !path.exists() {
        return Ok(());
    }
    let disk = Disk::open(path)?;
    if disk.uuid_string() != journal.layer.uuid {
        return Err(mismatch(path, "layer", &journal.layer.uuid, &disk.uuid_string()));
    }
    drop(disk);
    faults.point(path)?;
    std::fs::remove_file(path).map_err(|e| VhdError::io(path, "remove", e))?;
    journal::sync_dir(&dir_of(path))
}
