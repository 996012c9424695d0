"""`python -m statemachine.cli ...`: the `imaging` command (as the console script runs it)."""

from statemachine.cli import main

main()
