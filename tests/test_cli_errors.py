"""train.py / eval.py command lines: a misspelled --config field ends in one line naming it and
the closest existing name (exit code 2, before anything is built); eval.py reads the datasets
under the data root given, or under the one a training workdir's run used, and otherwise stops
and names the flag (before: it silently wrote a second synthetic dataset into ./data/synthetic)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "x2sam_tiny_synthetic.py")


def _eval_cli():
    sys.path.insert(0, str(REPO))
    try:
        import eval as eval_cli   # eval.py, as test_eval.py imports it (one module, one set of flags)
    finally:
        sys.path.remove(str(REPO))
    return eval_cli


def test_a_misspelled_config_field_names_the_closest_one(capsys):
    from absl import flags
    from ml_collections import config_flags

    from x2sam_jax.cli import parse_flags

    flag_values = flags.FlagValues()           # not the process's flags: other tests parse those
    config_flags.DEFINE_config_file("config", None, "run config", flag_values=flag_values, lock_config=True)
    # (a value of the wrong type is absl's own one-line error; it needs the process's flags)
    for override, message in [
        ("--config.eval.batchsize=1", "--config.eval.batchsize: the run config has no field eval.batchsize; "
                                      "did you mean eval.batch_size?"),
        ("--config.evall.batch_size=1", "no field evall; did you mean eval?"),
        ("--config.eval.buckets.seq_length=(512,)", "did you mean eval.buckets.seq_lengths?"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            parse_flags(["eval.py", "--config", TINY, override], flag_values)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err, err


def test_train_eval_and_predict_fail_in_one_line_before_any_work(tmp_path):
    """As commands, from a fresh directory, side by side: train.py with a misspelled field, eval.py
    --oracle without a data root (nothing written under ./data), x2sam_jax.predict on a text file."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    inputs = tmp_path.parent / f"{tmp_path.name}_inputs"
    inputs.mkdir()
    (inputs / "notes.txt").write_text("not an image")
    commands = [
        ([REPO / "train.py", "--config", TINY, "--workdir", tmp_path / "run", "--config.eval.batchsize=1"],
         2, "did you mean eval.batch_size?"),
        ([REPO / "eval.py", "--config", TINY, "--oracle", "--output", tmp_path / "out"],
         2, "which datasets? pass --config.data_root=DIR"),
        (["-m", "x2sam_jax.predict", "--checkpoint", inputs, "--image", inputs / "notes.txt", "--prompt", "x",
          "--out", tmp_path / "out"], 1, "notes.txt is neither an image nor a video"),
    ]
    running = [subprocess.Popen([sys.executable, *map(str, argv)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for argv, _, _ in commands]
    for process, (_, code, message) in zip(running, commands):
        out, err = process.communicate(timeout=300)
        assert process.returncode == code and err.startswith("error: ") and err.count("\n") == 1, err[-2000:]
        assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []          # no data/, run/ or out*


def test_eval_reads_the_data_root_of_the_workdirs_run(tmp_path):
    from absl.app import UsageError

    eval_cli = _eval_cli()
    sys.path.insert(0, str(REPO))
    try:
        from _config_files import config_module
    finally:
        sys.path.remove(str(REPO))
    workdir, data = tmp_path / "runs" / "main", tmp_path / "runs" / "main" / "data"
    (workdir / "checkpoints").mkdir(parents=True)
    data.mkdir()
    (workdir / "config.json").write_text(json.dumps({"data_root": str(data), "eval": {"data_root": str(data)}}))

    config = config_module("x2sam_tiny_synthetic").get_config()
    assert eval_cli.resolve_data_root(config, str(workdir), {}) == str(workdir / "config.json")
    # the run config's references follow: the evaluation and the synthetic generator read it
    assert config.eval.data_root == config.data_root == config.data.synthetic.root == str(data)

    config = config_module("x2sam_tiny_synthetic").get_config()
    assert eval_cli.resolve_data_root(config, str(workdir), {"data_root": "elsewhere"}) is None   # given: as given
    assert config.eval.data_root == "data/synthetic"

    data.rmdir()
    with pytest.raises(FileNotFoundError, match=f"{data}, the data root of the run in .*pass --config.data_root=DIR"):
        eval_cli.resolve_data_root(config, str(workdir), {})
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "x2sam", "config": {}}))
    for checkpoint in (str(model_dir), None):   # a model directory, --oracle: nothing says which data
        with pytest.raises(UsageError, match="which datasets. pass --config.data_root=DIR"):
            eval_cli.resolve_data_root(config, checkpoint, {})
    stage3 = config_module("x2sam_4b_stage3").get_config()
    with pytest.raises(UsageError, match="pass --config.data.root=DIR"):
        eval_cli.resolve_data_root(stage3, None, {"model.preset": "tiny"})
    assert eval_cli.resolve_data_root(stage3, None, {"data.root": "datas"}) is None
