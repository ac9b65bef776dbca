"""Inference for evaluation: the jitted teacher-forced forward, sharded over the mesh, the
oracle that turns a batch's own targets into the same output format, and the generation step of
GCG (greedy answers through x2sam_jax.generate, then the same forward over prompt + answer).

Teacher forcing (docs/architecture.md#evaluation): segmentation tasks run the prompt plus its
templated answer in one forward pass; the answer's <SEG> and the prompt's <p>..</p> spans
condition the mask decoder.
Batches come padded to bucket shapes (data/batching.py), so `make_forward` compiles one program
per bucket; the model state is an argument (NNX split -> jit over the state, graph static), so
every model of the same structure (a reloaded one, a training step's) reuses the programs.

Determinism: the region sampler draws its points with one key per row, derived from the
evaluation seed, the row's source index and clip index (`region_keys`), so a sample's result does
not depend on its batch, its row or the device count.
"""

from __future__ import annotations

import functools
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

import x2sam_jax
from x2sam_jax.data.tokenizer import IGNORE_LABEL, load_tokenizer
from x2sam_jax.distributed import absolute_path
from x2sam_jax.generate import generate
from x2sam_jax.model_checkpoint import CHECKSUMS_FILE, is_training_workdir, read_checksums
from x2sam_jax.models.x2sam import model_inputs as call_arguments

ROW_KEYS = ("sample_index", "clip_index")
ORACLE_LOGIT = 20.0   # |logit| of the oracle's masks and classes: sigmoid / softmax within 2e-9 of 0 or 1


def load_model_and_tokenizer(path, mesh=None, *, step: int | None = None):
    """(model, tokenizer) from a training workdir (its latest complete checkpoint and tokenizer/)
    or a model directory (``x2sam_jax.save`` / a converter; the tokenizer at its top level or in
    tokenizer/), the parameters on ``mesh`` (default: one device of this process). With a mesh
    spanning several processes every process calls it with the same mesh: the parameters are
    read straight into their shards of the global arrays. `step` picks a workdir's checkpoint."""
    directory = absolute_path(path)   # gs://bucket/run keeps its scheme
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is not a directory")
    if not is_training_workdir(directory) and not (directory / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {path} holds neither checkpoints/ (a training workdir) nor "
                                "config.json (a model directory)")
    return x2sam_jax.load(directory, mesh=mesh, step=step), load_tokenizer(str(directory))


def _manifest_digest(manifest) -> str | None:
    """sha256 of the canonical JSON of recorded array checksums (None when none were recorded):
    restores are verified against the same records, so it names the parameters evaluated."""
    if manifest is None or not all(v is not None for v in manifest.values()):
        return None
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def checkpoint_info(path) -> dict:
    """{"path", "kind", "step", "checksum"} of a training workdir (its latest complete step; the
    checksum covers the step's trainable and the run's frozen parameters) or a model directory
    (step: its config.json's "step", if any; checksum over checksums.json's arrays). Reads the
    recorded checksums only, no parameter."""
    directory = absolute_path(path)
    if is_training_workdir(directory):
        import orbax.checkpoint as ocp   # as runs: importing Orbax takes ~2 s

        def recorded(folder, step=None):
            manager = ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(read_only=True))
            try:
                step = manager.latest_step() if step is None else step
                if step is None:
                    return None, None
                meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                return step, (meta.get("checksums") or {}).get("params")
            finally:
                manager.close()

        step, params = recorded(directory / "checkpoints")
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {directory / 'checkpoints'}")
        manifest = {"params": params}
        if (directory / "frozen").is_dir():
            manifest["frozen"] = recorded(directory / "frozen", 0)[1]
        return {"path": str(path), "kind": "training workdir", "step": int(step),
                "checksum": _manifest_digest(manifest)}
    config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    arrays = read_checksums(directory) if (directory / CHECKSUMS_FILE).is_file() else None
    return {"path": str(path), "kind": "model directory", "step": config.get("step"),
            "checksum": _manifest_digest(None if arrays is None else {"params": arrays})}


