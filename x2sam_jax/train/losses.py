"""The training losses of X2SAM (docs/architecture.md#losses-and-matcher), all inside ``jit``.

Segmentation, per frame (every frame of every sample is an independent set-prediction problem):
  1. Hungarian matching of the Q queries to the frame's targets (``matcher.py``) with the cost
     2·(-p[class]) + 5·BCE + 5·dice on ``num_points`` uniform random points;
  2. softmax cross-entropy of every query's class logits over [conditions, background], the
     unmatched queries' target being the background (weight ``no_object_weight`` = 0.1), as a
     weighted mean over all query rows (torch ``CrossEntropyLoss(weight=...)``);
  3. sigmoid BCE and dice (+1 smoothing) of every matched (query, target) pair on ``num_points``
     points, 75 % of them the most uncertain (smallest |logit|) of 3x as many random candidates,
     the rest uniform; summed and divided by the number of target masks of the global batch
     (at least 1); each frame's points are drawn from its own key (``draw_points``);
  4. the same on all decoder predictions (the initial queries and every layer), summed;
  5. off by default (not in X2SAM): ``pairwise_class_weight`` x :func:`pairwise_class_loss`, the
     two-way [condition, background] decision of every (query, condition) pair, which is what a
     forward with one condition (a referring expression at evaluation) reads.
This is ``transformers``' ``Mask2FormerLoss`` with the auxiliary predictions; ``tests/test_losses.py``
checks the equality on the same points.

Where point logits come from is :func:`mask_point_logits`, the one function both the matcher and
the mask losses read predictions through (bilinear ``point_sample``, torch ``grid_sample``
with align_corners=False). Predictions come dense ([F, Q, H, W] logits) or factored
(:class:`FactoredMasks`: mask embeddings [F, Q, C] and mask features [F, H, W, C], logits = their
product over C), which is what training uses: bilinear sampling is linear, so the point logits
are read without the [P, F, Q, H, W] maps of every decoder prediction ever existing (equal to
sampling the dense logits up to float rounding; ``tests/test_train_scale.py`` checks it).

LM: token cross-entropy of the answer tokens (labels != -100), shifted by one, mean over the
tokens of the global batch.

An optimizer step of several micro-batches (gradient accumulation) normalises every term by the
whole step's count (``LossNormalizers``, from :func:`loss_normalizers`): the step's loss and
gradient are then those of one batch holding all its samples, whatever the split.

Padding never counts: targets are masked by ``instance_valid`` x ``gt_frame_valid`` x
``frame_valid``, query rows by ``frame_valid`` x whether the sample has a segmentation part, and
LM tokens by their labels.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from x2sam_jax.data.tokenizer import IGNORE_LABEL
from x2sam_jax.layers.deformable import grid_sample
from x2sam_jax.train.matcher import class_cost, hungarian_match, pairwise_dice, pairwise_sigmoid_ce

# Padded condition slots hold the class head's padded_class_logit (-1e6); real logits are clamped
# to +-logit_clamp (50).
PADDED_CONDITION_BOUND = -1e5


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights and point sampling (the Mask2Former / X2SAM values)."""

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    lm_weight: float = 1.0
    # Not in X2SAM (0 = off): weight of a per-(query, condition) binary loss on the two-way softmax
    # [condition, background], the decision a one-condition forward (referring evaluation) makes.
    # The set loss above only ranks a query's conditions against each other, so a query that
    # answers one condition of an image can still beat the background for another one it does
    # not answer. Target 1 where the query's matched target is the condition's object.
    pairwise_class_weight: float = 0.0
    # Read the predictions' point logits from dense [P, B, T, Q, S/4, S/4] logits (the reference
    # path) instead of mask embeddings x mask features (equal by linearity, far less memory).
    dense_mask_logits: bool = False
    # The LM loss runs the LM head and the cross-entropy over chunks of this many labelled
    # positions (``chunked_lm_loss``): training never builds [B, L, V] logits. 0: the full
    # logits and ``lm_loss`` (the reference path).
    lm_chunk: int = 64
    # Where the Hungarian assignment runs (``matcher.hungarian_match``): "host" (scipy's, one
    # callback per decoder prediction and device, each with that device's frames under the step's
    # mesh) or "device" (optax's, in the program). The same assignment; host was the faster at every
    # recipe size measured, on one CPU device and on 8 simulated ones (benchmarks/bench_matcher.py);
    # not yet measured on an accelerator.
    matcher: str = "host"

    @property
    def num_candidates(self) -> int:
        return int(self.num_points * self.oversample_ratio)

    @property
    def num_uncertain(self) -> int:
        return int(self.importance_sample_ratio * self.num_points)


