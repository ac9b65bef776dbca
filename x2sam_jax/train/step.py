"""The sharded train step: one ``jax.jit`` program per batch shape, explicit shardings, donated state.

One optimizer step = ``A`` micro-batches of one source stacked on a leading axis (the recipe's
global batch split over the devices, ``data.mixture.split_global_batch``); the step scans over
them and sums their gradients, every loss term normalised by the whole step's count (target
masks, class weights, answer tokens: ``losses.loss_normalizers``), so the update is that of one
batch holding all the step's samples on any number of devices (the official code divides each
micro-step's own loss by the accumulation count instead). It then clips and applies one AdamW
update. A non-finite loss or gradient norm skips the update (parameters and optimizer state
unchanged) and is counted.

Parameters are split once (``optimizer.split_params``) into the trainable state (float32 master
weights, differentiated, updated, in the optimizer), the frozen state (an input of the step,
never differentiated, may be stored in bfloat16) and the rest (RNG streams). Randomness is a
function of (seed, step): ``key_t = fold_in(seed_key, t)`` (``step_keys``), split into the dropout
streams of each micro-batch (``rng.reseed_rngs``: one key per dropout layer and per stacked
layer) and the sample key: the region sampler's points of sample i and the loss's points of its
frames are drawn from ``fold_in(sample_key, i)``, i counting the step's samples, so they do not
depend on how the step is split. A resumed run therefore draws exactly what the uninterrupted run
drew.
"""

from __future__ import annotations

import contextlib
import functools
import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from x2sam_jax.data.features import TASK_IDS
from x2sam_jax.rng import reseed_rngs
from x2sam_jax.sharding import MAPS, constrain, replicated_report, state_shardings
from x2sam_jax.train import flops as flops_lib
from x2sam_jax.train import losses as losses_lib

logger = logging.getLogger(__name__)

# Arrays of a collated batch the step reads (the model's inputs and the loss's targets).
MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "grid_thw", "sam_pixel_values", "sam_valid_hw",
              "cond_spans", "cond_valid", "seg_positions", "region_masks", "region_valid", "region_frame")
TARGET_KEYS = ("labels", "gt_masks", "gt_classes", "gt_frame_valid", "instance_valid", "frame_valid",
               "sample_valid", "task_id")
STAGE1_KEYS = ("sam_pixel_values", "sam_valid_hw", "gt_masks", "gt_classes", "gt_frame_valid", "instance_valid",
               "frame_valid", "sample_valid")
REFERRING_TASKS = ("ref_seg", "vref_seg", "reason_seg", "vreason_seg")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array            # int32: optimizer steps taken (skipped ones included) = data position
    updates: jax.Array         # int32: updates applied (the learning-rate schedule's position)
    params: Any                # nnx.State of the trainable parameters
    opt_state: Any
    rng: jax.Array             # the run's base key; step t draws from fold_in(rng, t)
    nonfinite_run: jax.Array   # int32: consecutive skipped steps
    skipped: jax.Array         # int32: skipped steps in total


@dataclasses.dataclass(frozen=True)
class Task:
    """What differs between the stages: the forward pass and which parameters train."""

    stage: int                                     # 1: class-agnostic segmentor, 3: X2SAM
    is_trainable: Callable[[str], bool]
    num_queries: int                               # of the mask decoder (the class loss's row count)
    shared_negatives: bool = False                 # referring phrases of a micro-batch as negatives

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return STAGE1_KEYS if self.stage == 1 else MODEL_KEYS + TARGET_KEYS

    def segmentation_samples(self, batch: dict) -> jax.Array:
        """[B] bool: the samples with a segmentation part (not padding, not chat-only)."""
        valid = batch["sample_valid"].astype(bool)
        return valid if self.stage == 1 else valid & batch["cond_valid"].astype(bool).any(-1)

    def language_only(self, batch: dict) -> bool:
        """Whether a stage-3 batch has no SAM frames (``frame_valid`` [..., 0]: every sample chat,
        ``data.batching.Collator``). A shape, so it is decided at trace time: such a batch compiles
        a program of the ViT, the LLM and the LM loss alone (``X2SAM.language_only``)."""
        return self.stage != 1 and batch["frame_valid"].shape[-1] == 0

    def forward(self, model, batch: dict, region_key, dense_masks: bool = False, lm_logits: bool = True):
        """Model outputs with all decoder predictions (factored unless ``dense_masks``: see
        ``X2SAMOutput``), and the loss's per-sample knobs. ``region_key``: one key per sample;
        ``lm_logits``: text logits (True) or the final hidden states (stage 3). A batch without
        frames (:meth:`language_only`) gets the text outputs only, and no segmentation samples."""
        if self.stage == 1:
            out = model(batch["sam_pixel_values"], sam_valid_hw=batch.get("sam_valid_hw"), all_predictions=True,
                        dense_masks=dense_masks)
            return out, self.segmentation_samples(batch), None
        if self.language_only(batch):
            out = model.language_only(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                      batch["grid_thw"], lm_logits=lm_logits)
            return out, None, None
        shared, offsets = None, None
        if self.shared_negatives:
            referring = jnp.isin(batch["task_id"], jnp.asarray([TASK_IDS[t] for t in REFERRING_TASKS]))
            referring = referring & batch["sample_valid"].astype(bool)
            shared = referring[:, None] & referring[None, :]
            offsets = jnp.arange(batch["cond_valid"].shape[0]) * batch["cond_valid"].shape[1]
        # A hand-made batch of normalised float frames may leave out sam_valid_hw (uint8 ones need it).
        out = model(**{k: batch[k] for k in MODEL_KEYS if k in batch}, frame_valid=batch["frame_valid"],
                    region_key=region_key, shared_conditions=shared, all_predictions=True, dense_masks=dense_masks,
                    lm_logits=lm_logits)
        return out, self.segmentation_samples(batch), offsets


