//! `Estimate`: the predicted size and time of an image, from `Chain.estimate`.

use pyo3::prelude::*;

#[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
pub(crate) struct Estimate {
    pub(crate) level: i32,
    pub(crate) virtual_size: u64,
    pub(crate) allocated_bytes: u64,
    pub(crate) unallocated_bytes: u64,
    pub(crate) sampled_bytes: u64,
    pub(crate) samples: usize,
    pub(crate) spans: usize,
    pub(crate) zero_fraction: f64,
    pub(crate) estimated_nonzero_bytes: u64,
    pub(crate) candidate_blocks: u64,
    pub(crate) image_blocks: u64,
    pub(crate) image_bytes: u64,
    pub(crate) compressed_bytes: u64,
    pub(crate) low: u64,
    pub(crate) high: u64,
    pub(crate) context_correction: f64,
    pub(crate) sampling_error: f64,
    pub(crate) correction_error: f64,
    pub(crate) seconds_spent: f64,
    pub(crate) predicted_seconds: f64,
    pub(crate) threads: usize,
}

impl Estimate {
    pub(crate) fn from_core(level: i32, e: vhdcore::Estimate) -> Estimate {
        Estimate {
            level,
            virtual_size: e.virtual_size,
            allocated_bytes: e.allocated_bytes,
            unallocated_bytes: e.unallocated_bytes,
            sampled_bytes: e.sampled_bytes,
            samples: e.samples,
            spans: e.spans,
            zero_fraction: e.zero_fraction,
            estimated_nonzero_bytes: e.estimated_nonzero_bytes,
            candidate_blocks: e.candidate_blocks,
            image_blocks: e.image_blocks,
            image_bytes: e.image_bytes,
            compressed_bytes: e.compressed_bytes,
            low: e.low,
            high: e.high,
            context_correction: e.context_correction,
            sampling_error: e.sampling_error,
            correction_error: e.correction_error,
            seconds_spent: e.seconds_spent,
            predicted_seconds: e.predicted_seconds,
            threads: e.threads,
        }
    }
}
