//! Coalesce keeps the flattened content byte for byte, at its end and after a crash at every write point.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vhdcore::rng::SplitMix;
use vhdcore::{coalesce_step, Budget, Chain, DiskType, ErrorKind, StepReport};
use vhdcore::{coalesce_step_with, Faults};

mod common;

use common::{BLOCK, SIZE};

fn build_chain(dir: &Path, depth: usize, seed: u64, base_type: DiskType) -> (Vec<PathBuf>, Vec<u8>) {
    common::build_chain(dir, depth, seed, base_type, 8)
}

fn flatten(leaf: &Path) -> Vec<u8> {
    let chain = Chain::open_unchecked(leaf, vhdcore::MAX_CHAIN_DEPTH).unwrap();
    let mut flat = vec![0u8; usize::try_from(chain.virtual_size()).unwrap()];
    chain.read_at(0, &mut flat).unwrap();
    flat
}

fn siblings(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

/// Steps until done with one fault hook across the steps; the first error ends the run.
fn run_all(leaf: &Path, faults: &Faults, budget: Budget) -> vhdcore::Result<Vec<StepReport>> {
    let dir = leaf.parent().unwrap();
    let mut steps = Vec::new();
    loop {
        let step = coalesce_step_with(leaf, &siblings(dir), budget, &|| Duration::ZERO, faults)?;
        let done = step.done;
        steps.push(step);
        if done {
            return Ok(steps);
        }
        assert!(steps.len() < 10_000, "coalesce does not converge");
    }
}

fn assert_clean(leaf: &Path) {
    let problems = vhdcore::check(leaf, vhdcore::MAX_CHAIN_DEPTH);
    assert!(problems.is_empty(), "{problems:?}");
}

/// The leaf's bytes outside its header and parent locator data.
fn leaf_body(leaf: &Path) -> Vec<u8> {
    let disk = vhdcore::Disk::open(leaf).unwrap();
    let sparse = disk.sparse.as_ref().unwrap();
    let mut bytes = std::fs::read(leaf).unwrap();
    let mut blank = |from: u64, len: u64| {
        let from = usize::try_from(from).unwrap();
        bytes[from..from + usize::try_from(len).unwrap()].fill(0);
    };
    blank(sparse.header_offset, 1024);
    for entry in sparse.header.parent_locators.iter().filter(|e| e.platform_code.get() != 0) {
        blank(entry.platform_data_offset.get(), 512 * u64::from(entry.platform_data_space.get()));
    }
    bytes
}

#[test]
fn coalesce_merges_every_read_only_layer_and_keeps_the_content() {
    for (seed, base_type) in [(11, DiskType::Dynamic), (12, DiskType::Fixed), (13, DiskType::Dynamic)] {
        let dir = tempfile::tempdir().unwrap();
        let (paths, model) = build_chain(dir.path(), 5, seed, base_type);
        let leaf = paths.last().unwrap();
        let leaf_before = leaf_body(leaf);
        let report = vhdcore::coalesce(leaf, &siblings(dir.path()), None).unwrap();
        assert_eq!(report.merges.len(), 3, "seed {seed}");
        assert_eq!(report.depth_before, 5);
        assert_eq!(report.depth, 2);
        assert!(flatten(leaf) == model, "seed {seed}: content changed");
        assert_clean(leaf);
        assert!(leaf_body(leaf) == leaf_before, "seed {seed}: the leaf changed beyond its parent pointer");
        for merged in &paths[1..4] {
            assert!(!merged.exists(), "{} was not removed", merged.display());
        }
        let chain = Chain::open(leaf, 30).unwrap();
        assert_eq!(chain.layers[1].path, paths[0]);
        assert!(chain.warnings.is_empty(), "{:?}", chain.warnings);
        assert!(!dir.path().join(vhdcore::JOURNAL_NAME).exists());
        let freed: u64 = report.merges.iter().map(|m| m.file_bytes_freed).sum();
        assert!(freed > 0);
    }
}

#[test]
fn duplicates_are_the_parent_sectors_the_layer_overwrote() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    vhdcore::create(&base, SIZE, DiskType::Dynamic, BLOCK).unwrap();
    vhdcore::write(&base, 0, &vec![1u8; 3 * 512]).unwrap();
    let mid = dir.path().join("mid.vhd");
    vhdcore::snapshot(&base, &mid).unwrap();
    // Two sectors over block 0 (allocated in the base: every sector of a dynamic block counts) and one over
    // block 3 (unallocated in the base: not a duplicate).
    vhdcore::write(&mid, 1024, &[2u8; 1024]).unwrap();
    vhdcore::write(&mid, 3 * u64::from(BLOCK), &[3u8; 512]).unwrap();
    let leaf = dir.path().join("leaf.vhd");
    vhdcore::snapshot(&mid, &leaf).unwrap();
    let before = flatten(&leaf);
    let report = vhdcore::coalesce(&leaf, &siblings(dir.path()), None).unwrap();
    assert_eq!(report.merges.len(), 1);
    assert_eq!(report.duplicate_bytes(), 1024);
    assert_eq!(report.bytes_copied(), 1536);
    assert!(flatten(&leaf) == before);
    assert_clean(&leaf);
}

