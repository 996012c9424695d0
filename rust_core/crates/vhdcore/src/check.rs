//! Validating a whole chain and reporting every problem found, not just the first.

use std::path::Path;

use zerocopy::{FromBytes, IntoBytes};

use crate::chain::Chain;
use crate::disk::Validator;
use crate::error::VhdError;
use crate::format::{Footer, FOOTER_SIZE};

/// Every problem of the chain whose leaf is `path`; empty when it is healthy.
pub fn check(path: &Path, max_depth: usize) -> Vec<VhdError> {
    let mut v = Validator::collecting();
    let chain = Chain::open_validated(path, max_depth, &mut v);
    let mut problems = std::mem::take(&mut v.problems);
    match chain {
        Err(fatal) => problems.push(fatal),
        Ok(chain) => {
            for disk in chain.layers.iter().filter(|d| d.sparse.is_some()) {
                let mut copy = [0u8; 512];
                if let Err(e) = disk.read_exact_at(&mut copy, 0) {
                    problems.push(e);
                    continue;
                }
                let matches =
                    Footer::read_from_bytes(&copy[..]).map(|c| c.as_bytes() == disk.footer.as_bytes()).unwrap_or(false);
                if !matches {
                    problems.push(VhdError::InvalidField {
                        path: disk.path.clone(),
                        field: "footer copy".into(),
                        offset: 0,
                        value: "a different footer".into(),
                        reason: format!(
                            "must equal the footer at offset {} ({} bytes)",
                            disk.footer_offset, FOOTER_SIZE
                        ),
                    });
                }
            }
        }
    }
    problems
}
