//! The image: its plan (`plan.rs`) and its compressed frames (`frame.rs`).

pub(crate) mod frame;
pub(crate) mod plan;
