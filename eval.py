"""Evaluate an X2SAM checkpoint on the datasets of a run config.

    python eval.py --config configs/x2sam_tiny_synthetic.py --checkpoint DIR --output OUT \\
        [--tasks coco_panoptic,refcoco] [--visualize N] [--oracle] [--headline] [--config.eval.batch_size=1]
        [--template-seeds N] [--per-sample]

DIR is a training workdir (it holds checkpoints/ and tokenizer/: the latest complete step is
restored) or a model directory written by x2sam_jax.save / a converter (config.json + params/,
the tokenizer at its top level or in tokenizer/). OUT receives results.json ({"results":
{dataset: {metric: value}}, "protocol": version, checkpoint step and checksum, templates and frame
sampling per dataset, "template_seeds", "timing": samples/s}), results.md (the metrics as a
table, failed samples beside them) and, with --visualize N, overlays of the first N samples of
each dataset (PNG per image, GIF per clip) in OUT/overlays/. --template-seeds N evaluates the
referring / reasoning / GCG datasets under N template draws (mean ± std); --per-sample writes
OUT/per_sample/<dataset>.jsonl (sample id, prompt, scores per line). --oracle scores the
ground truth itself (no checkpoint needed): a check of the data, post-processing and metrics.
--tasks keeps datasets by name or task (e.g. vref_seg). --headline prints the main job's headline
metrics (one per line, HEADLINE) instead of results.md. Synthetic data (a config with a
`data.synthetic` section) is generated first when `data_root` holds none.

Multi-host: as train.py, start the same command on every host with
--config.distributed.coordinator_address=HOST:PORT --config.distributed.num_processes=N
--config.distributed.process_id=I (or the JAX_* environment, or --config.distributed.auto=True);
each process evaluates its share of every batch, process 0 writes OUT and prints the table.
"""

from __future__ import annotations

import logging
import math
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from x2sam_jax.cli import cli_errors
from x2sam_jax.data import synthetic
from x2sam_jax.data.tokenizer import build_tiny_tokenizer
from x2sam_jax.distributed import absolute_path, barrier, initialize_distributed
from x2sam_jax.eval.evaluator import evaluate
from x2sam_jax.eval.inference import checkpoint_info, load_model_and_tokenizer
from x2sam_jax.runs import build_model_config
from x2sam_jax.sharding import make_mesh

_CONFIG = config_flags.DEFINE_config_file("config", None, "run config file (configs/*.py)", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "training workdir or model directory")
_OUTPUT = flags.DEFINE_string("output", None, "output directory (results.json, results.md, overlays/)")
_TASKS = flags.DEFINE_list("tasks", [], "datasets (names or tasks) to evaluate; default all")
_VISUALIZE = flags.DEFINE_integer("visualize", 0, "overlays of the first N samples of each dataset")
_ORACLE = flags.DEFINE_bool("oracle", False, "score the ground truth fed back as predictions")
_TEMPLATE_SEEDS = flags.DEFINE_integer("template-seeds", 1, "evaluate referring / reasoning / GCG samples under "
                                       "this many template draws (seeds 0..N-1 at eval.seed 0); mean ± std")
_PER_SAMPLE = flags.DEFINE_bool("per-sample", False, "write OUT/per_sample/<dataset>.jsonl: one line per sample "
                                "(id, prompt, scores)")
_HEADLINE = flags.DEFINE_bool("headline", False, "print the headline table (one metric per line) instead of "
                              "results.md")

# The headline numbers of the synthetic main job: (dataset, metric, what it measures).
HEADLINE = (("coco_panoptic", "PQ", "image generic"), ("coco_panoptic", "mIoU", "image generic"),
            ("refcoco", "cIoU", "image referring"), ("refcoco", "gIoU", "image referring"),
            ("coco_vgd", "AP", "image VGD"), ("ref_ytvos", "J&F", "video referring"),
            ("ytvos", "J&F", "video object"))