def _frames_first(x):
    """[P, B, T, ...] -> [P, B*T, ...]."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def mask_predictions(out, dense: bool):
    """The loss's view of all decoder predictions, frames flattened: dense [P, B*T, Q, h, w] or
    ``FactoredMasks`` (embeddings [P, B*T, Q, C], features [B*T, h, w, C])."""
    if dense:
        return constrain(_frames_first(out.all_mask_logits), ("predictions", "batch", "queries", "height", "width"))
    features = out.mask_features
    return losses_lib.FactoredMasks(
        constrain(_frames_first(out.all_mask_embeddings), ("predictions", "batch", "queries", "embed")),
        constrain(features.reshape(-1, *features.shape[2:]), MAPS))


def micro_batch_loss(model, task: Task, batch: dict, sample_key, loss_config: losses_lib.LossConfig,
                     first_sample=0, normalizers: losses_lib.LossNormalizers | None = None):
    """(total loss, metrics) of one micro-batch whose rows are the step's samples
    ``first_sample`` .. ``first_sample + B - 1``; ``normalizers``: the step's (default this
    micro-batch's own). A batch without frames (``Task.language_only``) has the LM loss alone; its
    segmentation metrics are zeros under the same names, so every program's metrics have one
    structure (the loop averages them over a logging window of mixed steps)."""
    region_key, loss_key = jax.random.split(sample_key)
    rows, frames = batch["frame_valid"].shape[:2]
    samples = first_sample + jnp.arange(rows)
    region_keys = jax.vmap(jax.random.fold_in, (None, 0))(region_key, samples)
    frame_ids = (samples[:, None] * frames + jnp.arange(frames)).reshape(-1)
    dense = loss_config.dense_mask_logits
    chunked = loss_config.lm_chunk > 0
    out, segmentation, offsets = task.forward(model, batch, region_keys, dense_masks=dense, lm_logits=not chunked)
    if task.language_only(batch):    # no masks: the segmentation terms are zeros of the same names
        seg = losses_lib.no_segmentation_losses(loss_config, normalizers)
    else:
        targets = losses_lib.frame_targets(batch, segmentation_samples=segmentation, class_offsets=offsets)
        seg = losses_lib.segmentation_losses(mask_predictions(out, dense), _frames_first(out.all_class_logits),
                                             targets, loss_key, loss_config, frame_ids=frame_ids,
                                             normalizers=normalizers)
    metrics = dict(seg)
    total = seg["loss_seg"]
    if task.stage != 1:
        num_tokens = None if normalizers is None else normalizers.lm_tokens
        if chunked:     # the head on the labelled positions only: no [B, L, V] logits
            head = functools.partial(model.vlm.lm_logits, vocab_parallel=True)
            lm, tokens = losses_lib.chunked_lm_loss(head, out.text_hidden, batch["labels"], num_tokens,
                                                    chunk=loss_config.lm_chunk)
        else:
            lm, tokens = losses_lib.lm_loss(out.text_logits, batch["labels"], num_tokens)
        total = total + loss_config.lm_weight * lm
        metrics.update(loss_lm=lm, lm_tokens=tokens.astype(jnp.float32))
    metrics["loss"] = total
    return total, metrics


def make_grad_fn(graphdef, task: Task, loss_config: losses_lib.LossConfig):
    """grad_fn(params, frozen, rest, micro_batch, dropout_key, sample_key, first_sample=0,
    normalizers=None) -> ((loss, metrics), grads of the trainable params): see ``step_keys`` and
    ``micro_batch_loss``."""

    def loss_fn(params, frozen, rest, batch, dropout_key, sample_key, first_sample=0, normalizers=None):
        # Fresh Variable objects for the non-differentiated states too, so that every node of the
        # model belongs to this (differentiated) trace.
        frozen = jax.tree.map(lambda x: x, frozen)
        model = nnx.merge(graphdef, params, frozen, reseed_rngs(rest, dropout_key))
        return micro_batch_loss(model, task, batch, sample_key, loss_config, first_sample, normalizers)

    return jax.value_and_grad(loss_fn, has_aux=True)


def step_keys(rng, step, micro_index):
    """(dropout key of micro-batch ``micro_index``, the sample key of optimizer step ``step``)."""
    dropout_root, sample_key = jax.random.split(jax.random.fold_in(rng, step))
    return jax.random.fold_in(dropout_root, micro_index), sample_key


def step_normalizers(task: Task, batch: dict, loss_config: losses_lib.LossConfig) -> losses_lib.LossNormalizers:
    """The loss denominators of a whole step (batch arrays [A, B, ...]), summed over its
    micro-batches and clamped as each loss clamps its own."""

    def one(micro):
        targets = losses_lib.frame_targets(micro, segmentation_samples=task.segmentation_samples(micro))
        return losses_lib.loss_normalizers(targets, micro.get("labels"), task.num_queries, loss_config)

    total = jax.tree.map(jnp.sum, jax.vmap(one)(batch))
    return total._replace(num_masks=jnp.maximum(total.num_masks, 1.0))


def make_train_step(graphdef, task: Task, optimizer: optax.GradientTransformation, schedule,
                    loss_config: losses_lib.LossConfig):
    """train_step(state, frozen, rest, batch) -> (state, metrics); batch arrays are [A, B, ...]."""
    grad_fn = make_grad_fn(graphdef, task, loss_config)

    def train_step(state: TrainState, frozen, rest, batch: dict):
        accumulate, rows = batch["sample_valid"].shape[:2]
        normalizers = step_normalizers(task, batch, loss_config)

        def micro(grads, xs):
            micro_batch, index = xs
            dropout_key, sample_key = step_keys(state.rng, state.step, index)
            (_, metrics), g = grad_fn(state.params, frozen, rest, micro_batch, dropout_key, sample_key,
                                      index * rows, normalizers)
            return jax.tree.map(jnp.add, grads, g), metrics

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, metrics = jax.lax.scan(micro, zeros, (batch, jnp.arange(accumulate)))
        # Every part is normalised by the step's counts, so the parts add up to the step's loss.
        metrics = jax.tree.map(lambda m: jnp.sum(m, 0), metrics)
        metrics["num_masks"] = normalizers.num_masks
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1, updates=state.updates + finite.astype(jnp.int32),
            params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state), rng=state.rng,
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
            skipped=state.skipped + (~finite).astype(jnp.int32))
        metrics.update(grad_norm=grad_norm, lr=schedule(state.updates), finite=finite.astype(jnp.float32),
                       skipped=new_state.skipped.astype(jnp.float32),
                       nonfinite_run=new_state.nonfinite_run.astype(jnp.float32))
        return new_state, metrics

    return train_step


# ------------------------------------------------------------------------------------- shardings
def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def train_state_shardings(state: TrainState, mesh) -> TrainState:
    """Parameters and optimizer moments by their logical names; counters and the key replicated."""
    rep = replicated(mesh)
    return TrainState(step=rep, updates=rep, params=state_shardings(state.params, mesh),
                      opt_state=state_shardings(state.opt_state, mesh), rng=rep, nonfinite_run=rep, skipped=rep)


def batch_sharding(mesh) -> NamedSharding:
    """Micro-batches [A, B, ...]: the batch axis over ('data', 'fsdp')."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    return NamedSharding(mesh, P(None, axes or None))


