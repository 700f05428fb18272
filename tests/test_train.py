"""Training (``python -m train``): config, data packing/order, optimizer, CLI end to end, exact resume after
SIGKILL (sharded over 8 fake CPU devices). Checkpoint faults and the NaN stop: tests/test_checkpoint_faults.py.

The CLI runs are subprocesses with a tiny model and few steps, so the whole file stays fast on 2 CPU cores.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "scripts"))

from dmask_stats import assert_mask_removes_keys  # noqa: E402
from train.config import DEFAULT_CONFIG, ConfigError, load_config, to_dict  # noqa: E402
from train.data import BatchIterator, PackedDataset, open_token_file, pack, write_token_file  # noqa: E402
from wmjax.checkpoint import load_run  # noqa: E402


# --------------------------------------------------------------------------------------------------------------
# config


def test_config_defaults_overrides_and_errors(tmp_path):
    cfg = load_config(None, ["optimizer.lr=3e-4", "mesh.fsdp=2", "model.hidden_size=64", "data.source=text",
                             "data.paths=[a, b]"])
    assert cfg.optimizer.lr == 3e-4 and cfg.mesh.fsdp == 2 and cfg.model["hidden_size"] == 64
    assert cfg.data.paths == ("a", "b")
    assert cfg.train.steps == DEFAULT_CONFIG["train"]["steps"]
    with pytest.raises(ConfigError, match=r"optimizer\.lrr"):
        load_config(None, ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer"):
        load_config(None, ["train.steps=ten"])
    with pytest.raises(ConfigError, match=r"optimizer\.schedule"):
        load_config(None, ["optimizer.schedule=linear"])
    with pytest.raises(ConfigError, match=r"grad_accum"):
        load_config(None, ["train.global_batch_size=10", "train.grad_accum=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optimizer.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer:\n  lr: 1e-3\n  betas: [0.9, 0.95]\n")
    with pytest.raises(ConfigError, match=r"optimizer\.betas"):
        load_config(str(bad))
    # YAML 1.1 reads 1e-3 as a string: still accepted as a float
    ok = tmp_path / "ok.yaml"
    ok.write_text("optimizer:\n  lr: 1e-3\n")
    assert load_config(str(ok)).optimizer.lr == 1e-3


def test_shipped_configs_load():
    tiny = load_config(os.path.join(ROOT, "configs", "tiny.yaml"))
    assert to_dict(tiny) == to_dict(load_config(None)), "configs/tiny.yaml must equal the embedded default"
    big = load_config(os.path.join(ROOT, "configs", "doge-160m.yaml"))
    assert big.model["preset"] == "Doge-160M" and big.data.seq_len == 2048


def test_unknown_model_field_is_an_error():
    from train.model import build_model_config

    with pytest.raises(ConfigError, match=r"model\.hiden_size"):
        build_model_config({"hiden_size": 3}, 256)
    c = build_model_config({"preset": "Doge-20M", "vocab_size": "tokenizer"}, 512)
    assert c.vocab_size == 512 and c.hidden_size == 256


# --------------------------------------------------------------------------------------------------------------
# data


def test_pack_segments_positions_mask():
    bos, eos = 2, 3
    w = np.array([[bos, 10, 11, eos, bos, 12, 13, eos, bos, 14]], np.int32)
    b = pack(w, eos, bos)
    assert b["tokens"].tolist() == [[2, 10, 11, 3, 2, 12, 13, 3, 2]]
    assert b["targets"].tolist() == [[10, 11, 3, 2, 12, 13, 3, 2, 14]]
    assert b["segment_ids"].tolist() == [[1, 1, 1, 1, 2, 2, 2, 2, 3]]
    assert b["positions"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0]]
    assert b["loss_mask"].tolist() == [[1, 1, 1, 0, 1, 1, 1, 0, 1]]
    # a window that starts mid-document
    b = pack(np.array([[20, 21, eos, bos, 22]], np.int32), eos, bos)
    assert b["segment_ids"].tolist() == [[1, 1, 1, 2]] and b["positions"].tolist() == [[0, 1, 2, 0]]


def test_token_file_order_resume_and_host_shards(tmp_path):
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[2], rng.integers(4, 100, size=rng.integers(5, 60)), [3]]) for _ in range(80)]
    info = write_token_file(str(tmp_path / "t.bin"), docs, vocab_size=100, meta={"bos_id": 2, "eos_id": 3})
    arr, meta = open_token_file(str(tmp_path / "t.bin"))
    assert arr.shape[0] == info["num_tokens"] == sum(len(d) for d in docs) and arr.dtype == np.uint16
    assert np.array_equal(np.asarray(arr[: len(docs[0])]), docs[0])
    ds = PackedDataset([str(tmp_path / "t.bin")], seq_len=16, seed=1)
    it = BatchIterator(ds, global_batch=8)
    batches = [next(it) for _ in range(ds.num_windows // 8 + 3)]  # runs into the second epoch
    # every window appears exactly once per epoch
    first_epoch = [ds.window_index(k) for k in range(ds.num_windows)]
    assert sorted(first_epoch) == list(range(ds.num_windows))
    # resuming from a saved position gives the same batches
    it2 = BatchIterator(ds, global_batch=8)
    it2.restore(BatchIterator(ds, 8, samples_seen=8 * 5).state().to_json())
    assert all(np.array_equal(next(it2)["tokens"], batches[5 + i]["tokens"]) for i in range(3))
    # two hosts: each reads only its half of every global batch; together they are the global batch
    h0 = BatchIterator(ds, 8, process_index=0, process_count=2)
    h1 = BatchIterator(ds, 8, process_index=1, process_count=2)
    for b in batches[:4]:
        x0, x1 = next(h0), next(h1)
        assert x0["tokens"].shape == (4, 16)
        assert np.array_equal(np.concatenate([x0["tokens"], x1["tokens"]]), b["tokens"])
    # a different dataset refuses the checkpointed position
    ds_other = PackedDataset([str(tmp_path / "t.bin")], seq_len=8, seed=1)
    with pytest.raises(ValueError, match="fingerprint"):
        BatchIterator(ds_other, 8).restore(it.state().to_json())
    # truncated token file is detected
    with open(tmp_path / "t.bin", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ValueError, match="truncated"):
        open_token_file(str(tmp_path / "t.bin"))


def test_jsonl_and_prepare(tmp_path):
    """`python -m train.prepare` writes token files from JSONL that the tokens source reads."""
    src = tmp_path / "d.jsonl"
    with open(src, "w") as fh:
        for i in range(200):
            fh.write(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n", "id": i}) + "\n")
    out = tmp_path / "tok" / "train"
    r = subprocess.run([sys.executable, "-m", "train.prepare", "--input", str(src), "--format", "jsonl",
                        "--output", str(out), "--vocab-size", "300", "--tokenizer-dir", str(tmp_path / "sp")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    arr, meta = open_token_file(str(out) + ".bin")
    assert meta["num_documents"] == 200 and arr.shape[0] > 200 * 5
    assert os.path.exists(meta["tokenizer"])
    from wmjax.tokenizer import Tokenizer

    tok = Tokenizer(meta["tokenizer"])
    first = np.asarray(arr[: list(np.asarray(arr)).index(meta["eos_id"]) + 1])
    assert first[0] == meta["bos_id"] and tok.decode(first[1:-1]) == "def f0(x):\n    return x * 0 + 0\n"


# --------------------------------------------------------------------------------------------------------------
# optimizer


def test_no_weight_decay_on_norms_biases_residuals_A():
    import jax.numpy as jnp

    from train.optim import decay_mask, make_schedule
    from train.config import OptimizerConfig

    params = {"model": {"embed_tokens": {"embedding": jnp.zeros((4, 2))},
                        "layers_0": {"input_residual": jnp.zeros((2,)), "input_layernorm": {"weight": jnp.zeros((2,))},
                                     "self_attn": {"A": jnp.zeros((2,)), "q_proj": {"kernel": jnp.zeros((2, 2)),
                                                                                   "bias": jnp.zeros((2,))}}}}}
    m = decay_mask(params)["model"]
    assert m["embed_tokens"]["embedding"] and m["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert not any([m["layers_0"]["input_residual"], m["layers_0"]["input_layernorm"]["weight"],
                    m["layers_0"]["self_attn"]["A"], m["layers_0"]["self_attn"]["q_proj"]["bias"]])
    s = make_schedule(OptimizerConfig(lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2), 100)
    vals = [float(s(i)) for i in range(100)]
    assert vals[0] == pytest.approx(0.1) and vals[9] == 1.0 and vals[50] == 1.0 and vals[79] == 1.0
    assert vals[90] == pytest.approx(0.5) and vals[99] < 0.06
    c = make_schedule(OptimizerConfig(lr=1.0, warmup_steps=10, schedule="cosine"), 100)
    assert float(c(10)) == pytest.approx(1.0) and float(c(100)) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------------------------------
# the CLI, end to end


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from train.tokenizer import stdlib_files

    d = tmp_path_factory.mktemp("corpus")
    files = [f for f in stdlib_files() if 8_000 < os.path.getsize(f) < 40_000][:12]
    for i, f in enumerate(files):
        shutil.copy(f, d / f"doc{i:02d}.py")
    return d


def _tiny_args(corpus, cache, run_dir, steps, every, extra=()):
    return ["--run-dir", str(run_dir), "--steps", str(steps),
            "--set", "data.source=text", "--set", f"data.paths=[{corpus}]", "--set", "data.seq_len=32",
            "--set", "data.tokenizer.corpus=data", "--set", "data.tokenizer.vocab_size=512",
            "--set", f"data.tokenizer.cache_dir={cache}/tok", "--set", f"data.cache_dir={cache}/data",
            "--set", "model.hidden_size=32", "--set", "model.intermediate_size=64",
            "--set", "model.num_attention_heads=2", "--set", "model.num_key_value_heads=2",
            "--set", "model.head_dim=16", "--set", "model.num_hidden_layers=1",
            # keep_window_size 8 < seq_len 32, the documents (whole stdlib files) far longer: the top-k is live
            # once A has left 0 (its init) after the first update; test_cli_outputs checks that it removes keys
            "--set", "model.keep_window_size=8",
            "--set", "train.global_batch_size=8", "--set", "train.log_every=2", "--set", "train.sample_tokens=12",
            "--set", "optimizer.warmup_steps=2", "--set", f"checkpoint.every={every}", "--set", "checkpoint.keep=3",
            *extra]


def _run_cli(args, env_extra=None, devices=1, timeout=420):
    """`python -m train ARGS` on `devices` CPU devices (the suite's XLA flags, tests/conftest.py)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "").split()
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _losses(run_dir):
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            r = json.loads(line)
            out[r["step"]] = r["loss"]
    return out


MESH = ["--set", "mesh.data=2", "--set", "mesh.fsdp=2", "--set", "mesh.tensor=2"]


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    """An uninterrupted 12-step run (checkpoints at 4, 8, 12), sharded dp2/fsdp2/tp2 over 8 fake devices."""
    base = tmp_path_factory.mktemp("runs")
    cache = tmp_path_factory.mktemp("cache")
    p = _run_cli(_tiny_args(corpus, cache, base / "full", 12, 4, MESH), devices=8)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return base, cache, p


def test_cli_outputs(full_run):
    base, cache, p = full_run
    run = base / "full"
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 13))
    assert os.path.getsize(run / "loss.png") > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tb"))
    assert sorted(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit()) == [4, 8, 12]
    assert "[sample]" in p.stdout and "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in p.stdout
    assert "tok/s" in p.stdout  # the progress bar
    assert json.load(open(run / "summary.json"))["steps"] == 12
    # the dynamic mask is live: with the trained (non-zero) A, every layer's top-k removes keys of the rows that
    # allow more than keep_window_size = 8 keys
    trained = load_run(str(run), log=lambda *a: None)
    assert trained.step == 12 and trained.config.keep_window_size == 8
    (token_file,) = glob.glob(str(cache / "data" / "*.bin"))
    assert_mask_removes_keys(trained.config, trained.params, PackedDataset([token_file], 32, seed=0).batch(0, 8))


