"""Evaluate an X2SAM checkpoint on the datasets of a run config.

    python eval.py --config configs/x2sam_tiny_synthetic.py --checkpoint DIR --output OUT \\
        [--tasks coco_panoptic,refcoco] [--visualize N] [--oracle] [--config.eval.batch_size=1]

DIR is a training workdir (it holds checkpoints/ and tokenizer/: the latest complete step is
restored) or a model directory written by x2sam_jax.save / a converter (config.json + params/,
the tokenizer at its top level or in tokenizer/). OUT receives results.json ({dataset: {metric:
value}}), results.md (the same as a table) and, with --visualize N, overlays of the first N
samples of each dataset (PNG per image, GIF per clip) in OUT/overlays/. --oracle scores the
ground truth itself (no checkpoint needed): a check of the data, post-processing and metrics.
--tasks keeps datasets by name or task (e.g. vref_seg). Synthetic data (a config with a
`data.synthetic` section) is generated first when `data_root` does not exist.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from x2sam_jax.cli import cli_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "run config file (configs/*.py)", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "training workdir or model directory")
_OUTPUT = flags.DEFINE_string("output", None, "output directory (results.json, results.md, overlays/)")
_TASKS = flags.DEFINE_list("tasks", [], "datasets (names or tasks) to evaluate; default all")
_VISUALIZE = flags.DEFINE_integer("visualize", 0, "overlays of the first N samples of each dataset")
_ORACLE = flags.DEFINE_bool("oracle", False, "score the ground truth fed back as predictions")

logger = logging.getLogger("x2sam_jax.eval")


def load_checkpoint(path: str, mesh):
    """(model, tokenizer) from a training workdir or a model directory."""
    import x2sam_jax
    from x2sam_jax.data.tokenizer import load_tokenizer

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"--checkpoint {path} is not a directory")
    if (directory / "checkpoints").is_dir():           # a training workdir
        from x2sam_jax.train.checkpointing import restore_model  # written by the training loop

        model = restore_model(str(directory), step=None, mesh=mesh)
        tokenizer_dir = directory / "tokenizer"
    else:
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"--checkpoint {path} holds neither checkpoints/ (a training workdir) nor "
                                    "config.json (a model directory)")
        model = x2sam_jax.load(directory, mesh=mesh)
        tokenizer_dir = directory / "tokenizer" if (directory / "tokenizer").is_dir() else directory
    return model, load_tokenizer(str(tokenizer_dir))


def ensure_synthetic_data(config) -> None:
    """Writes the synthetic dataset of a run config (``data.synthetic``: the generator's
    arguments) to ``data_root`` when it is missing, as train.py does."""
    synth = config.get("data", {}).get("synthetic")
    if not synth or not config.get("data_root") or os.path.exists(config.data_root):
        return
    from x2sam_jax.data import synthetic

    size = synth.size
    if isinstance(size, (list, tuple)) and len(size) == 1:   # --config.data.synthetic.size=32 gives (32,)
        size = int(size[0])
    logger.info("writing the synthetic dataset to %s", config.data_root)
    synthetic.generate(config.data_root, num_images=synth.num_images, num_videos=synth.num_videos,
                       frames=synth.frames, size=size if isinstance(size, int) else tuple(size), seed=synth.seed)


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

    from x2sam_jax.eval import evaluate
    from x2sam_jax.sharding import make_mesh

    ensure_synthetic_data(config)
    mesh = make_mesh(**config.mesh.to_dict()) if "mesh" in config else make_mesh(data=1, fsdp=-1)
    eval_config = config.eval.to_dict()
    if _CHECKPOINT.value is not None:
        model, tokenizer = load_checkpoint(_CHECKPOINT.value, mesh)
    else:                                               # oracle: sizes from the config's preset
        from x2sam_jax.config import x2sam_preset
        from x2sam_jax.data.tokenizer import build_tiny_tokenizer

        preset = x2sam_preset(config.model.preset)
        model, tokenizer = None, build_tiny_tokenizer()
        eval_config.update(sam_size=preset.mask_encoder.image_size, region_tokens=preset.region_tokens)
    results = evaluate(model, tokenizer, eval_config, mesh=mesh, output_dir=_OUTPUT.value,
                       visualize=_VISUALIZE.value, datasets=_TASKS.value or None, oracle=_ORACLE.value)
    del results  # written to OUT (results.json, results.md)
    print((Path(_OUTPUT.value) / "results.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, argv=sys.argv)