def batch_sharding(mesh, batch_size: int):
    """The batch axis over ('data', 'fsdp') when those devices divide it, else replicated."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return NamedSharding(mesh, P(("data", "fsdp")) if batch_size % shards == 0 else P())


def to_devices(arrays: dict, mesh) -> dict:
    """Host arrays of this process's rows -> arrays on the mesh. One process: `batch_sharding`.
    Several: each process's rows become its slice of the global batch (the global batch must
    divide over the data x fsdp devices)."""
    size = next(iter(arrays.values())).shape[0]
    if jax.process_count() == 1:
        sharding = batch_sharding(mesh, size)
        return {k: jax.device_put(np.asarray(v), sharding) for k, v in arrays.items()}
    return multihost_utils.host_local_array_to_global_array(
        {k: np.asarray(v) for k, v in arrays.items()}, mesh, P(("data", "fsdp")))


def to_host(outputs: dict, mesh) -> dict:
    """The forward's outputs for this process's rows, as numpy."""
    if jax.process_count() > 1:
        outputs = multihost_utils.global_array_to_host_local_array(outputs, mesh, P(("data", "fsdp")))
    return jax.device_get(outputs)


def model_inputs(batch: dict, mesh) -> dict:
    """The arrays of a batch that X2SAM.__call__ takes, placed on the mesh (see `to_devices`)."""
    return to_devices(call_arguments(batch), mesh)


def region_keys(seed, sample_index, clip_index):
    """One PRNG key per row: fold_in(fold_in(key(seed), sample index), clip index) (jittable)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.fold_in(base, s), c))(sample_index, clip_index)