def test_exact_resume_after_sigkill(full_run, corpus):
    """Killed by SIGKILL right after its step-8 checkpoint, then resumed: steps 9..12 are bitwise the same."""
    base, cache, _ = full_run
    run = base / "killed"
    args = _tiny_args(corpus, cache, run, 12, 4, MESH)
    p = _run_cli(args, env_extra={"WMJAX_DEBUG_SIGKILL_AFTER_CKPT": "8"}, devices=8)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert max(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit()) == 8
    p = _run_cli(args + ["--resume"], devices=8)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "resumed from step 8" in p.stdout
    full, resumed = _losses(base / "full"), _losses(run)
    assert sorted(resumed) == list(range(1, 13))
    for s in range(1, 13):
        assert resumed[s] == full[s], (s, resumed[s], full[s])  # bitwise (floats round-trip through JSON)






def test_cli_dp_fsdp_through_shard_map(corpus, full_run, tmp_path):
    """mesh data=2 x fsdp=4 (tensor=1): the step runs per device through shard_map; same losses as 1 device.

    Compared over 4 steps with keep_window_size = seq_len (the dynamic mask keeps every allowed key): with the live
    top-k (keep_window_size 8), after two updates A is ~ +-lr, the key biases exp(A softplus(dt)) of a row are
    near-tied, and any change of summation order (another partitioning, XLA's CPU codegen on another host) flips
    some top-k picks (2e-5 to 5e-5 rel at steps 3-4; <= 3e-7 without the top-k). With the live top-k the shard_map
    run equals the GSPMD dp2 x fsdp2 x tp2 run over its first 2 steps (same data order and lr at update 1; the loss
    logged at step s is taken before update s)."""
    _, cache, _ = full_run
    no_topk = ["--set", "model.keep_window_size=32"]
    shard_map = ["--set", "mesh.data=2", "--set", "mesh.fsdp=4", "--set", "mesh.tensor=1"]
    one = _run_cli(_tiny_args(corpus, cache, tmp_path / "one", 4, 4, no_topk))
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    runs = {}
    for name, extra, steps in (("sm", no_topk + shard_map, 4), ("sm_topk", shard_map, 2)):
        p = _run_cli(_tiny_args(corpus, cache, tmp_path / name, steps, 4, extra), devices=8)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
        assert "through shard_map" in p.stdout
        runs[name] = _losses(tmp_path / name)
    a, gspmd = _losses(tmp_path / "one"), _losses(full_run[0] / "full")
    assert sorted(a) == sorted(runs["sm"]) == [1, 2, 3, 4] and sorted(runs["sm_topk"]) == [1, 2]
    for s in a:
        assert abs(a[s] - runs["sm"][s]) <= 1e-5 * abs(a[s]), (s, a[s], runs["sm"][s])
    for s in (1, 2):
        b = runs["sm_topk"][s]
        assert abs(b - gspmd[s]) <= 1e-5 * abs(b), (s, b, gspmd[s])


