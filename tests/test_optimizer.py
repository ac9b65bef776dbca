"""The optimizer against torch: AdamW with per-module learning rates and global-norm clipping,
the warmup + cosine schedule, and the trainable / frozen split."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import x2sam_jax  # noqa: F401
from x2sam_jax.runs import split_params
from x2sam_jax.train.optimizer import build_optimizer, learning_rate_schedule, lr_multiplier


def test_schedule_is_linear_warmup_then_cosine():
    lr, total, ratio = 1e-4, 200, 0.03
    schedule = learning_rate_schedule(lr, total, ratio)
    warmup = 6
    for t in [0, 1, 3, 5, 6, 7, 50, 120, 199, 200]:
        if t < warmup:   # mmengine LinearLR(start_factor=1e-5): factor goes linearly to 1
            want = lr * (1e-5 + (1 - 1e-5) * t / warmup)
        else:            # CosineAnnealingLR(eta_min=0) over the remaining steps
            want = 0.5 * lr * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
        # float32, computed around magnitude lr (optax's polynomial form): absolute error ~ ulp(lr).
        np.testing.assert_allclose(float(schedule(t)), want, rtol=1e-5, atol=1e-7 * lr)


def test_adamw_groups_and_clipping_equal_torch():
    rng = np.random.default_rng(0)
    shapes = {"segmentor": {"encoder": {"w": (3, 4)}, "decoder": {"w": (4, 2), "b": (2,)}}, "head": {"w": (5,)}}
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    multipliers = (("segmentor.encoder", 0.1), ("head", 3.0))
    lr, total, clip, wd = 1e-2, 20, 0.5, 0.05
    optimizer = build_optimizer(lr=lr, total_steps=total, warmup_ratio=0.1, weight_decay=wd, grad_clip=clip,
                                b1=0.9, b2=0.999, lr_multipliers=multipliers)
    schedule = learning_rate_schedule(lr, total, 0.1)
    flat_names = ["segmentor.encoder.w", "segmentor.decoder.w", "segmentor.decoder.b", "head.w"]
    get = lambda tree, name: tree[name.split(".")[0]][name.split(".")[1]][name.split(".")[2]] \
        if name.count(".") == 2 else tree[name.split(".")[0]][name.split(".")[1]]  # noqa: E731
    torch_params = {n: torch.nn.Parameter(torch.tensor(np.asarray(get(params, n)))) for n in flat_names}
    groups = [{"params": [torch_params[n]], "name": n, "mult": lr_multiplier(n, multipliers)} for n in flat_names]
    reference = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)

    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for t in range(8):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * (1 + 3 * t), jnp.float32), params)
        updates, state = update(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        for n in flat_names:
            torch_params[n].grad = torch.tensor(np.asarray(get(grads, n)))
        torch.nn.utils.clip_grad_norm_(list(torch_params.values()), clip)
        for g in reference.param_groups:
            g["lr"] = float(schedule(t)) * g["mult"]
        reference.step()
        for n in flat_names:
            # float32 Adam on O(1) values: a few ulps of difference per step.
            np.testing.assert_allclose(np.asarray(get(params, n)), torch_params[n].detach().numpy(), rtol=2e-5,
                                       atol=2e-6, err_msg=f"{n} step {t}")


class _Toy(nnx.Module):
    def __init__(self, rngs):
        self.vlm = nnx.Dict(visual=nnx.Linear(2, 2, rngs=rngs), merger=nnx.Linear(2, 2, rngs=rngs))
        self.head = nnx.Linear(2, 1, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)


def test_frozen_parameters_are_neither_differentiated_nor_in_the_optimizer():
    model = _Toy(nnx.Rngs(0))
    trainable = lambda path: not path.startswith("vlm.visual.")  # noqa: E731
    graphdef, params, frozen, rest = split_params(model, trainable)
    names = lambda state: sorted(".".join(map(str, p)) for p, _ in nnx.to_flat_state(state))  # noqa: E731
    assert names(params) == ["head.bias", "head.kernel", "vlm.merger.bias", "vlm.merger.kernel"]
    assert names(frozen) == ["vlm.visual.bias", "vlm.visual.kernel"]
    assert all("rngs" in n for n in names(rest))
    optimizer = build_optimizer(lr=1e-3, total_steps=10)
    state = optimizer.init(params)
    # Adam's two moments per trainable leaf, nothing for the frozen ones.
    sizes = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert sizes == 2 * sum(x.size for x in jax.tree.leaves(params))
