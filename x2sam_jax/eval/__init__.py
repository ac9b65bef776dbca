"""Evaluation of X2SAM: inference (teacher-forced, jitted, sharded), per-task post-processing,
metrics that match the official evaluation code, overlays.

    from x2sam_jax.eval import evaluate
    results = evaluate(model, tokenizer, config.eval, mesh=mesh, output_dir="out")  # {dataset: {metric: value}}

Modules: `inference` (forward, oracle), `postprocess` (per task), `tasks` (per-task evaluators),
`metrics/` (usable on their own), `evaluator` (`evaluate`), `visualize` (overlays).
"""


def evaluate(model, tokenizer, eval_config, *, mesh, output_dir=None, visualize: int = 0, step=None, **kwargs):
    """See `x2sam_jax.eval.evaluator.evaluate` (imported lazily: light for `predict` and the
    training loop, which import this package)."""
    from x2sam_jax.eval.evaluator import evaluate as run

    return run(model, tokenizer, eval_config, mesh=mesh, output_dir=output_dir, visualize=visualize, step=step,
               **kwargs)


__all__ = ["evaluate"]
