"""convert_weights.sam2: HF and official checkpoints -> x2sam_jax, strictness, atomicity, export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import x2sam_jax
from _sam2_helpers import TINY_A, TINY_B, hf_full_model, hf_vision_model, max_abs, torch_fpn
from convert_weights import sam2 as convert_sam2
from x2sam_jax.conversion import ConversionError

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4  # float32 parity, highest matmul precision


def forward(path, pixels):
    model = x2sam_jax.load(path)
    return jax.jit(lambda m, x: m(x))(model, pixels)


def assert_fpn_parity(out, fpn, tol=TOL):
    assert len(out.fpn_hidden_states) == len(fpn)
    for level, (got, want) in enumerate(zip(out.fpn_hidden_states, fpn)):
        assert got.shape == want.shape, level
        assert max_abs(got, want) <= tol, (level, max_abs(got, want))


def save_safetensors(state_dict: dict, directory: Path, config: dict):
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))


def to_official(key: str) -> str:
    """transformers SAM2 vision key -> official facebookresearch/sam2 key (the inverse map)."""
    key = key.replace("vision_encoder.backbone.", "image_encoder.trunk.")
    key = key.replace("vision_encoder.neck.", "image_encoder.neck.")
    for hf, official in ((".patch_embed.projection.", ".patch_embed.proj."), (".layer_norm1.", ".norm1."),
                         (".layer_norm2.", ".norm2."), (".mlp.proj_in.", ".mlp.layers.0."),
                         (".mlp.proj_out.", ".mlp.layers.1.")):
        key = key.replace(hf, official)
    if key.startswith("image_encoder.neck.convs."):
        head, leaf = key.rsplit(".", 1)
        key = f"{head}.conv.{leaf}"
    return key


@pytest.fixture(scope="module")
def full_model_dir(tmp_path_factory):
    """A whole random Sam2Model (TINY_A encoder) saved with save_pretrained."""
    model = hf_full_model(TINY_A, seed=5)
    path = tmp_path_factory.mktemp("hf_full") / "sam2"
    model.save_pretrained(path)
    return model, path


def test_full_sam2_model_through_cli_subprocess(full_model_dir, tmp_path):
    model, src = full_model_dir
    dst = tmp_path / "jax"
    result = subprocess.run([sys.executable, "-m", "convert_weights.sam2", "--src", str(src), "--dst", str(dst)],
                            cwd=REPO, capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout and "mask_decoder." in result.stdout
    meta = json.loads((dst / "config.json").read_text())
    assert meta["model_type"] == "sam2_hiera"
    pixels = np.random.default_rng(0).standard_normal((2, 96, 128, 3)).astype(np.float32)  # non-square
    fpn, _, _ = torch_fpn(model.vision_encoder, pixels)
    assert_fpn_parity(forward(dst, pixels), fpn)


def test_bare_vision_model_second_config(tmp_path):
    model = hf_vision_model(TINY_B, seed=6)
    model.save_pretrained(tmp_path / "hf")
    skipped = convert_sam2.convert(tmp_path / "hf", tmp_path / "jax")
    assert skipped == []
    pixels = np.random.default_rng(1).standard_normal((1, 128, 128, 3)).astype(np.float32)
    fpn, _, _ = torch_fpn(model, pixels)
    assert_fpn_parity(forward(tmp_path / "jax", pixels), fpn)


def test_official_pt_layout(full_model_dir, tmp_path):
    """Official key layout: build a sam2.1_hiera_*.pt from an HF state dict with the inverse map."""
    from transformers import Sam2VisionModel

    from convert_weights.sam2 import hf_vision_config
    from x2sam_jax.config import hiera_preset

    hf = Sam2VisionModel(hf_vision_config(hiera_preset("tiny")))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in sorted(hf.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    hf.eval()
    state = {to_official(f"vision_encoder.{k}"): v for k, v in hf.state_dict().items()}
    assert all(k.startswith("image_encoder.") for k in state)
    state["sam_mask_decoder.iou_token.weight"] = torch.zeros(1, 256)     # known, skipped
    state["maskmem_tpos_enc"] = torch.zeros(7, 1, 1, 64)
    torch.save({"model": state}, tmp_path / "sam2.1_hiera_tiny.pt")

    with pytest.raises(ConversionError, match="--variant"):
        convert_sam2.convert(tmp_path / "sam2.1_hiera_tiny.pt", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    convert_sam2.main(["--src", str(tmp_path / "sam2.1_hiera_tiny.pt"), "--dst", str(tmp_path / "jax"),
                       "--variant", "tiny"])
    pixels = np.random.default_rng(2).standard_normal((1, 128, 160, 3)).astype(np.float32)
    fpn, _, _ = torch_fpn(hf, pixels)
    assert_fpn_parity(forward(tmp_path / "jax", pixels), fpn)


def _broken_copy(model, tmp_path, edit):
    state = {f"vision_encoder.{k}": v.clone() for k, v in model.state_dict().items()}
    edit(state)
    src = tmp_path / "broken"
    save_safetensors(state, src, {"model_type": "sam2", "vision_config": model.config.to_dict()})
    return src


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("vision_encoder.backbone.blocks.2.attn.qkv.weight"),
     r"missing keys:\n  vision_encoder\.backbone\.blocks\.2\.attn\.qkv\.weight"),
    (lambda s: s.__setitem__("vision_encoder.backbone.extra_head.weight", torch.zeros(3)),
     r"unexpected keys:\n  vision_encoder\.backbone\.extra_head\.weight"),
    (lambda s: s.__setitem__("vision_encoder.neck.convs.1.weight", torch.zeros(32, 7, 1, 1)),
     r"shape mismatches:\n  vision_encoder\.neck\.convs\.1\.weight"),
])
def test_bad_checkpoints_name_the_key_and_leave_nothing(full_model_dir, tmp_path, edit, message):
    model, _ = full_model_dir
    src = _broken_copy(model.vision_encoder, tmp_path, edit)
    dst = tmp_path / "out"
    with pytest.raises(ConversionError, match=message):
        convert_sam2.convert(src, dst)
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]  # no temporary directory left either


def test_existing_destination_needs_overwrite(full_model_dir, tmp_path):
    _, src = full_model_dir
    (tmp_path / "jax").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_sam2.convert(src, tmp_path / "jax")
    convert_sam2.main(["--src", str(src), "--dst", str(tmp_path / "jax"), "--overwrite"])
    assert (tmp_path / "jax" / "config.json").exists()


def test_round_trip_to_hf(full_model_dir, tmp_path):
    from transformers import Sam2VisionModel

    model, src = full_model_dir
    convert_sam2.main(["--src", str(src), "--dst", str(tmp_path / "jax")])
    convert_sam2.main(["--to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "hf")])
    reloaded = Sam2VisionModel.from_pretrained(tmp_path / "hf").eval()
    original = model.vision_encoder.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    pixels = np.random.default_rng(3).standard_normal((1, 64, 96, 3)).astype(np.float32)
    want, _, _ = torch_fpn(model.vision_encoder, pixels)
    got, _, _ = torch_fpn(reloaded, pixels)
    for a, b in zip(got, want):
        assert max_abs(a, b) == 0.0


SHARDED_SCRIPT = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
import x2sam_jax
from x2sam_jax.sharding import make_mesh
from jax.sharding import NamedSharding, PartitionSpec as P
ckpt, pixels_file, out_file = sys.argv[1:]
mesh = make_mesh(data=2, fsdp=2, tensor=2)
model = x2sam_jax.load(ckpt, mesh=mesh)
kernel = model.backbone.blocks[1].mlp.proj_in.kernel[...]
assert kernel.sharding.spec != P(), kernel.sharding  # weights really are split over the mesh
pixels = jax.device_put(np.load(pixels_file), NamedSharding(mesh, P(("data", "fsdp"))))
with jax.set_mesh(mesh):
    out = jax.jit(lambda m, x: m(x))(model, pixels)
np.save(out_file, np.asarray(out.fpn_hidden_states[0]))
"""


