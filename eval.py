"""Evaluate an X2SAM checkpoint on the datasets of a run config.

    python eval.py --config configs/x2sam_tiny_synthetic.py --checkpoint DIR --output OUT \\
        [--tasks coco_panoptic,refcoco] [--visualize N] [--oracle] [--headline] [--config.eval.batch_size=1]
        [--template-seeds N] [--per-sample] [--phrase-encoder BERT_DIR]

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
--phrase-encoder BERT_DIR (config.eval.phrase_encoder) is a local copy of bert-base-uncased: the GCG
recall compares phrases as GLaMM does (without it, by a bag-of-words stand-in; results.json says
which).
--tasks keeps datasets by name or task (e.g. vref_seg). --headline prints the main job's headline
metrics (one per line, HEADLINE) instead of results.md.

The datasets are read under the data root given on the command line (--config.data_root=DIR, or
--config.data.root=DIR for the 4B configs); without it, a training workdir's run says (the data
root in DIR/config.json, which the log names); for anything else eval.py stops and asks for the
flag. Synthetic data (a config with a `data.synthetic` section) is generated first when a data
root given on the command line holds none.

Multi-host: as train.py, start the same command on every host with
--config.distributed.coordinator_address=HOST:PORT --config.distributed.num_processes=N
--config.distributed.process_id=I (or the JAX_* environment, or --config.distributed.auto=True);
each process evaluates its share of every batch, process 0 writes OUT and prints the table.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from x2sam_jax.cli import cli_errors, parse_flags
from x2sam_jax.data import synthetic
from x2sam_jax.data.tokenizer import build_tiny_tokenizer
from x2sam_jax.distributed import absolute_path, barrier, initialize_distributed
from x2sam_jax.eval.evaluator import evaluate
from x2sam_jax.eval.inference import checkpoint_info, load_model_and_tokenizer
from x2sam_jax.model_checkpoint import is_training_workdir
from x2sam_jax.runs import build_model_config
from x2sam_jax.sharding import make_mesh

_CONFIG = config_flags.DEFINE_config_file("config", None, "run config file (configs/*.py)", lock_config=True)
_CONFIG_FLAG = flags.FLAGS["config"]
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "training workdir or model directory")
_OUTPUT = flags.DEFINE_string("output", None, "output directory (results.json, results.md, overlays/)")
_TASKS = flags.DEFINE_list("tasks", [], "datasets (names or tasks) to evaluate; default all")
_VISUALIZE = flags.DEFINE_integer("visualize", 0, "overlays of the first N samples of each dataset")
_ORACLE = flags.DEFINE_bool("oracle", False, "score the ground truth fed back as predictions")
_TEMPLATE_SEEDS = flags.DEFINE_integer("template-seeds", 1, "evaluate referring / reasoning / GCG samples under "
                                       "this many template draws (seeds 0..N-1 at eval.seed 0); mean ± std")
_PER_SAMPLE = flags.DEFINE_bool("per-sample", False, "write OUT/per_sample/<dataset>.jsonl: one line per sample "
                                "(id, prompt, scores)")
_PHRASE_ENCODER = flags.DEFINE_string("phrase-encoder", None, "directory of a BERT (bert-base-uncased) for the GCG "
                                      "recall's phrase similarity, as GLaMM (sets config.eval.phrase_encoder)")
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


# The overrides that choose where the evaluation reads its datasets (config.eval.data_root
# refers to data_root in the tiny config, to data.root in the 4B ones).
DATA_ROOT_FIELDS = ("data_root", "data.root", "eval.data_root")


def data_root_flag(config) -> str:
    """The flag that sets this config's data root."""
    if "data_root" in config:
        return "--config.data_root=DIR"
    return "--config.data.root=DIR" if "root" in config.get("data", {}) else "--config.eval.data_root=DIR"


def resolve_data_root(config, checkpoint: str | None, overrides) -> str | None:
    """Sets ``config.eval.data_root`` to where the evaluation reads its datasets and returns where
    it came from (None: the command line). Given on the command line (any of DATA_ROOT_FIELDS), it
    is used as given; else a training workdir's run says (the data root saved in its config.json,
    which must exist here). Never the config file's default: that would evaluate, or silently
    generate, a dataset the checkpoint was not trained beside."""
    if set(overrides) & set(DATA_ROOT_FIELDS):
        return None
    run_config = absolute_path(checkpoint) / "config.json" if checkpoint else None
    if checkpoint is None or not is_training_workdir(checkpoint) or not run_config.is_file():
        raise app.UsageError(f"which datasets? pass {data_root_flag(config)} (the root of the config's datasets; "
                             "for a training workdir, the one its run used is read from its config.json)")
    root = json.loads(run_config.read_text()).get("eval", {}).get("data_root")
    if not root:
        raise app.UsageError(f"{run_config} names no eval.data_root: pass {data_root_flag(config)}")
    if not absolute_path(root).exists():
        raise FileNotFoundError(f"{root}, the data root of the run in {checkpoint} ({run_config}), does not exist "
                                f"here: pass {data_root_flag(config)}")
    config.eval.data_root = root      # a reference in the run configs: data_root / data.root follow
    return str(run_config)


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

    source = resolve_data_root(config, _CHECKPOINT.value, config_flags.get_override_values(_CONFIG_FLAG))
    initialize_distributed(config)        # before anything touches a device, as train.py
    if source is not None:
        logger.info("reading the datasets under %s, the data root of the checkpoint's run (%s; %s for another)",
                    config.eval.data_root, source, data_root_flag(config))
    output = absolute_path(_OUTPUT.value)   # gs://bucket/out stays a gs:// path
    if source is None:                      # a run's data root holds what it trained on: nothing to write
        ensure_synthetic_data(config)
    mesh = make_mesh(**config.mesh.to_dict()) if "mesh" in config else make_mesh(data=1, fsdp=-1)
    eval_config = config.eval.to_dict()
    if _PHRASE_ENCODER.value is not None:
        eval_config["phrase_encoder"] = _PHRASE_ENCODER.value
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
    app.run(main, argv=sys.argv, flags_parser=parse_flags)