#[test]
fn a_parent_with_another_child_is_left_alone_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, model) = build_chain(dir.path(), 4, 21, DiskType::Dynamic);
    // A clone of layer1: layer1 now has two children, so layer2 (its child) cannot merge into it, nor layer1 be
    // removed; layer0 has one child (layer1), so layer1 would merge into layer0 but for its other child.
    vhdcore::snapshot(&paths[1], &dir.path().join("clone.vhd")).unwrap();
    let leaf = paths.last().unwrap();
    let report = vhdcore::coalesce(leaf, &siblings(dir.path()), None).unwrap();
    assert!(report.merges.is_empty());
    assert_eq!(report.depth, 4);
    assert_eq!(report.skipped.len(), 2, "{:?}", report.skipped);
    assert!(report.skipped.iter().any(|s| s.reason.contains("has another child")), "{:?}", report.skipped);
    assert!(flatten(leaf) == model);
    assert!(paths.iter().all(|p| p.exists()));
}

#[test]
fn byte_and_time_budgets_bound_each_step() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, model) = build_chain(dir.path(), 4, 31, DiskType::Dynamic);
    let leaf = paths.last().unwrap();
    let steps = run_all(leaf, &Faults::none(), Budget { bytes: Some(1), time: None }).unwrap();
    assert!(steps.len() > 4, "one block per step should take many steps, took {}", steps.len());
    for step in &steps {
        assert!(step.bytes_copied <= u64::from(BLOCK), "a step copied {} bytes", step.bytes_copied);
    }
    assert!(steps[..steps.len() - 1].iter().all(|s| !s.done));
    assert!(flatten(leaf) == model);
    assert_clean(leaf);

    // A clock that advances one second per reading, and a budget of three seconds.
    let dir = tempfile::tempdir().unwrap();
    let (paths, model) = build_chain(dir.path(), 3, 32, DiskType::Dynamic);
    let leaf = paths.last().unwrap();
    let ticks = std::cell::Cell::new(0u64);
    let clock = || {
        ticks.set(ticks.get() + 1);
        Duration::from_secs(ticks.get())
    };
    let budget = Budget { bytes: None, time: Some(Duration::from_secs(3)) };
    let step = coalesce_step_with(leaf, &siblings(dir.path()), budget, &clock, &Faults::none()).unwrap();
    assert!(!step.done);
    let pending = step.pending.unwrap();
    assert!(pending.bytes_copied > 0 && pending.bytes_copied < pending.bytes_total, "{pending:?}");
    assert!(flatten(leaf) == model, "content changed mid-merge");
    let steps = run_all(leaf, &Faults::none(), Budget::default()).unwrap();
    assert!(steps[0].recovered, "the next step resumes the journal");
    assert!(flatten(leaf) == model);
    assert_clean(leaf);
}

/// A crash at each mutating operation in turn (writes torn in half), then a second crash during the recovery,
/// then a clean run: the content never changes and the chain ends coalesced and valid.
#[test]
fn a_crash_at_every_write_point_is_recovered() {
    let template = tempfile::tempdir().unwrap();
    let (paths, model) = build_chain(template.path(), 5, 41, DiskType::Dynamic);
    let names: Vec<_> = paths.iter().map(|p| p.file_name().unwrap().to_owned()).collect();
    let copy_chain = |to: &Path| {
        for name in &names {
            std::fs::copy(template.path().join(name), to.join(name)).unwrap();
        }
        to.join(names.last().unwrap())
    };
    let budget = Budget { bytes: Some(2 * u64::from(BLOCK)), time: None };
    let mut crashes = 0u64;
    let mut rng = SplitMix(42);
    for point in 1.. {
        let dir = tempfile::tempdir().unwrap();
        let leaf = copy_chain(dir.path());
        let outcome = run_all(&leaf, &Faults::fail_at(point), budget);
        match outcome {
            Ok(_) => break,
            Err(e) => assert_eq!(e.kind(), ErrorKind::Interrupted, "point {point}: {e}"),
        }
        crashes += 1;
        // Whenever the chain opens, it reads the same bytes.
        if let Ok(chain) = Chain::open_unchecked(&leaf, 30) {
            let mut flat = vec![0u8; model.len()];
            if chain.read_at(0, &mut flat).is_ok() {
                assert!(flat == model, "point {point}: content changed after the crash");
            }
        }
        let second = 1 + rng.below(40);
        let _ = run_all(&leaf, &Faults::fail_at(second), budget);
        let steps = run_all(&leaf, &Faults::none(), budget).unwrap_or_else(|e| panic!("point {point}: {e}"));
        assert!(steps.last().unwrap().done);
        assert!(flatten(&leaf) == model, "point {point}: content changed after recovery");
        assert_clean(&leaf);
        assert_eq!(Chain::open(&leaf, 30).unwrap().layers.len(), 2, "point {point}");
        assert!(!dir.path().join(vhdcore::JOURNAL_NAME).exists(), "point {point}");
    }
    eprintln!("recovered from a crash at each of {crashes} write points");
    assert!(crashes > 50, "only {crashes} write points");
}