def init_train_state(params, optimizer, seed: int, mesh, replicated_threshold: int = 1 << 20) -> TrainState:
    """A fresh state, born sharded (the optimizer moments are created on their shards).

    Every trainable array above ``replicated_threshold`` bytes that the mesh leaves replicated
    (with its gradient and Adam moments, a full copy per device) is logged as a warning."""
    replicated_report(params, state_shardings(params, mesh), replicated_threshold, label="trainable parameter")

    def make(params):
        return TrainState(step=jnp.zeros((), jnp.int32), updates=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params), rng=jax.random.key(seed),
                          nonfinite_run=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))

    shardings = train_state_shardings(jax.eval_shape(make, params), mesh)
    with jax.set_mesh(mesh):
        return jax.jit(make, out_shardings=shardings)(params)


@contextlib.contextmanager
def partitioner(name: str):
    """Lower with "gspmd" or "shardy" (jax's default), restoring the previous choice after."""
    if name not in ("gspmd", "shardy"):
        raise ValueError(f"partitioner must be 'gspmd' or 'shardy', got {name!r}")
    previous = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", name == "shardy")
    try:
        yield
    finally:
        jax.config.update("jax_use_shardy_partitioner", previous)


def activation_constraints_safe(mesh) -> bool:
    """Whether the step is lowered under ``mesh`` (activation constraints on).

    Yes unless data, fsdp and tensor are all > 1. There XLA's SPMD partitioner (jax/jaxlib
    0.10.2) returns wrong gradients once activations are constrained: measured on the stage-1
    model, with a smooth loss (no matching, no top-k), the forward equal to 1e-6 and the gradient
    10 % off on 2x2x2, right to 1e-6 on 1x8x1, 1x4x2, 2x1x4 and 2x4x1. Three dense layers show
    it (scripts/repro_three_axis_gradient.py, run by tests/test_train_step.py); on such meshes the
    step keeps the shardings propagated from its inputs, which GSPMD partitions right."""
    return min(mesh.shape.get(axis, 1) for axis in ("data", "fsdp", "tensor")) == 1


