"""Every shipped config runs: each file in configs/ builds its full data plan from the miniature
datasets (or, for the tiny config, the synthetic ones) and takes two optimizer steps with the model
made small; the real-recipe configs carry none of the tiny config's settings; the recipe's global
batch takes the same steps over the same samples on 1, 2, 4 and 8 devices."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _config_files import config_module

from x2sam_jax.data import miniature
from x2sam_jax.train import losses

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = ("x2sam_tiny_synthetic", "x2sam_4b_stage1", "x2sam_4b_stage3")
BASES = ("x2sam_4b_base",)          # shared settings, not runs of their own
RECIPE = ("x2sam_4b_stage1", "x2sam_4b_stage3")

# What "the model made small" means for the real configs: the tiny preset (its tokenizer for
# stage 3), a global batch a CPU takes in seconds and loss points for its mask grid; everything
# else is the shipped config's.
SMALL = ("--config.model.preset=tiny", "--config.data.global_batch_images=2", "--config.data.global_batch_clips=1",
         "--config.data.num_workers=0", "--config.fast_compile=True", "--config.max_programs=0",
         "--config.loss.num_points=1024")   # one point per pixel of the tiny 32x32 mask grid
SMALL_STAGE1 = tuple(o for o in SMALL if "global_batch_clips" not in o)     # stage 1 reads no clips
SMALL_BY_CONFIG = {
    "x2sam_4b_stage1": SMALL_STAGE1,
    "x2sam_4b_stage3": SMALL + ("--config.model.tokenizer=tiny", "--config.eval_every=0"),
}
# Stage 3's first two steps under seed 30 read LISA and RefCOCO: two image batches of one program,
# one compile (~70 s here) where the config's seed 0 reads an image then a video batch (two
# compiles, the video one ~150 s). The image-then-video run is the slow test below.
STAGE3_ONE_PROGRAM = ("--config.seed=30",)


def _env(cache: Path, devices: int = 1) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _train(name, workdir, env, *overrides) -> tuple[dict, dict]:
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / f'{name}.py'}",
           f"--workdir={workdir}", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        metrics[record["step"]] = record
    return summary, metrics


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """The miniature datasets, 8 images per image dataset (a global batch of 8 distinct images)."""
    return miniature.write_miniature(str(tmp_path_factory.mktemp("mini") / "datas"), images_per_dataset=8)


def test_every_config_file_is_a_tested_run_or_a_base():
    names = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")
    assert names == sorted(RUN_CONFIGS + BASES)
    for name in RUN_CONFIGS:
        doc = config_module(name).__doc__
        assert "python train.py --config configs/" in doc and "reach" in doc, name


@pytest.mark.parametrize("name", RECIPE)
def test_recipe_configs_carry_no_setting_of_the_tiny_config(name):
    """The recipe's numbers, and nothing the toy config tuned: no synthetic data, no hand-set
    repeat factors, no loss X2SAM does not have, no synthetic evaluation."""
    from x2sam_jax.runs import build_model_config

    config = config_module(name).get_config()
    assert "synthetic" not in config.data and not config.get("data_root")
    assert not dict(config.data.repeats) and config.data.repeat_threshold == 0.1
    assert losses.LossConfig(**config.loss) == losses.LossConfig()          # X2SAM's losses, unchanged
    assert losses.LossConfig().pairwise_class_weight == 0 and losses.LossConfig().num_points == 12544
    assert config.data.global_batch_images == 128
    assert config.optimizer.lr == 1e-4 and config.optimizer.weight_decay == 0.05
    assert dict(config.optimizer.lr_multipliers)["segmentor.encoder"] == 0.1
    assert config.optimizer.grad_clip == (0.01 if name.endswith("stage1") else 1.0)
    model = build_model_config(config, None)
    assert model.mask_encoder.image_size == 1024 and model.mask_decoder.num_queries == 200
    assert model.vlm.text.dtype == "bfloat16" and model.mask_encoder.remat_policy == "full"
    assert model.vlm.text.remat_policy == "save_attention"        # the preset's per-stack policies
    if name.endswith("stage3"):
        assert config.data.global_batch_clips == 128 and config.model.shared_negatives
        datasets = config.eval.datasets
        assert config.eval.data_root == config.data.root
        assert all("synthetic" not in json.dumps(d.to_dict()) for d in datasets.values())
        # The rows of the paper's Table 6; V-GCG is the mean of VideoGLaMM's three evaluation sets.
        for row in ("coco_panoptic", "ade20k_panoptic", "refcoco_val", "refcocop_val", "refcocog_val",
                    "reasonseg_val", "grandf_gcg_val", "coco_interactive_point", "coco_vgd_box", "vipseg", "vspw",
                    "ytvis19", "ytvis21", "ref_ytvos", "ref_davis17", "revos", "ytvos19", "ytvis19_vgd",
                    "vipseg_vgd", "video_gcg_test", "mevis_gcg_val", "vidstg_gcg_val"):
            assert row in datasets, row
        assert set(config.eval_tasks) <= set(datasets)
        vgcg = tuple(config.eval.averages.vgcg_mean)
        assert vgcg == ("video_gcg_test", "mevis_gcg_val", "vidstg_gcg_val")
        for name in vgcg:   # 16-frame clips over the whole video, a frames bucket that holds them
            assert datasets[name].source.type in ("video_gcg", "mevis_gcg", "vidstg_gcg")
            assert datasets[name].feature.clip_len == 16 in config.eval.buckets.frames
        # The chat tables: answers of at most 16 greedy tokens; 64 frames of each video.
        for row in ("mme", "mmbench", "seed_bench", "pope", "ai2d"):
            assert datasets[row].source.type == row and datasets[row].max_new_tokens == 16, row
        for row in ("videomme", "mvbench", "mlvu", "longvideobench"):
            assert datasets[row].source.type == row and datasets[row].source.num_frames == 64, row
            assert datasets[row].max_new_tokens == 16, row


def test_the_tiny_config_keeps_its_own_settings():
    config = config_module("x2sam_tiny_synthetic").get_config()
    assert config.model.preset == "tiny" and config.loss.pairwise_class_weight == 2.0
    assert "segmentor.encoder" not in dict(config.optimizer.lr_multipliers)   # trains its SAM from scratch


@pytest.mark.parametrize("name", RUN_CONFIGS + BASES)
def test_loss_and_evaluation_come_from_the_run_config(name):
    """The loss section is LossConfig's fields (the file only overrides); shared_negatives is a
    model setting, and the old place is an error that says where it went; the loop's evaluation
    is built from the config (none when eval_every is 0)."""
    from x2sam_jax.eval.evaluator import from_run_config
    from x2sam_jax.train.loop import build_loss_config

    config = config_module(name).get_config()
    assert set(config.loss) == {f.name for f in dataclasses.fields(losses.LossConfig)}
    assert isinstance(build_loss_config(config), losses.LossConfig)
    assert isinstance(config.model.shared_negatives, bool)
    old = config_module(name).get_config()
    old.loss.shared_negatives = False
    with pytest.raises(ValueError, match="config.model.shared_negatives"):
        build_loss_config(old)
    assert (from_run_config(config) is None) == (not config.eval_every)
    config.eval_every = 0
    assert from_run_config(config) is None


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_config_builds_its_plan_and_takes_two_steps(name, mini, tmp_path):
    """The shipped config with the model made small: the whole mixture plan is built from the
    data (27 sources for stage 3), the compile plan is logged, two optimizer steps are taken."""
    if name == "x2sam_tiny_synthetic":
        overrides = (f"--config.data_root={tmp_path / 'synthetic'}", "--config.data.synthetic.num_images=8",
                     "--config.data.synthetic.num_videos=2", "--config.data.synthetic.frames=2",
                     "--config.eval_every=0", "--config.fast_compile=True", "--config.loss.num_points=256")
    else:
        overrides = SMALL_BY_CONFIG[name] + (f"--config.data.root={mini}",)
    if name == "x2sam_4b_stage3":
        overrides += STAGE3_ONE_PROGRAM
    summary, metrics = _train(name, tmp_path / "run", _env(tmp_path / "cache"), "--config.steps=2",
                              "--config.log_every=1", "--config.checkpoint_every=2", *overrides)
    assert summary["status"] == "finished" and summary["step"] == 2
    assert sorted(metrics) == [1, 2]
    for record in metrics.values():
        assert np.isfinite(record["loss"]) and np.isfinite(record["grad_norm"]) and record["data_source"]
        assert record["flops_per_step"] > 0 and 0 < record["mfu"] <= 1     # every scan of the step counted
    if name == "x2sam_4b_stage3":   # one program (STAGE3_ONE_PROGRAM): a changed plan needs another seed
        assert [metrics[step]["data_source"] for step in (1, 2)] == ["lisa", "refcoco"]
        assert summary["programs"] == 1
        # Its frozen base is stored in bfloat16 and restores so (eval.py's path).
        from flax import nnx

        from x2sam_jax.runs import restore_model

        model = restore_model(tmp_path / "run")
        kernel = nnx.state(model)["vlm"]["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
        assert str(kernel.get_value().dtype) == "bfloat16"


@pytest.mark.slow
def test_stage3_takes_an_image_step_and_a_video_step(mini, tmp_path):
    """The stage-3 config under its own seed: step 1 reads GranD-f (an image batch), step 2 VSPW
    (a clip): both programs compile and train."""
    _, metrics = _train("x2sam_4b_stage3", tmp_path / "run", _env(tmp_path / "cache"), "--config.steps=2",
                        "--config.log_every=1", "--config.checkpoint_every=0", *SMALL_BY_CONFIG["x2sam_4b_stage3"],
                        f"--config.data.root={mini}")
    assert [metrics[step]["data_source"] for step in (1, 2)] == ["grandf_gcg", "vspw"]
    assert all(np.isfinite(metrics[step]["loss"]) and np.isfinite(metrics[step]["grad_norm"]) for step in (1, 2))


@pytest.mark.slow
def test_global_batch_takes_the_same_steps_on_1_2_4_and_8_devices(tmp_path):
    """Stage 1 with a global batch of 8 images (at most 2 per device): 4 micro-steps on one
    device, 2 on two, 1 on four (2 per device) and eight (1 per device). Every run logs the same
    source and sample digest per step, and the same step-1 loss and gradient norm. The compute is
    float32 here: measured, float32 runs agree to the last bit of the loss and 1e-7 of the gradient
    norm on all four counts, while the config's bfloat16 rounds activations differently in each
    program (loss 1.3e-5, gradient norm 0.4 % apart between 1 and 2 devices). 16 images, so that
    the two steps read different halves."""
    mini = miniature.write_miniature(str(tmp_path / "datas"), images_per_dataset=16)
    runs = {}
    for devices in (1, 2, 4, 8):
        _, runs[devices] = _train("x2sam_4b_stage1", tmp_path / f"d{devices}", _env(tmp_path / "cache", devices),
                                  *SMALL_STAGE1, f"--config.data.root={mini}", "--config.data.global_batch_images=8",
                                  "--config.data.images_per_device=2", "--config.steps=2", "--config.log_every=1",
                                  "--config.checkpoint_every=0", "--config.model.compute_dtype=float32")
    reference = runs[1]
    assert sorted(reference) == [1, 2]
    for devices, metrics in runs.items():
        for step in (1, 2):
            assert metrics[step]["data_samples"] == reference[step]["data_samples"], (devices, step)
            assert metrics[step]["data_source"] == "sa1b"
        np.testing.assert_allclose(metrics[1]["loss"], reference[1]["loss"], rtol=1e-5, err_msg=str(devices))
        np.testing.assert_allclose(metrics[1]["grad_norm"], reference[1]["grad_norm"], rtol=1e-5,
                                   err_msg=str(devices))
        assert metrics[1]["num_masks"] == reference[1]["num_masks"]
    assert runs[1][1]["data_samples"] != runs[1][2]["data_samples"]          # two different batches


def test_stage3_compile_plan_is_bounded_and_enforced(mini):
    """The stage-3 bucket plan over its 27 sources at the recipe's batch: the untied buckets of
    the first 4B config could make 1320 programs, the tied ones make 30 (<= max_programs): 24 with
    the segmentor and 6 without (the chat sources' batches have no frames: LLaVA's and
    VideoChatGPT's micro-batches, 3 text buckets each); a limit below the plan stops the run before
    it compiles anything."""
    from x2sam_jax.data.batching import BucketConfig
    from x2sam_jax.data.mixture import MixturePlan
    from x2sam_jax.data.pipeline import materialize_source, source_info
    from x2sam_jax.train import compile_plan, loop

    config = config_module("x2sam_4b_stage3").get_config()
    config.data.root = mini
    specs, _ = loop.build_sources(config, None)
    infos = [source_info(materialize_source(spec), i) for i, spec in enumerate(specs)]
    plan = MixturePlan(infos, global_batch_images=128, images_per_device=4, clips_per_device=1,
                       video_accumulate_steps=4)
    shapes = compile_plan.program_shapes(plan, loop.bucket_config(config))
    assert len(shapes) == 30 <= config.max_programs
    chat = [s for s in shapes if dict(s.dims)["frames"] == 0]
    assert len(chat) == 6 and all(dict(s.dims)["regions"] == 0 for s in chat)
    assert {(s.accumulate, s.rows) for s in chat} == {(1, 128), (4, 32)}
    chat_sources = {info.name for info in infos if info.task in compile_plan.CHAT_TASKS}
    assert chat_sources and all(compile_plan.count_by_source(MixturePlan([info], global_batch_images=128),
                                                             loop.bucket_config(config))[info.name] == 3
                                for info in infos if info.name in chat_sources)
    assert {(s.accumulate, s.rows) for s in shapes} == {(1, 128), (4, 32)}
    assert {dict(s.dims)["frames"] for s in shapes if s.rows == 32} == {8, 0}       # clips of 8 frames; video chat
    regions = {info.name: {dict(s.dims)["regions"] for s in compile_plan.program_shapes(
        MixturePlan([info], global_batch_images=128), loop.bucket_config(config))} for info in infos if not info.is_video}
    assert regions["coco_vgd"] == {8, 32} and regions["coco_panoptic"] == {8}      # prompts only where used
    untied = BucketConfig(seq_lengths=(1024, 2048, 4096, 8192), patch_counts=(1024, 4096, 16384), grids=(1,),
                          frames=(1, 8), instances=(16, 64, 128), conditions=(8, 32, 128), regions=(8, 32),
                          seg_tokens=(8, 32, 128))
    # 1296 with the segmentor + 24 chat programs (4 text x 3 patch buckets, image and video chat)
    assert len(compile_plan.program_shapes(plan, untied)) == 1320

    config.max_programs = 10
    with pytest.raises(ValueError, match="can make 30 programs, more than max_programs=10"):
        loop.compile_ahead(config, None, None, None, None, plan, None, None)


def _readme_commands() -> list[list[str]]:
    """Every train.py / eval.py command of README.md's code blocks, continuation lines joined,
    as the tokens after the script (the part inside a gcloud --command="..." too)."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
            for tokens in [shlex.split(line)] + [shlex.split(t.split("=", 1)[1]) for t in shlex.split(line)
                                                 if t.startswith("--command=")]:
                for i, token in enumerate(tokens):
                    if token in ("train.py", "eval.py"):
                        commands.append(tokens[i:])
    return commands


def test_readme_train_and_eval_commands_name_real_configs_and_fields():
    """The README's commands (one host, SLURM, TPU pods, the recipe) cannot run here; their
    config files exist and every --config.x=y names a field of that config with a value of its type."""
    commands = _readme_commands()
    assert len(commands) >= 8 and any("--config.mesh.dcn_fsdp=2" in c for c in commands)
    for tokens in commands:
        args = dict(t.split("=", 1) if "=" in t else (t, None) for t in tokens[1:] if t.startswith("--"))
        config_path = args.get("--config") or tokens[tokens.index("--config") + 1]
        config = config_module(Path(config_path).stem).get_config()
        for flag, value in args.items():
            if not flag.startswith("--config.") or (value or "").startswith("$"):     # a shell variable
                continue
            *parents, name = flag[len("--config."):].split(".")
            field = config
            for key in parents:
                field = field[key]
            current = field[name]                     # a KeyError names a field the config lacks
            kind = type(current)
            if kind is bool:
                assert value in ("True", "False"), (flag, value)
            elif kind in (int, float):
                kind(value)
