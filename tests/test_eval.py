"""x2sam_jax.eval end to end: the synthetic datasets of every evaluated task family through the
evaluation pipeline, the jitted forward of the tiny X2SAM, post-processing and metrics.

- the ground truth fed back as predictions (the oracle) scores 1.0 on every metric: the frames'
  longest side (32) equals the tiny model's S/4 mask grid, so the grid holds the ground truth exactly;
- an untrained model scores near zero;
- results are identical at batch size 1 and 8, on 1 and 8 (simulated) devices, and run to run;
- results.json, results.md and overlays are written; eval.py loads model directories.
Programs are compiled once per (batch size, image / clip) and shared by the tests of this module.
"""

import hashlib
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
COUNTS = ("samples", "skipped", "failed")


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
def data(tmp_path_factory):
    """The synthetic datasets, the tiny tokenizer and a one-device mesh (no model: oracle tests)."""
    from x2sam_jax.data import synthetic
    from x2sam_jax.data.tokenizer import build_tiny_tokenizer
    from x2sam_jax.sharding import make_mesh

    root = tmp_path_factory.mktemp("eval") / "data"
    synthetic.generate(str(root), num_images=8, num_videos=4, frames=4, size=32, seed=0)
    return {"root": root, "tokenizer": build_tiny_tokenizer(), "mesh": make_mesh(data=1, fsdp=-1)}


@pytest.fixture(scope="module")
def setup(data):
    from flax import nnx

    from x2sam_jax.runs import preset_model_config
    from x2sam_jax.models.x2sam import X2SAM
    from x2sam_jax.sharding import compiler_options, create_sharded

    tokenizer, mesh = data["tokenizer"], data["mesh"]
    model = create_sharded(lambda: X2SAM(preset_model_config("tiny", tokenizer), rngs=nnx.Rngs(0)), mesh,
                           compiler_options=compiler_options(None))
    return {**data, "model": model}


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


def test_ground_truth_as_predictions_scores_one(data):
    from x2sam_jax.eval import evaluate

    config = _eval_config(data["root"], 8) | {"sam_size": 128, "region_tokens": 4}
    # The video panoptic / semantic metrics on the YouTube-VIS data too (its unlabeled background
    # is void: VPQ and mIoU ignore it, VSPW's consistency counts it, where the oracle's label is
    # the same in every frame, so mVC may reach 1).
    config["datasets"]["ytvis19_semantic"] = {"source": config["datasets"]["ytvis19"]["source"], "options": {
        "metrics": ("VPQ", "mIoU", "mVC"), "vpq_windows": (1, 2, 4), "vc_windows": (2,)}}
    results = evaluate(None, data["tokenizer"], config, mesh=data["mesh"], oracle=True)
    semantic = results.pop("ytvis19_semantic")
    assert semantic["VPQ"] == semantic["VPQ_4"] == semantic["mIoU"] == 1.0 and 0.9 < semantic["mVC_2"] <= 1.0
    assert set(results) == set(FAMILIES)
    for dataset, row in results.items():
        assert row["skipped"] == row["failed"] == 0 and row["samples"] > 0, dataset
        for metric, value in row.items():
            if metric not in COUNTS:
                # cIoU/gIoU carry LISA's 1e-10 in the denominator: 1 - 1e-10/union at worst
                assert value == pytest.approx(1.0, abs=1e-9), (dataset, metric)
        assert set(FAMILIES[dataset]) <= set(row), dataset


