"""`python -m wmjax.sample` end to end, in process (`main([...])`), on a tiny model exported as a transformers dir
(--hf) and as a wmjax-native dir (--checkpoint), each with a word-level tokenizer.json whose words name the ids
("w17" is id 17, no special tokens), so the printed text reads back as the generated ids. Sampling is checked
against the logits recomputed by a full forward pass (test_sampling.allowed_tokens), greedy decoding against an
argmax loop over full forward passes, both apart from `generate`."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from test_sampling import FUSED, SAMPLERS, _forward, _padded, _setup, allowed_tokens, step_logits
from wmjax.convert import save_hf, save_wmjax
from wmjax.sample import main

PROMPTS = ["w5 w7 w9", "w11 w3 w20 w8"]


def _ids(text):
    return [int(w[1:]) for w in text.split()]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, params, tmp dir with hf/ and wmjax/): the tiny model of test_sampling's sampling tests (every weight
    O(0.3), keep_window_size 64 so the fused decode path applies), no bos / eos / pad id."""
    tokenizers = pytest.importorskip("tokenizers")
    cfg, params, model = _setup(**FUSED)
    rng = np.random.default_rng(5)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype), params)
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(cfg.vocab_size)},
                                                          unk_token="w0"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins the words with spaces
    d = tmp_path_factory.mktemp("cli_sample")
    save_hf(cfg, params, d / "hf")
    save_wmjax(cfg, params, d / "wmjax")
    for sub in ("hf", "wmjax"):
        tk.save(str(d / sub / "tokenizer.json"))
    return model, params, d


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_cli_hf_sampling_reproducible_and_inside_allowed_set(name, exported, capsys):
    """--temperature with --top-k / --top-p / --min-p on --hf DIR, two prompts, 12 tokens: --seed 0 twice prints
    the same text, --seed 1 other text, and every printed token is in the allowed set of the logits it was drawn
    from (a set of under a third of the vocabulary)."""
    model, params, d = exported
    sp = SAMPLERS[name]
    argv = ["--hf", str(d / "hf"), "--max-new-tokens", "12", "--no-stream"] + sum(
        (["--prompt", p] for p in PROMPTS), []) + sum(
        ([f"--{k.replace('_', '-')}", str(v)] for k, v in sp.items()), [])
    outs = []
    for seed in (0, 0, 1):
        assert main(argv + ["--seed", str(seed)]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[1] == outs[0] and outs[2] != outs[0], outs
    prompts = [_ids(p) for p in PROMPTS]
    for out in (outs[0], outs[2]):
        blocks = out.split("\n---\n")
        assert len(blocks) == 3 and blocks[2] == "", out
        rows = [_ids(b) for b in blocks[:2]]
        assert [r[:len(p)] for r, p in zip(rows, prompts)] == prompts and all(len(r) == len(p) + 12
                                                                              for r, p in zip(rows, prompts)), out
        tokens = np.asarray([r[len(p):] for r, p in zip(rows, prompts)])
        allowed = np.asarray([[allowed_tokens(l, **sp) for l in row]
                              for row in step_logits(model, params, prompts, tokens)])  # [b, T, V]
        assert allowed.mean() < 1 / 3, allowed.mean()
        inside = np.take_along_axis(allowed, tokens[..., None], -1)[..., 0]
        assert inside.all(), (out, np.argwhere(~inside))


def _greedy(model, params, prompt, n):
    """n greedy tokens by argmax over full forward passes (no cache; one compile: right-padded to the end)."""
    ids = list(prompt)
    for _ in range(n):
        buf, mask = _padded([ids], len(prompt) + n, "right")
        ids.append(int(np.argmax(np.asarray(_forward(model, params, buf, mask))[0, len(ids) - 1])))
    return ids[len(prompt):]


def test_cli_streams_from_wmjax_checkpoint(exported, capsys):
    """Greedy, streamed, from --checkpoint DIR (wmjax-native) through the model's decode step (--decode model) and
    through the fused decode kernels (--decode fused; Pallas interpret mode on a CPU): both stream the prompt and
    the tokens of an argmax loop over full forward passes."""
    model, params, d = exported
    new = _greedy(model, params, _ids(PROMPTS[0]), 6)
    want = " ".join([PROMPTS[0]] + [f"w{i}" for i in new]) + "\n"
    for decode in ("model", "fused"):
        assert main(["--checkpoint", str(d / "wmjax"), "--prompt", PROMPTS[0], "--max-new-tokens", "6",
                     "--decode", decode]) == 0
        assert capsys.readouterr().out == want, decode
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(d / "wmjax"), "--prompt", "w5", "--max-new-tokens", "0"])
