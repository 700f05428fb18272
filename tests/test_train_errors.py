"""Common mistakes when starting a run: each ends in one line naming the key, file or value (exit status 2), and
a start that fails leaves the user's run dir and its earlier ``.prev`` copies exactly as they were.

The mistakes are all found before training, so each test is an in-process ``main([...])`` call that returns in
seconds (one subprocess checks the real CLI: exit status and no traceback).
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from train import prepare  # noqa: E402
from train.__main__ import main  # noqa: E402
from train.data import write_token_file  # noqa: E402
from train.trainer import move_aside  # noqa: E402

VOCAB = 64


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    """40 documents ``[BOS, ids 4..63, EOS]`` of 5-40 tokens (no tokenizer: model.vocab_size is given)."""
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[2], rng.integers(4, VOCAB, rng.integers(5, 40)), [3]]) for _ in range(40)]
    out = tmp_path_factory.mktemp("tokens") / "train.bin"
    write_token_file(str(out), docs, VOCAB, meta={"bos_id": 2, "eos_id": 3})
    return str(out)


@pytest.fixture
def old_run(tmp_path):
    """A run dir from an earlier run and an earlier ``.prev``, each holding a marker file."""
    run_dir = tmp_path / "run"
    for d, text in ((run_dir, "current"), (tmp_path / "run.prev", "previous")):
        (d / "checkpoints").mkdir(parents=True)
        (d / "marker.txt").write_text(text)
    return run_dir


def assert_untouched(run_dir):
    parent = run_dir.parent
    assert (run_dir / "marker.txt").read_text() == "current"
    assert (parent / "run.prev" / "marker.txt").read_text() == "previous"
    assert sorted(os.listdir(run_dir)) == ["checkpoints", "marker.txt"]
    assert sorted(p for p in os.listdir(parent) if p.startswith("run")) == ["run", "run.prev"]


def tiny_args(run_dir, token_file, *extra):
    return ["--run-dir", str(run_dir), "--steps", "1",
            "--set", "data.source=tokens", "--set", f"data.paths=[{token_file}]", "--set", "data.seq_len=16",
            "--set", f"model.vocab_size={VOCAB}", "--set", "model.hidden_size=32",
            "--set", "model.intermediate_size=64",
            "--set", "model.num_attention_heads=2", "--set", "model.num_key_value_heads=2",
            "--set", "model.head_dim=16", "--set", "model.num_hidden_layers=1",
            "--set", "train.global_batch_size=2", "--set", "train.progress=false", "--set", "train.plot=false",
            "--set", "train.tensorboard=false", "--set", "train.sample_tokens=0", "--set", "optimizer.warmup_steps=0",
            "--set", "checkpoint.async_save=false", *extra]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_data_paths_without_tokens_source_is_an_error(old_run, token_file, capsys):
    """The default source (stdlib) ignores data.paths: setting only the paths would silently train on the stdlib."""
    args = tiny_args(old_run, token_file, "--set", "data.source=stdlib")
    assert main(args) == 2
    msg = one_line_error(capsys)
    assert "data.paths" in msg and "data.source" in msg and token_file in msg and "tokens" in msg
    assert_untouched(old_run)


@pytest.mark.parametrize("break_", ["missing", "no_sidecar", "truncated"])
def test_bad_data_file_leaves_run_dir_and_prev(old_run, token_file, tmp_path, capsys, break_):
    """Three failed starts in a row: the old run and its .prev are still there, nothing new was created."""
    path = str(tmp_path / "data" / "missing.bin")
    if break_ != "missing":
        os.makedirs(os.path.dirname(path))
        data = open(token_file, "rb").read()
        with open(path, "wb") as fh:
            fh.write(data if break_ == "no_sidecar" else data[: len(data) // 4 * 2])
        if break_ == "truncated":
            with open(token_file[:-4] + ".json") as src, open(path[:-4] + ".json", "w") as dst:
                dst.write(src.read())
    for _ in range(3):
        assert main(tiny_args(old_run, path)) == 2
        msg = one_line_error(capsys)
        assert path in msg or path[:-4] + ".json" in msg, msg
        assert_untouched(old_run)
    assert {"missing": "nothing matches", "no_sidecar": "not found", "truncated": "truncated"}[break_] in msg


def test_missing_tokenizer_file_is_an_error(old_run, token_file, tmp_path, capsys):
    missing = str(tmp_path / "nope.model")
    assert main(tiny_args(old_run, token_file, "--set", f"data.tokenizer.path={missing}")) == 2
    msg = one_line_error(capsys)
    assert "data.tokenizer.path" in msg and missing in msg
    assert_untouched(old_run)


def test_mesh_larger_than_devices_is_an_error(old_run, token_file, capsys):
    n = jax.device_count()
    assert main(tiny_args(old_run, token_file, "--set", f"mesh.data={n + 1}")) == 2
    msg = one_line_error(capsys)
    assert msg.startswith("config error: mesh.data*fsdp*tensor")
    assert f"{n + 1}*1*1 = {n + 1}" in msg and f"{n} cpu device(s)" in msg
    assert_untouched(old_run)


def test_train_tokenizer_vocab_too_large_for_corpus(old_run, tmp_path, capsys):
    """A data-trained tokenizer with more pieces than the corpus can give: one line naming the option."""
    corpus = tmp_path / "text"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"d{i}.txt").write_text(f"hello world number {i}, the quick brown fox jumps over the lazy dog\n")
    args = tiny_args(old_run, "", "--set", "data.source=text", "--set", f"data.paths=[{corpus}]",
                     "--set", "data.tokenizer.corpus=data", "--set", "data.tokenizer.vocab_size=5000",
                     "--set", f"data.tokenizer.cache_dir={tmp_path / 'sp'}", "--set", "model.vocab_size=tokenizer")
    assert main(args) == 2
    msg = one_line_error(capsys)
    assert "data.tokenizer.vocab_size 5000 is too large" in msg and str(corpus) in msg and "<= " in msg
    assert_untouched(old_run)
    assert os.listdir(tmp_path / "sp") == [], "no partial tokenizer left behind"


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep")
    for i in range(3):
        (d / f"d{i}.txt").write_text(f"hello world number {i}, the quick brown fox jumps over the lazy dog\n")
    (d / "empty").mkdir()
    (d / "empty" / "a.txt").write_text("")
    (d / "nofiles").mkdir()
    return d


@pytest.mark.parametrize("case", ["vocab_too_large", "vocab_too_small", "no_match", "only_empty_dirs", "no_text",
                                  "missing_tokenizer"])
def test_prepare_errors_are_one_line(small_corpus, tmp_path, capsys, case):
    """``python -m train.prepare``: one line naming the option and value, nothing written."""
    text, model = str(small_corpus / "*.txt"), str(tmp_path / "no.model")
    inp, vocab, extra, expect = {
        "vocab_too_large": (text, 5000, [], ["--vocab-size 5000 is too large", text, "<= ", "more text"]),
        "vocab_too_small": (text, 100, [], ["--vocab-size 100 is too small", text]),
        "no_match": (str(small_corpus / "none" / "*.txt"), 300, [], ["--input", "nothing matches", "none"]),
        "only_empty_dirs": (str(small_corpus / "nofiles"), 300, [], ["--input", "nofiles", "without files"]),
        "no_text": (str(small_corpus / "empty" / "*.txt"), 300, [], ["--input", "empty", "no text"]),
        "missing_tokenizer": (text, 300, ["--tokenizer", model], ["--tokenizer", model]),
    }[case]
    out = tmp_path / "out" / "train"
    rc = prepare.main(["--input", inp, "--output", str(out), "--vocab-size", str(vocab),
                       "--tokenizer-dir", str(tmp_path / "sp"), *extra])
    assert rc == 2
    msg = one_line_error(capsys)
    assert msg.startswith("error: ") and all(e in msg for e in expect), msg
    assert not os.path.exists(tmp_path / "out"), "nothing written on failure"
    if os.path.exists(tmp_path / "sp"):
        assert os.listdir(tmp_path / "sp") == [], "no temporary tokenizer dirs left behind"


def test_cli_missing_file_exit_status_and_no_traceback(old_run, token_file, tmp_path):
    """The real ``python -m train``: exit status 2, one line on stderr, no traceback."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "train", *tiny_args(old_run, "data/missing.bin")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1] == \
        "error: data.paths: nothing matches 'data/missing.bin'"
    assert_untouched(old_run)


def test_move_aside_keeps_every_earlier_run(tmp_path):
    """``.prev`` is never overwritten: the next run goes to ``.prev2``, then ``.prev3``."""
    for gen in range(1, 4):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "marker.txt").write_text(str(gen))
        dest = move_aside(str(tmp_path / "run"))
        assert dest == str(tmp_path / ("run.prev" if gen == 1 else f"run.prev{gen}"))
    assert [(tmp_path / n / "marker.txt").read_text() for n in ("run.prev", "run.prev2", "run.prev3")] == \
        ["1", "2", "3"]
    assert not (tmp_path / "run").exists()


def test_good_start_moves_old_run_to_a_free_name(old_run, token_file, capsys):
    """A start that gets past the checks moves the old run to ``run.prev2`` (``run.prev`` is kept) and says so."""
    assert main(tiny_args(old_run, token_file)) == 0
    out = capsys.readouterr().out
    prev2 = old_run.parent / "run.prev2"
    assert f"moved to {prev2}" in out
    assert (prev2 / "marker.txt").read_text() == "current"
    assert (old_run.parent / "run.prev" / "marker.txt").read_text() == "previous"
    assert not (old_run / "marker.txt").exists() and (old_run / "metrics.jsonl").exists()
