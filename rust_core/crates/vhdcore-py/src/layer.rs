//! `Layer`: one VHD of a chain as Python sees it (its footer's and header's facts), and its `to_dict`.

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// A frozen Python record whose fields are read-only attributes, with `to_dict()` built from the same field list,
/// so a field added to the record is in the dict too.
macro_rules! record {
    ($(#[$meta:meta])* $vis:vis struct $name:ident { $($field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        $vis struct $name {
            $(pub(crate) $field: $ty,)*
        }

        impl $name {
            fn fields<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
                let d = PyDict::new(py);
                $(d.set_item(stringify!($field), &self.$field)?;)*
                Ok(d)
            }
        }
    };
}

record! {
    #[pyclass(frozen, get_all, module = "vhdcore._vhdcore")]
    #[derive(Clone)]
    pub(crate) struct Layer {
        path: String,
        disk_type: String,
        virtual_size: u64,
        file_size: u64,
        block_size: Option<u32>,
        max_table_entries: u32,
        allocated_blocks: u32,
        uuid: String,
        timestamp: u32,
        creator_app: String,
        legacy_footer: bool,
        parent_uuid: Option<String>,
        parent_name: Option<String>,
        parent_timestamp: Option<u32>,
    }
}

impl Layer {
    pub(crate) fn from_disk(disk: &vhdcore::Disk) -> Layer {
        Layer {
            path: disk.path.display().to_string(),
            disk_type: disk.disk_type.as_str().to_string(),
            virtual_size: disk.virtual_size,
            file_size: disk.file_size,
            block_size: disk.block_size(),
            max_table_entries: disk.sparse.as_ref().map_or(0, |s| s.header.max_table_entries.get()),
            allocated_blocks: disk.allocated_blocks(),
            uuid: disk.uuid_string(),
            timestamp: disk.footer.timestamp.get(),
            creator_app: String::from_utf8_lossy(&disk.footer.creator_app).trim_end_matches(['\0', ' ']).to_string(),
            legacy_footer: disk.legacy_footer,
            parent_uuid: disk.parent_uuid().map(|u| vhdcore::uuid_string(&u)),
            parent_name: disk.parent_name(),
            parent_timestamp: disk.parent_timestamp(),
        }
    }
}

#[pymethods]
impl Layer {
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.fields(py)
    }

    fn __repr__(&self) -> String {
        format!("Layer(path={:?}, disk_type={:?}, virtual_size={})", self.path, self.disk_type, self.virtual_size)
    }
}
