"""The imaging workflow: its ASL definition, the embedded local engine, and the `imaging` command line."""