class CompiledStep:
    """The jitted step, compiled ahead of time once per batch shape with a chosen partitioner; the
    model FLOPs of each program are counted when it is compiled (``flops``, for the log's MFU).

    GSPMD is the default: Shardy (JAX's default) gets the gradient of the three-layer program of
    scripts/repro_three_axis_gradient.py wrong on a mesh with data, fsdp and tensor all > 1 even
    with the shardings propagated from the inputs, where GSPMD gets it right.
    """

    def __init__(self, jitted, partitioner_name: str = "gspmd", mesh=None, count_flops: bool = True):
        self.jitted = jitted
        self.partitioner = partitioner_name
        self.mesh = mesh if mesh is not None and activation_constraints_safe(mesh) else None
        self.count_flops = count_flops
        self._compiled: dict = {}
        self._flops: dict = {}    # batch shapes -> model FLOPs of one step of that program

    def compile(self, state, frozen, rest, batch):
        """The compiled program for this batch shape (arrays or ShapeDtypeStructs), cached.

        Lowered under the mesh (``jax.set_mesh``), so the models' activation constraints
        (``sharding.constrain``) apply (see :func:`activation_constraints_safe`); without an
        active mesh they are no-ops and the partitioner propagates the input shardings alone."""
        key = self.key(batch)
        if key not in self._compiled:
            mesh = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
            with partitioner(self.partitioner), mesh:
                traced = self.jitted.trace(state, frozen, rest, batch)
                lowered = traced.lower()
                self._compiled[key] = lowered.compile()
                self._flops[key] = self._count_flops(traced, lowered)
        return self._compiled[key]

    @staticmethod
    def key(batch) -> tuple:
        """The batch shapes that pick a program."""
        return tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))

    def _count_flops(self, traced, lowered) -> float:
        if not self.count_flops:
            return 0.0
        try:
            return flops_lib.program_flops(traced, lowered)
        except Exception as e:  # a metric never stops a run
            logger.warning("could not count the train step's FLOPs (no MFU in the log): %r", e)
            return 0.0

    def flops(self, batch) -> float:
        """Model FLOPs of one optimizer step of ``batch``'s program (global, every scan iteration
        counted: ``flops.program_flops``); 0 when not counted or not compiled yet."""
        return self._flops.get(self.key(batch), 0.0)

    def __call__(self, state, frozen, rest, batch):
        return self.compile(state, frozen, rest, batch)(state, frozen, rest, batch)

    @property
    def programs(self) -> int:
        return len(self._compiled)


def jit_train_step(train_step, state: TrainState, frozen, rest, mesh, compiler_options=None,
                   partitioner_name: str = "gspmd") -> CompiledStep:
    """``jax.jit`` with explicit in/out shardings, the state donated; compiled per batch shape.
    Frozen arrays above 1 MiB that the mesh leaves replicated are logged as warnings."""
    state_sh = train_state_shardings(state, mesh)
    replicated_report(frozen, state_shardings(frozen, mesh), label="frozen parameter")
    jitted = jax.jit(train_step,
                     in_shardings=(state_sh, state_shardings(frozen, mesh), state_shardings(rest, mesh),
                                   batch_sharding(mesh)),
                     out_shardings=(state_sh, replicated(mesh)),
                     donate_argnums=(0,), compiler_options=compiler_options)
    return CompiledStep(jitted, partitioner_name, mesh)


def global_batch(micro_batches: list[dict], keys, mesh) -> dict:
    """This host's micro-batches (same shapes) -> global arrays [A, B_global, ...] sharded over
    the mesh's batch axes; each host passes its own rows (``make_array_from_process_local_data``)."""
    sharding = batch_sharding(mesh)
    out = {}
    for key in keys:
        local = np.stack([np.asarray(b[key]) for b in micro_batches])
        out[key] = jax.make_array_from_process_local_data(sharding, local)
    return out
