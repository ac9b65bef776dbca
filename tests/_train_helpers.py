"""Small models and batches for the train-step tests (fast compiles on CPU).

`reduced_config()` is the tiny preset cut further (one ViT block, one LLM layer, one block per
Hiera stage, one deformable layer, one round of three decoder layers): the same code paths,
fewer ops to compile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import x2sam_jax  # noqa: F401
from x2sam_jax.train import losses as losses_lib
from x2sam_jax.train import optimizer as optimizer_lib
from x2sam_jax.train import step as step_lib
from x2sam_jax.runs import model_for_stage, split_params, trainable_predicate

SAM = 128
GRID = SAM // 4
FAST = {"xla_backend_optimization_level": 0}
LOSS = losses_lib.LossConfig(num_points=128)


def reduced_config(**lora):
    from x2sam_jax.config import LoRAConfig, x2sam_preset

    base = x2sam_preset("tiny")
    vision = dataclasses.replace(base.vlm.vision, depth=1, deepstack_visual_indexes=(0,))
    text = dataclasses.replace(base.vlm.text, num_layers=1)
    lora_config = LoRAConfig(rank=4, alpha=8.0, dropout=lora.get("dropout", 0.0))
    hiera = dataclasses.replace(base.mask_encoder, blocks_per_stage=(1, 1, 1, 1), global_attention_blocks=(3,))
    return dataclasses.replace(
        base, vlm=dataclasses.replace(base.vlm, vision=vision, text=text, lora=lora_config), mask_encoder=hiera,
        pixel_decoder=dataclasses.replace(base.pixel_decoder, num_layers=1))


def build(stage, mesh, *, seed=0, config=None, lr=1e-3, total_steps=10, multipliers=(("segmentor.encoder", 0.1),),
          grad_clip=1.0, loss=LOSS):
    """(model config, graphdef, state, frozen, rest, train_step jitted for mesh, optimizer, task)."""
    from x2sam_jax.sharding import create_sharded

    config = config or reduced_config()
    model = create_sharded(lambda: model_for_stage(config, stage, nnx.Rngs(seed)), mesh, compiler_options=FAST)
    task = step_lib.Task(stage=stage, is_trainable=trainable_predicate(stage),
                         num_queries=config.mask_decoder.num_queries)
    graphdef, params, frozen, rest = split_params(
        nnx.view(model, deterministic=False, raise_if_not_found=False), task.is_trainable)
    optimizer = optimizer_lib.build_optimizer(lr=lr, total_steps=total_steps, warmup_ratio=0.0, grad_clip=grad_clip,
                                              lr_multipliers=multipliers)
    schedule = optimizer_lib.learning_rate_schedule(lr, total_steps, 0.0)
    state = step_lib.init_train_state(params, optimizer, seed, mesh)
    step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, task, optimizer, schedule, loss),
                                   state, frozen, rest, mesh, compiler_options=FAST)
    return dict(config=config, graphdef=graphdef, state=state, frozen=frozen, rest=rest, step=step,
                optimizer=optimizer, task=task)


def segmentation_batch(rng, *, accumulate, batch, frames=1, instances=4):
    """Random frames with random box-shaped targets (the stage-1 keys; stage 3 adds text)."""
    masks = np.zeros((accumulate, batch, frames, instances, GRID, GRID), bool)
    for index in np.ndindex(accumulate, batch, frames, instances):
        y, x = rng.integers(0, GRID - 8, size=2)
        h, w = rng.integers(4, 12, size=2)
        masks[index][y:y + h, x:x + w] = True
    valid = np.ones((accumulate, batch, instances), bool)
    valid[:, :, -1] = False                                   # a padded target slot
    masks[:, :, :, -1] = False
    return {
        "sam_pixel_values": rng.normal(size=(accumulate, batch, frames, SAM, SAM, 3)).astype(np.float32),
        "gt_masks": masks,
        "gt_classes": np.where(valid, 0, -1).astype(np.int32),
        "gt_frame_valid": masks.any((-1, -2)),
        "instance_valid": valid,
        "frame_valid": np.ones((accumulate, batch, frames), bool),
        "sample_valid": np.ones((accumulate, batch), bool),
    }


def stage3_batch(config, rng, *, accumulate=1, frames=1):
    """A stage-3 batch: test_x2sam's model inputs plus targets and answer labels."""
    from test_x2sam import make_batch

    micro = []
    for _ in range(accumulate):
        inputs = make_batch(config, rng, frames=frames, conditions=(3, 1), regions=(1, 0))
        targets = segmentation_batch(rng, accumulate=1, batch=2, frames=frames, instances=3)
        targets = {k: v[0] for k, v in targets.items() if k != "sam_pixel_values"}
        targets["gt_classes"] = np.array([[0, 2, -1], [0, -1, -1]], np.int32)   # sample 1 has one condition
        targets["instance_valid"] = targets["gt_classes"] >= 0
        targets["gt_frame_valid"] &= targets["instance_valid"][:, None, :]
        ids = inputs["input_ids"]
        labels = np.where((rng.random(ids.shape) < 0.3) & (ids < config.vlm.text.vocab_size), ids, -100)
        visual = (ids == config.vlm.image_token_id) | (ids == config.vlm.video_token_id)
        after = np.array([np.flatnonzero(row).max() + 1 for row in visual])
        labels[np.arange(len(ids)), after] = ids[np.arange(len(ids)), after]   # the last visual logit has a target
        micro.append({**inputs, **targets, "labels": labels.astype(np.int32),
                      "task_id": np.zeros((2,), np.int32)})
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


