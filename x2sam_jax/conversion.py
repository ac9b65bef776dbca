"""Strict, table-driven weight conversion between PyTorch/HF checkpoints and NNX states.

A converter is a list of :class:`Rule` s. Each rule maps a source key template to a target
parameter path template, e.g.::

    Rule("model.layers.{i}.mlp.up_proj.weight", "layers.mlp.up_proj.kernel", LINEAR)

``{name}`` placeholders match decimal integers. A placeholder that appears in the source but
not in the target indexes the leading axes of a stacked (scanned) target parameter, in the
order the placeholders appear in the source. The same table serves both directions
(:func:`load_tensors` torch -> JAX, :func:`export_tensors` JAX -> torch).

Every missing, unexpected and mis-shaped key is reported in one :class:`ConversionError`.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from x2sam_jax.storage.atomic import read_json


class ConversionError(ValueError):
    """A checkpoint does not match the architecture it is converted into."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """Layout change from the torch tensor to the JAX parameter (``forward``) and back."""

    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform(lambda a: a, lambda a: a)
# torch Linear weight [out, in] -> kernel [in, out]
LINEAR = Transform(lambda a: a.T, lambda a: a.T)
# torch Conv2d weight [O, I, kh, kw] -> [kh, kw, I, O]
CONV2D = Transform(lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))
# torch Conv3d weight [O, I, kt, kh, kw] -> [kt, kh, kw, I, O]
CONV3D = Transform(lambda a: a.transpose(2, 3, 4, 1, 0), lambda a: a.transpose(4, 3, 0, 1, 2))


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str
    target: str
    transform: Transform = IDENTITY

    def __post_init__(self):
        src_names = _placeholders(self.source)
        dst_names = _placeholders(self.target)
        if not set(dst_names) <= set(src_names):
            raise ValueError(f"rule {self.source!r} -> {self.target!r}: target placeholders "
                             f"{dst_names} must all appear in the source")

    @property
    def stacked(self) -> tuple[str, ...]:
        """Placeholders that index the stacked leading axes of the target, outermost first."""
        dst = set(_placeholders(self.target))
        return tuple(n for n in _placeholders(self.source) if n not in dst)


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _placeholders(template: str) -> list[str]:
    return _PLACEHOLDER.findall(template)


def template_regex(template: str) -> re.Pattern:
    parts = _PLACEHOLDER.split(template)
    out = []
    for i, part in enumerate(parts):
        out.append(f"(?P<{part}>\\d+)" if i % 2 else re.escape(part))
    return re.compile("".join(out) + r"\Z")


def fill_template(template: str, values: dict[str, int | str]) -> str:
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def flatten(tree, prefix: str = "") -> dict[str, object]:
    """Flattens nested dicts (e.g. ``nnx.to_pure_dict``) into ``{"a.b.0.c": leaf}``."""
    out: dict[str, object] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    out[prefix[:-1]] = tree
    return out


def unflatten(flat: dict[str, object]) -> dict:
    """Inverse of :func:`flatten`; integer path parts become int keys (as nnx.List uses)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        parts = [int(p) if p.isdigit() else p for p in path.split(".")]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def load_tensors(targets: dict[str, tuple[tuple[int, ...], np.dtype]],
                 tensors: Iterable[tuple[str, np.ndarray]], rules: Sequence[Rule],
                 skip: Sequence[str] = (), source: str = "checkpoint") -> tuple[dict[str, np.ndarray], list[str]]:
    """Fills every target parameter from ``tensors``.

    Args:
      targets: flat parameter path -> (shape, dtype) of the model being filled.
      tensors: (source key, array) pairs, consumed one at a time.
      rules: the conversion table.
      skip: regexes of source keys that are known and deliberately not converted.
      source: what ``tensors`` come from, named in the error.

    Returns:
      (flat path -> array in the target dtype, sorted list of skipped source keys).

    Raises:
      ConversionError naming every unexpected, mis-shaped and missing key.
    """
    compiled = [(rule, template_regex(rule.source)) for rule in rules]
    skip_res = [re.compile(s) for s in skip]
    out: dict[str, np.ndarray] = {}
    filled: dict[str, np.ndarray] = {}  # stacked targets: which slots were written
    unexpected, bad_shape, skipped, unknown_target, bad_dtype, non_finite = [], [], [], [], [], []

    for key, array in tensors:
        match = next(((rule, m) for rule, regex in compiled if (m := regex.match(key))), None)
        if match is None:
            (skipped if any(s.match(key) for s in skip_res) else unexpected).append(key)
            continue
        rule, m = match
        values = {k: int(v) for k, v in m.groupdict().items()}
        path = fill_template(rule.target, values)
        if path not in targets:
            unknown_target.append(f"{key} -> {path}")
            continue
        shape, dtype = targets[path]
        index = tuple(values[n] for n in rule.stacked)
        if any(i >= s for i, s in zip(index, shape)):
            unexpected.append(f"{key} (layer index {index} beyond the {shape[:len(index)]} stacked layers)")
            continue
        value = rule.transform.forward(np.asarray(array))
        if tuple(value.shape) != tuple(shape[len(index):]):
            bad_shape.append(f"{key}: expected {tuple(rule.transform.inverse(np.empty(shape[len(index):], np.int8)).shape)}"
                             f" (-> {path} {tuple(shape[len(index):])}), got {tuple(np.asarray(array).shape)}")
            continue
        if is_float_dtype(dtype) and not is_float_dtype(value.dtype):   # a cast would invent weights
            bad_dtype.append(f"{key}: {value.dtype} tensor for the {np.dtype(dtype)} parameter {path}")
            continue
        if is_float_dtype(value.dtype) and not np.isfinite(value).all():
            bad = ~np.isfinite(value)
            non_finite.append(f"{key}: {int(bad.sum())} of {value.size} values are NaN or infinite")
            continue
        if index:
            if path not in out:
                out[path] = np.zeros(shape, dtype)
                filled[path] = np.zeros(shape[:len(index)], bool)
            out[path][index] = value
            filled[path][index] = True
        else:
            out[path] = value.astype(dtype, copy=False)

    missing = []
    for path, (shape, _) in targets.items():
        if path not in out:
            missing.append(_describe_missing(path, None, rules))
        elif path in filled and not filled[path].all():
            for index in np.argwhere(~filled[path]):
                missing.append(_describe_missing(path, tuple(int(i) for i in index), rules))
    problems = []
    if missing:
        problems.append("missing keys:\n  " + "\n  ".join(sorted(missing)))
    if unexpected:
        problems.append("unexpected keys:\n  " + "\n  ".join(sorted(unexpected)))
    if bad_shape:
        problems.append("shape mismatches:\n  " + "\n  ".join(sorted(bad_shape)))
    if unknown_target:
        problems.append("keys whose rule points at no model parameter:\n  " + "\n  ".join(sorted(unknown_target)))
    if bad_dtype:
        problems.append("non-float tensors for float parameters:\n  " + "\n  ".join(sorted(bad_dtype)))
    if non_finite:
        problems.append("non-finite weights:\n  " + "\n  ".join(sorted(non_finite)))
    if problems:
        raise ConversionError(f"{source} does not match the model:\n" + "\n".join(problems))
    return out, sorted(skipped)


