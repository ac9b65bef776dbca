"""x2sam_jax.model_checkpoint and x2sam_jax.storage: load verifies what it restores (the model
built from config.json, the checksums written at save time), loads without a mesh run eagerly and
under jit, and writes never destroy what is not theirs, even when killed (issue 13).

The fixture is a tiny SAM2 encoder converted through the real CLI (numpy arrays written by a
converter, the case where Orbax restores stored shapes without a word)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import x2sam_jax
from _sam2_helpers import TINY_A, hf_vision_model
from convert_weights import sam2 as convert_sam2
from x2sam_jax import model_checkpoint
from x2sam_jax.storage import atomic
from x2sam_jax.storage import checksums as checksum_lib
from x2sam_jax.storage.atomic import CheckpointError

REPO = Path(__file__).resolve().parents[1]


def _convert(root: Path, seed: int) -> tuple[Path, Path]:
    """(HF source dir, converted checkpoint) of a random TINY_A encoder."""
    hf = root / f"hf{seed}"
    hf_vision_model(TINY_A, seed=seed).save_pretrained(hf)
    assert convert_sam2.main(["--src", str(hf), "--dst", str(root / f"ckpt{seed}")]) == 0
    return hf, root / f"ckpt{seed}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _convert(tmp_path_factory.mktemp("sam2"), seed=0)[1]


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / "copy"))


def _edit_config(path: Path, edit) -> None:
    meta = json.loads((path / "config.json").read_text())
    edit(meta["config"])
    (path / "config.json").write_text(json.dumps(meta))


# --- what load verifies ---------------------------------------------------------------------------

@pytest.mark.parametrize("edit,parameter", [
    (lambda c: c.update(fpn_hidden_size=64), r"neck\.convs\.0\.bias: stored shape \(32,\), the model has \(64,\)"),
    (lambda c: c.update(mlp_ratio=2.0), r"backbone\.blocks\.0\.mlp\.proj_in\.kernel: stored shape \(16, 64\), "
                                        r"the model has \(16, 32\)"),
    (lambda c: c.pop("fpn_hidden_size"), r"neck\.convs\.0\.kernel: stored shape \(1, 1, 128, 32\), "
                                         r"the model has \(1, 1, 128, 256\)"),   # the default, 256, applies
])
def test_config_that_does_not_describe_the_weights_is_an_error_naming_them(ckpt, tmp_path, edit, parameter):
    """Before: each of these loaded, the model running with a config that did not describe it."""
    path = _copy(ckpt, tmp_path)
    _edit_config(path, edit)
    with pytest.raises(CheckpointError, match=parameter) as error:
        x2sam_jax.load(path)
    assert str(error.value).startswith(f"{path}: the stored arrays do not match the model built from its config.json")


def test_flipped_bytes_are_an_error_naming_the_parameters(ckpt, tmp_path):
    """64 flipped bytes in a data file: Orbax itself restores the changed values without a word."""
    import orbax.checkpoint as ocp

    good = ocp.StandardCheckpointer().restore(ckpt / "params")
    # Flips that land in a compressed chunk make Orbax fail itself (zstd); the silent case is the
    # one to test, so draw flip positions until Orbax restores changed values without a word.
    for seed in range(20):
        path = _copy(ckpt, tmp_path / str(seed))
        data = max((p for p in (path / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        content = bytearray(data.read_bytes())
        for position in np.random.default_rng(seed).choice(np.arange(len(content) // 4, len(content) * 3 // 4), 64,
                                                           replace=False):
            content[position] ^= 0xFF
        data.write_bytes(bytes(content))
        try:
            bad = ocp.StandardCheckpointer().restore(path / "params")
            break
        except ValueError:
            continue
    changed = sum(int((np.asarray(a) != np.asarray(b)).sum()) for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(bad)))
    assert changed > 0   # the corruption reaches the values (no error from Orbax)
    with pytest.raises(CheckpointError, match=r"checksum mismatch") as error:
        x2sam_jax.load(path)
    assert str(error.value).startswith(f"{path}: the restored arrays are not the ones saved")
    assert "backbone.blocks." in str(error.value)
    with pytest.raises(CheckpointError, match=r"checksum mismatch"):
        model_checkpoint.load_flat_params(path)   # what the exporters read


def test_unknown_model_type_missing_and_malformed_config_name_the_file(ckpt, tmp_path, caplog):
    path = _copy(ckpt, tmp_path)
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**meta, "model_type": "sam3"}))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown model_type 'sam3'; known: \['qwen3_vl'"):
        x2sam_jax.load(path)   # before: a bare KeyError
    (path / "config.json").write_text(json.dumps(meta)[:-5])
    with pytest.raises(ValueError, match=rf"{path / 'config.json'}: not valid JSON \(.* at line 1 column"):
        x2sam_jax.load(path)
    meta["config"]["layer_norm_eps"] = "tiny"
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"{path / 'config.json'}: HieraConfig\.layer_norm_eps: expected float, "
                                              r"got 'tiny'"):
        x2sam_jax.load(path)   # before: accepted, the string reached the model
    del meta["config"]["layer_norm_eps"]   # same shapes: loads, but says which default it used
    (path / "config.json").write_text(json.dumps(meta))
    x2sam_jax.load(path)
    assert "fields not set, defaults used: layer_norm_eps" in caplog.text


def test_load_without_mesh_gives_device_arrays(ckpt):
    """Before: numpy parameters (a traced index into them fails inside nnx.vmap / jit)."""
    from flax import nnx

    model = x2sam_jax.load(ckpt)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)
    # a parameter indexed with a traced value, as the Qwen3-VL position table is inside X2SAM's
    # nnx.vmap (the eager X2SAM forward of README runs in tests/test_readme.py)
    table = model.backbone.pos_embed
    rows = jax.vmap(lambda i: table[...][i])(jnp.arange(2))
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(table[...][:2]))


# --- checksums ------------------------------------------------------------------------------------

def test_checksum_sees_every_kind_of_change_and_not_the_container():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 7)).astype(np.float32)
    reference = checksum_lib.array_checksum(base)
    assert checksum_lib.array_checksum(jnp.asarray(base)) == reference          # numpy or jax
    assert checksum_lib.array_checksum(base.copy(order="F")) == reference       # memory order
    one_bit = base.copy()
    one_bit.view(np.uint32)[2, 3] ^= 1
    swapped = base.copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    two_signs = base.copy()   # equal and opposite changes of the top bit: a plain sum misses them
    two_signs[0, 0] *= -1
    two_signs[1, 1] *= -1
    big = rng.standard_normal(3 * (1 << 20) + 5).astype(np.float32)          # several chunks
    big_changed = big.copy()
    big_changed[-1] += 1
    checksums = {checksum_lib.array_checksum(a) for a in (base, one_bit, swapped, two_signs)}
    assert len(checksums) == 4
    assert checksum_lib.array_checksum(big) != checksum_lib.array_checksum(big_changed)
    import ml_dtypes
    assert checksum_lib.array_checksum(base.astype(ml_dtypes.bfloat16)) != checksum_lib.array_checksum(
        (base + 1e-3).astype(ml_dtypes.bfloat16))


def test_tree_checksums_and_verify_restored_protect_any_tree():
    """The pieces a training checkpoint uses: record at save, verify after restore."""
    tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "layers": {0: {"b": np.ones(3, np.int32)}}}
    recorded = checksum_lib.tree_checksums(tree)
    assert recorded["layers.0.b"]["dtype"] == "int32" and recorded["w"]["shape"] == [3, 4]
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    checksum_lib.verify_restored(target, jax.tree.map(jnp.asarray, tree), recorded)
    changed = {"w": tree["w"] + 1, "layers": {0: {"b": tree["layers"][0]["b"].astype(np.float32)}}}
    with pytest.raises(CheckpointError) as error:
        checksum_lib.verify_restored(target, changed, recorded, where="step_7")
    message = str(error.value)
    assert message.startswith("step_7: ")
    assert "w: checksum mismatch" in message
    assert "layers.0.b: stored dtype float32, the model has int32" in message
    checksum_lib.verify_restored({"w": target["w"]}, {"w": tree["w"]}, recorded)   # a partial restore


SHARDED_CHECKSUM = r"""
import numpy as np, jax, ml_dtypes
from jax.sharding import NamedSharding, PartitionSpec as P
from x2sam_jax.storage import checksums as checksum_lib
mesh = jax.make_mesh((2, 4), ("a", "b"))
rng = np.random.default_rng(0)
for array, spec in [(rng.standard_normal((8, 6, 5)).astype(np.float32), P("b", None, None)),
                    (rng.standard_normal((4, 12)).astype(np.float32), P("a", "b")),
                    (rng.standard_normal((4, 12)).astype(ml_dtypes.bfloat16), P(None, "b")),
                    (rng.integers(0, 9, (6, 8)).astype(np.int32), P()),
                    (rng.standard_normal((8,)).astype(np.float32), P(("a", "b")))]:
    sharded = jax.device_put(array, NamedSharding(mesh, spec))
    host = checksum_lib.array_checksum(array)
    per_shard = "%08x%08x" % checksum_lib._sharded_digest(sharded)
    assert per_shard == host, (spec, per_shard, host)
    assert checksum_lib.array_checksum(sharded) == host