# --------------------------------------------------------------------------------------------------------------
# fused LM head + cross-entropy (wmjax.ops.cross_entropy) == the logits path


@pytest.mark.parametrize("tied,z_loss,chunk", [(True, 0.0, 24), (False, 1e-3, 10_000)])
def test_fused_loss_equals_logits_loss(tied, z_loss, chunk):
    import jax
    import jax.numpy as jnp

    from train.loss import make_loss_fn
    from wmjax.config import DogeConfig
    from wmjax.models.doge import DogeForCausalLM, init_params

    cfg = DogeConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, keep_window_size=16, max_position_embeddings=64,
                     tie_word_embeddings=tied)
    model = DogeForCausalLM(cfg, dtype=jnp.float32)
    params = init_params(cfg, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    B, L = 4, 12
    tok = rng.integers(0, 97, size=(B, L + 1)).astype(np.int32)
    mask = (rng.random((B, L)) > 0.25).astype(np.float32)
    mb = {"tokens": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:]), "loss_mask": jnp.asarray(mask)}
    denom = jnp.asarray(mask.sum())
    out = {}
    for impl in ("logits", "fused"):
        fn = make_loss_fn(model, cfg, z_loss, use_segments=False, loss_impl=impl, chunk_tokens=chunk)
        assert fn.impl == impl
        (loss, aux), g = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, mb, denom)
        out[impl] = (loss, aux, g)
    (l0, a0, g0), (l1, a1, g1) = out["logits"], out["fused"]
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for k in ("ce_sum", "z_sum"):
        np.testing.assert_allclose(float(a1[k]), float(a0[k]), rtol=1e-6)
    # per leaf: 2e-5 of the leaf's own scale, plus 1e-6 of the largest gradient (A's gradient at init is a
    # near-cancellation residue ~1e-5 whose relative error is not meaningful)
    top = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree_util.tree_leaves(g0))
    for (path, x0), x1 in zip(jax.tree_util.tree_flatten_with_path(g0)[0], jax.tree_util.tree_leaves(g1)):
        x0, x1 = np.asarray(x0), np.asarray(x1)
        err = np.abs(x1 - x0).max()
        assert err <= 2e-5 * np.abs(x0).max() + 1e-6 * top, (jax.tree_util.keystr(path), err, np.abs(x0).max())

    # the mask cotangent too (d loss / d mask_i = per-token objective / denom)
    def by_mask(impl):
        fn = make_loss_fn(model, cfg, z_loss, use_segments=False, loss_impl=impl, chunk_tokens=chunk)
        return jax.grad(lambda m: fn(params, dict(mb, loss_mask=m), denom)[0])(mb["loss_mask"])

    np.testing.assert_allclose(np.asarray(by_mask("fused")), np.asarray(by_mask("logits")), rtol=1e-5, atol=1e-7)


