//! The image of DESIGN §5: its plan (what each chunk reads, from metadata alone), the chunks built and compressed
//! as independent zstd frames (frame encoder, early abort of incompressible pieces, long-match finder) and the
//! direct (O_DIRECT) writer of a whole image file.

pub(crate) mod compress;
pub(crate) mod direct_writer;
pub(crate) mod early_abort;
pub(crate) mod frame_encoder;
pub(crate) mod long_match;
pub(crate) mod plan;
