//! Long disk work off the GIL, with a progress callback that can stop it (an exception, Ctrl-C).

use pyo3::prelude::*;

use crate::errors::OrRaise;

/// Runs `work` without the GIL, giving it a progress callback that calls `progress` (with the GIL) and stops the
/// work when that raises or a signal (Ctrl-C) is pending.
pub(crate) fn with_progress<T: Send>(
    py: Python<'_>,
    progress: Option<PyObject>,
    work: impl FnOnce(&mut dyn FnMut(u64, u64) -> bool) -> vhdcore::Result<T> + Send,
) -> PyResult<T> {
    let mut callback_error: Option<PyErr> = None;
    let result = py.allow_threads(|| {
        let mut report = |done: u64, total: u64| {
            Python::with_gil(|py| {
                let outcome = py.check_signals().and_then(|()| match &progress {
                    Some(cb) => cb.call1(py, (done, total)).map(|_| ()),
                    None => Ok(()),
                });
                match outcome {
                    Ok(()) => true,
                    Err(e) => {
                        callback_error = Some(e);
                        false
                    }
                }
            })
        };
        work(&mut report)
    });
    if let Some(e) = callback_error {
        return Err(e);
    }
    result.or_raise()
}