logger = logging.getLogger("x2sam_jax.eval")


def load_checkpoint(path: str, mesh, step: int | None = None):
    """(model, tokenizer) from a training workdir (at `step`, default its latest) or a model
    directory (``x2sam_jax.eval.inference.load_model_and_tokenizer``)."""
    return load_model_and_tokenizer(path, mesh, step=step)


def ensure_synthetic_data(config) -> None:
    """Writes the synthetic dataset of a run config (``data.synthetic``: the generator's
    arguments) to ``data_root`` when it is missing, as train.py does."""
    synth = config.get("data", {}).get("synthetic")
    if not synth or not config.get("data_root"):
        return
    if jax.process_index() == 0:   # one writer; the other processes wait for it
        if not os.path.exists(os.path.join(config.data_root, "synthetic.json")):
            logger.info("writing the synthetic dataset to %s", config.data_root)
        synthetic.ensure(config.data_root, **synthetic.generate_kwargs(synth))
    barrier("synthetic data")


@cli_errors
def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    config = _CONFIG.value
    if config is None or "eval" not in config:
        raise app.UsageError("--config must name a run config with an `eval` section")
    if _OUTPUT.value is None:
        raise app.UsageError("--output is required")
    if _CHECKPOINT.value is None and not _ORACLE.value:
        raise app.UsageError("--checkpoint is required (or --oracle)")
    if _TEMPLATE_SEEDS.value < 1:
        raise app.UsageError(f"--template-seeds must be at least 1 (got {_TEMPLATE_SEEDS.value})")

    initialize_distributed(config)        # before anything touches a device, as train.py
    output = absolute_path(_OUTPUT.value)   # gs://bucket/out stays a gs:// path
    ensure_synthetic_data(config)
    mesh = make_mesh(**config.mesh.to_dict()) if "mesh" in config else make_mesh(data=1, fsdp=-1)
    eval_config = config.eval.to_dict()
    checkpoint = None
    if _CHECKPOINT.value is not None:
        checkpoint = checkpoint_info(_CHECKPOINT.value)   # the step restored below, and its checksum
        workdir_step = checkpoint["step"] if checkpoint["kind"] == "training workdir" else None
        model, tokenizer = load_checkpoint(_CHECKPOINT.value, mesh, step=workdir_step)
    else:                                               # oracle: sizes from the config's model
        model, tokenizer = None, build_tiny_tokenizer()
        model_config = build_model_config(config, tokenizer)
        eval_config.update(sam_size=model_config.mask_encoder.image_size, region_tokens=model_config.region_tokens)
    results = evaluate(model, tokenizer, eval_config, mesh=mesh, output_dir=output, visualize=_VISUALIZE.value,
                       datasets=_TASKS.value or None, oracle=_ORACLE.value, step=(checkpoint or {}).get("step"),
                       template_seeds=_TEMPLATE_SEEDS.value, per_sample=_PER_SAMPLE.value, checkpoint=checkpoint)
    if jax.process_index() != 0:          # process 0 wrote OUT
        return 0
    if _HEADLINE.value:
        print(headline_table(results))
    else:
        print((output / "results.md").read_text(), end="")
    return 0


def headline_table(results: dict) -> str:
    """The HEADLINE metrics present in ``results`` ({dataset: {metric: value}}), in percent."""
    lines = ["| task | dataset | metric | value |", "|---|---|---|---|"]
    for dataset, metric, task in HEADLINE:
        if metric in results.get(dataset, {}):
            value = results[dataset][metric]
            # None (results.json) or NaN (in memory): undefined, e.g. pycocotools' -1 (no ground truth)
            undefined = value is None or (isinstance(value, float) and math.isnan(value))
            shown = "n/a" if undefined else f"{100 * value:.1f}"
            lines.append(f"| {task} | {dataset} | {metric} | {shown} |")
    return "\n".join(lines)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, argv=sys.argv)