# ------------------------------------------------------------------------------- point sampling
def point_sample(maps: jax.Array, coords: jax.Array) -> jax.Array:
    """Bilinear samples of maps at points in [0, 1]² ((x, y), torch ``point_sample`` with
    align_corners=False and zero padding).

    maps [F, M, H, W] with coords [F, K, 2] (the same points for all M maps) -> [F, M, K];
    or coords [F, M, K, 2] (points per map) -> [F, M, K].
    """
    frames, num_maps, height, width = maps.shape
    grid = 2.0 * coords.astype(jnp.float32) - 1.0
    if coords.ndim == 3:   # the maps are channels of one image per problem
        out = grid_sample(maps.astype(jnp.float32).transpose(0, 2, 3, 1), grid)   # [F, K, M]
        return out.transpose(0, 2, 1)
    flat = maps.reshape(frames * num_maps, height, width, 1).astype(jnp.float32)
    out = grid_sample(flat, grid.reshape(frames * num_maps, -1, 2))                 # [F*M, K, 1]
    return out.reshape(frames, num_maps, -1)


class FactoredMasks(NamedTuple):
    """Mask predictions as logits[f, q, y, x] = sum_c embeddings[f, q, c] * features[f, y, x, c]
    (the mask decoder's last step), without the dense logits."""

    embeddings: jax.Array     # [F, Q, C] (one prediction) or [P, F, Q, C] (all predictions)
    features: jax.Array       # [F, H, W, C], shared by the predictions


def mask_point_logits(mask_logits: jax.Array | FactoredMasks, coords: jax.Array,
                      queries: jax.Array | None = None) -> jax.Array:
    """Predicted mask logits at points: the one place point logits come from.

    Args:
      mask_logits: [F, Q, H, W] dense logits of one decoder prediction, or the prediction
        factored (:class:`FactoredMasks`, embeddings [F, Q, C]).
      coords: [F, K, 2] points shared by all queries, or [F, M, K, 2] points per selected query.
      queries: [F, M] int, the queries to read (with per-query points); None = all Q.
    Returns:
      [F, Q, K] or [F, M, K] float32.

    Factored predictions: shared points (the matcher) sample the C feature channels at the K
    points and take the product with every query's embedding (O(K·C + Q·K) instead of the
    Q·H·W dense maps); per-query points (uncertainty sampling and the losses, M·K points with
    K·C ≫ H·W) build the dense maps of the M selected queries only and sample them, the
    cheaper of the two exact orders there.
    """
    if isinstance(mask_logits, FactoredMasks):
        embeddings = mask_logits.embeddings.astype(jnp.float32)
        features = mask_logits.features.astype(jnp.float32)
        if queries is None:
            sampled = point_sample(features.transpose(0, 3, 1, 2), coords)             # [F, C, K]
            return jnp.einsum("fqc,fck->fqk", embeddings, sampled)
        selected = jnp.take_along_axis(embeddings, queries[:, :, None], axis=1)          # [F, M, C]
        return point_sample(jnp.einsum("fmc,fhwc->fmhw", selected, features), coords)
    if queries is None:
        return point_sample(mask_logits, coords)
    selected = jnp.take_along_axis(mask_logits, queries[:, :, None, None], axis=1)
    return point_sample(selected, coords)


# ------------------------------------------------------------------------------- targets, points
class FrameTargets(NamedTuple):
    """Targets of F independent frame problems (flattened batch x frames)."""

    masks: jax.Array          # [F, N, H, W] bool / float in [0, 1]
    classes: jax.Array        # [F, N] int32, index into the class logits
    valid: jax.Array          # [F, N] bool: a real target with pixels on this frame
    frame_weight: jax.Array   # [F] bool: the frame's query rows take part in the class loss


class LossNormalizers(NamedTuple):
    """Denominators of the losses (counts over an optimizer step; see :func:`loss_normalizers`)."""

    num_masks: jax.Array      # target masks (mask and dice losses)
    class_weight: jax.Array   # summed class-loss weights of the query rows
    lm_tokens: jax.Array      # supervised answer tokens


