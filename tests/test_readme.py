"""README.md runs as written (issue 13): its converter commands and its Python block, on tiny
sources saved under the README's own paths and converted through the real CLIs.

The Python block's free names (``pixel_values``, ``processor_outputs``, ``batch``) are inputs
the README describes in words; the test supplies them for the tiny models. The X2SAM command
gets ``--preset tiny`` appended (the README converts the released 4B head) and runs without its
optional ``[--merge-lora]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from _x2sam_sources import save_release, write_x2sam_sources

REPO = Path(__file__).resolve().parents[1]
PATCH_DIM = 3 * 2 * 16 * 16
IMAGE, VIDEO, VISION_START, VISION_END, REGION = 1010, 1011, 1012, 1013, 1014


@contextlib.contextmanager
def working_directory(path: Path):   # contextlib.chdir needs Python 3.11
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)


def convert_commands() -> list[list[str]]:
    """Every ``python -m convert_weights.*`` line of the README's bash blocks, as argv lists."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("python -m convert_weights."):
                words = [w for w in shlex.split(line) if not (w.startswith("[") and w.endswith("]"))]
                commands.append(words[2:])
    return commands


def tiny_config():
    """The tiny X2SAM with every special token inside its 1024-row vocabulary."""
    from x2sam_jax.config import x2sam_preset

    base = x2sam_preset("tiny")
    vocab = base.vlm.text.vocab_size
    vlm = dataclasses.replace(base.vlm, image_token_id=IMAGE, video_token_id=VIDEO,
                              vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    return dataclasses.replace(base, vlm=vlm, region_token_id=REGION, seg_token_id=vocab - 3,
                               p_start_token_id=vocab - 2, p_end_token_id=vocab - 1)


def readme_inputs(config) -> dict:
    """What the README's block reads but does not define, for the tiny models."""
    rng = np.random.default_rng(0)
    grid = (1, 4, 4)                                   # 16 patches -> 4 merged visual tokens
    text = [VISION_START] + [IMAGE] * 4 + [VISION_END] + [21, 22, 23]
    processor_outputs = dict(input_ids=np.array([text], np.int32), attention_mask=np.ones((1, len(text)), np.int32),
                             pixel_values=rng.standard_normal((16, PATCH_DIM)).astype(np.float32),
                             image_grid_thw=np.array([grid], np.int32),
                             mm_token_type_ids=np.array([[int(t == IMAGE) for t in text]], np.int32))
    size = config.mask_encoder.image_size
    ids = text + [30, config.p_start_token_id, 31, 32, config.p_end_token_id, 33, config.seg_token_id, 34]
    start = ids.index(config.p_start_token_id)
    batch = dict(
        input_ids=np.array([ids], np.int32), attention_mask=np.ones((1, len(ids)), bool),
        pixel_values=processor_outputs["pixel_values"][None], grid_thw=np.array([[grid]], np.int32),
        sam_pixel_values=rng.standard_normal((1, 1, size, size, 3)).astype(np.float32),
        cond_spans=np.array([[[start, start + 3]]], np.int32), cond_valid=np.ones((1, 1), bool),
        seg_positions=np.array([[ids.index(config.seg_token_id)]], np.int32),
        # targets the collated batches carry for the losses, not model arguments
        labels=np.full((1, len(ids)), -100, np.int32), gt_masks=np.zeros((1, 1, 1, size // 4, size // 4), bool))
    return dict(pixel_values=rng.standard_normal((1, size, size, 3)).astype(np.float32),
                processor_outputs=processor_outputs, batch=batch)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory holding the README's source paths, converted by the README's commands."""
    work = tmp_path_factory.mktemp("readme")
    config = tiny_config()
    _, _, qwen_dir, sam2_dir, release = write_x2sam_sources(work, config)
    qwen_dir.rename(work / "Qwen3-VL-4B-Instruct")
    sam2_dir.rename(work / "sam2.1-hiera-large")
    (work / "x2sam_qwen3_vl_4b_sam2.1_hiera_large_m2f_e1_gpu32_lora").mkdir()
    save_release(release, work / "x2sam_qwen3_vl_4b_sam2.1_hiera_large_m2f_e1_gpu32_lora" / "pytorch_model.bin")
    commands = convert_commands()
    assert [c[0] for c in commands] == ["convert_weights.sam2"] * 2 + ["convert_weights.qwen3_vl"] * 2 + [
        "convert_weights.x2sam"]
    with working_directory(work):
        for module, *args in commands:
            if module == "convert_weights.x2sam":
                args += ["--preset", "tiny"]
            assert importlib.import_module(module).main(args) == 0, (module, args)
    return work, config


def test_readme_converter_commands_write_what_the_python_block_loads(workdir):
    work, _ = workdir
    for name in ("ckpt/sam2_large", "ckpt/qwen3_vl_4b", "ckpt/x2sam_4b"):
        assert (work / name / "checksums.json").exists(), name
    for name in ("hf_sam2", "hf_qwen"):
        assert (work / name / "config.json").exists() and list((work / name).glob("*.safetensors")), name


def test_readme_python_block_runs_as_written(workdir):
    """Before: ``x2sam(**batch)`` failed (numpy parameters, a tracer conversion error in the
    Qwen3-VL vision tower) and ``generate`` on an image prompt lacked the pixel arguments."""
    work, config = workdir
    (block,) = [b for b in code_blocks("python") if "x2sam_jax.load(" in b]
    namespace = readme_inputs(config)
    with working_directory(work):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    fpn = namespace["sam2"](namespace["pixel_values"]).fpn_hidden_states
    assert [f.shape[1] for f in fpn] == [32, 16, 8]                        # 128 / (4, 8, 16)
    assert namespace["logits"].shape == (1, 9, namespace["vlm"].config.text.vocab_size)   # the base's rows
    assert namespace["tokens"].shape[0] == 1
    out = namespace["out"]
    queries, side = config.mask_decoder.num_queries, config.mask_encoder.image_size // 4
    assert out.mask_logits.shape == (1, 1, queries, side, side)
    assert np.isfinite(np.asarray(out.mask_logits)).all()


def test_a_misspelled_model_argument_is_an_error(workdir):
    """Before: ``X2SAM.__call__(..., **unused)`` swallowed it."""
    import x2sam_jax
    from x2sam_jax.models.x2sam import model_inputs

    work, config = workdir
    x2sam = x2sam_jax.load(work / "ckpt/x2sam_4b")
    batch = readme_inputs(config)["batch"]
    assert set(model_inputs(batch)) == set(batch) - {"labels", "gt_masks"}
    with pytest.raises(TypeError, match="all_prediction"):
        x2sam(**model_inputs(batch), all_prediction=True)


def test_readme_metrics_example_prints_what_it_says():
    """The metrics block (numpy in, numbers out) runs as written; its comments state the results."""
    import contextlib
    import io

    (block,) = [b for b in code_blocks("python") if "from x2sam_jax.eval import metrics" in b]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - the README's own code
    lines = printed.getvalue().splitlines()
    assert len(lines) == 2 and float(lines[1]) == 1.0 and "'PQ': 1.0" in lines[0], lines


def test_readme_main_job_section_matches_the_script_and_the_cli():
    """The "Two commands" section: `bash scripts/main.sh` trains and evaluates the tiny synthetic
    config into runs/main; every `python -m x2sam_jax.predict` line parses with predict's own CLI,
    and its --image is a held-out image of the data that config generates."""
    import importlib.util

    from x2sam_jax import predict

    blocks = code_blocks("bash")
    assert any(line.strip().startswith("bash scripts/main.sh") for b in blocks for line in b.splitlines())
    script = (REPO / "scripts" / "main.sh").read_text()
    assert "CONFIG=configs/x2sam_tiny_synthetic.py" in script and "RUN=runs/main" in script
    assert 'train.py --config "$CONFIG" --workdir "$RUN"' in script
    assert 'eval.py --config "$CONFIG" --checkpoint "$RUN" --output "$RUN/eval"' in script

    spec = importlib.util.spec_from_file_location("tiny_config", REPO / "configs" / "x2sam_tiny_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    synth = module.get_config().data.synthetic
    first_val = synth.num_images - max(1, int(synth.num_images * 0.25)) + 1     # synthetic.generate's split
    commands = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()
                if line.strip().startswith("python -m x2sam_jax.predict")]
    assert len(commands) == 2
    for line in commands:
        args = predict.parse_args(shlex.split(line.split("#", 1)[0])[3:])
        assert args.checkpoint == "runs/main"
        if args.image:
            assert args.image == f"runs/main/data/coco/val2017/{first_val:012d}.jpg"
