"""One exception type for bad input: the CLI prints its message on one line and exits non-zero."""


class LmstackError(Exception):
    """A user-facing error: bad input, a missing file, a corrupt checkpoint, an invalid option."""
