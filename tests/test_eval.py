"""x2sam_jax.eval end to end: the synthetic datasets of every evaluated task family through the
evaluation pipeline, the jitted forward of the tiny X2SAM, post-processing and metrics.

- the ground truth fed back as predictions (the oracle) scores 1.0 on every metric: the frames'
  longest side (32) equals the tiny model's S/4 mask grid, so the grid holds the ground truth exactly;
- an untrained model scores near zero;
- results are identical at batch size 1 and 8, on 1 and 8 (simulated) devices, and run to run;
- results.json, results.md and overlays are written; eval.py loads model directories.
Programs are compiled once per (batch size, image / clip) and shared by the tests of this module.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
COUNTS = ("samples", "skipped")


def _run_config():
    spec = importlib.util.spec_from_file_location("tiny_config", REPO / "configs" / "x2sam_tiny_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _eval_config(data_root, batch_size):
    """The run config's eval section on the test data: 2 samples per dataset, 4-frame clips, GCG
    answers of at most 16 generated tokens."""
    config = _run_config()
    config.data_root = str(data_root)
    ev = config.eval.to_dict()
    ev.update(batch_size=batch_size, max_samples=2, max_new_tokens=16)
    ev["feature"]["clip_len"] = 4
    ev["buckets"]["frames"] = (1, 4)
    ev["datasets"]["grandf_gcg"]["options"]["captions"] = False   # METEOR / CIDEr: Java, see test_eval_metrics
    return ev


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from flax import nnx

    from x2sam_jax.data import synthetic
    from x2sam_jax.data.tokenizer import build_tiny_tokenizer
    from x2sam_jax.runs import preset_model_config
    from x2sam_jax.models.x2sam import X2SAM
    from x2sam_jax.sharding import compiler_options, create_sharded, make_mesh

    root = tmp_path_factory.mktemp("eval") / "data"
    synthetic.generate(str(root), num_images=8, num_videos=4, frames=4, size=32, seed=0)
    tokenizer = build_tiny_tokenizer()
    mesh = make_mesh(data=1, fsdp=-1)
    model = create_sharded(lambda: X2SAM(preset_model_config("tiny", tokenizer), rngs=nnx.Rngs(0)), mesh,
                           compiler_options=compiler_options(None))
    return {"root": root, "tokenizer": tokenizer, "mesh": mesh, "model": model}


@pytest.fixture(scope="module")
def results8(setup, tmp_path_factory):
    from x2sam_jax.eval import evaluate

    out = tmp_path_factory.mktemp("eval_out") / "run"
    results = evaluate(setup["model"], setup["tokenizer"], _eval_config(setup["root"], 8), mesh=setup["mesh"],
                       output_dir=str(out), visualize=1, step=7)
    return out, results


def _max_difference(a, b):
    assert a.keys() == b.keys()
    worst = 0.0
    for dataset in a:
        assert a[dataset].keys() == b[dataset].keys(), dataset
        for metric, value in a[dataset].items():
            other = b[dataset][metric]
            if value is None or other is None or (math.isnan(value) and math.isnan(other)):
                assert (value is None) == (other is None), (dataset, metric)
                continue
            worst = max(worst, abs(value - other))
    return worst


FAMILIES = {"coco_panoptic": ("PQ", "mIoU", "AP"), "refcoco": ("cIoU", "gIoU"), "coco_vgd": ("AP",),
            "coco_interactive": ("cIoU", "mIoU"), "grandf_gcg": ("AP50", "mIoU", "recall"),
            "ytvis19": ("AP", "mAP_x2sam"), "ref_ytvos": ("J&F", "J&F_x2sam"), "ytvos": ("J&F", "J&F_x2sam")}


def test_ground_truth_as_predictions_scores_one(setup):
    from x2sam_jax.eval import evaluate

    config = _eval_config(setup["root"], 8) | {"sam_size": 128, "region_tokens": 4}
    # The video panoptic / semantic metrics on the YouTube-VIS data too (its unlabeled background
    # is void: VPQ and mIoU ignore it, VSPW's consistency counts it, where the oracle's label is
    # the same in every frame, so mVC may reach 1).
    config["datasets"]["ytvis19_semantic"] = {"source": config["datasets"]["ytvis19"]["source"], "options": {
        "metrics": ("VPQ", "mIoU", "mVC"), "vpq_windows": (1, 2, 4), "vc_windows": (2,)}}
    results = evaluate(None, setup["tokenizer"], config, mesh=setup["mesh"], oracle=True)
    semantic = results.pop("ytvis19_semantic")
    assert semantic["VPQ"] == semantic["VPQ_4"] == semantic["mIoU"] == 1.0 and 0.9 < semantic["mVC_2"] <= 1.0
    assert set(results) == set(FAMILIES)
    for dataset, row in results.items():
        assert row["skipped"] == 0 and row["samples"] > 0, dataset
        for metric, value in row.items():
            if metric not in COUNTS:
                # cIoU/gIoU carry LISA's 1e-10 in the denominator: 1 - 1e-10/union at worst
                assert value == pytest.approx(1.0, abs=1e-9), (dataset, metric)
        assert set(FAMILIES[dataset]) <= set(row), dataset


def test_untrained_model_scores_near_zero(results8):
    _, results = results8
    assert set(results) == set(FAMILIES)
    for dataset, metrics in FAMILIES.items():
        for metric in metrics:
            value = results[dataset][metric]
            # random masks overlap their targets by chance only (a few percent of the frame); F
            # credits boundaries within ceil(0.008 * diagonal) = 1 pixel of a 32-pixel frame
            assert 0.0 <= value < (0.3 if "J&F" in metric else 0.15), (dataset, metric, value)


def test_results_files_and_overlays(results8):
    out, results = results8
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    markdown = (out / "results.md").read_text()
    assert "at step 7" in markdown and all(f"| {name} |" in markdown for name in FAMILIES)
    overlays = sorted(p.relative_to(out / "overlays").as_posix() for p in (out / "overlays").rglob("*.*"))
    assert overlays == sorted([f"{d}/00000.png" for d in ("coco_panoptic", "refcoco", "coco_vgd", "coco_interactive",
                                                           "grandf_gcg")]
                              + [f"{d}/00000.gif" for d in ("ytvis19", "ref_ytvos", "ytvos")])
    from PIL import Image

    with Image.open(out / "overlays" / "ref_ytvos" / "00000.gif") as gif:
        assert gif.n_frames == 4 and gif.size[0] >= 2 * 200      # two enlarged panels per frame


def test_two_runs_write_the_same_results_json(setup, results8, tmp_path):
    """A second run (of the region and video datasets, which draw region points and templates)
    writes byte-identical results."""
    from x2sam_jax.eval import evaluate
    from x2sam_jax.eval.evaluator import write_results

    _, results = results8
    names = ("coco_vgd", "ref_ytvos")
    evaluate(setup["model"], setup["tokenizer"], _eval_config(setup["root"], 8), mesh=setup["mesh"],
             output_dir=str(tmp_path / "again"), step=7, datasets=names)
    write_results(tmp_path / "first", {k: results[k] for k in names}, step=7)
    for name in ("results.json", "results.md"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "first" / name).read_bytes()


def test_batch_size_one_gives_the_same_results(setup, results8):
    from x2sam_jax.eval import evaluate
    from x2sam_jax.eval.evaluator import _FORWARDS

    _, results = results8
    single = evaluate(setup["model"], setup["tokenizer"], _eval_config(setup["root"], 1), mesh=setup["mesh"])
    # Every row computes alone (no cross-row term) and draws its region points from its own key;
    # rows of one bucket pad to the same shapes, so the numbers agree to float rounding at most.
    # GCG answers are generated: greedy decoding of right-padded prompts gives every row its own tokens.
    assert _max_difference(results, single) <= 1e-6
    assert sum(f.programs() for f in _FORWARDS.values()) == 4   # (image, clip) x (batch 8, batch 1)


_EIGHT_DEVICES = textwrap.dedent("""
    import json, sys
    from flax import nnx

    from x2sam_jax.data.tokenizer import build_tiny_tokenizer
    from x2sam_jax.runs import preset_model_config
    from x2sam_jax.eval import evaluate
    from x2sam_jax.models.x2sam import X2SAM
    from x2sam_jax.sharding import compiler_options, create_sharded, make_mesh
    import jax
    assert jax.device_count() == 8
    config = json.loads(sys.argv[1])
    tokenizer = build_tiny_tokenizer()
    mesh = make_mesh(data=2, fsdp=4)
    model = create_sharded(lambda: X2SAM(preset_model_config("tiny", tokenizer), rngs=nnx.Rngs(0)), mesh,
                           compiler_options=compiler_options(None))
    results = evaluate(model, tokenizer, config, mesh=mesh)
    print("RESULTS=" + json.dumps(results))
