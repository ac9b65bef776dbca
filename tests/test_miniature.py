"""The miniature of every dataset of the X2SAM recipe (x2sam_jax/data/miniature.py): written once,
read by the real readers through the real configs' specs (stage 1, stage 3's training mix, the
paper's benchmarks), planned into a mixture, and scored by `eval.py --oracle`."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from _config_files import config_module
from PIL import Image

from x2sam_jax.data import miniature

ROOT = Path(__file__).resolve().parents[1]


def _train_specs(root):
    """Stage 3's training sources and stage 1's SA-1B, roots joined to the data root (as train.py)."""
    specs = list(config_module("x2sam_4b_stage3").get_config().data.sources)
    specs += list(config_module("x2sam_4b_stage1").get_config().data.sources)
    return [dict(spec, root=os.path.join(root, spec["root"])) for spec in specs]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return miniature.write_miniature(str(tmp_path_factory.mktemp("mini") / "datas"), seed=0)


def test_deterministic_atomic_and_written_once(mini, tmp_path):
    def listing(root):
        out = {}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                out[rel] = os.readlink(path) if os.path.islink(path) else Path(path).read_bytes()
        return out

    # Everything but the encoded video (the H.264 encoder's bytes are not promised) is the same.
    def comparable(root):
        return {k: v for k, v in listing(root).items() if not k.endswith(".mp4")}

    assert os.path.exists(os.path.join(mini, miniature.RECORD))
    with pytest.raises(FileExistsError):
        miniature.write_miniature(mini)
    assert miniature.ensure_miniature(mini) == mini            # kept as it is
    assert not [p for p in os.listdir(os.path.dirname(mini)) if p.startswith(".miniature-")]
    again = miniature.write_miniature(str(tmp_path / "again"), seed=0)
    assert comparable(again) == comparable(mini)
    other = miniature.write_miniature(str(tmp_path / "other"), seed=1)
    assert comparable(other) != comparable(mini)
    # the links of the official tree are relative and resolve inside it
    for link in ("img_vgdseg/coco_vgd/coco2017", "img_refseg/refcocos/images/train2014",
                 "vid_gcgseg/video_glamm/ytrvos21", "vid_vgdseg/ytvis_vgd/ytvis19"):
        path = os.path.join(mini, link)
        assert os.path.islink(path) and not os.path.isabs(os.readlink(path)) and os.path.isdir(path), link


def test_every_training_source_reads_and_loads(mini):
    from x2sam_jax.data.features import make_features
    from x2sam_jax.data.pipeline import materialize_source
    from x2sam_jax.data.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    specs = _train_specs(mini)
    assert len(specs) == 27
    tasks = set()
    for spec in specs:
        source = materialize_source(spec)
        assert len(source) >= 1, spec
        sample = source[0].validate()
        assert sample.has_targets, spec
        if sample.task not in ("chat", "vchat"):
            assert sample.instances, spec
        features = make_features(sample, tokenizer=tokenizer, train=True, rng=np.random.default_rng(0),
                                 sam_size=128, class_agnostic=spec["type"] == "sa1b")
        if sample.task in ("chat", "vchat"):                  # no SAM side: the step runs the LLM alone
            assert "sam_pixel_values" not in features and "gt_masks" not in features, spec
        else:
            assert features["gt_masks"].any(), spec
        if sample.task.startswith("v") and sample.task != "vgd_seg":
            assert int(features["num_frames"]) == 8, spec            # a full training clip
        tasks.add(sample.task)
    assert tasks == {"chat", "gen_seg", "ref_seg", "reason_seg", "vgd_seg", "gcg_seg", "vchat", "vgen_seg",
                     "vref_seg", "vreason_seg", "vvgd_seg", "vobj_seg", "vgcg_seg"}


def test_every_benchmark_builds(mini):
    from x2sam_jax.eval.evaluator import build_source

    base = config_module("x2sam_4b_base")
    benchmarks = {**base.paper_benchmarks(), **base.paper_chat_benchmarks()}
    withheld = set()
    for name, spec in benchmarks.items():
        source = build_source(spec, mini)
        assert len(source) >= 1, name
        source[0].validate()
        if not source.has_targets:
            withheld.add(name)
    assert withheld == {"ytvis19", "ytvis21", "ref_ytvos", "ytvos19"}


def test_stage3_mixture_plan_builds(mini):
    from x2sam_jax.data.mixture import MixturePlan
    from x2sam_jax.data.pipeline import materialize_source, source_info

    config = config_module("x2sam_4b_stage3").get_config()
    infos = [source_info(materialize_source(spec), i) for i, spec in enumerate(_train_specs(mini)[:-1])]
    per_device = config.data.images_per_device
    plan = MixturePlan(infos, global_batch_images=per_device, images_per_device=per_device,
                       clips_per_device=config.data.clips_per_device, repeat_threshold=config.data.repeat_threshold,
                       seed=config.seed)
    assert all(steps >= 1 for steps in plan.steps_per_source)
    assert sum(info.is_video for info in infos) == 15
    assert len({info.name for info in infos}) == len(infos)      # the repeats table needs unique names
    assert plan.micro_batches_per_epoch >= len(infos)


def test_oracle_evaluation_of_every_benchmark(mini, tmp_path):
    """`eval.py --oracle` over the stage-3 config: a row for every benchmark (scored, or the
    server's submission archive), nothing skipped. The tiny preset gives a 128 px SAM input;
    METEOR / CIDEr (pycocoevalcap) are off."""
    out = tmp_path / "eval"
    command = [sys.executable, str(ROOT / "eval.py"), "--config", str(ROOT / "configs" / "x2sam_4b_stage3.py"),
               "--oracle", "--output", str(out), f"--config.data.root={mini}", "--config.model.preset=tiny",
               "--config.eval.buckets.seq_lengths=(1024,2048,8192)",
               "--config.eval.buckets.patch_counts=(256,1024,4096,16384)"]
    command += [f"--config.eval.datasets.{name}.options.captions=False"
                for name in ("grandf_gcg_val", "grandf_gcg_test", "video_gcg_test", "mevis_gcg_val", "vidstg_gcg_val")]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())["results"]
    base = config_module("x2sam_4b_base")
    benchmarks = {**base.paper_benchmarks(), **base.paper_chat_benchmarks()}
    assert set(results) == set(benchmarks) | {"vgcg_mean"}     # V-GCG: the mean of three rows
    main_metric = {"PQ", "mIoU", "cIoU", "J&F", "AP", "VPQ", "acc", "F1", "perception"}
    for name, row in results.items():
        assert row["samples"] >= 1 and row["skipped"] == 0, (name, row)
        if "submission" in row:
            archive = out / row["submission"]
            with zipfile.ZipFile(archive) as z:
                assert z.namelist(), name
        else:
            scores = [row[m] for m in main_metric if row.get(m) is not None]
            assert scores and min(scores) > 0.6, (name, row)        # ground truth at a 32x32 mask grid
    assert {n for n, r in results.items() if "submission" in r} == {"ytvis19", "ytvis21", "ref_ytvos", "ytvos19"}
    # YouTube-VOS 2019 valid: a palette PNG (every object's id) per frame meta.json lists for a video
    ytvos = results["ytvos19"]
    meta = json.loads((Path(mini) / "vid_objseg" / "ytvos19" / "valid" / "meta.json").read_text())["videos"]
    listed = {f"Annotations/{vid}/{frame}.png" for vid, v in meta.items()
              for frame in {f for obj in v["objects"].values() for f in obj["frames"]}}
    with zipfile.ZipFile(out / ytvos["submission"]) as z:
        assert set(z.namelist()) == listed and ytvos["entries"] == len(listed)
        assert ytvos["frames_background"] == 0 and ytvos["samples"] == len(meta)
        for vid, video in meta.items():
            first = min(video["objects"]["1"]["frames"])
            with Image.open(z.open(f"Annotations/{vid}/{first}.png")) as png:
                assert png.mode == "P" and set(np.unique(np.asarray(png))) <= {0} | {int(o) for o in video["objects"]}
    markdown = (out / "results.md").read_text()
    assert "| ytvos19 |" in markdown and "submissions/ytvos19/submission.zip" in markdown
    assert results["vspw"]["mVC"] is not None


def test_subtitle_variants_put_the_lines_of_the_subtitle_frames_in_the_prompt(mini):
    """Video-MME and LongVideoBench "w/ subtitles" (a dataset's source field `subtitles: True`) on
    the miniature's 8-frame, 8 fps videos at 4 frames: VLMEvalKit's subtitle frames are
    int(i * 8 / 5) = 1, 3, 4, 6, i.e. 125, 375, 500 and 750 ms. Video-MME lists the cue strictly
    around each (0-300, 300-600, 600-1000 ms: the second twice), its line break a space, <i> as
    pysubs2 writes it; LongVideoBench keeps the lines with a frame inside their span (widened to
    1 s when shorter; a null end is the video's end), not the one after the video."""
    from x2sam_jax.data.sources import chat_bench as cb
    from x2sam_jax.eval.evaluator import build_source

    chat = config_module("x2sam_4b_base").paper_chat_benchmarks()
    specs = {name: {"source": dict(chat[name]["source"], num_frames=4, subtitles=True)}
             for name in ("videomme", "longvideobench")}
    videomme = build_source(specs["videomme"], mini)
    sample = videomme[0]
    shape = sample.meta["bench"]["options"][sample.meta["bench"]["answer"]]
    subtitles = f"A {shape} appears.\nThe {shape} starts to move.\nThe {shape} starts to move.\n" \
                f"{{\\i1}}The {shape} keeps moving.{{\\i0}}"
    assert sample.conversation[0]["value"].startswith(
        "<video>\n" + cb.VIDEOMME_SUBTITLE_HINT.format(subtitles) + "\nQuestion: Which shape moves in the video?\nA. ")
    plain = build_source({"source": dict(chat["videomme"]["source"], num_frames=4)}, mini)[0].conversation[0]["value"]
    assert plain.startswith("<video>\n" + cb.VIDEOMME_HINT + "\nQuestion: ") and "subtitles" not in plain
    lvb = build_source(specs["longvideobench"], mini)
    for k, tail in ((0, "The {} keeps moving.\n"), (1, "")):
        sample = lvb[k]
        shape = sample.meta["bench"]["options"][sample.meta["bench"]["answer"]]
        assert sample.conversation[0]["value"].startswith(
            f"<video>\nA {shape} appears.\n" + tail.format(shape) + "Which shape moves in the video?\nA. "), k
