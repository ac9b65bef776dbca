"""convert_weights.sam2: HF and official checkpoints -> x2sam_jax, strictness, atomicity, export."""

import json
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
        convert_sam2.main(["--src", str(tmp_path / "sam2.1_hiera_tiny.pt"), "--dst", str(tmp_path / "x")])
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
        convert_sam2.main(["--src", str(src), "--dst", str(dst)])
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]  # no temporary directory left either


def test_existing_destination_needs_overwrite(full_model_dir, tmp_path):
    _, src = full_model_dir
    (tmp_path / "jax").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_sam2.main(["--src", str(src), "--dst", str(tmp_path / "jax")])
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
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PATH": ""}
    result = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "jax"),
                             str(tmp_path / "pixels.npy"), str(tmp_path / "out.npy")],
                            cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    fpn, _, _ = torch_fpn(model.vision_encoder, pixels)
    assert max_abs(np.load(tmp_path / "out.npy"), fpn[0]) <= TOL
