"""Error handling shared by every command-line entry point (convert_weights/*, train.py, eval.py).

Expected failures (a missing or unreadable file, bad JSON, a bad config value, a truncated
archive, a checkpoint that does not match its config) end in one line on stderr naming the file
and what is wrong, and exit code 1; a bug still shows its traceback. Set X2SAM_TRACEBACK=1 to
see the traceback of an expected failure too.

    from x2sam_jax.cli import cli_errors

    @cli_errors
    def main(argv=None) -> int:
        ...

    if __name__ == "__main__":
        sys.exit(main())
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
import zipfile
from typing import Callable

# OSError: missing / unreadable / unwritable files; ValueError: bad values, bad JSON
# (json.JSONDecodeError), ConversionError, CheckpointError; the rest: damaged archives.
EXPECTED_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError)
TRACEBACK_ENV = "X2SAM_TRACEBACK"


def describe(error: BaseException) -> str:
    """The message of an expected error, with the file first for OS errors."""
    if isinstance(error, OSError) and error.strerror:
        files = [str(f) for f in (error.filename, error.filename2) if f is not None]
        return f"{' -> '.join(files)}: {error.strerror}" if files else error.strerror
    return str(error) or type(error).__name__


def cli_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorates a CLI ``main``: expected errors print ``error: <message>`` and return 1."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except EXPECTED_ERRORS as error:
            if os.environ.get(TRACEBACK_ENV):
                raise
            print(f"error: {describe(error)}", file=sys.stderr)
            return 1

    return wrapped