class LossPoints(NamedTuple):
    """The random points of one prediction's loss (all in [0, 1]², (x, y))."""

    match: jax.Array          # [F, K, 2] matcher points, shared by all queries and targets of a frame
    candidates: jax.Array     # [F, N, 3K, 2] uncertainty candidates per matched pair
    uniform: jax.Array        # [F, N, K - 0.75K, 2] uniform points per matched pair


def draw_points(key: jax.Array, frames: int, targets: int, config: LossConfig,
                frame_ids: jax.Array | None = None) -> LossPoints:
    """The points of ``frames`` frames; frame f draws from ``fold_in(key, frame_ids[f])`` (default
    f), so its points depend on its id alone, not on the batch it travels in."""
    k = config.num_points

    def one(frame_id):
        k_match, k_cand, k_uniform = jax.random.split(jax.random.fold_in(key, frame_id), 3)
        return LossPoints(
            match=jax.random.uniform(k_match, (k, 2)),
            candidates=jax.random.uniform(k_cand, (targets, config.num_candidates, 2)),
            uniform=jax.random.uniform(k_uniform, (targets, k - config.num_uncertain, 2)))

    return jax.vmap(one)(jnp.arange(frames) if frame_ids is None else frame_ids)


def frame_targets(batch: dict, *, segmentation_samples: jax.Array, class_offsets: jax.Array | None = None
                  ) -> FrameTargets:
    """Per-frame targets of a collated batch (``x2sam_jax.data.batching``).

    ``segmentation_samples`` [B] bool: samples with a segmentation part (not chat-only, not
    padding). ``class_offsets`` [B] int: added to the class indices (shared negatives put every
    sample's conditions at an offset in one long condition list).
    """
    gt_masks = batch["gt_masks"]                                               # [B, T, N, h, w]
    b, t, n = gt_masks.shape[:3]
    classes = batch["gt_classes"]
    if class_offsets is not None:
        classes = jnp.where(classes >= 0, classes + class_offsets[:, None], classes)
    frame_ok = batch["frame_valid"].astype(bool) & segmentation_samples[:, None]   # [B, T]
    valid = (batch["instance_valid"].astype(bool)[:, None, :] & batch["gt_frame_valid"].astype(bool)
             & frame_ok[:, :, None])
    return FrameTargets(masks=gt_masks.reshape(b * t, n, *gt_masks.shape[3:]),
                        classes=jnp.broadcast_to(classes[:, None, :], (b, t, n)).reshape(b * t, n),
                        valid=valid.reshape(b * t, n), frame_weight=frame_ok.reshape(b * t))


# ------------------------------------------------------------------------------- one prediction
def match(mask_logits, class_logits, targets: FrameTargets, match_points, config: LossConfig) -> jax.Array:
    """[F, N] query of every target (-1: padded / unmatched), on the prediction without gradient."""
    point_logits = mask_point_logits(jax.lax.stop_gradient(mask_logits), match_points)   # [F, Q, K]
    point_labels = point_sample(targets.masks, match_points)                         # [F, N, K]
    cost = (config.mask_weight * pairwise_sigmoid_ce(point_logits, point_labels)
            + config.dice_weight * pairwise_dice(point_logits, point_labels))
    if class_logits is not None:
        cost = cost + config.class_weight * class_cost(jax.lax.stop_gradient(class_logits), targets.classes)
    return hungarian_match(cost, targets.valid, config.matcher)


def uncertain_points(mask_logits, queries, points: LossPoints, config: LossConfig) -> jax.Array:
    """[F, N, K, 2]: per matched pair, the 0.75K candidates of smallest |logit| then the uniform
    points (transformers' ``sample_points_using_uncertainty``); no gradient flows through them."""
    logits = mask_point_logits(jax.lax.stop_gradient(mask_logits), points.candidates, queries)
    _, index = jax.lax.top_k(-jnp.abs(logits), config.num_uncertain)                 # [F, N, 0.75K]
    chosen = jnp.take_along_axis(points.candidates, index[..., None], axis=2)
    return jax.lax.stop_gradient(jnp.concatenate([chosen, points.uniform], axis=2))