def test_failed_samples_count_as_misses_and_the_protocol_is_reported(data, tmp_path):
    """RefCOCO through the oracle with one image deleted: that sample produces no prediction, so it
    is failed (counted in results.json and results.md) and scores IoU 0 instead of dropping out;
    two template seeds draw other prompts, give mean ± std, and every (seed, sample) has its line."""
    import shutil

    import x2sam_jax
    from x2sam_jax.eval import evaluate

    root = tmp_path / "data"
    shutil.copytree(data["root"] / "refcocos", root / "refcocos")
    config = _eval_config(root, 2) | {"sam_size": 128, "region_tokens": 4}
    config["datasets"] = {"refcoco": config["datasets"]["refcoco"]}
    (root / "refcocos" / "images" / "train2014" / "000000000007.jpg").unlink()   # sample "7/0", the first
    with pytest.raises(ValueError, match="template_seeds must be at least 1"):
        evaluate(None, data["tokenizer"], config, mesh=data["mesh"], oracle=True, template_seeds=0)
    out = tmp_path / "out"
    row = evaluate(None, data["tokenizer"], config, mesh=data["mesh"], oracle=True, output_dir=str(out),
                   template_seeds=2, per_sample=True, checkpoint={"step": 3, "checksum": "ab" * 32})["refcoco"]
    assert (row["samples"], row["skipped"], row["failed"]) == (1, 1, 1)
    assert row["gIoU"] == pytest.approx(0.5) and row["cIoU"] < 1.0      # the miss counts: IoU 0 beside a 1
    document = json.loads((out / "results.json").read_text())
    assert document["protocol"]["checkpoint"] == {"step": 3, "checksum": "ab" * 32}
    assert document["protocol"]["version"] == x2sam_jax.__version__
    assert document["protocol"]["datasets"]["refcoco"]["templates"]["seeds"] == [0, 1]
    seeds = document["template_seeds"]["refcoco"]
    assert [r["failed"] for r in seeds["per_seed"]] == [1, 1] and seeds["std"]["gIoU"] == pytest.approx(0.0)
    assert "| refcoco |" in (out / "results.md").read_text() and "50.00 ± 0.00 | 1 | 1 | 1 |" in \
        (out / "results.md").read_text()          # gIoU, then samples, skipped, failed
    lines = [json.loads(x) for x in (out / "per_sample" / "refcoco.jsonl").read_text().splitlines()]
    assert [(x["template_seed"], x["sample_id"], x["failed"]) for x in lines] == \
        [(0, "7/0", True), (0, "8/0", False), (1, "7/0", True), (1, "8/0", False)]
    assert lines[0]["iou"] == [0.0] and lines[0]["prompt"] is None and lines[1]["iou"] == [1.0]
    assert "rightmost green square" in lines[1]["prompt"] and lines[1]["prompt"] != lines[3]["prompt"]


def test_a_missed_sample_scores_zero_in_every_family(data):
    """`TaskEvaluator.missed`: a sample without a prediction, scored against its annotations alone,
    gives 0 on each family's main metrics (no family's record format is left out); VGD regions come
    from the features (no miss), and a semantic map has no "nothing" (mIoU undefined on a miss alone)."""
    from x2sam_jax.eval import tasks
    from x2sam_jax.eval.evaluator import build_source, prepare_source

    config = _eval_config(data["root"], 8)
    for name, spec in config["datasets"].items():
        source = prepare_source(build_source(spec, config["data_root"]), spec, 2)
        evaluator = tasks.evaluator_for(source, spec.get("options"))
        sample = source[0]
        record = evaluator.missed(sample, list(range(sample.num_frames)))
        if name == "coco_vgd":
            assert record is None
            continue
        row = evaluator.finalize([{"index": 0, "clip": 0, **record}])
        for metric in FAMILIES[name]:
            assert row[metric] == 0.0 or (name, metric) == ("coco_panoptic", "mIoU"), (name, metric, row[metric])
        assert json.dumps(evaluator.sample_scores(record))          # the per-sample line's scores


