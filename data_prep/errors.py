"""The one exception type that means "the user asked for something impossible".

It lives on the offline side, which imports nothing from pipeline/ or cluster/; pipeline.errors re-exports
this very class, so ``except HardnegError`` in the CLI catches errors from both sides.
"""


class HardnegError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits 2, no traceback."""
