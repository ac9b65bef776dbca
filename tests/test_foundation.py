"""Foundation: config round trip, conversion tables, atomic checkpoints, sharding rules, stacks."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from x2sam_jax import config as config_lib
from x2sam_jax.storage.atomic import atomic_directory
from x2sam_jax.conversion import (CONV2D, LINEAR, ConversionError, Rule, export_tensors, flatten,
                                  load_tensors, unflatten)
from x2sam_jax.layers.scan import create_stack, run_stack
from x2sam_jax.sharding import logical_to_mesh, make_mesh

from _tolerance import assert_equal_up_to_reordering, assert_trees_equal_up_to_reordering


# --- config ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Inner:
    sizes: tuple[int, ...] = (1, 2)
    name: str = "a"


@dataclasses.dataclass(frozen=True)
class _Outer:
    inner: _Inner = _Inner()
    maybe: _Inner | None = None
    pairs: tuple[tuple[int, int], ...] = ((1, 2),)


def test_config_round_trip_restores_nested_dataclasses_and_tuples():
    cfg = _Outer(inner=_Inner(sizes=(3, 4, 5)), maybe=_Inner(name="b"), pairs=((7, 8), (9, 10)))
    import json
    back = config_lib.from_dict(_Outer, json.loads(json.dumps(config_lib.to_dict(cfg))))
    assert back == cfg


def test_config_unknown_field_is_named():
    with pytest.raises(ValueError, match="bogus"):
        config_lib.from_dict(_Inner, {"bogus": 1})


# --- conversion -----------------------------------------------------------------------------

RULES = [
    Rule("enc.layers.{i}.fc.weight", "layers.fc.kernel", LINEAR),
    Rule("enc.layers.{i}.fc.bias", "layers.fc.bias"),
    Rule("enc.blocks.{j}.conv.weight", "blocks.{j}.conv.kernel", CONV2D),
]
TARGETS = {
    "layers.fc.kernel": ((3, 4, 5), np.float32),
    "layers.fc.bias": ((3, 5), np.float32),
    "blocks.0.conv.kernel": ((3, 3, 2, 6), np.float32),
    "blocks.1.conv.kernel": ((3, 3, 2, 6), np.float32),
}


def _source(rng):
    src = {f"enc.layers.{i}.fc.weight": rng.normal(size=(5, 4)).astype(np.float32) for i in range(3)}
    src.update({f"enc.layers.{i}.fc.bias": rng.normal(size=(5,)).astype(np.float32) for i in range(3)})
    src.update({f"enc.blocks.{j}.conv.weight": rng.normal(size=(6, 2, 3, 3)).astype(np.float32)
                for j in range(2)})
    return src


def test_conversion_fills_stacked_and_listed_params_and_exports_back():
    src = _source(np.random.default_rng(0))
    out, skipped = load_tensors(TARGETS, src.items(), RULES)
    assert skipped == []
    np.testing.assert_array_equal(out["layers.fc.kernel"][2], src["enc.layers.2.fc.weight"].T)
    np.testing.assert_array_equal(out["blocks.1.conv.kernel"][:, :, 1, 4],
                                  src["enc.blocks.1.conv.weight"][4, 1])
    back = export_tensors(out, RULES)
    assert set(back) == set(src)
    for key in src:
        np.testing.assert_array_equal(back[key], src[key])


def test_safetensors_export_takes_read_only_arrays_without_warning(tmp_path):
    """Exported arrays come from jax.device_get, which are read-only; torch.from_numpy warns on
    those (and would alias memory it may not write), so the writer copies them first."""
    import warnings

    from safetensors.numpy import load_file

    from x2sam_jax.conversion import save_safetensors_sharded

    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    weight.flags.writeable = False
    bias = np.asarray(jax.device_get(jnp.ones((4,), jnp.float32)))
    assert not bias.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_safetensors_sharded({"w": weight, "b": bias}, tmp_path)
    loaded = {}
    for name in os.listdir(tmp_path):
        if name.endswith(".safetensors"):
            loaded.update(load_file(str(tmp_path / name)))
    np.testing.assert_array_equal(loaded["w"], weight)
    np.testing.assert_array_equal(loaded["b"], bias)


def test_conversion_reports_every_problem_by_key():
    src = _source(np.random.default_rng(0))
    del src["enc.layers.1.fc.bias"]                                   # missing (one stacked slot)
    src["enc.layers.0.fc.weight"] = np.zeros((5, 7), np.float32)      # wrong shape
    src["enc.extra.weight"] = np.zeros(3, np.float32)                 # unknown
    src["prompt_encoder.x"] = np.zeros(3, np.float32)                 # known, deliberately skipped
    with pytest.raises(ConversionError) as err:
        load_tensors(TARGETS, src.items(), RULES, skip=[r"prompt_encoder\."])
    msg = str(err.value)
    assert "enc.layers.1.fc.bias" in msg and "missing" in msg
    assert "enc.layers.0.fc.weight" in msg and "(5, 7)" in msg
    assert "enc.extra.weight" in msg and "unexpected" in msg
    assert "prompt_encoder.x" not in msg


def test_flatten_unflatten_round_trip_with_list_indices():
    tree = {"a": {0: {"w": 1}, 1: {"w": 2}}, "b": 3}
    flat = flatten(tree)
    assert flat == {"a.0.w": 1, "a.1.w": 2, "b": 3}
    assert unflatten(flat) == tree


# --- atomic writes --------------------------------------------------------------------------

def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    dst = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_directory(dst) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(dst) as tmp:
        (tmp / "done.txt").write_text("x")
    assert (dst / "done.txt").exists() and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(FileExistsError):
        with atomic_directory(dst):
            pass


# --- sharding ---------------------------------------------------------------------------------

def test_logical_rules_use_each_mesh_axis_once_and_drop_trivial_axes():
    mesh = make_mesh(data=1, fsdp=1, tensor=1)
    assert logical_to_mesh(("embed", "mlp"), mesh) == jax.sharding.PartitionSpec(None, None)
    # without a mesh every rule applies; 'heads' and 'mlp' both want 'tensor': only the first gets it
    spec = logical_to_mesh(("layers", "mlp", "heads"))
    assert spec == jax.sharding.PartitionSpec(None, "tensor", None)
    with pytest.raises(KeyError, match="nonsense"):
        logical_to_mesh(("nonsense",))


def test_sharded_creation_matches_single_device_on_8_cpu_devices(tmp_path):
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        import x2sam_jax
        from flax import nnx
        from x2sam_jax.sharding import make_mesh, create_sharded
        class M(nnx.Module):
            def __init__(self, rngs):
                init = nnx.initializers.lecun_normal()
                self.up = nnx.Linear(16, 32, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
                self.down = nnx.Linear(32, 16, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs)
            def __call__(self, x):
                return self.down(jax.nn.relu(self.up(x)))
        mesh = make_mesh(data=2, fsdp=2, tensor=2)
        sharded = create_sharded(lambda: M(nnx.Rngs(0)), mesh)
        ref = M(nnx.Rngs(0))
        assert sharded.up.kernel.value.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor"), sharded.up.kernel.value.sharding
        x = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16) / 100
        with jax.set_mesh(mesh):
            y = nnx.jit(lambda m, x: m(x))(sharded, x)
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref(x)), atol=1e-5)
        print("OK", len(jax.devices()))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 8" in out.stdout


# --- stacks -------------------------------------------------------------------------------------

class _Block(nnx.Module):
    def __init__(self, rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
        self.fc = nnx.Linear(8, 8, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        return x + jnp.tanh(self.fc(x))


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_and_unrolled_stacks_agree_in_value_and_gradient(remat):
    stack = create_stack(_Block, 4, nnx.Rngs(0))
    assert stack.fc.kernel.shape == (4, 8, 8)
    assert stack.fc.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
    x = jax.random.normal(jax.random.key(1), (3, 8))

    def loss(params, scan):
        model = nnx.merge(nnx.graphdef(stack), params)
        y, per_layer = run_stack(model, x, lambda layer, c, _: (layer(c), c.sum()), scan=scan, remat=remat)
        return (y ** 2).sum() + per_layer.sum()

    params = nnx.state(stack)
    v1, g1 = jax.value_and_grad(loss)(params, True)
    v2, g2 = jax.value_and_grad(loss)(params, False)
    # the first layer must change the output (otherwise the test could not fail)
    assert abs(float(v1) - float(((x) ** 2).sum())) > 1e-3
    assert_equal_up_to_reordering(v2, v1, what="loss")
    assert_trees_equal_up_to_reordering(g2, g1, what="gradient")


def test_hybrid_device_grid_keeps_tensor_and_inner_axes_inside_a_slice():
    """4 slices of 4 devices, listed interleaved: data=4 over the data-centre network (one row per
    slice), fsdp=2 x tensor=2 inside each; sizes that do not split are refused by name."""
    import types

    from x2sam_jax.sharding import device_grid

    fakes = [types.SimpleNamespace(id=i, slice_index=i % 4, process_index=i % 4, platform="cpu", device_kind="cpu")
             for i in range(16)]
    grid = device_grid(data=4, fsdp=2, tensor=2, devices=fakes, dcn_data=4)
    assert grid.shape == (4, 2, 2)
    assert [{d.slice_index for d in row.flat} for row in grid] == [{0}, {1}, {2}, {3}]
    grid = device_grid(data=2, fsdp=-1, tensor=2, devices=fakes, dcn_data=2, dcn_fsdp=2)
    assert grid.shape == (2, 4, 2)
    assert {d.slice_index for d in grid[0, :2].flat} == {0} and {d.slice_index for d in grid[1, 2:].flat} == {3}
    with pytest.raises(ValueError, match="dcn_data=3"):
        device_grid(data=4, fsdp=4, devices=fakes, dcn_data=3)
