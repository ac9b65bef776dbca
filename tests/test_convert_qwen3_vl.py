"""convert_weights.qwen3_vl: strict + atomic HF -> JAX, --add-x2sam-tokens, --to-hf round trip,
presets and from_hf."""

from __future__ import annotations

import copy
import json
import re
import shutil

import numpy as np
import pytest

import x2sam_jax
from _qwen3_vl_helpers import (HUB_4B_CONFIG, convert_cli, image_tokens, make_hf_model, pixels, save_tiny_tokenizer, text_ids,
                               torch_logits)
from convert_weights.qwen3_vl import config_from_hf, convert, main, resize_rows
from x2sam_jax.config import Qwen3TextConfig, Qwen3VLVisionConfig
from x2sam_jax.conversion import ConversionError


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen3vl_convert")
    hf, src = make_hf_model(tmp, tie=True, seed=3, layers=2)
    return hf, src


def _edit_checkpoint(src, dst, edit):
    """Copies an HF dir, applying ``edit(dict)`` to the tensors of the shard that holds the first key."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(str(dst / shard))
    edit(tensors)
    save_file(tensors, str(dst / shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update({k: shard for k in tensors})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def _leaves_nothing(dst):
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.tmp")]


def test_missing_key_fails_with_its_name_and_leaves_no_dst(hf_dir, tmp_path):
    _, src = hf_dir
    removed = []

    def drop(tensors):
        key = sorted(tensors)[0]
        removed.append(key)
        del tensors[key]

    bad = _edit_checkpoint(src, tmp_path / "bad", drop)
    with pytest.raises(ConversionError, match="missing keys") as error:
        convert(bad, tmp_path / "out")
    assert removed[0] in str(error.value)
    _leaves_nothing(tmp_path / "out")
    assert main(["--src", str(bad), "--dst", str(tmp_path / "out")]) == 1
    _leaves_nothing(tmp_path / "out")


def test_unknown_key_fails_with_its_name_and_leaves_no_dst(hf_dir, tmp_path):
    import torch

    _, src = hf_dir
    bad = _edit_checkpoint(src, tmp_path / "bad", lambda t: t.update({"model.language_model.extra.weight": torch.zeros(3)}))
    with pytest.raises(ConversionError, match=r"unexpected keys:\s+model\.language_model\.extra\.weight"):
        convert(bad, tmp_path / "out")
    _leaves_nothing(tmp_path / "out")


def test_misshaped_key_fails_with_its_name_and_leaves_no_dst(hf_dir, tmp_path):
    _, src = hf_dir
    key = "model.language_model.layers.0.mlp.up_proj.weight"

    from safetensors import safe_open

    index = json.loads((src / "model.safetensors.index.json").read_text())
    shutil.copytree(src, tmp_path / "bad")
    shard = tmp_path / "bad" / index["weight_map"][key]
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(shard))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with safe_open(str(shard), "pt") as f:
        assert tuple(f.get_tensor(key).shape) == (96, 63)
    with pytest.raises(ConversionError, match=r"shape mismatches:\s+" + key.replace(".", r"\.") + r": expected \(96, 64\)"):
        convert(tmp_path / "bad", tmp_path / "out")
    _leaves_nothing(tmp_path / "out")


def test_existing_dst_needs_overwrite(hf_dir, tmp_path):
    _, src = hf_dir
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        convert(src, tmp_path / "out")
    convert(src, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "config.json").exists()


def test_export_to_hf_round_trip(hf_dir, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    hf, src = hf_dir
    convert_cli(src, tmp_path / "jax")
    assert main(["--to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "back"),
                 "--max-shard-bytes", "100000"]) == 0
    assert len(list((tmp_path / "back").glob("*.safetensors"))) >= 3
    again = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    grid = [1, 4, 6]
    ids = np.array([text_ids(3, 1) + image_tokens(grid) + text_ids(3, 2)])
    kw = dict(pixel_values=pixels([grid], 3), image_grid_thw=np.array([grid]))
    ref = torch_logits(hf, ids, **kw)
    back = torch_logits(again, ids, **kw)
    assert np.abs(back - ref).max() <= 1e-6
    state, state_again = hf.state_dict(), again.state_dict()
    assert set(state) == set(state_again)
    assert max(float((state[k] - state_again[k]).abs().max()) for k in state) == 0.0


def test_add_x2sam_tokens_shrinks_like_the_official_resize(hf_dir, tmp_path):
    """Tokenizer (200) + 3 tokens < 256 embedding rows: HF resize_token_embeddings(len(tokenizer))
    truncates to 203 rows; the tokenizer in DST knows the new tokens."""
    from transformers import AutoTokenizer

    hf, src = hf_dir
    with_tok = tmp_path / "src"
    shutil.copytree(src, with_tok)
    save_tiny_tokenizer(with_tok, 200)
    convert_cli(with_tok, tmp_path / "jax", "--add-x2sam-tokens")
    model = x2sam_jax.load(tmp_path / "jax")
    table = np.asarray(model.language_model.embed_tokens.embedding[...])
    original = hf.model.language_model.embed_tokens.weight.detach().numpy()
    assert table.shape == (203, 64) and model.config.text.vocab_size == 203
    np.testing.assert_array_equal(table, original[:203])
    tok = AutoTokenizer.from_pretrained(tmp_path / "jax")
    assert [tok.convert_tokens_to_ids(t) for t in ("<SEG>", "<p>", "</p>")] == [200, 201, 202]
    assert tok.tokenize("w5 <SEG> <p> w7 </p>") == ["w5", "<SEG>", "<p>", "w7", "</p>"]
    meta = json.loads((tmp_path / "jax" / "config.json").read_text())
    assert meta["x2sam_token_ids"] == {"<SEG>": 200, "<p>": 201, "</p>": 202}
    assert json.loads((tmp_path / "jax" / "hf_config.json").read_text())["text_config"]["vocab_size"] == 203


def test_add_x2sam_tokens_grows_with_mean_rows(hf_dir, tmp_path):
    hf, src = hf_dir
    with_tok = tmp_path / "src"
    shutil.copytree(src, with_tok)
    save_tiny_tokenizer(with_tok, 256)
    convert_cli(with_tok, tmp_path / "jax", "--add-x2sam-tokens")
    table = np.asarray(x2sam_jax.load(tmp_path / "jax").language_model.embed_tokens.embedding[...])
    original = hf.model.language_model.embed_tokens.weight.detach().numpy()
    assert table.shape == (259, 64)
    np.testing.assert_array_equal(table[:256], original)
    # new rows: the old mean plus a tiny N(0, 1e-9 cov) draw
    assert np.abs(table[256:] - original.mean(0)).max() < 1e-4
    assert np.abs(table[256:] - original.mean(0)).max() > 0


def test_resize_rows_falls_back_to_the_mean_when_covariance_is_singular():
    rows = np.tile(np.arange(4, dtype=np.float32), (5, 1))  # rank-0 covariance
    grown = resize_rows(rows, 7)
    np.testing.assert_array_equal(grown[5:], np.tile(rows.mean(0), (2, 1)))
    np.testing.assert_array_equal(resize_rows(rows, 3), rows[:3])


def test_presets_have_the_hub_numbers():
    four = Qwen3TextConfig.qwen3_vl_4b()
    assert (four.num_layers, four.hidden_size, four.num_heads, four.num_kv_heads, four.head_dim,
            four.intermediate_size, four.vocab_size, four.rope_theta, four.tie_word_embeddings) == \
        (36, 2560, 32, 8, 128, 9728, 151936, 5e6, True)
    two = Qwen3TextConfig.qwen3_vl_2b()
    assert (two.num_layers, two.hidden_size, two.num_heads, two.num_kv_heads, two.intermediate_size,
            two.tie_word_embeddings) == (28, 2048, 16, 8, 6144, True)
    eight = Qwen3TextConfig.qwen3_vl_8b()
    assert (eight.num_layers, eight.hidden_size, eight.num_heads, eight.num_kv_heads, eight.intermediate_size,
            eight.tie_word_embeddings) == (36, 4096, 32, 8, 12288, False)


def test_from_hf_reads_a_hub_style_config():
    hub = copy.deepcopy(HUB_4B_CONFIG)
    config = config_from_hf(hub, position_mode="sequential")
    assert config.text == Qwen3TextConfig.qwen3_vl_4b()
    assert config.vision == Qwen3VLVisionConfig.preset("4b")
    assert config.position_mode == "sequential"
    with pytest.raises(ValueError, match="rope_type"):
        Qwen3TextConfig.from_hf({**hub["text_config"], "rope_scaling": {"rope_type": "yarn"}})


def test_lora_model_exports_merged_and_builds_its_own_hf_config(hf_dir, tmp_path):
    """A LoRA-adapted model saved with x2sam_jax.save (no hf_config.json kept): --to-hf merges the
    adapters into the base weights and writes a config.json transformers loads; same logits."""
    import dataclasses

    import jax
    from flax import nnx
    from transformers import Qwen3VLForConditionalGeneration

    from x2sam_jax.config import LoRAConfig
    from x2sam_jax.models.lora import LORA_FILTER
    from x2sam_jax.models.qwen3_vl import Qwen3VLModel

    _, src = hf_dir
    convert_cli(src, tmp_path / "jax")
    base = x2sam_jax.load(tmp_path / "jax")
    config = dataclasses.replace(base.config, lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
    adapted = Qwen3VLModel(config, rngs=nnx.Rngs(0))
    nnx.update(adapted, nnx.state(base, nnx.Param))
    lora = nnx.state(adapted, LORA_FILTER)
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(lora))))
    nnx.update(adapted, jax.tree.map(lambda a: 0.2 * jax.random.normal(next(keys), a.shape, a.dtype), lora))
    x2sam_jax.save(tmp_path / "adapted", adapted)
    assert not (tmp_path / "adapted" / "hf_config.json").exists()
    assert main(["--to-hf", "--src", str(tmp_path / "adapted"), "--dst", str(tmp_path / "back")]) == 0
    hf = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    grid = [1, 4, 4]
    ids = np.array([text_ids(3, 1) + image_tokens(grid) + text_ids(3, 2)])
    kw = dict(pixel_values=pixels([grid], 3), image_grid_thw=np.array([grid]))
    ours = np.asarray(adapted(input_ids=ids, **kw).logits)
    assert np.abs(ours - np.asarray(base(input_ids=ids, **kw).logits)).max() > 1e-3  # the adapters matter
    assert np.abs(torch_logits(hf, ids, **kw) - ours).max() <= 1e-4


def test_full_presets_pair_vision_and_text_widths():
    from x2sam_jax.config import Qwen3VLConfig

    for name in ("2b", "4b", "8b"):
        config = Qwen3VLConfig.preset(name)
        assert config.vision.out_hidden_size == config.text.hidden_size


def test_bfloat16_storage_loads_back_as_float32(hf_dir, tmp_path):
    import jax.numpy as jnp

    from x2sam_jax.model_checkpoint import load_flat_params

    hf, src = hf_dir
    convert_cli(src, tmp_path / "bf16", "--dtype", "bfloat16")
    stored = load_flat_params(tmp_path / "bf16")
    assert stored["language_model.layers.mlp.up_proj.kernel"].dtype == jnp.bfloat16
    model = x2sam_jax.load(tmp_path / "bf16")
    kernel = model.language_model.layers.mlp.up_proj.kernel[...]
    assert kernel.dtype == jnp.float32
    original = hf.model.language_model.layers[1].mlp.up_proj.weight.detach().numpy().T
    np.testing.assert_array_equal(np.asarray(kernel[1]), original.astype(jnp.bfloat16).astype(np.float32))


# --- bad input: named, refused, nothing of the user's touched (issue 13) ------------------------

def test_add_x2sam_tokens_refuses_a_source_without_its_tokenizer(hf_dir, tmp_path, capsys):
    """Before: exit 0 with an empty 4-token tokenizer, the 256-row embedding cut to 4, <SEG> = 1."""
    _, src = hf_dir
    assert not any((src / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    assert main(["--src", str(src), "--dst", str(tmp_path / "out"), "--add-x2sam-tokens"]) == 1
    err = capsys.readouterr().err
    assert f"{src} has no tokenizer files" in err and err.count("\n") == 1, err
    _leaves_nothing(tmp_path / "out")


def test_add_x2sam_tokens_refuses_a_tokenizer_far_smaller_than_the_embedding(hf_dir, tmp_path, capsys):
    _, src = hf_dir
    shutil.copytree(src, tmp_path / "src")
    save_tiny_tokenizer(tmp_path / "src", 4)
    assert main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "out"), "--add-x2sam-tokens"]) == 1
    assert "has 4 tokens for an embedding of 256 rows" in capsys.readouterr().err
    _leaves_nothing(tmp_path / "out")


def test_integer_bool_and_nan_tensors_are_refused_naming_them(hf_dir, tmp_path, capsys):
    """Before: an int kernel became [21. 5. 0. 9. ...] and NaN weights loaded."""
    import torch

    _, src = hf_dir
    names = {}

    def corrupt(tensors):
        keys = sorted(k for k in tensors if k.endswith(".weight") and tensors[k].ndim == 2)
        names["int"], names["nan"] = keys[0], keys[1]
        tensors[keys[0]] = torch.randint(0, 30, tensors[keys[0]].shape, dtype=torch.int32)
        tensors[keys[1]] = tensors[keys[1]].clone()
        tensors[keys[1]][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        norms = sorted(k for k in tensors if k.endswith("norm.weight"))
        names["bool"] = norms[0]
        tensors[norms[0]] = torch.ones(tensors[norms[0]].shape, dtype=torch.bool)

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"   # one unsharded file holding every tensor
    bad.mkdir()
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    corrupt(tensors)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", bad / "config.json")
    assert main(["--src", str(bad), "--dst", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{names['int']}: int32 tensor for the float32 parameter" in err, err
    assert f"{names['bool']}: bool tensor for the float32 parameter" in err, err
    assert re.search(re.escape(names["nan"]) + r": 3 of \d+ values are NaN or infinite", err), err
    _leaves_nothing(tmp_path / "out")


def test_truncated_shard_and_bad_config_json_are_one_line_naming_the_file(hf_dir, tmp_path, capsys):
    _, src = hf_dir
    shutil.copytree(src, tmp_path / "bad")
    shard = sorted((tmp_path / "bad").glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert main(["--src", str(tmp_path / "bad"), "--dst", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.split("\r")[-1]   # after the (cleared) progress bar
    assert err.startswith(f"error: {shard}: cannot read it as safetensors") and err.count("\n") == 1, err
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "qwen3_vl",')
    assert main(["--src", str(tmp_path / "bad"), "--dst", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'bad' / 'config.json'}: not valid JSON") and err.count("\n") == 1, err
    _leaves_nothing(tmp_path / "out")


def test_to_hf_overwrite_replaces_an_export_but_never_the_hub_download(hf_dir, tmp_path, capsys):
    _, src = hf_dir
    shutil.copytree(src, tmp_path / "hub")
    convert_cli(tmp_path / "hub", tmp_path / "jax")
    before = {p.name: p.read_bytes() for p in (tmp_path / "hub").iterdir()}
    assert main(["--to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "hub"), "--overwrite"]) == 1
    assert "replaces only an HF export of x2sam_jax" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "hub").iterdir()} == before
    for _ in range(2):   # the first writes the export, the second replaces it
        assert main(["--to-hf", "--src", str(tmp_path / "jax"), "--dst", str(tmp_path / "back"), "--overwrite"]) == 0
    assert (tmp_path / "back" / "x2sam_jax_export.json").exists()
    assert not (tmp_path / "back" / "checksums.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "hub", "jax"]
