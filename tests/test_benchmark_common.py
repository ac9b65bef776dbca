"""benchmarks/common.py: a speed figure measured while other work loaded the machine is not printed."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import interleaved_medians, is_loaded, speed  # noqa: E402


def test_a_loaded_machine_gives_no_ratio(monkeypatch):
    cores = os.cpu_count()
    assert not is_loaded([cores * 0.9, cores - 0.1]) and is_loaded([1.0, cores + 1.0])
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 3.0, 0.0, 0.0))
    timing = interleaved_medians({"a": lambda: None, "b": lambda: None}, repeats=2, warmup=0)
    assert timing["loaded"] and speed(1.234, timing) == "loaded: not a result"
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.0, 0.0))
    timing = interleaved_medians({"a": lambda: None}, repeats=2, warmup=0)
    assert not timing["loaded"] and speed(1.23456, timing) == 1.235
