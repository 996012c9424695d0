"""Fixtures of the functional tests: `cli` (this checkout's `imaging` in a child process with a data directory of
its own) and `leaf` (the sample chain), from tests/support/cli.py. A test module that defines its own `cli` (the
installed console script, or other settings) overrides this one."""

from tests.support.cli import cli, leaf  # noqa: F401 - registered here for every test of this folder