def test_fused_loss_bf16_close_to_logits_loss():
    """bf16 compute: both paths use the same bf16 logits; f32 softmax; gradients agree to bf16 rounding."""
    import jax
    import jax.numpy as jnp

    from train.loss import make_loss_fn
    from wmjax.config import DogeConfig
    from wmjax.models.doge import DogeForCausalLM, init_params

    cfg = DogeConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, keep_window_size=16, max_position_embeddings=64)
    model = DogeForCausalLM(cfg, dtype=jnp.bfloat16)
    params = init_params(cfg, jax.random.PRNGKey(2))
    tok = np.random.default_rng(1).integers(0, 97, size=(2, 17)).astype(np.int32)
    mb = {"tokens": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:]),
          "loss_mask": jnp.ones((2, 16), jnp.float32)}
    res = {}
    for impl in ("logits", "fused"):
        fn = make_loss_fn(model, cfg, 0.0, use_segments=False, loss_impl=impl, chunk_tokens=8)
        res[impl] = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, mb, jnp.float32(32.0))
    np.testing.assert_allclose(float(res["fused"][0][0]), float(res["logits"][0][0]), rtol=1e-5)
    emb0 = np.asarray(res["logits"][1]["model"]["embed_tokens"]["embedding"])
    emb1 = np.asarray(res["fused"][1]["model"]["embed_tokens"]["embedding"])
    assert np.abs(emb1 - emb0).max() / np.abs(emb0).max() < 2e-2
