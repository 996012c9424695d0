"""Fixtures of the workflow tests: `env` (a file store and SQLite state in tmp_path, the workflow's settings in the
environment), from tests/support/workflow.py."""

from tests.support.workflow import env  # noqa: F401 - registered here for every test of this folder