def test_video_gcg_oracle_scores_what_the_protocol_allows(data, tmp_path):
    """VideoGLaMM's three evaluation sets of the stage-3 config (miniature files with 32x32
    frames, which the tiny S/4 grid holds exactly) through evaluate() with the ground truth as
    predictions: every phrase found (recall 1); a frame scores mIoU 1 where a phrase is visible and
    0 where none is (the official rule), so the row's mIoU is the share of such frames over the
    16-frame span clips (1 here: the miniature's things stay in view); MeViS's 18-frame video is
    two clips, each with its own caption; a miss
    scores 0; the mean row averages the three."""
    from _config_files import config_module

    from x2sam_jax.data import features, miniature, pipeline
    from x2sam_jax.eval import evaluate, tasks
    from x2sam_jax.eval.evaluator import build_source

    miniature._Writer(str(tmp_path / "datas"), seed=0, images=1, videos=2, frames=4, size=(32, 32)).video_glamm_eval()
    base = config_module("x2sam_4b_base")
    names = base.paper_averages()["vgcg_mean"]
    config = _eval_config(tmp_path / "datas", 4) | {"sam_size": 128, "region_tokens": 4,
                                                   "averages": base.paper_averages()}
    config["datasets"] = {n: base.paper_benchmarks()[n] | {"options": {"captions": False}} for n in names}
    config["buckets"] |= {"frames": (4, 16), "seq_lengths": (1024,), "patch_counts": (1024,)}
    results = evaluate(None, data["tokenizer"], config, mesh=data["mesh"], oracle=True, output_dir=tmp_path / "out",
                       per_sample=True)
    for name in names:
        source = build_source(config["datasets"][name], config["data_root"])
        items = pipeline.eval_items(source, features.feature_config(clip_len=16))
        shown = [any(source[i].instances[k].masks[f] is not None for k in range(len(source[i].instances)))
                 for i, _, clip in items for f in (clip or range(source[i].num_frames))]
        row = results[name]
        assert row["recall"] == 1.0 and row["failed"] == row["skipped"] == 0, (name, row)
        assert row["mIoU"] == pytest.approx(np.mean(shown), abs=1e-9), name
        protocol = json.loads((tmp_path / "out" / "results.json").read_text())["protocol"]["datasets"][name]
        assert protocol["frames"]["clip_len"] == 16 and protocol["frames"]["clip_mode"] == "span"
        assert protocol["frames"]["answer"].startswith("generated per clip")
        lines = [json.loads(line) for line in (tmp_path / "out" / "per_sample" / f"{name}.jsonl").open()]
        assert [(x["index"], x["clip"]) for x in lines] == [(i, c) for i, c, _ in items]
        assert all(x["caption"] == source[x["index"]].caption for x in lines)
        evaluator = tasks.evaluator_for(source, {"captions": False})
        miss = evaluator.missed(source[0], list(range(source[0].num_frames)))
        assert evaluator.finalize([{"index": 0, "clip": 0, **miss}]) == {"mIoU": 0.0, "recall": 0.0}
    assert len(pipeline.eval_items(build_source(config["datasets"]["mevis_gcg_val"], config["data_root"]),
                                   features.feature_config(clip_len=16))) == 3     # 18 frames: two clips
    assert results["vgcg_mean"]["mIoU"] == pytest.approx(np.mean([results[n]["mIoU"] for n in names]), abs=1e-12)
    assert results["vgcg_mean"]["samples"] == sum(results[n]["samples"] for n in names)
    assert "| vgcg_mean |" in (tmp_path / "out" / "results.md").read_text()


