//! Validating a whole chain and reporting every problem found, not just the first.

use std::path::Path;

use zerocopy::{FromBytes, IntoBytes};

use crate::chain::Chain;
use crate::disk::Validator;
use crate::error::VhdError;
use crate::format::{Footer, FOOTER_SIZE};

/// Where the parent timestamp sits in the dynamic header.
const PARENT_TIMESTAMP_OFFSET: u64 = 56;

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
            problems.extend(changed_parents(&chain));
        }
    }
    problems
}

/// Children whose parent changed after them, where the timestamps tell: the parent's footer timestamp is not the
/// one the child recorded, and is not older than the child itself (a parent written into after its child was made
/// is restamped by `restamp`). A parent timestamp older than the child is the stale timestamp real chains carry:
/// only a warning of the chain (DESIGN §7), not a problem.
fn changed_parents(chain: &Chain) -> Vec<VhdError> {
    chain
        .layers
        .windows(2)
        .filter_map(|pair| {
            let (child, parent) = (&pair[0], &pair[1]);
            let recorded = child.parent_timestamp().filter(|t| *t != 0)?;
            let actual = parent.footer.timestamp.get();
            let made = child.footer.timestamp.get();
            (recorded != actual && actual >= made).then(|| VhdError::InvalidField {
                path: child.path.clone(),
                field: "header.parent_timestamp".into(),
                offset: child.footer.data_offset.get().saturating_add(PARENT_TIMESTAMP_OFFSET),
                value: recorded.to_string(),
                reason: format!(
                    "its parent {} changed after this child was made (parent timestamp {actual}, not before the \
                     child's own {made}): this disk's content may have changed with it",
                    parent.path.display()
                ),
            })
        })
        .collect()
}