def chat_batch(config, rng, *, accumulate=1):
    """A stage-3 batch of chat samples (answer labels, no conditions, no targets, no region
    tokens) as the collator padded it before chat batches lost their frames: one zero frame,
    padded regions and target slots. :func:`without_frames` gives the batch of today's collator."""
    batch = stage3_batch(config, rng, accumulate=accumulate)
    ids = batch["input_ids"]
    chat = {**batch, "input_ids": np.where(ids == config.region_token_id, 11, ids)}   # no region tokens
    for key in ("cond_valid", "region_valid", "instance_valid", "gt_masks", "gt_frame_valid", "seg_valid"):
        if key in chat:
            chat[key] = np.zeros_like(chat[key])
    chat["sam_pixel_values"] = np.zeros_like(chat["sam_pixel_values"])
    chat["gt_classes"] = np.full_like(chat["gt_classes"], -1)
    return chat


def without_frames(batch):
    """``batch`` ([A, B, ...]) with its frames and regions cut to 0 (``batching.NO_FRAME_DIMS``): a
    chat batch as the collator builds it now."""
    from x2sam_jax.data.batching import NO_FRAME_DIMS, PADDED_AXES

    out = dict(batch)
    for name in NO_FRAME_DIMS:
        for key, axis in PADDED_AXES[name]:
            if key in out:
                out[key] = np.take(out[key], np.arange(0), axis=axis + 1)
    return out


def to_device(batch, mesh):
    sharding = step_lib.batch_sharding(mesh)
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def flat_values(state) -> dict:
    return {".".join(map(str, path)): np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
            for path, v in nnx.to_flat_state(state)}


def train_split_iou(model, tokenizer, model_config, root, *, sources=("coco_panoptic", "refcoco", "ref_ytvos"),
                    batches=4, batch_size=4):
    """Mean IoU of the best-scoring query per condition against its target on training samples
    (``batch_ious``), per source."""
    from x2sam_jax.data import synthetic
    from x2sam_jax.data.batching import BucketConfig
    from x2sam_jax.data.pipeline import build_eval_pipeline

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, inputs):
        out = nnx.merge(graphdef, state)(**inputs)
        return out.mask_logits, out.class_logits

    buckets = BucketConfig(seq_lengths=(512, 1024), patch_counts=(512,), grids=(1,), frames=(1, 8), instances=(16,),
                           conditions=(32,), regions=(1,), seg_tokens=(16,))
    result = {}
    available = synthetic.sources(str(root), "train")
    for name in sources:
        pipeline = build_eval_pipeline(available[name], tokenizer=tokenizer, batch_size=batch_size if name != "ref_ytvos" else 1,
                                       buckets=buckets, sam_size=model_config.mask_encoder.image_size, seed=0,
                                       process_index=0, process_count=1,
                                       feature_kwargs={"region_tokens": model_config.region_tokens, "max_categories": 16})
        rows = []
        for _, batch in zip(range(batches), pipeline):
            inputs = {k: batch[k] for k in step_lib.MODEL_KEYS}
            inputs["frame_valid"] = batch["frame_valid"]
            masks, classes = forward(state, inputs)
            rows += batch_ious(batch, np.asarray(masks), np.asarray(classes))
        result[name] = float(np.mean([r["iou"] for r in rows])) if rows else float("nan")
    return result


def batch_ious(batch: dict, mask_logits: np.ndarray, class_logits: np.ndarray) -> list[dict]:
    """IoU of every (sample, condition with a target): the condition's best query (class score
    averaged over the valid frames), mask logit > 0, pooled over the clip's valid frames, on the
    unpadded S/4 grid (a quick training-progress measure, not a benchmark metric)."""
    from x2sam_jax.data.transforms import longest_side_shape

    cond_valid, frame_valid = batch["cond_valid"], batch["frame_valid"]
    real = np.concatenate([cond_valid, np.ones_like(cond_valid[:, :1])], axis=1)[:, None, None, :]
    logits = np.where(real, class_logits.astype(np.float64), -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    weights = frame_valid.astype(np.float64)[:, :, None, None]
    scores = (probs[..., :-1] * weights).sum(1) / np.maximum(weights.sum(1), 1)        # [B, Q, C]
    best = scores.argmax(1)                                                              # [B, C]
    picked = np.take_along_axis(mask_logits, best[:, None, :, None, None], axis=2)     # [B, T, C, h, w]
    onehot = batch["gt_classes"][:, :, None] == np.arange(cond_valid.shape[1])[None, None]
    targets = np.einsum("btnhw,bnc->btchw", batch["gt_masks"].astype(np.int32), onehot.astype(np.int32)) > 0
    rows = []
    for b in np.flatnonzero(batch["sample_valid"]):
        vh, vw = longest_side_shape(int(batch["orig_hw"][b][0]), int(batch["orig_hw"][b][1]), picked.shape[-1])
        frames = frame_valid[b]
        for c in np.flatnonzero(cond_valid[b]):
            gt = targets[b, frames, c, :vh, :vw]
            if not gt.any():
                continue  # a listed category absent from the image: nothing to score
            pred = picked[b, frames, c, :vh, :vw] > 0
            rows.append({"iou": float(np.logical_and(pred, gt).sum() / np.logical_or(pred, gt).sum())})
    return rows


def random_module(make, seed):
    """A module with random parameters, without running its (slow, eager) initialisers."""
    from x2sam_jax.rng import reseed_rngs

    graphdef, params, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), params)
    rest = reseed_rngs(rest, jax.random.key(seed))
    return nnx.merge(graphdef, params, rest)