print("ok")
"""


def test_per_shard_checksum_equals_the_host_one_on_8_devices():
    """The multi-process path (each process sums its shards at their global positions) gives the
    host checksum for every sharding, replicated included."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED_CHECKSUM], env=env, capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# --- atomic replacement ----------------------------------------------------------------------------

def test_swap_without_renameat2_and_recovery_of_its_interrupted_state(tmp_path, monkeypatch):
    dst = tmp_path / "ckpt"
    for content in ("old", "new"):
        with atomic.atomic_directory(dst, overwrite=True, replaceable=lambda p: True) as tmp:
            (tmp / "value").write_text(content)
    assert (dst / "value").read_text() == "new"
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)   # the two-rename fallback
    with atomic.atomic_directory(dst, overwrite=True, replaceable=lambda p: True) as tmp:
        (tmp / "value").write_text("newer")
    assert (dst / "value").read_text() == "newer" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    # a kill between the two renames: DST missing, the old copy aside, the new one in .tmp-
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    dst.rename(tmp_path / f".ckpt.old-{dead}-0123abcd")
    (tmp_path / f".ckpt.tmp-{dead}-0123abcd").mkdir()
    atomic.remove_stale_scratch(dst)
    assert (dst / "value").read_text() == "newer" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


KILL_CONVERT = [sys.executable, "-m", "convert_weights.sam2", "--overwrite", "--src"]


