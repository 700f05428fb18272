"""wmjax.convert: HF / wmjax file round trips, transformers interop, legacy checkpoints on disk, CLI, bad inputs."""

import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from wmjax.config import ConfigError, DogeConfig
from wmjax.convert import (ConversionError, flatten_params, from_state_dict, hf_layout, load_hf, load_wmjax, save_hf,
                           save_wmjax, to_state_dict, unflatten_params)
from wmjax.convert.__main__ import main as cli
from wmjax.models.doge import DogeForCausalLM, init_params, param_logical_axes

jax.config.update("jax_default_matmul_precision", "highest")
transformers.logging.set_verbosity_error()

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, keep_window_size=6, max_position_embeddings=64)
MOE = dict(is_moe=True, num_experts=16, num_experts_per_tok=3)


def random_params(cfg, seed=0):
    """Params straight from the layout table (no jit): N(0, 0.02) matrices, 1-D weights 1 + N(0, 0.1), biases
    N(0, 0.1), A ~ N(0, 1) (the keep-window top-k then has no ties). test_layout_covers_exactly_the_model_params
    checks the table against the model's own init."""
    rng = np.random.default_rng(seed)
    flat = {}
    for e in hf_layout(cfg):
        if e.path[-1] == "A":
            v = rng.normal(size=e.flax_shape)
        elif e.path[-1] == "bias":
            v = 0.1 * rng.normal(size=e.flax_shape)
        elif len(e.flax_shape) == 1:
            v = 1 + 0.1 * rng.normal(size=e.flax_shape)
        else:
            v = 0.02 * rng.normal(size=e.flax_shape)
        flat[e.flat_path] = jnp.asarray(v, jnp.float32)
    return unflatten_params(flat)


def ids_and_mask(b=2, s=11, seed=3):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(TINY["vocab_size"])[:s] for _ in range(b)])  # no repeats: no bias ties
    mask = np.ones((b, s), np.int64)
    mask[-1, s - 3:] = 0
    return ids, mask


def wmjax_logits(cfg, params, ids, mask):
    out, _ = DogeForCausalLM(cfg, attention_impl="reference").apply(
        {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    return np.asarray(out)


def tensors_bytes(file):
    """{key: (dtype, shape, raw bytes)} of a safetensors file (bf16 compared as raw bits)."""
    out = {}
    with safe_open(file, framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            out[k] = (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def hf_random_model(cfg, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = transformers.DogeForCausalLM(transformers.DogeConfig(**cfg.to_hf_dict())).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(".A"):
                p.copy_(torch.randn_like(p))
    return m.to(dtype)


def assert_no_leftovers(parent, allowed=()):
    left = sorted(set(os.listdir(parent)) - set(allowed))
    assert left == [], f"left behind in {parent}: {left}"


# ------------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("overrides", [dict(tie_word_embeddings=True), dict(MOE, attention_bias=True, mlp_bias=True),
                                       dict(qk_norm=False, dt_heads="query")])
def test_layout_covers_exactly_the_model_params(overrides):
    cfg = DogeConfig(**dict(TINY, **overrides))
    axes = flatten_params(param_logical_axes(cfg))
    shapes = {k: v.shape for k, v in flatten_params(jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0))))
              .items()}
    assert set(axes) == set(shapes)
    assert {e.flat_path: e.flax_shape for e in hf_layout(cfg)} == shapes