def make_forward(compiler_options: dict | None = None, *, with_lm_loss: bool = False):
    """The jitted teacher-forced forward.

    forward(model, inputs, rows, seed=0) -> {"mask_logits" [B, T, Q, S/4, S/4], "class_logits"
    [B, T, Q, C + 1]} (+ "lm_loss", the mean cross-entropy of the answer tokens, when
    `with_lm_loss`; then `rows` also holds "labels"). `inputs` are `model_inputs(batch, mesh)`,
    `rows` the batch's "sample_index" and "clip_index" (the region sampler's keys). Without the
    LM loss XLA drops the vocabulary projection from the program.
    """
    @functools.partial(jax.jit, static_argnums=0, compiler_options=compiler_options)
    def jitted(graphdef, state, inputs, rows, seed):
        model = nnx.merge(graphdef, state)
        model.eval()  # dropout off, also for a model handed over in training mode
        keys = region_keys(seed, rows["sample_index"], rows["clip_index"])
        out = model(**inputs, region_key=keys)
        result = {"mask_logits": out.mask_logits, "class_logits": out.class_logits}
        if with_lm_loss:
            logits = out.text_logits[:, :-1].astype(jnp.float32)
            targets = rows["labels"][:, 1:]
            valid = targets != IGNORE_LABEL
            log_probs = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(log_probs, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
            result["lm_loss"] = -(picked * valid).sum() / jnp.maximum(valid.sum(), 1)
        return result

    def forward(model, inputs: dict, rows: dict, seed: int = 0) -> dict:
        graphdef, state = nnx.split(model)
        return jitted(graphdef, state, inputs, rows, jnp.asarray(seed, jnp.uint32))

    forward.programs = jitted._cache_size  # compiled programs so far (to check nothing recompiles)
    return forward


def row_inputs(batch: dict, mesh, with_labels: bool = False) -> dict:
    """The per-row arrays the forward needs besides the model's inputs (placed like the batch)."""
    size = batch["input_ids"].shape[0]
    # Padding rows (-1) and training batches (no sample_index) draw with index 0.
    rows = {k: np.maximum(np.asarray(batch.get(k, np.zeros(size))), 0).astype(np.int32) for k in ROW_KEYS}
    if with_labels:
        rows["labels"] = np.asarray(batch["labels"])
    return to_devices(rows, mesh)


def oracle_outputs(batch: dict, logit: float = ORACLE_LOGIT) -> dict:
    """The batch's targets in the model's output format: one query per target slot, its mask
    logits +/- `logit` from `gt_masks`, its class logits +`logit` for its condition and -`logit`
    elsewhere (padded target slots: background). Post-processing and metrics then see exactly
    the ground truth on the S/4 grid."""
    gt_masks = np.asarray(batch["gt_masks"], bool)                  # [B, T, N, g, g]
    gt_classes = np.asarray(batch["gt_classes"])                    # [B, N], -1 = padding
    num_conditions = batch["cond_valid"].shape[1]
    batch_size, frames, num_targets = gt_masks.shape[:3]
    mask_logits = np.where(gt_masks, logit, -logit).astype(np.float32)
    classes = np.full((batch_size, num_targets, num_conditions + 1), -logit, np.float32)
    rows, slots = np.nonzero(gt_classes >= 0)
    classes[rows, slots, gt_classes[rows, slots]] = logit
    classes[gt_classes < 0, -1] = logit
    class_logits = np.broadcast_to(classes[:, None], (batch_size, frames) + classes.shape[1:]).copy()
    return {"mask_logits": mask_logits, "class_logits": class_logits}


# ------------------------------------------------------------------------------------ generation
def prompt_lengths(batch: dict) -> np.ndarray:
    """Tokens before each row's first answer token (the generation prompt, which ends with
    "<|im_start|>assistant\\n"); 0 for padding rows."""
    answer = np.asarray(batch["labels"]) != IGNORE_LABEL
    lengths = np.where(answer.any(1), answer.argmax(1), np.asarray(batch["attention_mask"]).sum(1))
    return np.where(np.asarray(batch["sample_valid"]), lengths, 0).astype(np.int32)


def generate_answers(model, batch: dict, *, max_new_tokens: int, stop_token_ids, pad_token_id: int):
    """Greedy answers of the LLM to each row's prompt (x2sam_jax.generate: jitted prefill and
    decode loop, one program per batch shape): (tokens [B, max_new_tokens], lengths [B])."""
    # generate's nnx.jit writes its output state back into the module it gets: hand it a clone
    # (new Variables, same arrays) so the model keeps its parameter shardings, hence its programs.
    vlm = nnx.clone(model.vlm)
    lengths = prompt_lengths(batch)
    width = batch["input_ids"].shape[1]
    ids = np.where(np.arange(width)[None] < lengths[:, None], batch["input_ids"], pad_token_id).astype(np.int32)
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
    mask[lengths == 0, 0] = 1                       # padding rows: one pad token (generate needs one)
    # The ViT packs the images of all rows: each valid row's patch rows and grid rows, in order.
    valid = np.asarray(batch["sample_valid"])
    pixels = np.concatenate([batch["pixel_values"][b][batch["pixel_valid"][b]] for b in np.flatnonzero(valid)])
    grids = np.concatenate([g[g.prod(-1) > 0] for g in batch["grid_thw"][valid]])
    out = generate(vlm, ids, mask, pixel_values=pixels, image_grid_thw=grids, max_new_tokens=max_new_tokens,
                   stop_token_ids=tuple(stop_token_ids), pad_token_id=pad_token_id)
    return np.asarray(out.tokens), np.asarray(out.lengths)


def _spans(ids: np.ndarray, p_start: int, p_end: int) -> list[tuple[int, int]]:
    """Well-formed <p>..</p> pairs of generated text (a stray </p> is ignored, a <p> reopened)."""
    spans, open_at = [], None
    for position, token in enumerate(ids.tolist()):
        if token == p_start:
            open_at = position
        elif token == p_end and open_at is not None:
            spans.append((open_at, position))
            open_at = None
    return spans


def with_answers(batch: dict, tokens: np.ndarray, lengths: np.ndarray, special_ids) -> dict:
    """The batch with each row's answer replaced by a generated one (prompt + answer tokens), its
    condition spans and <SEG> positions found again in the new text; shapes are kept (conditions
    or <SEG> tokens past the batch's buckets are dropped, so is an answer that does not fit)."""
    out = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in batch.items()}
    width, conditions, segs = batch["input_ids"].shape[1], batch["cond_valid"].shape[1], batch["seg_valid"].shape[1]
    starts = prompt_lengths(batch)
    for key in ("labels", "cond_spans", "cond_valid", "seg_positions", "seg_valid"):
        out[key][:] = IGNORE_LABEL if key == "labels" else 0
    for b in np.flatnonzero(batch["sample_valid"]):
        start = int(starts[b])
        answer = tokens[b, : min(int(lengths[b]), width - start)]
        out["input_ids"][b, start:] = special_ids.pad
        out["input_ids"][b, start:start + len(answer)] = answer
        out["labels"][b, start:start + len(answer)] = answer
        out["attention_mask"][b] = np.arange(width) < start + len(answer)
        row = out["input_ids"][b, : start + len(answer)]
        spans = [s for s in _spans(row, special_ids.p_start, special_ids.p_end) if s[0] >= start][:conditions]
        seg = np.flatnonzero(row == special_ids.seg)[:segs]
        out["cond_spans"][b, : len(spans)] = np.asarray(spans, np.int32).reshape(-1, 2)
        out["cond_valid"][b, : len(spans)] = True
        out["seg_positions"][b, : len(seg)] = seg
        out["seg_valid"][b, : len(seg)] = True
    return out