def test_sharded_load_and_forward_on_8_devices(full_model_dir, tmp_path):
    """Parameters restored into a (data 2, fsdp 2, tensor 2) CPU mesh give the same outputs."""
    model, src = full_model_dir
    convert_sam2.main(["--src", str(src), "--dst", str(tmp_path / "jax")])
    pixels = np.random.default_rng(4).standard_normal((4, 64, 64, 3)).astype(np.float32)
    np.save(tmp_path / "pixels.npy", pixels)
    (tmp_path / "run.py").write_text(SHARDED_SCRIPT)
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PATH": "",
           "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "jax"),
                             str(tmp_path / "pixels.npy"), str(tmp_path / "out.npy")],
                            cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    fpn, _, _ = torch_fpn(model.vision_encoder, pixels)
    assert max_abs(np.load(tmp_path / "out.npy"), fpn[0]) <= TOL


# --- bad input: named, refused, nothing of the user's touched (issue 13) ------------------------

def _truncated_copy(src: Path, tmp_path: Path) -> Path:
    """A copy of the HF directory whose weights file is cut in half: reading it is an error, so a
    test that gets a *destination* error from it knows the destination was checked first."""
    bad = tmp_path / "truncated"
    bad.mkdir()
    (bad / "config.json").write_bytes((src / "config.json").read_bytes())
    data = (src / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    return bad


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def test_integer_and_nan_tensors_are_refused_naming_them(full_model_dir, tmp_path):
    model, _ = full_model_dir

    def corrupt(state):
        state["vision_encoder.neck.convs.0.weight"] = torch.randint(0, 30, state["vision_encoder.neck.convs.0.weight"].shape)
        state["vision_encoder.backbone.blocks.0.layer_norm1.bias"][:2] = float("nan")

    src = _broken_copy(model.vision_encoder, tmp_path, corrupt)
    with pytest.raises(ConversionError) as error:
        convert_sam2.convert(src, tmp_path / "out")
    assert "non-float tensors for float parameters:\n  vision_encoder.neck.convs.0.weight: int64" in str(error.value)
    assert "non-finite weights:\n  vision_encoder.backbone.blocks.0.layer_norm1.bias: 2 of 16 values" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_cli_failure_is_one_line_and_exit_code_1_without_traceback(tmp_path):
    """Before: a relative --src that does not exist was told it needs --variant."""
    result = subprocess.run([sys.executable, "-m", "convert_weights.sam2", "--src", "no/such/sam2", "--dst",
                             str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1
    assert result.stderr.startswith("error: no/such/sam2: no such file or directory"), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_truncated_official_pt_and_bad_config_json_name_the_file(full_model_dir, tmp_path, capsys):
    pt = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": {"image_encoder.trunk.pos_embed": torch.zeros(1, 96, 7, 7)}}, str(pt))
    pt.write_bytes(pt.read_bytes()[:200])
    assert convert_sam2.main(["--src", str(pt), "--variant", "tiny", "--dst", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {pt}: cannot read it as a torch state dict") and err.count("\n") == 1, err
    bad = tmp_path / "hf"
    bad.mkdir()
    (bad / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert convert_sam2.main(["--src", str(bad), "--dst", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad / 'config.json'}: not a JSON text file") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "sam2.1_hiera_tiny.pt"]


def test_destination_is_checked_before_any_weight_is_read(full_model_dir, tmp_path, capsys):
    """Each bad --dst gets its own error although the source's weights are unreadable."""
    _, src = full_model_dir
    bad = _truncated_copy(src, tmp_path)
    (tmp_path / "a_file").write_text("mine")
    cases = {
        str(tmp_path / "a_file"): "exists and is not a directory",
        str(tmp_path / "a_file" / "ckpt"): "Not a directory",
        str(bad / "ckpt"): "lies inside the source",
    }
    for dst, message in cases.items():
        assert convert_sam2.main(["--src", str(bad), "--dst", dst, "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (dst, err)
    assert convert_sam2.main(["--src", str(bad), "--dst", str(bad), "--overwrite"]) == 1
    assert "is the source" in capsys.readouterr().err
    if os.geteuid() != 0:   # root writes into read-only directories
        (tmp_path / "read_only").mkdir(mode=0o500)
        assert convert_sam2.main(["--src", str(bad), "--dst", str(tmp_path / "read_only" / "ckpt")]) == 1
        assert "Permission denied" in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "read_only") == ["a_file", "truncated"]
    assert sorted(p.name for p in bad.iterdir()) == ["config.json", "model.safetensors"]


def test_overwrite_replaces_only_a_checkpoint(full_model_dir, tmp_path, capsys):
    """Before: --overwrite removed an unrelated folder recursively."""
    _, src = full_model_dir
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "keep.txt").write_text("keep")
    (mine / "sub" / "thesis.tex").write_text("\\section{}")
    before = _tree(mine)
    assert convert_sam2.main(["--src", str(src), "--dst", str(mine), "--overwrite"]) == 1
    assert "--overwrite replaces only an x2sam_jax checkpoint" in capsys.readouterr().err
    assert _tree(mine) == before
    ckpt = tmp_path / "ckpt"
    assert convert_sam2.main(["--src", str(src), "--dst", str(ckpt)]) == 0
    (ckpt / "params" / "marker").write_text("old")
    assert convert_sam2.main(["--src", str(src), "--dst", str(ckpt), "--overwrite"]) == 0
    assert not (ckpt / "params" / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "mine"]   # no scratch left behind


def test_next_run_cleans_the_scratch_of_killed_runs_and_nothing_else(full_model_dir, tmp_path):
    """Before: a killed --overwrite left a hidden .DST.tmp-* folder that nothing ever removed."""
    _, src = full_model_dir
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    ours = [f".ckpt.tmp-{dead}-0123abcd", f".ckpt.tmp-{dead}-89abcdef"]    # killed runs' writes
    kept = [f".ckpt.tmp-{os.getpid()}-0123abcd",                            # a live process's write
            ".ckpt.tmp-notours", f".other.tmp-{dead}-0123abcd", "ckpt.tmp-0123abcd", ".ckpt.tmp-89abcdef"]
    for name in ours + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "half.bin").write_bytes(b"x")
    assert convert_sam2.main(["--src", str(src), "--dst", str(tmp_path / "ckpt")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["ckpt"])