def prediction_losses(mask_logits: jax.Array, class_logits: jax.Array | None, targets: FrameTargets,
                      points: LossPoints, num_masks: jax.Array, config: LossConfig,
                      class_weight: jax.Array | None = None) -> dict[str, jax.Array]:
    """Unweighted losses of one decoder prediction: {"cls", "mask", "dice"} (scalars).

    mask_logits [F, Q, H, W] or :class:`FactoredMasks`, class_logits [F, Q, C + 1] (background
    last; None: no class loss); ``class_weight``: the class loss's denominator (default its own).
    """
    query_of_target = match(mask_logits, class_logits, targets, points.match, config)   # [F, N]
    matched = query_of_target >= 0
    queries = jnp.maximum(query_of_target, 0)

    coords = uncertain_points(mask_logits, queries, points, config)                     # [F, N, K, 2]
    labels = jax.lax.stop_gradient(point_sample(targets.masks, coords))                 # [F, N, K]
    logits = mask_point_logits(mask_logits, coords, queries)
    bce = jnp.mean(jax.nn.softplus(logits) - logits * labels, axis=-1)                  # BCE with logits
    probs = jax.nn.sigmoid(logits)
    dice = 1.0 - (2.0 * (probs * labels).sum(-1) + 1.0) / (probs.sum(-1) + labels.sum(-1) + 1.0)
    losses = {"mask": jnp.sum(jnp.where(matched, bce, 0.0)) / num_masks,
              "dice": jnp.sum(jnp.where(matched, dice, 0.0)) / num_masks}
    if class_logits is not None:
        losses["cls"] = class_loss(class_logits, query_of_target, targets, config, class_weight)
        if config.pairwise_class_weight:
            losses["pair"] = pairwise_class_loss(class_logits, query_of_target, targets)
    return losses


def class_loss(class_logits, query_of_target, targets: FrameTargets, config: LossConfig,
               weight_total: jax.Array | None = None) -> jax.Array:
    """Weighted cross-entropy over [conditions, background]: matched queries -> their target's
    class, the others -> background (weight no_object_weight); mean weighted by class weights
    over the query rows of the frames that take part (``weight_total``: the sum of the weights,
    default these frames')."""
    frames, num_queries, num_classes = class_logits.shape
    background = num_classes - 1
    assigned = (query_of_target[:, :, None] == jnp.arange(num_queries)) & (query_of_target[:, :, None] >= 0)
    target_class = jnp.where(assigned.any(1), jnp.sum(assigned * targets.classes[:, :, None], axis=1),
                             background)                                                # [F, Q]
    log_probs = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, target_class[..., None], axis=-1)[..., 0]
    weight = jnp.where(target_class == background, config.no_object_weight, 1.0)
    weight = weight * targets.frame_weight[:, None]
    total = jnp.sum(weight) if weight_total is None else weight_total
    return jnp.sum(weight * nll) / jnp.maximum(total, 1e-12)


def pairwise_class_loss(class_logits, query_of_target, targets: FrameTargets) -> jax.Array:
    """Mean sigmoid BCE of (condition logit - background logit) over every (query, real
    condition) pair of the frames that take part: target 1 where the query is matched to a target
    whose mask equals that of a target of the condition (several expressions of one object each
    have their own target), else 0."""
    real_conditions = class_logits[..., :-1] > PADDED_CONDITION_BOUND                     # [F, Q, C]
    margin = (class_logits[..., :-1] - class_logits[..., -1:]).astype(jnp.float32)
    num_queries, num_conditions = class_logits.shape[-2], class_logits.shape[-1] - 1
    matched = ((query_of_target[:, None, :] == jnp.arange(num_queries)[:, None])
               & (query_of_target[:, None, :] >= 0)).astype(jnp.float32)                   # [F, Q, N]
    # Binary masks are equal when their overlap is the area of both (one matmul, not [F, N, N, HW]).
    flat = (targets.masks.reshape(*targets.masks.shape[:2], -1) > 0.5).astype(jnp.float32)
    overlap = jnp.einsum("fnp,fmp->fnm", flat, flat)
    area = jnp.sum(flat, axis=-1)
    same_object = ((overlap == area[:, :, None]) & (overlap == area[:, None, :])
                   & targets.valid[:, :, None] & targets.valid[:, None, :])                 # [F, N, N]
    of_condition = (targets.classes[..., None] == jnp.arange(num_conditions)) & targets.valid[..., None]
    answers = jnp.einsum("fqn,fnm,fmc->fqc", matched, same_object.astype(jnp.float32),
                         of_condition.astype(jnp.float32)) > 0
    bce = jax.nn.softplus(margin) - margin * answers
    weight = real_conditions & targets.frame_weight[:, None, None]
    return jnp.sum(jnp.where(weight, bce, 0.0)) / jnp.maximum(jnp.sum(weight), 1)