def test_gcg_recall_uses_the_configured_phrase_encoder(data, tmp_path):
    """eval.phrase_encoder: GLaMM's BERT similarity in the image and video GCG recall, named in
    results.json (the bag-of-words stand-in otherwise, and named too); a wrong path stops
    evaluate() before anything is evaluated."""
    from types import SimpleNamespace

    from _tiny_bert import save_tiny_bert

    from x2sam_jax.eval import evaluate, metrics, tasks

    config = _eval_config(data["root"], 2) | {"sam_size": 128, "region_tokens": 4}
    config["datasets"] = {"grandf_gcg": config["datasets"]["grandf_gcg"]}
    bert = save_tiny_bert(tmp_path / "bert")
    protocols = {}
    for encoder in ("", str(bert)):
        out = tmp_path / f"out{len(protocols)}"
        row = evaluate(None, data["tokenizer"], config | {"phrase_encoder": encoder}, mesh=data["mesh"], oracle=True,
                       output_dir=str(out))["grandf_gcg"]
        assert row["recall"] == 1.0
        protocols[encoder] = json.loads((out / "results.json").read_text())["protocol"]["datasets"]["grandf_gcg"]
    assert protocols[""]["phrase_similarity"] == metrics.gcg.BAG_OF_WORDS
    assert protocols[str(bert)]["phrase_similarity"].startswith("BERT mean-pooled cosine")
    with pytest.raises(FileNotFoundError, match="nowhere: no config.json"):
        evaluate(None, data["tokenizer"], config | {"phrase_encoder": str(tmp_path / "nowhere")}, mesh=data["mesh"],
                 oracle=True)
    # Both families score their recall with the given similarity: one found phrase, then none.
    track = [{"size": [2, 2], "counts": "04"}]                                   # one full 2x2 frame
    record = {"index": 0, "clip": 0, "vgcg": {"hw": (2, 2), "caption": "", "references": [""], "pred_tracks": [track],
                                              "pred_phrases": ["dog"], "gt_tracks": [track], "gt_phrases": ["dog"]}}
    image = {"index": 0, "clip": 0, "gcg": {"hw": (2, 2), "caption": "", "references": [""], "pred_masks": track,
                                            "pred_phrases": ["dog"], "gt_masks": track, "gt_phrases": ["dog"]}}
    for task, rec in (("vgcg_seg", record), ("gcg_seg", image)):
        source = SimpleNamespace(name=task, task=task)
        assert tasks.evaluator_for(source, {"captions": False}).finalize([rec])["recall"] == 1.0
        never = tasks.evaluator_for(source, {"captions": False}, phrase_similarity=lambda a, b: 0.0)
        assert never.finalize([rec])["recall"] == 0.0, task


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
    import x2sam_jax

    out, results = results8
    document = json.loads((out / "results.json").read_text())
    assert document["results"] == json.loads(json.dumps(results))
    protocol = document["protocol"]
    assert protocol["version"] == x2sam_jax.__version__ and protocol["checkpoint"] == {"step": 7}
    assert set(protocol["datasets"]) == set(document["timing"]["datasets"]) == set(FAMILIES)
    assert protocol["datasets"]["ref_ytvos"]["frames"]["clip_len"] == 4
    assert document["timing"]["datasets"]["refcoco"]["samples_per_s"] > 0 and document["timing"]["batch_size"] == 8
    markdown = (out / "results.md").read_text()
    assert "at step 7" in markdown and all(f"| {name} |" in markdown for name in FAMILIES)
    assert "| failed |" in markdown and "samples_per_s" not in markdown
    overlays = sorted(p.relative_to(out / "overlays").as_posix() for p in (out / "overlays").rglob("*.*"))
    assert overlays == sorted([f"{d}/00000.png" for d in ("coco_panoptic", "refcoco", "coco_vgd", "coco_interactive",
                                                           "grandf_gcg")]
                              + [f"{d}/00000.gif" for d in ("ytvis19", "ref_ytvos", "ytvos")])
    from PIL import Image

    with Image.open(out / "overlays" / "ref_ytvos" / "00000.gif") as gif:
        assert gif.n_frames == 4 and gif.size[0] >= 3 * 200      # input, prediction, ground truth: enlarged


def _timeless(path) -> dict:
    """results.json without its "timing" (wall times differ run to run; nothing else may)."""
    document = json.loads(path.read_text())
    document.pop("timing", None)
    return document


def test_two_runs_write_the_same_results_json(setup, results8, tmp_path):
    """A second run (of the region and video datasets, which draw region points and templates)
    writes the same results.json, timing aside, and a byte-identical results.md."""
    from x2sam_jax.eval import evaluate
    from x2sam_jax.eval.evaluator import write_results

    out, results = results8
    names = ("coco_vgd", "ref_ytvos")
    evaluate(setup["model"], setup["tokenizer"], _eval_config(setup["root"], 8), mesh=setup["mesh"],
             output_dir=str(tmp_path / "again"), step=7, datasets=names)
    first = _timeless(out / "results.json")
    first["protocol"]["datasets"] = {k: first["protocol"]["datasets"][k] for k in names}
    write_results(tmp_path / "first", {k: results[k] for k in names}, step=7, report=first)
    assert _timeless(tmp_path / "again" / "results.json") == _timeless(tmp_path / "first" / "results.json")
    assert (tmp_path / "again" / "results.md").read_bytes() == (tmp_path / "first" / "results.md").read_bytes()