""")


IMAGE_DATASETS = ("coco_panoptic", "refcoco", "coco_vgd", "coco_interactive")


def _eight_devices(setup, results8, names):
    """The same model (born sharded over a 2 x 4 data x fsdp mesh) and the batch split over the 8
    devices, in a subprocess with 8 forced host devices."""
    _, results = results8
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    config = _eval_config(setup["root"], 8)
    config["datasets"] = {k: v for k, v in config["datasets"].items() if k in names}
    config = json.dumps(config)
    done = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, config], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULTS="))
    sharded = json.loads(line[len("RESULTS="):])
    # The sharded matmuls sum in another order: logits move by ~1e-7, far from flipping a mask
    # pixel or a ranking on these few samples, so the metrics agree to 1e-6.
    assert _max_difference({k: results[k] for k in names}, sharded) <= 1e-6


def test_eight_devices_give_the_same_results(setup, results8):
    """The image program (vocabulary, referring and region datasets) on 8 devices; the clip
    program and GCG generation too in the slow variant (more compiles in the subprocess)."""
    _eight_devices(setup, results8, IMAGE_DATASETS)


@pytest.mark.slow
def test_eight_devices_give_the_same_results_on_every_dataset(setup, results8):
    _eight_devices(setup, results8, tuple(FAMILIES))


def test_region_points_depend_on_the_sample_only(setup):
    """The region sampler's per-row keys: a row's region tokens are the same in a batch of 3 with
    4 region slots and alone with 2 slots."""
    import jax
    import jax.numpy as jnp

    from x2sam_jax.eval.inference import region_keys

    model = setup["model"]
    rng = np.random.default_rng(0)
    # 32 x 32 prompt masks (the sampler normalises coordinates) with more pixels than its 16 points
    maps, masks = rng.normal(size=(3, 1, 8, 8, 64)), rng.random((3, 4, 32, 32)) < 0.3
    maps[0], masks[0] = maps[1], masks[1]               # rows 0 and 1 differ in their keys only
    maps, masks = jnp.asarray(maps, jnp.float32), jnp.asarray(masks)
    valid = jnp.ones((3, 4), bool)
    frame = jnp.zeros((3, 4), jnp.int32)
    keys = region_keys(0, jnp.array([5, 9, 2]), jnp.array([0, 1, 0]))
    embed = jax.jit(model.region_embeddings)
    batched = embed(maps, masks, valid, frame, keys)
    alone = embed(maps[1:2], masks[1:2, :2], valid[1:2, :2], frame[1:2, :2], keys[1:2])
    np.testing.assert_array_equal(np.asarray(batched[1, :2]), np.asarray(alone[0]))
    assert not np.array_equal(np.asarray(batched[0]), np.asarray(batched[1]))   # other keys, other points


def test_eval_cli_loads_model_directories_and_runs_the_oracle(setup, tmp_path):
    import x2sam_jax

    sys.path.insert(0, str(REPO))
    try:
        import eval as eval_cli
    finally:
        sys.path.remove(str(REPO))
    ckpt = tmp_path / "model"
    x2sam_jax.save(ckpt, setup["model"])
    setup["tokenizer"].save_pretrained(str(ckpt / "tokenizer"))
    model, tokenizer = eval_cli.load_checkpoint(str(ckpt), setup["mesh"])
    assert tokenizer.convert_tokens_to_ids("<SEG>") == setup["tokenizer"].convert_tokens_to_ids("<SEG>")
    np.testing.assert_array_equal(np.asarray(model.segmentor.decoder.queries_features.embedding[...]),
                                  np.asarray(setup["model"].segmentor.decoder.queries_features.embedding[...]))
    with pytest.raises(FileNotFoundError, match="neither checkpoints/"):
        eval_cli.load_checkpoint(str(tmp_path), setup["mesh"])

    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, str(REPO / "eval.py"), "--config", str(REPO / "configs/x2sam_tiny_synthetic.py"),
                           f"--config.data_root={setup['root']}", "--config.eval.max_samples=2", "--oracle",
                           "--tasks", "coco_panoptic,vref_seg", "--output", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"coco_panoptic", "ref_ytvos"}                 # by name and by task
    assert results["coco_panoptic"]["PQ"] == 1.0 and results["ref_ytvos"]["J&F"] == 1.0
    assert "| coco_panoptic |" in done.stdout


def test_chat_benchmark_answers_are_generated_and_judged(setup, tmp_path):
    """A chat benchmark (MME's TSV) through evaluate() with the tiny model: each answer is generated
    (the batch has no SAM frames, so nothing is segmented) and judged. The ground truth fed back
    scores MME's full 200 points per subtask; the untrained model's generated answers do not, and
    every sample is counted either judged or unparsed."""
    from test_chat_benchmarks import MME_ROWS, _write_tsv

    from x2sam_jax.eval import evaluate

    (tmp_path / "mme").mkdir()
    _write_tsv(tmp_path / "mme" / "MME.tsv", MME_ROWS)
    model_config = setup["model"].config
    config = {"data_root": str(tmp_path), "batch_size": 2, "buckets": _eval_config(setup["root"], 2)["buckets"],
              "sam_size": model_config.mask_encoder.image_size, "region_tokens": model_config.region_tokens,
              "datasets": {"mme": {"source": {"type": "mme", "root": "mme"}, "max_new_tokens": 4}}}
    oracle = evaluate(None, setup["tokenizer"], config, mesh=setup["mesh"], oracle=True)["mme"]
    generated = evaluate(setup["model"], setup["tokenizer"], config, mesh=setup["mesh"])["mme"]
    assert oracle["perception"] == oracle["cognition"] == 2.0 and oracle["unparsed"] == 0
    for result in (oracle, generated):
        assert result["samples"] == len(MME_ROWS) and result["skipped"] == 0
    assert generated["perception"] + generated["cognition"] < 4.0
    assert 0 <= generated["unparsed"] <= len(MME_ROWS)
