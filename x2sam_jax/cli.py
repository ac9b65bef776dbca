"""Error handling shared by every command-line entry point (convert_weights/*, train.py, eval.py,
x2sam_jax.predict).

Expected failures (a missing or unreadable file, bad JSON, a bad config value, a truncated
archive, a checkpoint that does not match its config) end in one line on stderr naming the file
and what is wrong, and exit code 1; a malformed command line (absl's ``UsageError``, a bad flag,
a ``--config.<field>`` override naming no field of the run config) one line and exit code 2. A
bug still shows its traceback. Set X2SAM_TRACEBACK=1 to see the traceback of an expected
failure too.

    from x2sam_jax.cli import cli_errors, parse_flags

    @cli_errors
    def main(argv=None) -> int:
        ...

    if __name__ == "__main__":
        sys.exit(main())                              # argparse CLIs
        app.run(main, flags_parser=parse_flags)       # absl CLIs (train.py, eval.py)
"""

from __future__ import annotations

import difflib
import functools
import os
import pickle
import sys
import zipfile
from typing import Callable

from absl import flags
from absl.app import UsageError

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
        except (*EXPECTED_ERRORS, UsageError) as error:
            if os.environ.get(TRACEBACK_ENV):
                raise
            print(f"error: {describe(error)}", file=sys.stderr)
            return 2 if isinstance(error, UsageError) else 1

    return wrapped


def unknown_config_field(config, argv) -> str | None:
    """The message for the first ``--config.<path>=...`` of ``argv`` whose path names no field of
    ``config`` (a ConfigDict): the field and the closest existing name, or None."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0]
        node, prefix = config, ""
        for name in path.split("."):
            if not hasattr(node, "keys"):      # a leaf value (tuple, dataclass, ...): its parser says
                break
            if name not in node:
                close = difflib.get_close_matches(name, list(node.keys()), n=1)
                hint = f"; did you mean {prefix}{close[0]}?" if close else ""
                return f"--config.{path}: the run config has no field {prefix}{name}{hint}"
            node, prefix = node[name], f"{prefix}{name}."
    return None


def _run_config(argv):
    """The ConfigDict of the ``--config FILE`` in argv (its ``get_config()``), or None."""
    import importlib.util

    for k, arg in enumerate(argv):
        path = arg[len("--config="):] if arg.startswith("--config=") else (
            argv[k + 1] if arg == "--config" and k + 1 < len(argv) else None)
        if path and os.path.isfile(path.split(":", 1)[0]):
            spec = importlib.util.spec_from_file_location("_run_config", path.split(":", 1)[0])
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
                return module.get_config()
            except Exception:   # the config's own error is absl's to report
                return None
    return None


def parse_flags(argv: list[str], flag_values: flags.FlagValues | None = None) -> list[str]:
    """absl's flag parsing (``app.run(main, flags_parser=parse_flags)``) with any bad flag as one
    line on stderr and exit code 2, before anything is built or loaded."""
    try:
        return (flags.FLAGS if flag_values is None else flag_values)(argv)
    except (AttributeError, KeyError, flags.Error) as error:   # ml_collections: an override of a missing field
        config = _run_config(argv)
        message = (unknown_config_field(config, argv) if config is not None else None) or str(error)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