@pytest.mark.slow
def test_kill_9_at_random_moments_of_an_overwrite_always_leaves_the_old_or_the_new(tmp_path):
    """An --overwrite conversion to the other of two sources is killed (SIGKILL) at random
    moments: half uniformly over a run, half within 30 ms of its new checkpoint becoming complete
    (around the swap). After each kill DST loads (verified) and is the old or the new model.
    Before: the old checkpoint half deleted, the new one stranded in .DST.tmp-*."""
    from flax import nnx

    hf_a, ref_a = _convert(tmp_path, seed=1)
    hf_b, ref_b = _convert(tmp_path, seed=2)

    def params(path):
        state = nnx.to_pure_dict(nnx.state(x2sam_jax.load(path), nnx.Param))
        return {k: np.asarray(v) for k, v in checksum_lib.flat_tree(state).items()}

    def same(a, b):
        return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    models = {"a": params(ref_a), "b": params(ref_b)}
    dst = tmp_path / "dst"
    shutil.copytree(ref_a, dst)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    start = time.monotonic()
    subprocess.run(KILL_CONVERT + [str(hf_b), "--dst", str(dst)], env=env, check=True, capture_output=True)
    duration = time.monotonic() - start
    current, rng, kills, outcomes = "b", random.Random(0), 0, []
    for attempt in range(16):
        new = "b" if current == "a" else "a"
        process = subprocess.Popen(KILL_CONVERT + [str(hf_a if new == "a" else hf_b), "--dst", str(dst)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + (rng.uniform(0, duration) if attempt % 2 else 4 * duration)
        while process.poll() is None and time.monotonic() < deadline:
            if attempt % 2 == 0 and list(tmp_path.glob(f".dst.tmp-{process.pid}-*/config.json")):
                time.sleep(rng.uniform(0, 0.03))
                break
            time.sleep(0.002)
        if process.poll() is None:
            process.kill()
            kills += 1
        process.wait()
        loaded = params(dst)
        which = [name for name, model in models.items() if same(loaded, model)]
        assert which in ([current], [new]), f"attempt {attempt}: DST is neither the old nor the new model"
        outcomes.append((current, new, which[0]))
        current = which[0]
    assert kills >= 10, (kills, outcomes)
    assert any(old != now for old, _, now in outcomes), outcomes   # some kills fell after the swap
    subprocess.run(KILL_CONVERT + [str(hf_a), "--dst", str(dst)], env=env, check=True, capture_output=True)
    assert same(params(dst), models["a"])
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".dst.")]   # scratch cleaned
