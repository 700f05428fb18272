"""``python -m train`` learns: a tiny Doge on the default data (the Python standard library's sources, packed
with segment ids), run through the CLI's own ``main``, must lower its loss by a stated margin and below the
entropy of the data's unigram distribution (it conditions on its input, not just on token frequencies), and its
trained dynamic mask removes keys.

One run (100 steps, ~15 s) is shared by the tests of this module.
"""

import glob
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "scripts"))

from dmask_stats import assert_mask_removes_keys  # noqa: E402
from train.__main__ import main  # noqa: E402
from train.data import PackedDataset, open_token_file, pack  # noqa: E402
from wmjax.checkpoint import load_run  # noqa: E402

STEPS, SEQ_LEN, KEEP_WINDOW, VOCAB = 100, 64, 16, 512


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    d = tmp_path_factory.mktemp("learn")
    run_dir = d / "run"
    # the embedded default config (data.source stdlib, segment ids, wsd schedule, lr 3e-3), made small: 60
    # stdlib files, a 512-piece tokenizer, a 2-layer d=64 model whose keep_window_size (16) is below the
    # sequence length (64), so the top-k is live once A has left 0 (its init) after the first update
    rc = main(["--run-dir", str(run_dir), "--steps", str(STEPS),
               "--set", "data.max_documents=60", "--set", f"data.seq_len={SEQ_LEN}",
               "--set", f"data.tokenizer.vocab_size={VOCAB}", "--set", "data.tokenizer.max_corpus_bytes=300000",
               "--set", f"data.tokenizer.cache_dir={d}/tok", "--set", f"data.cache_dir={d}/data",
               "--set", "model.hidden_size=64", "--set", "model.intermediate_size=128",
               "--set", "model.num_hidden_layers=2", "--set", "model.num_attention_heads=2",
               "--set", "model.num_key_value_heads=1", "--set", "model.head_dim=32",
               "--set", f"model.keep_window_size={KEEP_WINDOW}",
               "--set", "train.global_batch_size=16", "--set", "train.log_every=1", "--set", "train.sample_tokens=0",
               "--set", "train.progress=false", "--set", "train.plot=false", "--set", "train.tensorboard=false",
               "--set", "optimizer.warmup_steps=5", "--set", f"checkpoint.every={STEPS}"])
    assert rc == 0
    (token_file,) = glob.glob(str(d / "data" / "*.bin"))
    return run_dir, token_file


def test_cli_loss_falls(learned):
    run_dir, token_file = learned
    with open(run_dir / "metrics.jsonl") as fh:
        losses = [json.loads(line)["loss"] for line in fh]
    assert len(losses) == STEPS
    first, last10 = losses[0], float(np.mean(losses[-10:]))
    # The first loss is ~ln(512) = 6.24 (near-uniform predictions at init). Measured mean of the last 10: 4.21
    # (seed 0), 3.82 / 3.94 (seeds 1 / 2), i.e. a fall of 2.03 to 2.42 nats. The best model that ignores its
    # input sits at the data's unigram entropy (4.84 nats, a fall of 1.40; measured with the inputs zeroed:
    # 1.41), so a fall of 1.5 needs the input, and 0.5 nats below the smallest measured fall is left for other
    # platforms / standard library versions. A sign-flipped update raises the loss (to ~40 nats).
    assert first - last10 >= 1.5, (first, last10, losses)
    tokens, _ = open_token_file(token_file)
    counts = np.bincount(np.asarray(tokens), minlength=VOCAB).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    assert last10 < unigram - 0.25, (last10, unigram)  # measured 0.63 below


def test_trained_model_masks_keys(learned):
    """After training, A is non-zero and every layer's top-k removes keys from rows longer than the window."""
    run_dir, token_file = learned
    run = load_run(str(run_dir), log=lambda *a: None)
    assert run.step == STEPS and run.config.keep_window_size == KEEP_WINDOW
    ds = PackedDataset([token_file], SEQ_LEN, seed=0)
    tokens, _ = open_token_file(token_file)
    starts = np.flatnonzero(np.asarray(tokens) == ds.bos_id)  # documents are ~11k tokens: pick the windows
    windows = sorted({int(i) // SEQ_LEN for i in starts if i % SEQ_LEN})[:8]  # that hold a document boundary
    batch = pack(np.stack([ds.window(w) for w in windows]), ds.eos_id, ds.bos_id)
    assert len(windows) == 8 and (batch["segment_ids"].max(1) >= 2).all()
    assert_mask_removes_keys(run.config, run.params, batch)
