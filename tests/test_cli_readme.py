"""The README's commands, each run once at tiny size: `python -m train` (the embedded default run in an empty
directory, train.steps lowered to 3), `python -m wmjax.sample --checkpoint RUN` on that run with the sentencepiece
tokenizer it trained, and `python -m wmjax.demo` (one layer, 16 tokens). `python -m train.prepare` runs in
tests/test_train.py::test_jsonl_and_prepare, `python -m wmjax.sample --hf DIR` in tests/test_cli_sample.py.

The default run with 3 steps (~30 s on 2 CPU cores: tokenizer training, the stdlib's tokenization, compilation;
~0.3 s a step after that, so the default 500 steps would take ~3 min) is shared by two tests."""

import json
import os
import subprocess
import sys

import pytest

from wmjax.sample import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_m(args, cwd, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python -m train --set train.steps=3 --set train.sample_temperature=0` in an empty directory: the default
    run (stdlib corpus, a 2048-piece sentencepiece tokenizer trained and cached under .cache/, the tiny Doge,
    runs/tiny), 3 steps, ending with a greedy sample (an independent value for the sampling CLI below)."""
    d = tmp_path_factory.mktemp("default_run")
    p = _python_m(["train", "--set", "train.steps=3", "--set", "train.sample_temperature=0"], d)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return d, p.stdout


def _sample_text(stdout):
    """The continuation the run printed after `[sample] ...:` between two lines of dashes."""
    after = stdout.split("[sample]", 1)[1].split("\n" + "-" * 60 + "\n")
    assert len(after) >= 3, stdout[-2000:]
    return after[1]


@pytest.mark.slow
def test_default_train_run(default_run):
    d, out = default_run
    run = d / "runs" / "tiny"
    with open(run / "metrics.jsonl") as fh:
        steps = [json.loads(line) for line in fh]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(0 < r["loss"] < 20 for r in steps), steps
    assert os.path.getsize(run / "loss.png") > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tb"))
    assert sorted(os.listdir(run / "checkpoints")) == ["3"]
    tokenizers = [f for f in os.listdir(d / ".cache" / "wmjax" / "tokenizers") if f.endswith(".model")]
    assert len(tokenizers) == 1 and tokenizers[0].startswith("sp-stdlib-2048-"), tokenizers
    assert _sample_text(out).startswith("def ")


@pytest.mark.slow
def test_sample_checkpoint_of_default_run(default_run, monkeypatch, capsys):
    """`python -m wmjax.sample --checkpoint runs/tiny` (from the run's directory, greedy, the run's sample length)
    finds the run's sentencepiece model and prints the continuation the run itself sampled from its in-memory
    params (compared without whitespace: the two join the prompt and the pieces differently)."""
    d, out = default_run
    monkeypatch.chdir(d)
    assert main(["--checkpoint", "runs/tiny", "--prompt", "def ", "--max-new-tokens", "64", "--no-stream"]) == 0
    printed, err = capsys.readouterr()
    assert "sp-stdlib-2048-" in err, err
    text = printed.split("\n---\n")[0]
    assert text.startswith("def ") and "".join(text.split()) == "".join(_sample_text(out).split()), (text, out)


def test_demo_runs(tmp_path):
    """`python -m wmjax.demo --layers 1 --seq 16`: export to HF, transformers' logits, re-import, all checks OK."""
    p = _python_m(["wmjax.demo", "--layers", "1", "--seq", "16"], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "all checks passed" in p.stdout and "FAIL" not in p.stdout, p.stdout
