"""Checkpoint faults (wmjax.checkpoint): a truncated array file, deleted array metadata or one flipped bit in
array data makes training, sampling and conversion fall back to the previous step with a one-line message and
move the bad step aside (<step>.corrupt); the resumed run completes, saves every later step and reproduces an
uninterrupted run's losses bitwise. Also: load_run's path forms and errors, the NaN stop naming the newest step
that passes its checks, and a trained run converted to Hugging Face (logits equal wmjax's).

Runs are in-process (`train.__main__.main`) with test_train's tiny model: 6 steps, a checkpoint every 2.
"""

import os
import shutil
import sys
from types import SimpleNamespace

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import _losses, _tiny_args, corpus  # noqa: E402,F401 - corpus is a fixture

from train.__main__ import main as train_main  # noqa: E402
from wmjax.checkpoint import Checkpointer, CheckpointError, load_run  # noqa: E402
from wmjax.convert.__main__ import main as convert_main  # noqa: E402
from wmjax.sample import main as sample_main  # noqa: E402

# orbax leaves callbacks that fire into its closed event loop after a failed read; wmjax.checkpoint silences them
# through sys.unraisablehook, which pytest replaces during each test
pytestmark = pytest.mark.filterwarnings(r"ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning")

STEPS, EVERY = 6, 2
QUIET = ["--set", "train.sample_tokens=0", "--set", "train.plot=false", "--set", "train.tensorboard=false",
         "--set", "train.progress=false"]


@pytest.fixture(scope="module")
def full(corpus, tmp_path_factory):  # noqa: F811
    """An uninterrupted run (checkpoints 2, 4, 6), its args and its step-6 params."""
    base = tmp_path_factory.mktemp("ckfaults")

    def args(run, steps=STEPS, every=EVERY, extra=()):
        return _tiny_args(corpus, base / "cache", run, steps, every, QUIET + list(extra))

    assert train_main(args(base / "full")) == 0
    return SimpleNamespace(base=base, run=base / "full", args=args, params6=load_run(str(base / "full")).params)


def _equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# --------------------------------------------------------------------------------------------------------------
# faults, applied to one step dir


def _data_files(step_dir) -> list:
    """The step's array data files, largest first (which arrays share a file depends on orbax's write timing)."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
             if os.path.basename(r) == "d"]
    return sorted(files, key=os.path.getsize, reverse=True)


def _truncate(step_dir, params):
    for f in _data_files(step_dir):
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _delete_metadata(step_dir, params):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _orbax_params(step_dir, like):
    """The step's params as orbax alone reads them (no checksums), or None if it cannot."""
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    item = {"params": jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), like)}
    try:
        with ocp.PyTreeCheckpointer() as c:
            return c.restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
                item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))["params"]
    except Exception:  # noqa: BLE001
        return None


def _flip_bit(step_dir, params):
    """One bit flipped in the array data, at a place orbax reads without complaint but into other params (the
    compressed data carries no checksum of its own): only our checksums can catch it."""
    for f in _data_files(step_dir):
        with open(f, "rb") as fh:
            orig = fh.read()
        for frac in (0.9, 0.7, 0.5, 0.3):
            data = bytearray(orig)
            data[int(len(data) * frac)] ^= 0x10
            with open(f, "wb") as fh:
                fh.write(data)
            got = _orbax_params(step_dir, params)
            if got is not None and not _equal(got, params):
                return
        with open(f, "wb") as fh:
            fh.write(orig)
    pytest.fail(f"{step_dir}: no single-bit flip found that orbax reads silently into other params")


FAULTS = {"truncated": _truncate, "no_metadata": _delete_metadata, "bit_flip": _flip_bit}


def _fallback_line(out: str, ckpt_dir, step: int) -> str:
    """The one line reporting that ``step`` was moved aside."""
    lines = [ln for ln in out.splitlines() if f"[checkpoint] step {step} in {ckpt_dir} " in ln]
    assert len(lines) == 1, out[-3000:]
    assert lines[0].endswith(f"moved to {ckpt_dir}/{step}.corrupt; trying the previous step"), lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("fault,bad", [("truncated", (6,)), ("no_metadata", (4, 6)), ("bit_flip", (6,))])
def test_resume_falls_back_and_completes(full, fault, bad, capsys):
    """Bad steps are moved aside, the run resumes from the step before them, re-saves every later step (a bad
    step 4 used to raise StepAlreadyExistsError at its save, a bad last step made the final save a no-op) and
    its losses equal the uninterrupted run's bitwise."""
    run = full.base / f"resume_{fault}"
    shutil.copytree(full.run, run)
    ckpt = run / "checkpoints"
    for s in bad:
        FAULTS[fault](ckpt / str(s), full.params6)
    capsys.readouterr()
    assert train_main(full.args(run) + ["--resume"]) == 0
    out = capsys.readouterr().out
    for s in bad:
        line = _fallback_line(out, ckpt, s)
        if fault == "bit_flip":
            assert "checksum mismatch in params/" in line, line
    assert f"resumed from step {min(bad) - EVERY}" in out, out[-3000:]
    assert sorted(os.listdir(ckpt)) == sorted(["2", "4", "6"] + [f"{s}.corrupt" for s in bad])
    assert _losses(run) == _losses(full.run)
    again = load_run(str(run))
    assert again.step == 6 and _equal(again.params, full.params6)


