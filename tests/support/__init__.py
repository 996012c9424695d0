"""Test support code shared by the test suites (reference VHD implementation, qemu helpers, isolation)."""
