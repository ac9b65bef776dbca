"""Skip-and-count: one bad sample never stops training.

A missing or corrupt image, an empty or out-of-bounds mask, a malformed record (`BadSample` from a
source or a transform, or an OSError from decoding) or a sample too large for every bucket is
skipped; the slot is refilled from the next candidate (the pipeline gives a deterministic
sequence of candidates, so a resumed run refills exactly as an uninterrupted one). Every skip is
counted per reason and per source; `SkipStats.stats()` is the report and `log_line()` its summary.

Exceptions that do not mean "bad data" (a bug in a transform, say) are NOT swallowed: they
propagate with a note naming the dataset and sample.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterable

from x2sam_jax.data.schema import BadSample

logger = logging.getLogger("x2sam_jax.data")

# Exceptions that mean "this sample's data is bad". OSError covers missing files
# (FileNotFoundError) and undecodable images (PIL.UnidentifiedImageError, truncated files).
SKIPPABLE_EXCEPTIONS: tuple[type[BaseException], ...] = (BadSample, OSError)

REASONS = (
    "missing_file", "corrupt_image", "corrupt_mask", "empty_mask", "mask_out_of_bounds", "malformed_record",
    "exceeds_bucket",
)


def classify(err: BaseException) -> str:
    """A short reason for a skipped sample (the key counts are kept under).

    An exception may name its reason in a `kind` attribute; otherwise the type and the message
    (as sources/transforms word them: "missing image file", "corrupt image file", "mask of size
    .. for an image of size ..") decide.
    """
    kind = getattr(err, "kind", None)
    if isinstance(kind, str) and kind:
        return kind
    if isinstance(err, FileNotFoundError):
        return "missing_file"
    if isinstance(err, OSError):
        return "corrupt_image"
    text = str(err).lower()
    if "missing image" in text or "filenotfounderror" in text or "no such file" in text:
        return "missing_file"
    if "bad mask rle" in text:  # sources.common.check_rle: runs that do not cover the mask
        return "corrupt_mask"
    if "corrupt" in text or "cannot identify image" in text or "truncated" in text:
        return "corrupt_image"
    if "mask" in text and ("empty" in text or "no mask" in text or "vanishes" in text):
        return "empty_mask"
    if any(k in text for k in ("out of bounds", "out-of-bounds", "outside the image", "for an image of size",
                               "differs from image size")):
        return "mask_out_of_bounds"
    return "malformed_record"


class SkipStats:
    """Thread-safe skip counters per (source, reason), with a few example messages per reason."""

    max_examples = 3

    def __init__(self):
        self._counts: collections.Counter = collections.Counter()
        self._examples: dict[str, list[str]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def add(self, source: str, reason: str, message: str = "") -> None:
        with self._lock:
            self._counts[(source, reason)] += 1
            if message and len(self._examples[reason]) < self.max_examples:
                self._examples[reason].append(message)

    def merge(self, records: Iterable[tuple[str, str, str]]) -> int:
        n = 0
        for source, reason, message in records:
            self.add(source, reason, message)
            n += 1
        return n

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def stats(self) -> dict:
        """{"total", "by_reason": {reason: n}, "by_source": {source: {reason: n}}, "examples"}."""
        with self._lock:
            by_reason: dict[str, int] = collections.Counter()
            by_source: dict[str, dict[str, int]] = collections.defaultdict(dict)
            for (source, reason), n in sorted(self._counts.items()):
                by_reason[reason] += n
                by_source[source][reason] = n
            return {
                "total": sum(self._counts.values()),
                "by_reason": dict(sorted(by_reason.items())),
                "by_source": dict(by_source),
                "examples": {k: list(v) for k, v in self._examples.items()},
            }

    def log_line(self) -> str:
        s = self.stats()
        if not s["total"]:
            return "data: no samples skipped"
        parts = ", ".join(
            f"{src}: " + " ".join(f"{reason}={n}" for reason, n in reasons.items())
            for src, reasons in s["by_source"].items()
        )
        return f"data: skipped {s['total']} samples ({parts})"

    # Counts travel with the iterator state so a resumed run keeps reporting totals.
    def get_state(self) -> list:
        with self._lock:
            return [[src, reason, n] for (src, reason), n in sorted(self._counts.items())]

    def set_state(self, state: list) -> None:
        with self._lock:
            self._counts = collections.Counter({(src, reason): int(n) for src, reason, n in state})
            self._examples = collections.defaultdict(list)


class TooManyBadSamples(RuntimeError):
    pass


def load_first_good(
    source_name: str,
    candidates: Iterable[tuple[int, Callable[[], dict]]],
    *,
    max_attempts: int = 64,
    skippable: tuple[type[BaseException], ...] = SKIPPABLE_EXCEPTIONS,
) -> tuple[dict, list[tuple[str, str, str]]]:
    """Runs `load()` of each (sample_index, load) candidate in order until one succeeds.

    Returns (features, skipped) with skipped = [(source, reason, message), ...] for the failures.
    Raises TooManyBadSamples after `max_attempts` consecutive failures (a broken dataset, not a
    bad sample: better a clear error than a silent loop).
    """
    skipped: list[tuple[str, str, str]] = []
    for attempt, (index, load) in enumerate(candidates):
        if attempt >= max_attempts:
            break
        try:
            return load(), skipped
        except skippable as err:
            reason = classify(err)
            message = f"{source_name}[{index}]: {err}"
            logger.debug("skipping %s (%s)", message, reason)
            skipped.append((source_name, reason, message))
        except Exception as err:  # a bug, not bad data: surface it, saying where
            err.add_note(f"while loading sample {index} of {source_name}")
            raise
    reasons = collections.Counter(r for _, r, _ in skipped)
    raise TooManyBadSamples(
        f"{source_name}: {len(skipped)} consecutive samples failed ({dict(reasons)}); "
        f"last: {skipped[-1][2] if skipped else 'no candidates'}"
    )
