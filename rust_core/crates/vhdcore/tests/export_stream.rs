//! Exports to a pipe: written front to back (no seek), the same disk as the file exports.

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use vhdcore::{Chain, DiskType, ExportFormat};

mod common;

fn mkfifo(path: &Path) {
    let name = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
}

/// Exports `chain` into a new FIFO while a thread drains it; returns the bytes that came out and the stats.
fn export_through_pipe(chain: &Chain, dir: &Path, format: ExportFormat) -> (Vec<u8>, vhdcore::ExportStats) {
    let fifo = dir.join(format!("out-{}.fifo", format.as_str()));
    mkfifo(&fifo);
    let reader_path = fifo.clone();
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        std::fs::File::open(reader_path).unwrap().read_to_end(&mut bytes).unwrap();
        bytes
    });
    let mut last = 0;
    let stats = vhdcore::export(chain, &fifo, format, &mut |done, total| {
        assert!(done >= last && done <= total, "progress goes forward: {last} then {done} of {total}");
        last = done;
        true
    })
    .unwrap();
    assert_eq!(last, chain.virtual_size(), "progress ends at the whole disk");
    (reader.join().unwrap(), stats)
}

#[test]
fn raw_and_vhd_exports_to_a_pipe_equal_the_file_exports() {
    for (seed, base_type) in [(21, DiskType::Dynamic), (22, DiskType::Fixed)] {
        let dir = tempfile::tempdir().unwrap();
        let (paths, model) = common::build_chain(dir.path(), 4, seed, base_type, 12);
        let chain = Chain::open(paths.last().unwrap(), vhdcore::MAX_CHAIN_DEPTH).unwrap();

        let (raw, stats) = export_through_pipe(&chain, dir.path(), ExportFormat::Raw);
        assert!(raw == model, "seed {seed}: raw through a pipe differs from the model");
        assert_eq!(stats.bytes_written, model.len() as u64);

        let (vhd, stats) = export_through_pipe(&chain, dir.path(), ExportFormat::Vhd);
        assert_eq!(stats.bytes_written, vhd.len() as u64);
        let file = dir.path().join("from-pipe.vhd");
        std::fs::write(&file, &vhd).unwrap();
        let exported = Chain::open(&file, 1).unwrap();
        let mut again = vec![0u8; model.len()];
        exported.read_at(0, &mut again).unwrap();
        assert!(again == model, "seed {seed}: vhd through a pipe differs from the model");

        // The same blocks stored as a file export stores: only the footer's UUID and timestamp differ.
        let by_file = dir.path().join("by-file.vhd");
        let file_stats = vhdcore::export(&chain, &by_file, ExportFormat::Vhd, &mut |_, _| true).unwrap();
        assert_eq!(file_stats.bytes_written, stats.bytes_written);
        assert_eq!(file_stats.data_bytes, stats.data_bytes);
        let by_file = std::fs::read(&by_file).unwrap();
        assert!(by_file[512..by_file.len() - 512] == vhd[512..vhd.len() - 512], "seed {seed}: layout differs");
    }
}

#[test]
fn an_all_zero_disk_goes_through_a_pipe_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("empty.vhd");
    vhdcore::create(&base, 5 * 1024 * 1024 + 512, DiskType::Dynamic, vhdcore::DEFAULT_BLOCK_SIZE).unwrap();
    let chain = Chain::open(&base, 1).unwrap();
    let (raw, _) = export_through_pipe(&chain, dir.path(), ExportFormat::Raw);
    assert_eq!(raw.len() as u64, chain.virtual_size());
    assert!(raw.iter().all(|b| *b == 0));
}
