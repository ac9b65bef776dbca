"""Test-wide settings: CPU, float32 matmuls at full precision (parity tests compare to torch)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import x2sam_jax  # noqa: E402,F401  (sets the flax config the models rely on)

# The files that compile the whole model several times, longest first (seconds on a quiet 2-core
# machine, from `--durations`). scripts/test.sh hands files to its two workers in collection order
# (--dist loadfile --no-loadscope-reorder): the long ones start first, so neither worker is left
# alone with a long file at the end.
LONGEST_FILES = ("test_train_step.py", "test_configs.py", "test_x2sam.py", "test_train_loop.py", "test_eval.py",
                 "test_train_scale.py", "test_readme.py", "test_predict.py", "test_eval_submissions.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))   # stable: the rest keep their order