def is_float_dtype(dtype) -> bool:
    """Floating point, the ml_dtypes ones (bfloat16, float8...) included."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        return True
    import ml_dtypes

    try:
        ml_dtypes.finfo(dtype)
    except ValueError:
        return False
    return True


def _describe_missing(path: str, index, rules: Sequence[Rule]) -> str:
    """The source key that should have provided ``path`` (at stacked ``index``)."""
    for rule in rules:
        m = template_regex(rule.target).match(path)
        if m is None or (index is not None) != bool(rule.stacked):
            continue
        values = {k: int(v) for k, v in m.groupdict().items()}
        values.update(zip(rule.stacked, index or ()))
        return f"{fill_template(rule.source, values)} (for {path})"
    return f"<no rule produces {path}>"


def export_tensors(flat: dict[str, np.ndarray], rules: Sequence[Rule]) -> dict[str, np.ndarray]:
    """Inverse of :func:`load_tensors`: flat parameter arrays -> {source key: torch-layout array}."""
    compiled = [(rule, template_regex(rule.target)) for rule in rules]
    out: dict[str, np.ndarray] = {}
    unmapped = []
    for path, array in flat.items():
        match = next(((rule, m) for rule, regex in compiled if (m := regex.match(path))), None)
        if match is None:
            unmapped.append(path)
            continue
        rule, m = match
        values = {k: int(v) for k, v in m.groupdict().items()}
        array = np.asarray(array)
        n = len(rule.stacked)
        for index in np.ndindex(*array.shape[:n]):
            values.update(zip(rule.stacked, index))
            out[fill_template(rule.source, values)] = np.ascontiguousarray(rule.transform.inverse(array[index]))
    if unmapped:
        raise ConversionError("parameters with no export rule:\n  " + "\n  ".join(sorted(unmapped)))
    return out


# ----------------------------------------------------------------------------------------------
# Reading source checkpoints lazily, one tensor at a time.
# ----------------------------------------------------------------------------------------------


def torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def safetensors_files(src: Path) -> list[Path]:
    """The safetensors files of an HF directory (sharded via the index, or single)."""
    src = Path(src)
    index = src / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index}: expected a 'weight_map' object")
        files = [src / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists files that are not in {src}: {', '.join(missing)}")
        return files
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src}: no model.safetensors.index.json or *.safetensors files")
    return files


def iter_safetensors(files: Sequence[Path], keep: Callable[[str], bool] | None = None
                     ) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) of every tensor in ``files`` (only the keys ``keep`` accepts), read one at a
    time; a truncated or damaged file is a ConversionError naming it."""
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if keep is None or keep(key):
                        yield key, torch_to_numpy(f.get_tensor(key))
        except (OSError, ConversionError):
            raise
        except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise ConversionError(f"{file}: cannot read it as safetensors ({error}); is it truncated?") from None


