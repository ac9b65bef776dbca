"""Writes that never leave a half-written destination, and never replace what is not theirs.

Everything goes to a temporary sibling (``.NAME.tmp-PID-XXXXXXXX``) that replaces the destination
in one step at the end (``renameat2(RENAME_EXCHANGE)`` where the filesystem has it), so a failed
or killed write never leaves a directory that looks complete; a later write cleans up the scratch
of killed ones. ``overwrite`` replaces only what ``replaceable`` accepts: by default an x2sam_jax
model directory (:func:`is_checkpoint`, the layout of ``x2sam_jax.model_checkpoint``) or an empty
folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator, Sequence

logger = logging.getLogger("x2sam_jax.storage")


class CheckpointError(ValueError):
    """A checkpoint that is not the model it claims to hold, or a destination that must not be written."""



def read_json(file: str | Path) -> dict:
    """A JSON object from ``file``; a missing, unreadable or malformed file is an error naming it."""
    file = Path(file)
    try:
        data = json.loads(file.read_text())
    except UnicodeDecodeError as error:
        raise ValueError(f"{file}: not a JSON text file ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, found a {type(data).__name__}")
    return data



def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :func:`save` or a converter (the only kind of
    directory ``overwrite`` may replace)."""
    path = Path(path)
    try:
        meta = read_json(path / "config.json")
    except (OSError, ValueError):
        return False
    return "model_type" in meta and "format_version" in meta and (path / "params").is_dir()


def check_destination(dst: str | Path, *, overwrite: bool = False, sources: Sequence[str | Path] = (),
                      replaceable: Callable[[Path], bool] = is_checkpoint,
                      what: str = "an x2sam_jax checkpoint", directory: bool = True) -> Path:
    """Refuses a destination that must not be written, before any work is done.

    ``dst`` must not be, contain or lie inside one of ``sources``; an existing ``dst`` needs
    ``overwrite``, must be a directory (a file when ``directory=False``) and must be empty or
    satisfy ``replaceable`` (by default: an x2sam_jax checkpoint), so nothing else of the user's
    is replaced.
    Returns ``dst`` as an absolute path.
    """
    dst = Path(dst).absolute()
    target = dst.resolve()
    for source in sources:
        resolved = Path(source).resolve()
        if resolved == target:
            raise CheckpointError(f"destination {dst} is the source {source}: writing it would destroy the input")
        if resolved in target.parents:
            raise CheckpointError(f"destination {dst} lies inside the source {source}")
        if target in resolved.parents:
            raise CheckpointError(f"the source {source} lies inside the destination {dst}")
    if os.path.lexists(dst):
        kind = "directory" if directory else "file"
        if dst.is_dir() != directory:
            raise FileExistsError(f"destination {dst} exists and is not a {kind}")
        if not overwrite:
            raise FileExistsError(f"destination {dst} already exists (pass overwrite=True / --overwrite to replace it)")
        if not (replaceable(dst) or (directory and not any(dst.iterdir()))):
            raise CheckpointError(f"--overwrite replaces only {what}, and {dst} is not one; "
                                  "move it away or choose another destination")
    return dst