def test_batch_sizes_one_and_three_give_the_same_results(setup, results8):
    """Batch 1 and 3 (a padded row) against batch 8: the guarantee README states, checked on
    whatever machine runs the suite."""
    from x2sam_jax.eval import evaluate
    from x2sam_jax.eval.evaluator import _FORWARDS

    _, results = results8
    for batch_size in (1, 3):
        # The forwards are shared by the process (the Predictor's too): count this call's programs only.
        before = sum(f.programs() for f in _FORWARDS.values())
        other = evaluate(setup["model"], setup["tokenizer"], _eval_config(setup["root"], batch_size),
                         mesh=setup["mesh"])
        # Every row computes alone (no cross-row term) and draws its region points from its own key;
        # rows of one bucket pad to the same shapes, so the numbers agree to float rounding at most.
        # GCG answers are generated: greedy decoding of right-padded prompts gives every row its own tokens.
        assert _max_difference(results, other) <= 1e-6, batch_size
        assert sum(f.programs() for f in _FORWARDS.values()) - before == 2, batch_size   # image and clip


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
    info = eval_cli.checkpoint_info(str(ckpt))       # a model directory: the digest of its checksums.json
    arrays = json.loads((ckpt / "checksums.json").read_text())["arrays"]
    digest = hashlib.sha256(json.dumps({"params": arrays}, sort_keys=True, separators=(",", ":")).encode())
    assert info["kind"] == "model directory" and info["step"] is None and info["checksum"] == digest.hexdigest()
    assert tokenizer.convert_tokens_to_ids("<SEG>") == setup["tokenizer"].convert_tokens_to_ids("<SEG>")
    np.testing.assert_array_equal(np.asarray(model.segmentor.decoder.queries_features.embedding[...]),
                                  np.asarray(setup["model"].segmentor.decoder.queries_features.embedding[...]))
    with pytest.raises(FileNotFoundError, match="neither checkpoints/"):
        eval_cli.load_checkpoint(str(tmp_path), setup["mesh"])

    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, str(REPO / "eval.py"), "--config", str(REPO / "configs/x2sam_tiny_synthetic.py"),
                           f"--config.data_root={setup['root']}", "--config.eval.max_samples=2", "--oracle",
                           "--tasks", "coco_panoptic,vref_seg", "--output", str(out), "--template-seeds", "2",
                           "--per-sample"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads((out / "results.json").read_text())
    results = document["results"]
    assert set(results) == {"coco_panoptic", "ref_ytvos"}                 # by name and by task
    assert results["coco_panoptic"]["PQ"] == 1.0 and results["ref_ytvos"]["J&F"] == 1.0
    assert "| coco_panoptic |" in done.stdout and "100.00 ± 0.00" in done.stdout   # ref_ytvos: two template seeds
    assert set(document["template_seeds"]) == {"ref_ytvos"} and document["protocol"]["checkpoint"] is None
    assert len((out / "per_sample" / "ref_ytvos.jsonl").read_text().splitlines()) == 2 * 2   # 2 samples x 2 seeds


def test_checkpoint_info_of_a_training_workdir(tmp_path):
    """eval.py records a workdir's latest step and a digest of the checksums saved with it (the
    step's trainable and the run's frozen parameters): another step's parameters, another digest."""
    import orbax.checkpoint as ocp

    from x2sam_jax.eval.inference import checkpoint_info
    from x2sam_jax.storage.checksums import tree_checksums

    def save(folder, step, params):
        manager = ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(create=True))
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(
            {"step": step, "checksums": {"params": tree_checksums(params)}})))
        manager.wait_until_finished()
        manager.close()

    save(tmp_path / "frozen", 0, {"w": np.ones(3, np.float32)})
    save(tmp_path / "checkpoints", 2, {"b": np.zeros(2, np.float32)})
    first = checkpoint_info(tmp_path)
    save(tmp_path / "checkpoints", 4, {"b": np.full(2, 0.5, np.float32)})
    latest = checkpoint_info(tmp_path)
    assert (first["kind"], first["step"], latest["step"]) == ("training workdir", 2, 4)
    assert len(first["checksum"]) == 64 and first["checksum"] != latest["checksum"]


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