def test_nan_stop_names_the_newest_step_that_passes_its_checks(full, monkeypatch, capsys):
    """Resumed at lr=30 with a checkpoint every step: step 7 is saved (then broken here), step 8 is NaN. The stop
    message names step 6, the newest good one, not the newest on disk (7)."""
    run = full.base / "nan"
    shutil.copytree(full.run, run)
    save = Checkpointer.save

    def save_then_break(self, step, state, meta, force=True):
        ok = save(self, step, state, meta, force)
        self.wait()
        os.remove(os.path.join(self.directory, str(step), "state", "_METADATA"))
        return ok

    monkeypatch.setattr(Checkpointer, "save", save_then_break)
    capsys.readouterr()
    assert train_main(full.args(run, steps=12, every=1, extra=["--set", "optimizer.lr=30"]) + ["--resume"]) == 3
    out = capsys.readouterr().out
    assert "non-finite loss at step 8" in out, out[-3000:]
    # the stop message names the parameters whose gradient is not finite, in forward order
    assert "non-finite gradient in" in out and "parameters, first model/embed_tokens/embedding" in out, out[-3000:]
    assert f"The last good checkpoint is kept: step 6 in {run / 'checkpoints'}" in out, out[-3000:]
    _fallback_line(out, run / "checkpoints", 7)


# --------------------------------------------------------------------------------------------------------------
# sampling and conversion


def test_load_run_sample_and_convert_fall_back(full, tmp_path, capsys):
    """load_run (bit flip), `wmjax.sample --checkpoint` (truncated file) and `wmjax.convert --from wmjax`
    (deleted metadata) each use step 4 when step 6 is bad, moving it aside with the same one-line message."""
    step4 = load_run(str(full.run), step=4).params
    runs = {}
    for name, fault in (("load", _flip_bit), ("sample", _truncate), ("convert", _delete_metadata)):
        runs[name] = tmp_path / name / "checkpoints"
        shutil.copytree(full.run / "checkpoints", runs[name])
        fault(runs[name] / "6", full.params6)

    logged = []
    r = load_run(str(runs["load"]), log=logged.append)
    assert r.step == 4 and _equal(r.params, step4)
    assert len(logged) == 1 and "checksum mismatch in params/" in _fallback_line(logged[0], runs["load"], 6)
    assert load_run(str(runs["load"])).step == 4  # the manager no longer lists 6

    capsys.readouterr()
    assert sample_main(["--checkpoint", str(runs["sample"].parent), "--prompt", "def ", "--max-new-tokens", "2",
                        "--no-stream"]) == 0
    err = capsys.readouterr().err
    _fallback_line(err, runs["sample"], 6)
    assert f"{runs['sample']} step 4" in err

    out = tmp_path / "hf"
    assert convert_main(["--from", "wmjax", str(runs["convert"]), "--to", "hf", str(out), "--no-progress"]) == 0
    _fallback_line(capsys.readouterr().err, runs["convert"], 6)
    for d in runs.values():
        assert sorted(os.listdir(d)) == ["2", "4", "6.corrupt"]
    from wmjax.convert import load_hf

    assert _equal(load_hf(str(out))[1], step4)


def test_load_run_paths_steps_and_misspelled_paths(full, tmp_path, capsys):
    ckpt = full.run / "checkpoints"
    assert load_run(str(full.run)).step == 6 and load_run(str(ckpt)).step == 6
    assert load_run(str(ckpt / "4")).step == 4 and load_run(str(full.run), step=2).step == 2
    with pytest.raises(CheckpointError, match=r"no step 5; available steps: \[2, 4, 6\]"):
        load_run(str(full.run), step=5)
    with pytest.raises(CheckpointError, match="is step 4, but step 2 was asked for"):
        load_run(str(ckpt / "4"), step=2)
    # --step picks a step of a run
    assert convert_main(["--from", "wmjax", str(full.run), "--to", "wmjax", str(tmp_path / "wm4"), "--step", "4",
                         "--no-progress"]) == 0
    from wmjax.convert import load_wmjax

    assert _equal(load_wmjax(str(tmp_path / "wm4"))[1], load_run(str(ckpt / "4")).params)

    typo = tmp_path / "runz" / "tiny"
    with pytest.raises(CheckpointError, match="no such directory") as e:
        load_run(str(typo))
    assert "\n" not in str(e.value) and str(typo) in str(e.value)
    capsys.readouterr()
    assert sample_main(["--checkpoint", str(typo), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and str(typo) in err, err
    assert convert_main(["--from", "wmjax", str(typo), "--to", "hf", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and str(typo) in err, err
    assert not os.path.exists(tmp_path / "runz") and not os.path.exists(tmp_path / "out")


def test_convert_run_dir_to_hf_logits_equal(full, tmp_path):
    """train tiny -> `python -m wmjax.convert --from wmjax RUN_DIR --to hf OUT` -> transformers loads OUT (model and
    tokenizer); its logits equal wmjax's (f32: 1e-5)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from wmjax.models.doge import DogeForCausalLM
    from wmjax.tokenizer import Tokenizer

    out = tmp_path / "hf"
    assert convert_main(["--from", "wmjax", str(full.run), "--to", "hf", str(out), "--no-progress"]) == 0
    run = load_run(str(full.run))
    hf, info = transformers.DogeForCausalLM.from_pretrained(out, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = np.random.default_rng(0).integers(3, run.config.vocab_size, size=(2, 24))
    with torch.no_grad():
        ref = hf.eval()(torch.as_tensor(ids)).logits.numpy()
    logits, _ = DogeForCausalLM(run.config, attention_impl="reference").apply({"params": run.params}, ids)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-5, rtol=0)
    text = "def f(x):\n    return x"
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(text, add_special_tokens=False).input_ids == Tokenizer(run.tokenizer).encode(text)