def load_torch_file(path: Path):
    """``torch.load(path)`` of a state-dict file: weights only (never arbitrary objects), mmapped
    when the file allows; a truncated or damaged file is a ConversionError naming it."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):   # only files not saved with the zipfile format cannot be mmapped
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(f"{path}: cannot read it as a torch state dict ({first}); is it truncated?") from None


def iter_torch_file(path: Path, subkey: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a ``torch.save`` state dict, loaded with ``weights_only=True`` and mmap."""
    obj = load_torch_file(path)
    if subkey is not None and isinstance(obj, dict) and subkey in obj:
        obj = obj[subkey]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
    for key in list(obj):
        value = obj.pop(key)
        if not hasattr(value, "dtype"):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        yield key, torch_to_numpy(value)


def iter_checkpoint(src: str | Path, subkey: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) pairs of an HF directory, a .safetensors file or a torch .pt/.bin file."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    if src.is_dir():
        return iter_safetensors(safetensors_files(src))
    if src.suffix == ".safetensors":
        return iter_safetensors([src])
    return iter_torch_file(src, subkey)


def save_safetensors_sharded(tensors: dict[str, np.ndarray], dst: Path, max_shard_bytes: int = 4 << 30,
                             dtype=None) -> None:
    """Writes an HF-style (sharded when large) safetensors set with its index into ``dst``."""
    import torch
    from safetensors.torch import save_file

    def to_torch(a: np.ndarray):
        a = np.asarray(a)
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        # C order, and writeable: jax.device_get arrays are read-only and torch warns on those
        t = torch.from_numpy(np.require(a, requirements=['C', 'W']))
        return t.to(dtype) if dtype is not None else t

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    dst.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        save_file({k: to_torch(v) for k, v in shards[0].items()}, str(dst / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: to_torch(v) for k, v in shard.items()}, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(a.nbytes for a in tensors.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# An HF directory written by an exporter carries this file: ``--overwrite`` replaces only such
# a directory (never, say, the downloaded hub model it came from).
HF_EXPORT_MARKER = "x2sam_jax_export.json"


def mark_hf_export(directory: Path, source: Path) -> None:
    (Path(directory) / HF_EXPORT_MARKER).write_text(json.dumps({"exported_from": str(Path(source).absolute())}))


def is_hf_export(path: Path) -> bool:
    return (Path(path) / HF_EXPORT_MARKER).is_file()
