"""Tests of the vhdcore Python API (the native module built from rust_core/)."""