#[test]
fn a_pending_journal_is_reported_by_open() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, model) = build_chain(dir.path(), 3, 51, DiskType::Dynamic);
    let leaf = paths.last().unwrap();
    let budget = Budget { bytes: Some(1), time: None };
    let step = coalesce_step_with(leaf, &siblings(dir.path()), budget, &|| Duration::ZERO, &Faults::none()).unwrap();
    assert!(step.pending.is_some());
    let chain = Chain::open(leaf, 30).unwrap();
    assert!(chain.warnings.iter().any(|w| w.contains("coalesce of this chain is pending")), "{:?}", chain.warnings);
    assert!(flatten(leaf) == model);

    // A torn child header: open fails, and says a coalesce is pending.
    let mut header = vec![0u8; 1024];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(leaf).unwrap(), &mut header, 512).unwrap();
    header[600] ^= 0xFF;
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(leaf).unwrap(),
        &header,
        512,
    )
    .unwrap();
    let err = Chain::open(leaf, 30).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CoalescePending, "{err}");
}

#[test]
fn a_second_coalesce_of_the_same_folder_waits_its_turn() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(dir.path(), 3, 61, DiskType::Dynamic);
    let held = std::fs::File::create(dir.path().join(vhdcore::LOCK_NAME)).unwrap();
    held.lock().unwrap();
    let err = vhdcore::coalesce(paths.last().unwrap(), &siblings(dir.path()), None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("another coalesce is running"), "{err}");
    drop(held);
    let report = vhdcore::coalesce(paths.last().unwrap(), &siblings(dir.path()), None).unwrap();
    assert_eq!(report.merges.len(), 1);
}

#[test]
fn a_parent_that_gains_a_child_mid_merge_stops_the_merge() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, model) = build_chain(dir.path(), 3, 71, DiskType::Dynamic);
    let leaf = paths.last().unwrap();
    let budget = Budget { bytes: Some(1), time: None };
    let step = coalesce_step_with(leaf, &siblings(dir.path()), budget, &|| Duration::ZERO, &Faults::none()).unwrap();
    assert!(step.pending.is_some());
    vhdcore::snapshot(&paths[0], &dir.path().join("late.vhd")).unwrap();
    let err = vhdcore::coalesce(leaf, &siblings(dir.path()), None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("became a child of"), "{err}");
    assert!(flatten(leaf) == model);
}

/// A whole coalesce in small steps picks up its own paused merges from one step to the next: that is not a
/// recovery. Only a journal left by an earlier run is.
#[test]
fn a_coalesce_in_steps_reports_a_recovery_only_for_an_earlier_runs_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, model) = build_chain(dir.path(), 4, 41, DiskType::Dynamic);
    let leaf = paths.last().unwrap();
    let report = vhdcore::coalesce(leaf, &siblings(dir.path()), Some(1)).unwrap();
    assert!(report.steps > 2, "one block per step should take several steps, took {}", report.steps);
    assert!(!report.recovered, "a fresh chain's coalesce said it recovered an earlier run");
    assert!(flatten(leaf) == model);

    let dir = tempfile::tempdir().unwrap();
    let (paths, model) = build_chain(dir.path(), 4, 42, DiskType::Dynamic);
    let leaf = paths.last().unwrap();
    let paused = coalesce_step(leaf, &siblings(dir.path()), Budget { bytes: Some(1), time: None }).unwrap();
    assert!(paused.pending.is_some() && !paused.recovered);
    let report = vhdcore::coalesce(leaf, &siblings(dir.path()), Some(1)).unwrap();
    assert!(report.recovered, "the earlier run's paused merge was finished");
    assert!(flatten(leaf) == model);
}
