"""How far apart two float32 computations of the same value may be when they differ only in the
order of their sums: scanned vs unrolled layers, chunked vs whole attention, sharded vs one device,
remat vs stored activations.

Reordering a float32 sum changes its rounding, not its value. One reordered reduction moves its
result by a few units in the last place (ulp, 2**-23 ~ 1.2e-7 relative) of the magnitudes it sums,
and the layers after it carry that difference forward without amplifying it much (normalisations
keep activations O(1)). How large it ends up depends on XLA's fusion and thread partitioning, so
on the machine and its load: seen here up to ~1.1e-6 of the output's largest magnitude (~9 ulp).

``VALUE_ULPS`` (64 ulp = 7.6e-6 of the reference's largest magnitude) is ~8x that. A gradient
sums over every position that used the parameter, so its reordering noise is larger relative to its
own largest entry: ``GRADIENT_ULPS`` (256 ulp = 3.1e-5). A real bug (a swapped or skipped layer,
a missing residual, a wrong mask) moves outputs by 1e-3 to 1 of their magnitude, far above both;
the tests that use these bounds show it with a deliberately broken variant where it is cheap.
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
VALUE_ULPS = 64
GRADIENT_ULPS = 256


def reorder_bound(reference, ulps: int = VALUE_ULPS) -> float:
    """The max-abs difference allowed: ``ulps`` float32 ulp of the reference's largest magnitude."""
    reference = np.asarray(reference, np.float64)
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    return ulps * EPS32 * scale


def assert_equal_up_to_reordering(actual, expected, *, ulps: int = VALUE_ULPS, what: str = "") -> float:
    """Asserts max|actual - expected| <= reorder_bound(expected, ulps); returns the error."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = float(np.abs(actual - expected).max()) if expected.size else 0.0
    bound = reorder_bound(expected, ulps)
    assert err <= bound, (f"{what}: max-abs difference {err:.3g} exceeds {bound:.3g} "
                          f"({ulps} float32 ulp of the largest magnitude {np.abs(expected).max():.3g})")
    return err


def assert_trees_equal_up_to_reordering(actual, expected, *, ulps: int = GRADIENT_ULPS, what: str = "") -> float:
    """The same for two pytrees (e.g. gradients), with the largest magnitude of the whole tree as the
    scale: a gradient entry that cancels to nearly zero still sums terms as large as its neighbours',
    so its reordering noise is set by them, not by its own small value. Returns the largest error."""
    import jax

    paths = jax.tree_util.tree_leaves_with_path(expected)
    leaves = jax.tree.leaves(actual)
    assert len(paths) == len(leaves), (what, len(paths), len(leaves))
    scale = max((float(np.abs(np.asarray(b, np.float64)).max()) for _, b in paths if np.size(b)), default=0.0)
    bound = ulps * EPS32 * scale
    worst = 0.0
    for (path, b), a in zip(paths, leaves):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, (what, jax.tree_util.keystr(path), a.shape, b.shape)
        err = float(np.abs(a - b).max()) if b.size else 0.0
        assert err <= bound, (f"{what}{jax.tree_util.keystr(path)}: max-abs difference {err:.3g} exceeds "
                              f"{bound:.3g} ({ulps} float32 ulp of the tree's largest magnitude {scale:.3g})")
        worst = max(worst, err)
    return worst
