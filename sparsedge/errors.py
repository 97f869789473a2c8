"""One exception type for everything a user can get wrong.

The CLI prints a SparsedgeError as one line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class SparsedgeError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported model."""
