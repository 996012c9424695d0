//! The exception tree rooted at `VhdError`, and the one place where vhdcore's errors become Python exceptions: by
//! their kind, with `kind`, `path`, `field` and `offset` attributes. [`CoreError`] carries a vhdcore error across
//! the boundary (`From<CoreError> for PyErr`, so `?` raises it); [`OrRaise::or_raise`] does that for a whole result.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use vhdcore::ErrorKind;

create_exception!(_vhdcore, VhdError, PyException, "Root of every error vhdcore raises.");
create_exception!(_vhdcore, VhdIoError, VhdError, "The disk could not be read or written.");
create_exception!(_vhdcore, VhdFormatError, VhdError, "A VHD structure is malformed.");
create_exception!(_vhdcore, ChecksumError, VhdFormatError, "A footer or header checksum does not match.");
create_exception!(_vhdcore, TruncatedError, VhdFormatError, "The file ends before a structure it must hold.");
create_exception!(_vhdcore, BatError, VhdFormatError, "A BAT entry points past the data or overlaps another.");
create_exception!(_vhdcore, UnsupportedError, VhdFormatError, "A valid but unsupported VHD feature.");
create_exception!(_vhdcore, ChainError, VhdError, "The chain of parents cannot be resolved.");
create_exception!(_vhdcore, MissingParentError, ChainError, "A differencing disk's parent is not found.");
create_exception!(_vhdcore, ParentMismatchError, ChainError, "The file found as parent has another UUID.");
create_exception!(_vhdcore, ChainCycleError, ChainError, "The chain loops back on itself.");
create_exception!(_vhdcore, ChainTooDeepError, ChainError, "The chain is deeper than the cap.");
create_exception!(_vhdcore, InvalidArgumentError, VhdError, "A request the disk cannot honour.");
create_exception!(
    _vhdcore,
    CoalescePendingError,
    ChainError,
    "A coalesce of the chain was interrupted and its journal is pending; run coalesce to finish it."
);

/// A vhdcore error on its way to Python: `?` in a function returning `PyResult` raises the exception of its kind.
pub(crate) struct CoreError(pub(crate) vhdcore::VhdError);

impl From<vhdcore::VhdError> for CoreError {
    fn from(err: vhdcore::VhdError) -> CoreError {
        CoreError(err)
    }
}

impl From<CoreError> for PyErr {
    fn from(err: CoreError) -> PyErr {
        Python::with_gil(|py| to_py_err(py, err.0))
    }
}

/// `result.or_raise()?`: a vhdcore result as a Python one (through [`CoreError`]).
pub(crate) trait OrRaise<T> {
    fn or_raise(self) -> PyResult<T>;
}

impl<T> OrRaise<T> for vhdcore::Result<T> {
    fn or_raise(self) -> PyResult<T> {
        self.map_err(|e| CoreError(e).into())
    }
}

/// Adds the exception classes to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("VhdError", py.get_type::<VhdError>())?;
    m.add("VhdIoError", py.get_type::<VhdIoError>())?;
    m.add("VhdFormatError", py.get_type::<VhdFormatError>())?;
    m.add("ChecksumError", py.get_type::<ChecksumError>())?;
    m.add("TruncatedError", py.get_type::<TruncatedError>())?;
    m.add("BatError", py.get_type::<BatError>())?;
    m.add("UnsupportedError", py.get_type::<UnsupportedError>())?;
    m.add("ChainError", py.get_type::<ChainError>())?;
    m.add("MissingParentError", py.get_type::<MissingParentError>())?;
    m.add("ParentMismatchError", py.get_type::<ParentMismatchError>())?;
    m.add("ChainCycleError", py.get_type::<ChainCycleError>())?;
    m.add("ChainTooDeepError", py.get_type::<ChainTooDeepError>())?;
    m.add("InvalidArgumentError", py.get_type::<InvalidArgumentError>())?;
    m.add("CoalescePendingError", py.get_type::<CoalescePendingError>())?;
    Ok(())
}

fn to_py_err(py: Python<'_>, err: vhdcore::VhdError) -> PyErr {
    let message = err.to_string();
    let py_err = match err.kind() {
        ErrorKind::Io => VhdIoError::new_err(message),
        ErrorKind::BadCookie | ErrorKind::InvalidField => VhdFormatError::new_err(message),
        ErrorKind::Checksum => ChecksumError::new_err(message),
        ErrorKind::Truncated => TruncatedError::new_err(message),
        ErrorKind::BatOutOfRange | ErrorKind::OverlappingBlocks => BatError::new_err(message),
        ErrorKind::Unsupported => UnsupportedError::new_err(message),
        ErrorKind::MissingParent => MissingParentError::new_err(message),
        ErrorKind::ParentMismatch => ParentMismatchError::new_err(message),
        ErrorKind::ChainCycle => ChainCycleError::new_err(message),
        ErrorKind::ChainTooDeep => ChainTooDeepError::new_err(message),
        ErrorKind::InvalidArgument => InvalidArgumentError::new_err(message),
        ErrorKind::CoalescePending => CoalescePendingError::new_err(message),
        ErrorKind::Interrupted => return pyo3::exceptions::PyKeyboardInterrupt::new_err("interrupted"),
    };
    let value = py_err.value(py);
    let attrs: [(&str, PyObject); 4] = [
        ("kind", err.kind().as_str().into_pyobject(py).map(|v| v.into_any().unbind()).unwrap_or_else(|_| py.None())),
        (
            "path",
            err.path()
                .map(|p| p.display().to_string())
                .into_pyobject(py)
                .map(|v| v.unbind())
                .unwrap_or_else(|_| py.None()),
        ),
        ("field", err.field().into_pyobject(py).map(|v| v.unbind()).unwrap_or_else(|_| py.None())),
        ("offset", err.offset().into_pyobject(py).map(|v| v.unbind()).unwrap_or_else(|_| py.None())),
    ];
    for (name, attr) in attrs {
        // Setting attributes on a fresh exception instance cannot fail in practice; keep the error if it does.
        let _ = value.setattr(name, attr);
    }
    py_err
}