def _scratch_name(dst: Path, kind: str) -> Path:
    return dst.parent / f".{dst.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _scratch_pattern(dst: Path) -> re.Pattern:
    # .NAME.tmp-PID-XXXXXXXX (a write in progress, or an old copy being deleted) and .NAME.old-...
    # (the old copy during a two-step swap).
    return re.compile(rf"\.{re.escape(dst.name)}\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{{8}}\Z")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def remove_stale_scratch(dst: str | Path) -> list[Path]:
    """Cleans up after earlier writes to ``dst`` that were killed: deletes their ``.tmp-`` folders
    and, when a kill fell between the two renames of a non-atomic swap (``dst`` missing), puts
    the old copy back. Only names of exactly our pattern whose process is gone are touched.
    Returns what was removed or restored."""
    dst = Path(dst).absolute()
    if not dst.parent.is_dir():
        return []
    pattern = _scratch_pattern(dst)
    touched = []
    for entry in sorted(dst.parent.iterdir()):
        match = pattern.match(entry.name)
        if match is None or _alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not os.path.lexists(dst):
            entry.rename(dst)
            logger.warning("restored %s from %s (an interrupted overwrite)", dst, entry.name)
        else:
            _remove(entry)
        touched.append(entry)
    return touched


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_atomically(new: Path, dst: Path) -> None:
    """Moves ``new`` to ``dst``. An existing ``dst`` is swapped with ``new`` in one step (so a
    kill at any moment leaves the old or the new one at ``dst``) and then deleted; where the
    filesystem cannot swap, it is renamed aside first and :func:`remove_stale_scratch` restores
    it if a kill falls between the two renames."""
    if not os.path.lexists(dst):
        os.rename(new, dst)
        return
    if _exchange(new, dst):
        _remove(new)             # ``new`` now names the old copy
        return
    aside = new.with_name(new.name.replace(".tmp-", ".old-", 1))
    os.rename(dst, aside)
    os.rename(new, dst)
    _remove(aside)


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p ``directory``; returns the directories it created, deepest last."""
    missing = []
    for parent in [directory, *directory.parents]:
        if os.path.lexists(parent):
            break
        missing.append(parent)
    for path in reversed(missing):
        path.mkdir()
    return list(reversed(missing))


@contextlib.contextmanager
def atomic_directory(dst: str | Path, overwrite: bool = False, *, sources: Sequence[str | Path] = (),
                     replaceable: Callable[[Path], bool] = is_checkpoint,
                     what: str = "an x2sam_jax checkpoint") -> Iterator[Path]:
    """Yields a temporary directory that replaces ``dst`` only if the block succeeds.

    Enter it before reading any input: the destination is checked first (see
    :func:`check_destination`), stale scratch of killed runs is cleaned, and creating the
    temporary directory proves the location writable. On failure nothing is left behind (not
    even parent directories it created); on success the swap is atomic (:func:`replace_atomically`).
    """
    dst = check_destination(dst, overwrite=overwrite, sources=sources, replaceable=replaceable, what=what)
    remove_stale_scratch(dst)
    created = []
    tmp = _scratch_name(dst, "tmp")
    try:
        created = _make_parents(dst.parent)
        tmp.mkdir()
    except OSError as error:
        _remove_empty(created)
        raise type(error)(error.errno, f"cannot write the destination {dst}: {error.strerror}") from None
    try:
        yield tmp
        if os.path.lexists(dst):  # it may have appeared while we worked
            check_destination(dst, overwrite=overwrite, replaceable=replaceable, what=what)
        replace_atomically(tmp, dst)
    except BaseException:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


@contextlib.contextmanager
def atomic_file(dst: str | Path, overwrite: bool = False, *, sources: Sequence[str | Path] = (),
                replaceable: Callable[[Path], bool] = lambda path: False, what: str = "a file") -> Iterator[Path]:
    """:func:`atomic_directory` for a single file: yields a temporary path renamed onto ``dst``
    (``os.replace``, atomic) when the block succeeds."""
    dst = check_destination(dst, overwrite=overwrite, sources=sources, replaceable=replaceable, what=what,
                            directory=False)
    remove_stale_scratch(dst)
    created = []
    tmp = _scratch_name(dst, "tmp")
    try:
        created = _make_parents(dst.parent)
        tmp.touch()
    except OSError as error:
        _remove_empty(created)
        raise type(error)(error.errno, f"cannot write the destination {dst}: {error.strerror}") from None
    try:
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        if os.path.lexists(tmp):
            tmp.unlink()
        _remove_empty(created)
        raise


def _remove_empty(directories: list[Path]) -> None:
    for path in reversed(directories):
        with contextlib.suppress(OSError):
            path.rmdir()