# ------------------------------------------------------------------------------- all predictions
def segmentation_losses(all_mask_logits: jax.Array | FactoredMasks, all_class_logits: jax.Array | None,
                        targets: FrameTargets, key: jax.Array, config: LossConfig,
                        points: LossPoints | None = None, *, frame_ids: jax.Array | None = None,
                        normalizers: LossNormalizers | None = None) -> dict[str, jax.Array]:
    """Losses of every decoder prediction, summed over predictions.

    Args:
      all_mask_logits: [P, F, Q, H, W], or factored (embeddings [P, F, Q, C], features
        [F, H, W, C]); all_class_logits [P, F, Q, C + 1] or None (no class head).
      targets: the frames' targets.
      key: draws each prediction's points (independent per prediction), per frame from
        ``frame_ids`` (default 0..F-1; see :func:`draw_points`).
      points: explicit points stacked over P (tests feed the reference the same points).
      normalizers: the denominators of an accumulated optimizer step (default: these frames').
    Returns:
      {"loss_cls", "loss_mask", "loss_dice"}: unweighted sums over predictions, and
      "loss_seg": their weighted sum (class 2, mask 5, dice 5); "num_masks".
    """
    factored = isinstance(all_mask_logits, FactoredMasks)
    per_prediction_masks = all_mask_logits.embeddings if factored else all_mask_logits
    num_predictions, frames = per_prediction_masks.shape[:2]
    if normalizers is None:
        num_masks, class_weight = jnp.maximum(jnp.sum(targets.valid), 1).astype(jnp.float32), None
    else:
        num_masks, class_weight = normalizers.num_masks, normalizers.class_weight
    if points is None:
        keys = jax.random.split(key, num_predictions)
        points = jax.vmap(lambda k: draw_points(k, frames, targets.masks.shape[1], config, frame_ids))(keys)

    def one(args):
        masks, class_logits, p = args
        if factored:
            masks = FactoredMasks(masks, all_mask_logits.features)
        return prediction_losses(masks, class_logits, targets, p, num_masks, config, class_weight)

    per_prediction = jax.lax.map(one, (per_prediction_masks, all_class_logits, points))   # one at a time (memory)
    summed = {k: jnp.sum(v) for k, v in per_prediction.items()}
    out = {"loss_mask": summed["mask"], "loss_dice": summed["dice"],
           "loss_cls": summed.get("cls", jnp.zeros((), jnp.float32))}
    out["loss_seg"] = (config.class_weight * out["loss_cls"] + config.mask_weight * out["loss_mask"]
                       + config.dice_weight * out["loss_dice"])
    if "pair" in summed:
        out["loss_pair"] = summed["pair"]
        out["loss_seg"] = out["loss_seg"] + config.pairwise_class_weight * summed["pair"]
    out["num_masks"] = num_masks
    return out


def no_segmentation_losses(config: LossConfig, normalizers: LossNormalizers | None = None
                           ) -> dict[str, jax.Array]:
    """The result of :func:`segmentation_losses` (with a class head) for a batch without masks
    (chat): every term zero, ``num_masks`` as that function reports it with no target."""
    zero = jnp.zeros((), jnp.float32)
    out = {"loss_mask": zero, "loss_dice": zero, "loss_cls": zero, "loss_seg": zero}
    if config.pairwise_class_weight:
        out["loss_pair"] = zero
    out["num_masks"] = jnp.ones((), jnp.float32) if normalizers is None else normalizers.num_masks
    return out


