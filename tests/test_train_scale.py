"""Training at scale (issue 10): point-sampled mask losses from mask features x mask embeddings,
activation and parameter shardings of the compiled train step on 8 simulated devices, and mixed
precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _train_helpers import FAST, reduced_config, stage3_batch
from x2sam_jax.models.x2sam import X2SAM
from x2sam_jax.train import losses as losses_lib
from x2sam_jax.train import step as step_lib


# ------------------------------------------------------------------------------ point-sampled loss
def test_point_logits_from_features_equal_dense_sampling():
    """Both ways of reading a prediction at points, on random maps: shared points (the matcher)
    and per-query points (uncertainty sampling, losses)."""
    rng = np.random.default_rng(0)
    frames, queries, channels, size = 2, 6, 16, 24
    embeddings = jnp.asarray(rng.normal(size=(frames, queries, channels)), jnp.float32)
    features = jnp.asarray(rng.normal(size=(frames, size, size, channels)), jnp.float32)
    dense = jnp.einsum("fqc,fhwc->fqhw", embeddings, features)
    factored = losses_lib.FactoredMasks(embeddings, features)
    shared = jnp.asarray(rng.uniform(-0.05, 1.05, size=(frames, 50, 2)), jnp.float32)   # incl. zero padding
    per_query = jnp.asarray(rng.uniform(size=(frames, 3, 40, 2)), jnp.float32)
    chosen = jnp.asarray([[5, 0, 2], [1, 1, 4]], jnp.int32)
    # |logit| <= sum_c |e_c m_c| ~ 16 here; float32 sums of 16 products in two orders differ by
    # a few ulp of that (~1e-6 relative): 1e-5 absolute.
    np.testing.assert_allclose(losses_lib.mask_point_logits(factored, shared),
                               losses_lib.mask_point_logits(dense, shared), rtol=0, atol=1e-5)
    np.testing.assert_allclose(losses_lib.mask_point_logits(factored, per_query, chosen),
                               losses_lib.mask_point_logits(dense, per_query, chosen), rtol=0, atol=1e-5)


@pytest.mark.parametrize("frames", [1, 2])
def test_point_sampled_losses_equal_dense_logit_losses_on_the_model(frames):
    """The stage-3 model's training outputs read both ways (dense_masks True / False), the same
    points: the matches and every loss agree, and no dense per-prediction logits come out of the
    factored forward."""
    config = reduced_config()
    model = X2SAM(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(frames)
    batch = {k: jnp.asarray(v[0]) for k, v in stage3_batch(config, rng, frames=frames).items()}
    task = step_lib.Task(stage=3, is_trainable=lambda _: True)
    loss_config = losses_lib.LossConfig(num_points=96)
    graphdef, state = nnx.split(model)

    @jax.jit
    def both(state, batch):
        model = nnx.merge(graphdef, state)
        out = {}
        for dense in (True, False):
            result, segmentation, offsets = task.forward(model, batch, jax.random.key(1), dense_masks=dense)
            targets = losses_lib.frame_targets(batch, segmentation_samples=segmentation, class_offsets=offsets)
            masks = step_lib.mask_predictions(result, dense)
            out[dense] = (losses_lib.segmentation_losses(masks, step_lib._frames_first(result.all_class_logits),
                                                         targets, jax.random.key(2), loss_config),
                          result.all_mask_logits, result.mask_logits)
        return out

    out = both(state, batch)
    dense, factored = out[True][0], out[False][0]
    assert out[False][1] is None and out[False][2] is None
    assert out[True][1].shape[:3] == (config.mask_decoder.num_layers + 1, 2, frames)
    assert float(dense["num_masks"]) > 0 and float(dense["loss_mask"]) > 0
    # Losses are means over points of BCE/dice of logits that differ by float32 rounding only
    # (~1e-6 relative, see above), summed over 4 predictions: relative 1e-5. A different
    # Hungarian assignment or uncertain-point choice would move them by O(1e-1).
    for name in ("loss_cls", "loss_mask", "loss_dice", "loss_seg"):
        np.testing.assert_allclose(factored[name], dense[name], rtol=1e-5, atol=1e-6, err_msg=name)
