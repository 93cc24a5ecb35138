"""`python -m lmstack` is the same as the `lmstack` command."""

from lmstack.cli import main

main()
