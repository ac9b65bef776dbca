"""Evaluation of X2SAM: inference (teacher-forced, jitted, sharded), per-task post-processing,
metrics that match the official evaluation code, overlays.

    from x2sam_jax.eval import evaluate
    results = evaluate(model, tokenizer, config.eval, mesh=mesh, output_dir="out")  # {dataset: {metric: value}}

Modules: `inference` (forward, oracle), `postprocess` (per task), `tasks` (per-task evaluators),
`metrics/` (usable on their own), `evaluator` (`evaluate`; `from_run_config`, the training loop's
evaluation, which train.py hands to the loop), `visualize` (overlays).
"""

from x2sam_jax.eval.evaluator import evaluate, from_run_config

__all__ = ["evaluate", "from_run_config"]
