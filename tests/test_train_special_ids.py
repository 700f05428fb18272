"""Document-boundary ids and the model's special ids in ``python -m train`` (issue 13's GPU NaN at step 1).

The cause, reproduced on the CPU in f32 before the fix: a token file whose sidecar has no bos/eos ids was read
with bos 2 / eos 3; its documents were ``[1, ..., 2]``, so every document's last token (2) started a packed
segment. 2 is the Doge presets' pad id, whose embedding row is initialised to zero: that token attends only to
itself, its hidden state stays exactly zero through every layer, and RMSNorm's gradient at zero is
1/sqrt(eps) = 1000 per norm, so the gradient overflowed with depth (inf at 12-24 layers).
"""

import glob
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from train.__main__ import main  # noqa: E402
from train.data import write_token_file  # noqa: E402

VOCAB = 512


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    """Documents ``[1, ids 3..511, 2]`` as in the issue; the sidecar carries no bos/eos ids."""
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[1], rng.integers(3, VOCAB, rng.integers(20, 120)), [2]]) for _ in range(200)]
    path = str(tmp_path_factory.mktemp("tok") / "docs.bin")
    write_token_file(path, docs, VOCAB)
    return path


def _args(token_file, run_dir, *extra):
    sets = [f"run_dir={run_dir}", "data.source=tokens", f"data.paths=[{token_file}]", "data.seq_len=64",
            "train.steps=2", "train.global_batch_size=4", "train.progress=false", "train.sample_tokens=0",
            "train.compute_dtype=float32", "train.log_every=1", "train.plot=false", "train.tensorboard=false",
            "checkpoint.async_save=false", *extra]
    return [a for s in sets for a in ("--set", s)]


# Doge-preset-shaped special ids (bos 0, eos 1, pad 2) on a narrow model (24 layers overflowed in f32 before the
# fix; the refusals need no depth, and the ids check below runs 4 layers).
DEEP = ["model.preset=Doge-20M", f"model.vocab_size={VOCAB}", "model.num_hidden_layers=4", "model.hidden_size=32",
        "model.intermediate_size=64", "model.num_attention_heads=2", "model.num_key_value_heads=1",
        "model.head_dim=16"]


def test_sidecar_without_boundary_ids_is_refused(token_file, tmp_path, capsys):
    rc = main(_args(token_file, tmp_path / "run", *DEEP))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1
    assert "docs.json" in err and "data.bos_id" in err
    assert not os.path.exists(tmp_path / "run" / "checkpoints"), "a refused start must not write a run"


def test_pad_id_on_a_document_boundary_is_refused(token_file, tmp_path, capsys):
    rc = main(_args(token_file, tmp_path / "run", *DEEP, "data.bos_id=1", "data.eos_id=2", "model.pad_token_id=2"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "model.pad_token_id=2" in err and "eos_id" in err, err


def test_preset_ids_follow_the_data(token_file, tmp_path, capsys):
    """The preset's pad 2 (zero row) is replaced by the data's ids; the run trains with finite losses."""
    run = tmp_path / "run"
    rc = main(_args(token_file, run, *DEEP, "data.bos_id=1", "data.eos_id=2"))
    out = capsys.readouterr()
    assert rc == 0, out.err
    losses = [json.loads(line)["loss"] for line in open(run / "metrics.jsonl")]
    grads = [json.loads(line)["grad_norm"] for line in open(run / "metrics.jsonl")]
    assert len(losses) == 2 and np.all(np.isfinite(losses)) and np.all(np.isfinite(grads)), (losses, grads)
    metas = glob.glob(str(run / "checkpoints" / "2" / "meta" / "*"))
    meta = next(json.load(open(m)) for m in metas if os.path.isfile(m) and "model_config" in open(m).read())
    ids = {k: meta["model_config"][k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    assert ids == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}, ids