def lm_loss(text_logits: jax.Array, labels: jax.Array, num_tokens: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over the answer tokens: (loss, number of tokens).

    text_logits [B, L, V]; labels [B, L] with -100 where no loss (prompt, padding);
    ``num_tokens``: the denominator (default these labels' token count)."""
    logits = text_logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE_LABEL
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    count = jnp.sum(valid)
    total = count if num_tokens is None else num_tokens
    return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(total, 1), count


def chunked_lm_loss(head, hidden: jax.Array, labels: jax.Array, num_tokens: jax.Array | None = None,
                    chunk: int = 64) -> tuple[jax.Array, jax.Array]:
    """:func:`lm_loss` of ``head(hidden)`` without building the [B, L, V] logits.

    The positions whose next token is labelled are moved to the front of each row (a stable
    argsort keeps their order), then a scan over chunks of ``chunk`` positions runs the head and
    the log-softmax on [B, chunk, V] at a time; a chunk past the batch's largest labelled count
    is skipped (``lax.cond``: no head, no softmax, forward or backward), and each chunk is
    rematerialised in the backward pass, so its logits are never stored. Any number of labelled
    tokens is exact (no capacity to overflow); the work is that of ceil(max labelled / chunk)
    chunks, ~10 answer tokens -> one chunk.

    Args:
      head: [B, c, D] -> [B, c, V'] logits (the model's LM head; V' >= V, columns past the
        vocabulary padding that no label names, as ``sharding.vocab_parallel_logits`` returns).
      hidden: [B, L, D] final hidden states; labels [B, L] with -100 where no loss.
      num_tokens: the denominator (default these labels' token count).
    Returns:
      (loss, number of tokens), as :func:`lm_loss`.
    """
    batch, length, width = hidden.shape
    positions = length - 1
    targets = labels[:, 1:]
    valid = targets != IGNORE_LABEL
    size = max(1, min(chunk, positions))
    chunks = -(-positions // size)
    pad = chunks * size - positions
    order = jnp.argsort(~valid, axis=1, stable=True)                                 # labelled first
    order = jnp.pad(order, ((0, 0), (0, pad)))
    slot_valid = jnp.pad(jnp.take_along_axis(valid, order[:, :positions], axis=1), ((0, 0), (0, pad)))
    slot_target = jnp.where(slot_valid, jnp.take_along_axis(jnp.pad(targets, ((0, 0), (0, pad))), order, 1), 0)
    slot_hidden = jnp.take_along_axis(hidden[:, :-1], order[..., None], axis=1)     # [B, chunks*size, D]
    count = jnp.sum(valid)
    needed = jnp.max(jnp.sum(valid, axis=1))                                         # chunks used: ceil(needed / size)

    def chunk_nll(h, t, ok):
        log_probs = jax.nn.log_softmax(head(h).astype(jnp.float32), axis=-1)
        # A select-and-sum rather than a gather: it stays local when the vocabulary is split
        # over devices (``sharding.vocab_parallel_logits``).
        columns = jnp.arange(log_probs.shape[-1])
        picked = jnp.sum(jnp.where(columns == t[..., None], log_probs, 0.0), axis=-1)
        return -jnp.sum(jnp.where(ok, picked, 0.0))

    # The checkpoint wraps the cond (not the other way round): its residuals are then its inputs
    # and the head weight it closes over, which the scan hoists as loop-invariant. A checkpoint
    # inside the cond makes the weight a residual output of the cond, stacked once per chunk.
    @jax.checkpoint
    def chunk_or_skip(index, h, t, ok):
        return jax.lax.cond(index * size < needed, chunk_nll, lambda *_: jnp.zeros((), jnp.float32), h, t, ok)

    def body(total, xs):
        return total + chunk_or_skip(*xs), None

    def split(x):                                                                    # [B, n*size, ...] -> [n, B, size, ...]
        return jnp.moveaxis(x.reshape(batch, chunks, size, *x.shape[2:]), 1, 0)

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (jnp.arange(chunks), split(slot_hidden), split(slot_target), split(slot_valid)))
    denominator = count if num_tokens is None else num_tokens
    return total / jnp.maximum(denominator, 1), count


def loss_normalizers(targets: FrameTargets, labels: jax.Array | None, num_queries: int, config: LossConfig
                     ) -> LossNormalizers:
    """The losses' denominators counted from the targets alone (no forward pass), unclamped, to
    be summed over the micro-batches of a step: target masks; class weights (every query row of
    a frame that takes part weighs ``no_object_weight``, except the min(targets, queries) rows
    the Hungarian matching assigns, which weigh 1); answer tokens."""
    matched = jnp.sum(jnp.minimum(jnp.sum(targets.valid, -1), num_queries) * targets.frame_weight)
    rows = jnp.sum(targets.frame_weight) * num_queries
    tokens = jnp.zeros((), jnp.int32) if labels is None else jnp.sum(labels[:, 1:] != IGNORE_LABEL)
    return LossNormalizers(num_masks=jnp.sum(targets.valid).astype(jnp.float32),
                           class_weight=(config.no_object_weight * (rows - matched) + matched).astype(jnp.float32),
                           lm_tokens=tokens.astype(jnp.float32))
