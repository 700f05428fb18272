"""Sample from a checkpoint of any model family (Doge, Cheems, OTCE, Om), streaming the text to the terminal.

    python -m wmjax.sample --hf DIR --prompt "Once upon a time" [--max-new-tokens 128] [--temperature 0.8 --top-p 0.9]
    python -m wmjax.sample --checkpoint DIR --prompt "..."

--hf DIR: an upstream checkpoint (a `transformers` Doge, or a Cheems / OTCE / Om one: config.json +
  safetensors/bin, read by wmjax.convert.load_hf), with its tokenizer.json (HF `tokenizers`) or tokenizer.model (sentencepiece) in DIR.
--checkpoint DIR, any of:
  * a wmjax-native directory (wmjax.convert.save_wmjax: wmjax_config.json + params.safetensors);
  * a training run directory or its checkpoints/ directory (train/: orbax steps holding `state` and `meta`):
    the newest good step's params are restored (wmjax.checkpoint.load_run: a step that cannot be read or fails
    its checksums is moved aside to <step>.corrupt and the previous one is used), the model config and the
    tokenizer path come from `meta` (a specific step: --checkpoint RUN/checkpoints/STEP).
  --tokenizer PATH overrides the tokenizer (a tokenizer.json, a sentencepiece .model or a directory holding one).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from wmjax import convert
from wmjax.checkpoint import CheckpointError, load_run
from wmjax.models.registry import family_of
from wmjax.sampling import DECODE_PATHS, generate
from wmjax.tokenizer import Tokenizer, find_tokenizer


def load(args):
    """-> (config, params, tokenizer path or None, description)."""
    if args.hf:
        config, params = convert.load_hf(args.hf)
        return config, params, find_tokenizer(args.hf), args.hf
    d = args.checkpoint
    if os.path.isfile(os.path.join(d, convert.WMJAX_CONFIG)):
        config, params = convert.load_wmjax(d)
        return config, params, find_tokenizer(d), d
    run = load_run(d, log=lambda m: print(m, file=sys.stderr))
    return run.config, run.params, run.tokenizer, run.description


def _warning_line(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m wmjax.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="wmjax-native dir, or a train/ run / checkpoints / step dir")
    src.add_argument("--hf", help="upstream checkpoint dir (transformers Doge; Cheems / OTCE / Om state dict + "
                                  "config.json)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch; the first one streams")
    p.add_argument("--tokenizer", help="tokenizer.json or sentencepiece .model (default: found with the weights)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", choices=("auto", "full", "bounded"), default="auto")
    p.add_argument("--decode", choices=DECODE_PATHS, default="auto",
                   help="decode step (wmjax.sampling.generate): auto = the fused Pallas kernels on GPU where they "
                        "apply, else the Flax model's step")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--no-stream", action="store_true", help="print the texts at the end only")
    args = p.parse_args(argv)

    if args.max_new_tokens <= 0:
        p.error(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    try:
        config, params, tok_path, desc = load(args)
    except (FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok_path = args.tokenizer or tok_path
    if not tok_path:
        print(f"error: no tokenizer found for {desc} (looked for tokenizer.json / tokenizer.model); pass --tokenizer",
              file=sys.stderr)
        return 2
    try:
        tok = Tokenizer(tok_path, bos_id=config.bos_token_id)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {'--tokenizer ' if args.tokenizer else ''}{e}", file=sys.stderr)
        return 2
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    dtype = jnp.dtype(dtype)
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else jnp.asarray(x),
        params)
    family = family_of(config)
    model = family.model_cls(config, dtype=dtype, param_dtype=dtype)
    prompts = [tok.encode(t, add_bos=True) for t in args.prompt]
    for t, ids in zip(args.prompt, prompts):
        if not ids:
            print(f"error: prompt {t!r} encodes to no tokens", file=sys.stderr)
            return 2
    print(f"[{desc}: {family.summary(config)}, {dtype.name}; "
          f"tokenizer {tok_path}]", file=sys.stderr, flush=True)

    # decode prompt + new tokens together and print the growth past the prompt's own text, so the spacing at
    # the seam (sentencepiece drops a leading space when decoding pieces alone) comes out right
    base = [tok.decode(ids) for ids in prompts]
    state = {"ids": list(prompts[0]), "shown": base[0], "prompt_shown": False}

    def show_prompt():  # with the first token, so that generate's warnings come before the streamed text
        if not state["prompt_shown"]:
            sys.stdout.write(args.prompt[0])
            sys.stdout.flush()
            state["prompt_shown"] = True

    def stream(step, toks, active):
        show_prompt()
        if not bool(active[0]):
            return
        t = int(toks[0])
        if config.eos_token_id is not None and t == config.eos_token_id:
            return
        state["ids"].append(t)
        text = tok.decode(state["ids"])
        # wait while the last character is incomplete (multi-byte) or the text does not extend what is shown
        if text.endswith("\ufffd") or not text.startswith(state["shown"]):
            return
        sys.stdout.write(text[len(state["shown"]):])
        sys.stdout.flush()
        state["shown"] = text

    streaming = not args.no_stream
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():  # generate's warnings (e.g. a prompt past max_position_embeddings): one line
            warnings.showwarning = _warning_line
            out = generate(model, params, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                           repetition_penalty=args.repetition_penalty, rng=jax.random.PRNGKey(args.seed),
                           cache=args.cache, decode=args.decode, callback=stream if streaming else None)
        toks, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        jax.effects_barrier()
    except ValueError as e:
        print(f"{chr(10) if state['prompt_shown'] else ''}error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    texts, fulls = [], []
    for i in range(len(prompts)):
        ids = toks[i, :lengths[i]].tolist()
        if config.eos_token_id is not None and ids and ids[-1] == config.eos_token_id:
            ids = ids[:-1]
        full = tok.decode(list(prompts[i]) + ids)
        fulls.append(full)
        texts.append(full[len(base[i]):] if full.startswith(base[i]) else tok.decode(ids))
    if streaming:
        show_prompt()
        rest = fulls[0][len(state["shown"]):] if fulls[0].startswith(state["shown"]) else ""
        sys.stdout.write(rest + "\n")
        for t, txt in zip(args.prompt[1:], texts[1:]):
            sys.stdout.write(f"---\n{t}{txt}\n")
    else:
        for t, txt in zip(args.prompt, texts):
            sys.stdout.write(f"{t}{txt}\n---\n")
    sys.stdout.flush()
    print(f"[{int(lengths.sum())} tokens in {dt:.2f}s incl. compilation]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
