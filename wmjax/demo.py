"""python -m wmjax.demo: a Doge-20M-shaped model through Hugging Face and back.

Builds a randomly initialised Doge (default: the Doge-20M preset; A drawn N(0, 1) so the dynamic-mask biases are
not all 1), exports it with `wmjax.convert.save_hf`, loads it with `transformers.DogeForCausalLM.from_pretrained`
(eager attention, the reference implementation), compares the logits on a right-padded batch, converts the HF
checkpoint back with `load_hf` and checks every tensor is byte-identical. Prints a table; exit status 1 if any check
fails. CPU, f32, well under a minute.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from wmjax.config import DogeConfig
from wmjax.convert import flatten_params, load_hf, save_hf
from wmjax.models.doge import DogeForCausalLM, init_params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wmjax.demo", description=__doc__.split("\n\n")[1])
    ap.add_argument("--preset", default="Doge-20M", help="a wmjax.config.PRESETS name (default Doge-20M)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--keep-window", type=int, default=None,
                    help="override keep_window_size (< seq exercises the dynamic-mask top-k)")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (fewer: faster)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args(argv)

    jax.config.update("jax_default_matmul_precision", "highest")
    try:  # optional: the test extra
        import torch
        import transformers
    except ImportError as e:
        print(f"the demo compares against transformers: install the test extra (pip install -e '.[test]'): {e}",
              file=sys.stderr)
        return 1
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    over = {} if args.keep_window is None else {"keep_window_size": args.keep_window}
    if args.layers is not None:
        over["num_hidden_layers"] = args.layers
    cfg = DogeConfig.preset(args.preset, **over)
    t0 = time.time()
    rows: list[tuple[str, str, bool]] = []

    # 1. random wmjax params, A ~ N(0, 1)
    params = init_params(cfg, jax.random.PRNGKey(args.seed))
    rng = np.random.default_rng(args.seed)
    for name, layer in params["model"].items():
        if name.startswith("layers_"):
            a = layer["self_attn"]["A"]
            layer["self_attn"]["A"] = jnp.asarray(rng.normal(size=a.shape), a.dtype)
    n_params = sum(int(np.prod(v.shape)) for v in flatten_params(params).values())

    # a right-padded batch of distinct tokens per row (repeated tokens tie the layer-0 biases; docs/DOGE.md, Ties in practice)
    b, s = args.batch, args.seq
    ids = np.stack([rng.permutation(cfg.vocab_size)[:s] for _ in range(b)]).astype(np.int64)
    mask = np.ones((b, s), np.int64)
    if b > 1:
        mask[-1, s - s // 4:] = 0

    with tempfile.TemporaryDirectory(prefix="wmjax-demo-") as tmp:
        hf_dir, back_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "hf_again")
        t = time.time()
        save_hf(cfg, params, hf_dir)
        st = os.path.join(hf_dir, "model.safetensors")
        with safe_open(st, framework="pt") as f:
            n_tensors = len(list(f.keys()))
        rows.append(("save_hf -> config.json + model.safetensors",
                     f"{n_tensors} tensors, {os.path.getsize(st) / 2**20:.1f} MiB, {time.time() - t:.1f}s", True))

        t = time.time()
        hf, info = transformers.DogeForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                                                output_loading_info=True)
        hf.eval()
        bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
        rows.append(("transformers from_pretrained (eager)",
                     "missing 0, unexpected 0, mismatched 0" if not bad else f"PROBLEMS: {bad}", not bad))

        with torch.no_grad():
            ref = hf(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
        model = DogeForCausalLM(cfg, attention_impl="reference")
        fwd = jax.jit(lambda p, i, m: model.apply({"params": p}, i, attention_mask=m)[0])
        out = np.asarray(fwd(params, jnp.asarray(ids), jnp.asarray(mask)))
        diff = float(np.abs(out - ref).max())
        real = mask.astype(bool)
        agree = float((out.argmax(-1) == ref.argmax(-1))[real].mean())
        rows.append((f"logits wmjax vs HF {list(out.shape)}",
                     f"max |diff| {diff:.2e} (tol {args.tol:g}); argmax agree {agree:.0%}", diff <= args.tol))
        if cfg.keep_window_size >= s:  # also with the dynamic-mask top-k active: keep_window_size < seq in both
            kw = max(2, s // 4)
            for layer in hf.model.layers:
                layer.self_attn.keep_window_size = kw
            with torch.no_grad():
                ref_kw = hf(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
            model_kw = DogeForCausalLM(cfg.replace(keep_window_size=kw), attention_impl="reference")
            out_kw = np.asarray(jax.jit(lambda p, i, m: model_kw.apply({"params": p}, i, attention_mask=m)[0])(
                params, jnp.asarray(ids), jnp.asarray(mask)))
            d_kw = float(np.abs(out_kw - ref_kw).max())
            rows.append((f"  same, keep_window_size={kw} < seq (top-k on)",
                         f"max |diff| {d_kw:.2e}; differs from full window by {np.abs(out_kw - out).max():.2f}",
                         d_kw <= args.tol))

        t = time.time()
        cfg2, params2 = load_hf(hf_dir)
        flat, flat2 = flatten_params(params), flatten_params(params2)
        same = cfg2 == cfg and flat.keys() == flat2.keys() and all(
            flat[k].dtype == flat2[k].dtype and np.asarray(flat[k]).tobytes() == np.asarray(flat2[k]).tobytes()
            for k in flat)
        rows.append(("load_hf -> wmjax params (vs original)",
                     f"{len(flat)} arrays, config equal, byte-identical: {same}, {time.time() - t:.1f}s", same))

        save_hf(cfg2, params2, back_dir)
        tensors = lambda d: {k: (v.dtype, v.shape, v.tobytes()) for k, v in _read(safe_open, d).items()}
        same_st = tensors(hf_dir) == tensors(back_dir)
        rows.append(("save_hf again -> model.safetensors", f"{n_tensors} tensors byte-identical: {same_st}", same_st))

    print(f"wmjax demo: {args.preset}-shaped Doge ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}x{cfg.head_dim}, vocab {cfg.vocab_size}, "
          f"{'MoE, ' if cfg.is_moe else ''}{'tied, ' if cfg.tie_word_embeddings else ''}{n_params / 1e6:.1f}M params), "
          f"random init with A ~ N(0, 1); batch {b}x{s} (row {b - 1} right-padded), keep_window_size "
          f"{cfg.keep_window_size}; CPU f32")
    w = max(len(r[0]) for r in rows)
    print(f"{'step':<{w}}  {'ok':<4}  result")
    for name, result, ok in rows:
        print(f"{name:<{w}}  {'OK' if ok else 'FAIL':<4}  {result}")
    all_ok = all(r[2] for r in rows)
    print(f"{'all checks passed' if all_ok else 'SOME CHECKS FAILED'} in {time.time() - t0:.1f}s")
    return 0 if all_ok else 1


def _read(safe_open, d):
    with safe_open(os.path.join(d, "model.safetensors"), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


if __name__ == "__main__":
    sys.exit(main())
