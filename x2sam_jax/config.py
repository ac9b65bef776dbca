"""Architecture configs: frozen dataclasses, one preset per released checkpoint.

Each component owns one section below. Configs round-trip through JSON (``to_dict`` /
``from_dict``), which is how checkpoints record the architecture they hold (config.json).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

C = TypeVar("C")


def to_dict(config) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuilds a (nested) config dataclass from ``to_dict`` output; unknown fields are an error."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config fields {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value)
    return cls(**kwargs)


def _coerce(hint, value):
    origin = typing.get_origin(hint)
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return from_dict(arg, value)
        return _coerce(next(a for a in typing.get_args(hint) if a is not type(None)), value)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        return tuple(_coerce(a, v) for a, v in zip(args, value)) if args else tuple(value)
    return value


# ----------------------------------------------------------------------------------------------
# SAM2 / SAM2.1 Hiera mask encoder + FPN neck            (owner: models/hiera.py)
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Qwen3-VL vision encoder, Qwen3 text model, LoRA         (owner: models/qwen3_vl*.py, lora.py)
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# X2SAM head: pixel decoder, mask decoder, mask memory, projectors, full model
# ----------------------------------------------------------------------------------------------