# ------------------------------------------------------------------------------------------------ HF interop
@pytest.mark.parametrize("moe", [False, True])
def test_export_from_pretrained_logits_equal(tmp_path, moe):
    cfg = DogeConfig(**dict(TINY, **(MOE if moe else {}), tie_word_embeddings=not moe))
    params = random_params(cfg)
    save_hf(cfg, params, tmp_path / "hf")
    files = sorted(os.listdir(tmp_path / "hf"))
    assert files == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not cfg.tie_word_embeddings)
    hf, info = transformers.DogeForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                            output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask = ids_and_mask()
    with torch.no_grad():
        ref = hf.eval()(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    chex.assert_trees_all_close(wmjax_logits(cfg, params, ids, mask), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype,moe", [(torch.float32, True), (torch.bfloat16, False)])
def test_import_export_byte_identical(tmp_path, dtype, moe):
    """HF save_pretrained -> load_hf -> save_hf: every tensor has the same dtype, shape and bytes; config equal."""
    cfg = DogeConfig(**dict(TINY, **(MOE if moe else {}), tie_word_embeddings=moe))
    hf_random_model(cfg, dtype).save_pretrained(tmp_path / "src")
    cfg2, params = load_hf(tmp_path / "src")
    assert cfg2 == cfg
    assert params["model"]["embed_tokens"]["embedding"].dtype == (jnp.bfloat16 if dtype == torch.bfloat16
                                                                  else jnp.float32)
    save_hf(cfg2, params, tmp_path / "dst")
    a = tensors_bytes(str(tmp_path / "src" / "model.safetensors"))
    b = tensors_bytes(str(tmp_path / "dst" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k] == b[k], k
    assert DogeConfig.from_hf_json(str(tmp_path / "dst")) == cfg


def test_sharded_and_torch_bin_and_state_dict_sources(tmp_path):
    cfg = DogeConfig(**dict(TINY, tie_word_embeddings=False))
    hf = hf_random_model(cfg)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    _, p_sharded = load_hf(tmp_path / "sharded")
    os.makedirs(tmp_path / "bin")
    shutil.copy(tmp_path / "sharded" / "config.json", tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _, p_bin = load_hf(tmp_path / "bin")
    _, p_sd = load_hf(hf.state_dict(), config=cfg)
    _, p_np = load_hf({k: v.numpy() for k, v in hf.state_dict().items()}, config=cfg.to_hf_dict())
    p_from = from_state_dict(cfg, hf.state_dict())
    for p in (p_bin, p_sd, p_np, p_from):
        chex.assert_trees_all_equal(p, p_sharded)
    sd = to_state_dict(cfg, p_sharded)
    for k, v in hf.state_dict().items():
        np.testing.assert_array_equal(sd[k], v.numpy())


def test_wmjax_native_round_trip_and_cli(tmp_path, capsys):
    cfg = DogeConfig(**dict(TINY, **MOE, router_layout="per_token", tie_word_embeddings=True))
    params = random_params(cfg)
    save_wmjax(cfg, params, tmp_path / "wm")
    cfg2, params2 = load_wmjax(tmp_path / "wm")
    assert cfg2 == cfg
    chex.assert_trees_all_equal(params2, params)
    # CLI: wmjax -> hf -> wmjax -> hf, tensors byte-identical
    with pytest.warns(UserWarning, match="per_token"):
        assert cli(["--from", "wmjax", str(tmp_path / "wm"), "--to", "hf", str(tmp_path / "hf1"), "--no-progress"]) == 0
    assert cli(["--from", "hf", str(tmp_path / "hf1"), "--to", "wmjax", str(tmp_path / "wm2")]) == 0
    assert "wrote wmjax checkpoint" in capsys.readouterr().out
    cfg3, params3 = load_wmjax(tmp_path / "wm2")
    assert cfg3 == cfg  # router_layout travels in config.json as an extra key transformers ignores
    chex.assert_trees_all_equal(params3, params)
    with pytest.warns(UserWarning, match="per_token"):
        assert cli(["--from", "wmjax", str(tmp_path / "wm2"), "--to", "hf", str(tmp_path / "hf2")]) == 0
    assert tensors_bytes(str(tmp_path / "hf1" / "model.safetensors")) == tensors_bytes(
        str(tmp_path / "hf2" / "model.safetensors"))
    # an existing destination needs --overwrite
    assert cli(["--from", "hf", str(tmp_path / "hf1"), "--to", "wmjax", str(tmp_path / "wm2")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli(["--from", "hf", str(tmp_path / "hf1"), "--to", "wmjax", str(tmp_path / "wm2"), "--overwrite",
                "--dtype", "bfloat16"]) == 0
    assert load_wmjax(tmp_path / "wm2")[1]["model"]["norm"]["weight"].dtype == jnp.bfloat16
    assert_no_leftovers(tmp_path, ["wm", "wm2", "hf1", "hf2"])


def test_legacy_checkpoint_directory_cli(tmp_path, capsys):
    """A legacy SmallDoge directory on disk (old names, old config.json fields, no q/k norm, A by query heads):
    --to wmjax works; --to hf fails explaining why, leaving nothing behind."""
    cfg = DogeConfig(**dict(TINY, tie_word_embeddings=True, qk_norm=False, dt_heads="query"))
    params = random_params(cfg)
    sd = {}
    names = {"model.embed_tokens.weight": "model.word_embed.weight", "model.norm.weight": "model.final_layernorm.weight"}
    for k, v in to_state_dict(cfg, params).items():
        k = names.get(k, k)
        k = (k.replace("input_layernorm.weight", "pre_layernorm.weight").replace("input_residual", "pre_residual.weight")
             .replace("post_attention_layernorm.weight", "post_layernorm.weight")
             .replace("post_attention_residual", "post_residual.weight").replace(".mlp.", ".feed_forward."))
        sd[k] = v
    os.makedirs(tmp_path / "old")
    from safetensors.numpy import save_file
    save_file(sd, str(tmp_path / "old" / "model.safetensors"), metadata={"format": "pt"})
    old_cfg = {k: v for k, v in cfg.to_dict().items() if k not in ("router_layout", "qk_norm", "dt_heads",
                                                                    "rope_type", "rope_factor", "rope_theta",
                                                                    "attention_bias", "mlp_bias")}
    old_cfg.update(model_type="doge", hidden_bias=False, dynamic_mask_ratio=0.0, rope_theta=10000.0,
                   rope_scaling=None, architectures=["DogeForCausalLM"], auto_map={"AutoConfig": "x"})
    with open(tmp_path / "old" / "config.json", "w") as f:
        json.dump(old_cfg, f)
    assert cli(["--from", "hf", str(tmp_path / "old"), "--to", "wmjax", str(tmp_path / "wm"), "--no-progress"]) == 0
    assert "qk_norm=False" in capsys.readouterr().out
    cfg2, params2 = load_wmjax(tmp_path / "wm")
    assert cfg2 == cfg
    chex.assert_trees_all_equal(params2, params)
    assert cli(["--from", "hf", str(tmp_path / "old"), "--to", "hf", str(tmp_path / "new")]) == 1
    err = capsys.readouterr().err
    assert "no lossless HF-native" in err and "qk_norm=False" in err and "dt_heads='query' with GQA" in err
    assert cli(["--from", "hf", str(tmp_path / "old"), "--to", "wmjax", str(tmp_path / "x"), "--strict"]) == 1
    err = capsys.readouterr().err
    assert "model.word_embed.weight" in err and "pre-2025-06-19" in err
    assert_no_leftovers(tmp_path, ["old", "wm"])


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.fixture
def hf_dir(tmp_path):
    cfg = DogeConfig(**dict(TINY, tie_word_embeddings=False))
    save_hf(cfg, random_params(cfg), tmp_path / "src")
    return cfg, tmp_path / "src"


def _cli_fails(tmp_path, src, capsys, dst_name="dst", fmt="hf"):
    """Conversion of a bad source: exit 1, the destination (fresh, or existing with content) is untouched."""
    dst = tmp_path / dst_name
    assert cli(["--from", fmt, str(src), "--to", "wmjax", str(dst)]) == 1
    assert not dst.exists()
    os.makedirs(dst)
    (dst / "keep.txt").write_text("old")
    assert cli(["--from", fmt, str(src), "--to", "wmjax", str(dst), "--overwrite"]) == 1
    assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "old"
    shutil.rmtree(dst)
    assert_no_leftovers(tmp_path, [os.path.basename(src)])
    return capsys.readouterr().err


def test_unknown_config_field(hf_dir, tmp_path, capsys):
    cfg, src = hf_dir
    d = json.loads((src / "config.json").read_text())
    d["frobnicate"] = 3
    (src / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="frobnicate"):
        load_hf(src)
    err = _cli_fails(tmp_path, src, capsys)
    assert "frobnicate" in err and "config.json" in err
    # wmjax-native config: same
    save_wmjax(cfg, random_params(cfg), tmp_path / "wm")
    meta = json.loads((tmp_path / "wm" / "wmjax_config.json").read_text())
    meta["config"]["frobnicate"] = 1
    (tmp_path / "wm" / "wmjax_config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"wmjax_config.json.*frobnicate"):
        load_wmjax(tmp_path / "wm")


@pytest.mark.parametrize("field,value", [("num_key_value_heads", 3), ("head_dim", 7), ("vocab_size", -1),
                                         ("router_layout", "sideways")])
def test_invalid_config_value_names_the_field(hf_dir, field, value):
    _, src = hf_dir
    d = json.loads((src / "config.json").read_text())
    d[field] = value
    (src / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=field) as e:
        load_hf(src)
    assert "config.json" in str(e.value)


def test_wrong_vocab_shape_lists_every_key(hf_dir, tmp_path, capsys):
    cfg, src = hf_dir
    d = json.loads((src / "config.json").read_text())
    d["vocab_size"] = 90  # the tensors have 97 rows
    (src / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConversionError) as e:
        load_hf(src)
    msg = str(e.value)
    f = str(src / "model.safetensors")
    assert f"model.embed_tokens.weight: expected (90, 64), found (97, 64) in {f}" in msg
    assert f"lm_head.weight: expected (90, 64), found (97, 64) in {f}" in msg
    assert sorted(e.value.mismatched) == ["lm_head.weight", "model.embed_tokens.weight"]
    err = _cli_fails(tmp_path, src, capsys)
    assert "model.embed_tokens.weight" in err and "lm_head.weight" in err


def test_missing_layer_lists_every_key(hf_dir, tmp_path, capsys):
    cfg, src = hf_dir
    from safetensors.numpy import load_file, save_file
    sd = load_file(str(src / "model.safetensors"))
    layer1 = sorted(k for k in sd if k.startswith("model.layers.1."))
    assert len(layer1) == 15
    sd = {k: v for k, v in sd.items() if k not in layer1}
    sd["model.layers.1.self_attn.extra"] = np.zeros(3, np.float32)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError) as e:
        load_hf(src)
    assert sorted(e.value.missing) == layer1
    assert e.value.unexpected == ["model.layers.1.self_attn.extra"]
    assert "15 missing, 1 unexpected, 0 mis-shaped" in str(e.value)
    assert "missing     model.layers.1.self_attn.A: expected (2,)" in str(e.value)
    for k in layer1:
        assert k in str(e.value)
    _cli_fails(tmp_path, src, capsys)
    # the same checks on the way out: mis-shaped / missing params
    params = random_params(cfg)
    del params["model"]["layers_1"]
    params["model"]["norm"]["weight"] = jnp.ones(63)
    with pytest.raises(ConversionError, match=r"model/norm/weight: expected \(64,\), found \(63,\)") as e:
        save_hf(cfg, params, tmp_path / "out")
    assert len(e.value.missing) == 15 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
def test_corrupt_safetensors_names_the_file(hf_dir, tmp_path, capsys, damage):
    _, src = hf_dir
    f = src / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) - 100])
    elif damage == "garbage_header":
        f.write_bytes(data[:8] + b"{not json" + data[17:])
    else:
        f.write_bytes(b"")
    with pytest.raises(ConversionError, match="not a readable safetensors file") as e:
        load_hf(src)
    assert str(f) in str(e.value)
    err = _cli_fails(tmp_path, src, capsys)
    assert str(f) in err


def test_failure_while_writing_leaves_destination_untouched(tmp_path, monkeypatch):
    cfg = DogeConfig(**dict(TINY, tie_word_embeddings=True))
    params = random_params(cfg)
    os.makedirs(tmp_path / "dst")
    (tmp_path / "dst" / "keep.txt").write_text("old")
    import wmjax.convert.core as core

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(core, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_hf(cfg, params, tmp_path / "dst", overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_wmjax(cfg, params, tmp_path / "new")
    assert os.listdir(tmp_path / "dst") == ["keep.txt"]
    assert_no_leftovers(tmp_path, ["dst"])
    monkeypatch.undo()
    save_hf(cfg, params, tmp_path / "dst", overwrite=True)  # success replaces it
    assert sorted(os.listdir(tmp_path / "dst")) == ["config.json", "model.safetensors"]
    assert_no_leftovers(tmp_path, ["dst"])


def test_single_file_tied_head_and_square_query_dt(tmp_path):
    cfg = DogeConfig(**dict(TINY, tie_word_embeddings=True))
    params = random_params(cfg)
    save_hf(cfg, params, tmp_path / "hf")
    # a single safetensors file needs a config
    with pytest.raises(ConversionError, match="no config given"):
        load_hf(tmp_path / "hf" / "model.safetensors")
    _, p = load_hf(tmp_path / "hf" / "model.safetensors", config=cfg)
    chex.assert_trees_all_equal(p, params)
    # HF's state_dict() carries the tied head: accepted when it is the embedding, an error when it is not
    sd = to_state_dict(cfg, params, include_tied_head=True)
    chex.assert_trees_all_equal(from_state_dict(cfg, sd), params)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(ConversionError, match="lm_head.weight differs from model.embed_tokens.weight"):
        from_state_dict(cfg, sd)
    # legacy "A/dt_proj by query heads" with H == G is the same tensors as HF-native: written as dt_heads="kv"
    sq = DogeConfig(**dict(TINY, num_key_value_heads=4, dt_heads="query"))
    save_hf(sq, random_params(sq), tmp_path / "sq")
    assert load_hf(tmp_path / "sq")[0] == sq.replace(dt_heads="kv")
    with pytest.raises(ValueError, match="legacy="):
        load_hf(tmp_path / "sq", legacy="maybe")


def test_legacy_router_bias_dropped_with_warning_when_nonzero():
    cfg = DogeConfig(**dict(TINY, **MOE, tie_word_embeddings=True))
    params = random_params(cfg)
    sd = {k.replace(".mlp.", ".feed_forward."): v for k, v in to_state_dict(cfg, params).items()}
    sd["model.rotary_emb.inv_freq"] = np.ones(8, np.float32)  # old persistent RoPE buffer: ignored
    for i in range(cfg.num_hidden_layers):
        sd[f"model.layers.{i}.feed_forward.router_gate.bias"] = np.zeros(2 * cfg.num_keys, np.float32)
    chex.assert_trees_all_equal(from_state_dict(cfg, sd), params)
    sd["model.layers.1.feed_forward.router_gate.bias"] = np.full(2 * cfg.num_keys, 0.5, np.float32)
    with pytest.warns(UserWarning, match=r"dropping non-zero legacy model.layers.1.feed_forward.router_gate.bias"):
        from_state_dict(cfg, sd)
    with pytest.raises(ConversionError, match="both map to"):
        from_state_dict(cfg, dict(sd, **{"model.layers.0.mlp.up_proj.weight": sd[
            "model.layers.0.feed_forward.up_proj.weight"]}))


# ------------------------------------------------------------------------------------------------ tokenizer export
# code with newlines, 4-space indents, tabs, runs of spaces, digits, non-ASCII (byte fallback), leading space
TOKENIZER_TEXTS = ["def f(x):\n    return x + 12345\n", "\tif a  and b:\n\t\tpass", " leading space", "", "\n",
                   "\t", "héllo wörld ✓ 日本", "\n\n  x  ", "class Tokenizer:\n        '''doc'''\n"]
SP_CFG = dict(TINY, vocab_size=512, bos_token_id=2, eos_token_id=3, pad_token_id=0)


def _mode(path):
    return os.stat(path).st_mode & 0o777


def test_export_with_tokenizer_loads_in_transformers(sp_model, tmp_path, monkeypatch, capsys):
    """save_hf(tokenizer=sp model): AutoTokenizer and DogeForCausalLM load OUT offline, AutoTokenizer's ids are
    [bos] + sentencepiece's (as training writes documents), its special ids are the config's; files 0644, dir 0755.
    The CLI carries the tokenizer on from a wmjax dir (found with the source) and from a HF dir (copied)."""
    import sentencepiece as spm

    from wmjax.tokenizer import Tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    cfg = DogeConfig(**dict(SP_CFG, tie_word_embeddings=False))
    params = random_params(cfg)
    out = tmp_path / "hf"
    save_hf(cfg, params, out, tokenizer=sp_model)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "special_tokens_map.json",
                                       "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert {f: _mode(out / f) for f in os.listdir(out)} == {f: 0o644 & ~umask for f in os.listdir(out)}
    assert _mode(out) == 0o755 & ~umask
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (2, 3, 0)
    model = transformers.DogeForCausalLM.from_pretrained(out)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (2, 3, 0)
    wm_tok = Tokenizer(out)  # the directory's tokenizer.json, special ids from tokenizer_config.json
    assert (wm_tok.kind, wm_tok.bos_id, wm_tok.eos_id, wm_tok.pad_id) == ("hf", 2, 3, 0)
    for text in TOKENIZER_TEXTS:
        ids = sp.encode(text)
        assert hf_tok(text).input_ids == [2] + ids, text
        assert hf_tok.decode([2] + ids, skip_special_tokens=True) == sp.decode(ids) == text
        assert wm_tok.encode(text, add_bos=True) == [2] + ids and wm_tok.decode(ids) == text
    # wmjax dir written with the tokenizer -> CLI to HF finds it there; HF -> HF copies the files
    save_wmjax(cfg, params, tmp_path / "wm", tokenizer=sp_model)
    assert _mode(tmp_path / "wm" / "tokenizer.model") == 0o644 & ~umask
    assert cli(["--from", "wmjax", str(tmp_path / "wm"), "--to", "hf", str(tmp_path / "hf2"), "--no-progress"]) == 0
    assert cli(["--from", "hf", str(tmp_path / "hf2"), "--to", "hf", str(tmp_path / "hf3"), "--no-progress"]) == 0
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "hf3" / name).read_bytes() == (out / name).read_bytes(), name
    assert cli(["--from", "hf", str(tmp_path / "hf3"), "--to", "wmjax", str(tmp_path / "wm2"), "--no-tokenizer"]) == 0
    assert sorted(os.listdir(tmp_path / "wm2")) == ["params.safetensors", "wmjax_config.json"]
    assert "no tokenizer" not in capsys.readouterr().err


def test_tokenizer_special_ids_must_match_the_config(sp_model, tmp_path):
    cfg = DogeConfig(**dict(SP_CFG, bos_token_id=1))
    with pytest.raises(ConversionError, match="bos id is 2 but the model config's bos_token_id is 1"):
        save_hf(cfg, random_params(cfg), tmp_path / "hf", tokenizer=sp_model)
    cfg = DogeConfig(**dict(SP_CFG, vocab_size=300))
    with pytest.raises(ConversionError, match="512 tokens, more than the model's vocab_size=300"):
        save_wmjax(cfg, random_params(cfg), tmp_path / "wm", tokenizer=sp_model)
    assert_no_leftovers(tmp_path)


def test_destination_checked_before_loading(hf_dir, tmp_path, monkeypatch, capsys):
    """An occupied, unwritable or source destination is a one-line error before any tensor is read or converted."""
    import wmjax.convert as wc
    import wmjax.convert.core as core

    cfg, src = hf_dir

    def must_not_run(*a, **k):
        raise AssertionError("the source was loaded / converted before the destination was checked")

    for mod, name in ((wc, "load_hf"), (wc, "load_wmjax"), (wc, "load_run"), (core, "to_state_dict"),
                      (core, "flatten_params")):
        monkeypatch.setattr(mod, name, must_not_run, raising=False)
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "keep.txt").write_text("old")
    (tmp_path / "afile").write_text("x")
    cases = {str(tmp_path / "full"): "exists and is not empty", str(src): "is the source",
             str(tmp_path): "is a folder holding the source", str(tmp_path / "afile"): "is not a directory",
             str(tmp_path / "afile" / "sub"): "afile is not a directory"}
    for dst, msg in cases.items():
        assert cli(["--from", "hf", str(src), "--to", "wmjax", dst]) == 1, dst
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (dst, err)
    for save in (save_hf, save_wmjax):
        with pytest.raises(ConversionError, match="exists and is not empty"):
            save(cfg, {}, tmp_path / "full")
    assert os.listdir(tmp_path / "full") == ["keep.txt"]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_json_follows_sentencepiece_settings(tmp_path, model_type):
    """A sentencepiece model with the library's default normalization (nmt_nfkc charsmap, extra whitespace removed)
    and a multi-character user-defined piece: the tokenizer.json written for it encodes and decodes like it
    (user-defined pieces are matched whole and escape the charsmap, which would turn "\\n" into a space)."""
    import sentencepiece as spm
    import tokenizers

    from train.tokenizer import read_text, stdlib_files
    from wmjax.convert.tokenizer import sentencepiece_tokenizer_json

    lines = [ln for f in stdlib_files()[::50] for ln in read_text(f).splitlines() if ln.strip()][:3000]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type=model_type, user_defined_symbols=["<|sep|>", "\n"], byte_fallback=True,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    tk = tokenizers.Tokenizer.from_str(sentencepiece_tokenizer_json(str(tmp_path / "sp.model"), sp.bos_id()))
    texts = TOKENIZER_TEXTS + ["a<|sep|>b", "<|sep|>x\ny", "x <|sep|> y<|sep|>", "ｆｕｌｌ  width\u3000 spaces ",
                               "  \n  "]
    for text in texts:
        ids = sp.encode(text)
        assert tk.encode(text).ids == [sp.bos_id()] + ids, text
        assert tk.decode(ids) == sp.decode(ids), text
