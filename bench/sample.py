"""Sampling throughput: wmjax `generate` vs `transformers` generate, and constant decode memory of the bounded cache.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/sample.py            # GPU: Doge-160M, bf16
    python bench/sample.py --tiny                                          # CPU smoke test of the script

One process. Random-init weights (same weights in both frameworks via wmjax.convert.to_state_dict), prompt 128
random tokens, greedy, no stop token (every row generates all new tokens), tok/s = batch * new tokens / wall time
of the whole `generate` call (prefill included), best of `--repeats` after a compile + warm-up call.
transformers: torch bf16 on the same GPU, eager attention, `generate(do_sample=False, min_new_tokens=max_new_tokens)`;
its per-token cost is flat, so it is measured on `--hf-new` tokens to save device time.

Bounded cache (--long): a small model (Doge-20M config, keep_window_size 2048) generates N tokens for N in
--long-lengths with cache="bounded"; reported: cache pytree bytes (from the shapes), device peak memory
in use after each run, and ms per generated token. Constant memory = the same cache bytes and peak for every N.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))

from pallas_kernels.decode import tuning as decode_tuning  # noqa: E402


def log(*a):
    print(*a, flush=True)


def cast_params(params, dtype):
    import jax
    import jax.numpy as jnp
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def peak_bytes():
    import jax
    try:
        st = jax.devices()[0].memory_stats() or {}
        return st.get("peak_bytes_in_use"), st.get("bytes_in_use")
    except Exception:  # noqa: BLE001
        return None, None


def time_generate(model, params, prompts, new, repeats, **kw):
    import jax
    from wmjax.sampling import generate
    t0 = time.perf_counter()
    out = generate(model, params, prompts, max_new_tokens=new, stop_tokens=[], **kw)
    jax.block_until_ready(out.tokens)
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = generate(model, params, prompts, max_new_tokens=new, stop_tokens=[], **kw)
        jax.block_until_ready(out.tokens)
        best = min(best, time.perf_counter() - t0)
    return out, first, best


def bench_long(args, results):
    import jax
    import jax.numpy as jnp
    from wmjax.cache import cache_nbytes, init_cache
    from wmjax.config import DogeConfig
    from wmjax.models.doge import DogeForCausalLM, init_params
    cfg = DogeConfig.preset("Doge-20M") if not args.tiny else DogeConfig.preset(
        "Doge-20M", hidden_size=64, intermediate_size=64, num_hidden_layers=2, keep_window_size=64)
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, 65536))
    dtype = jnp.bfloat16
    params = cast_params(init_params(cfg, jax.random.PRNGKey(0)), dtype)
    rng = np.random.default_rng(0)
    for name, layer in params["model"].items():  # non-zero A so the top-k / eviction is exercised
        if name.startswith("layers_"):
            a = layer["self_attn"]["A"]
            layer["self_attn"]["A"] = jnp.asarray(rng.normal(size=a.shape), dtype)
    model = DogeForCausalLM(cfg, dtype=dtype, param_dtype=dtype)
    prompt = [rng.integers(0, cfg.vocab_size, 128).tolist()]
    rows = []
    for n in args.long_lengths:
        nbytes = cache_nbytes(jax.eval_shape(lambda: init_cache(cfg, 1, 0, dtype, "bounded")))
        full_bytes = cache_nbytes(jax.eval_shape(lambda: init_cache(cfg, 1, 128 + n, dtype, "full")))
        out, first, best = time_generate(model, params, prompt, n, 1, cache="bounded")
        assert int(out.lengths[0]) == n
        peak, inuse = peak_bytes()
        row = dict(generated=n, bounded_cache_bytes=nbytes, full_cache_bytes_would_be=full_bytes,
                   ms_per_token=1e3 * best / n, first_call_s=first, device_peak_bytes=peak, device_bytes_in_use=inuse)
        log("[long]", json.dumps(row))
        rows.append(row)
    results["bounded_long"] = dict(model="Doge-20M config" + (" (tiny)" if args.tiny else ""),
                                   keep_window_size=cfg.keep_window_size, rows=rows)


def bench_main(args, results):
    import jax
    import jax.numpy as jnp
    from wmjax.config import DogeConfig
    from wmjax.models.doge import DogeForCausalLM, init_params
    cfg = DogeConfig.preset(args.preset)
    if args.tiny:
        cfg = cfg.replace(hidden_size=64, intermediate_size=64, num_hidden_layers=2, vocab_size=512)
    dtype = jnp.bfloat16
    params32 = init_params(cfg, jax.random.PRNGKey(0))
    params = cast_params(params32, dtype)
    model = DogeForCausalLM(cfg, dtype=dtype, param_dtype=dtype)
    rng = np.random.default_rng(0)
    wm = {}
    per_decode = {}
    # variants: every decode path, the fused ones also under every --decode-tuning set
    variants = []
    tuning_sets = [t.strip() for t in args.decode_tuning.split(";")]
    for dec in args.decode:
        for fo in (tuning_sets if dec in ("fused", "auto") else [""]):
            variants.append((dec + (f" {{{fo}}}" if fo else ""), dec, _tuning_fields(fo)))
    for bs in args.batch_sizes:
        prompts = rng.integers(0, cfg.vocab_size, (bs, args.prompt_len)).tolist()
        for vi, (label, dec, fopts) in enumerate(variants):
            with decode_tuning.override(**fopts):
                out, first, best = time_generate(model, params, prompts, args.new, args.repeats, cache="full",
                                                 decode=dec)
            tps = bs * args.new / best
            row = dict(tok_s=tps, seconds=best, first_call_s=first, ms_per_step=1e3 * best / args.new)
            log(f"[wmjax] {args.preset} decode={label} bs={bs} prompt={args.prompt_len} new={args.new}: {tps:,.0f} "
                f"tok/s ({1e3 * best / args.new:.3f} ms/step incl. prefill; first call {first:.1f}s)")
            if dec in args.kernels:
                rows, n_ev, tl = _profile_generate(model, params, prompts, args.new, dec, args.profile_top,
                                                   f"generate decode={label} bs={bs}", cfg.num_hidden_layers, fopts)
                row["profile"] = dict(events=n_ev, timeline=tl, kernels=[dict(r, name=r["name"][:200])
                                                                          for r in rows[:60]])
            per_decode.setdefault(label, {})[bs] = row
            if vi == 0:
                first_tokens = np.asarray(out.tokens)
            if vi == len(variants) - 1:
                wm[bs] = dict(row, tokens=np.asarray(out.tokens), prompts=prompts)
            if vi > 0:
                same = float(np.mean(np.cumprod(first_tokens == np.asarray(out.tokens), axis=1).sum(1)))
                log(f"[wmjax] bs={bs}: greedy tokens of decode={variants[0][0]} and decode={label} agree on the "
                    f"first {same:.1f} of {args.new} tokens on average")
                row["greedy_prefix_agreement_with_" + variants[0][0]] = same
    results["wmjax"] = {bs: {k: v for k, v in d.items() if k not in ("tokens", "prompts")} for bs, d in wm.items()}
    results["wmjax_by_decode"] = per_decode
    if args.no_hf:
        return
    try:
        import torch
        import transformers
        from wmjax.convert import to_state_dict
    except Exception as e:  # noqa: BLE001
        log(f"[hf] skipped: {type(e).__name__}: {e}")
        return
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hcfg = transformers.DogeConfig(**cfg.to_hf_dict())
    hf = transformers.DogeForCausalLM(hcfg)
    sd = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in to_state_dict(cfg, params32).items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not cfg.tie_word_embeddings]
    if missing or unexpected:
        log(f"[hf] state dict mismatch: missing {missing[:5]} unexpected {unexpected[:5]}")
    hf.config._attn_implementation = "eager"
    hf = hf.to(dev, torch.bfloat16).eval()
    results["hf"] = {}
    for bs in args.batch_sizes:
        ids = torch.tensor(wm[bs]["prompts"], device=dev)
        kw = dict(do_sample=False, max_new_tokens=args.hf_new, min_new_tokens=args.hf_new, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            hf.generate(ids, **dict(kw, max_new_tokens=4, min_new_tokens=4))  # warm-up
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = hf.generate(ids, **kw)
            if dev == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        new = out.shape[1] - ids.shape[1]
        tps = bs * new / dt
        ours = wm[bs]["tokens"][:, :new]
        agree = float(np.mean(np.cumprod(ours == out[:, ids.shape[1]:].cpu().numpy(), axis=1).sum(1)))
        results["hf"][bs] = dict(tok_s=tps, seconds=dt, new_tokens=new, mean_greedy_prefix_agreement=agree)
        log(f"[hf] bs={bs} new={new}: {tps:,.1f} tok/s ({dt:.2f}s); greedy tokens equal to wmjax for the first "
            f"{agree:.1f} tokens on average (bf16 in both)")
        log(f"[speedup] bs={bs}: wmjax / transformers = {results['wmjax'][bs]['tok_s'] / tps:,.0f}x")


def _tuning_fields(text: str) -> dict:
    """'gemv_warps=2 cache_block=64' -> {name: int} (pallas_kernels.decode.tuning.DecodeTuning fields)."""
    fields = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--decode-tuning: {item!r} is not name=value")
        fields[name] = int(value)
    return fields


def _profile_generate(model, params, prompts, new, decode, top, title, n_layers, tuning_fields=None):
    """Kernel table (printed) and device timeline of one `generate` call under jax.profiler; returns
    (rows, events per call, timeline)."""
    import tempfile
    from bench.kernel_profile import device_timeline, kernel_table, print_kernel_table
    from wmjax.sampling import generate
    logdir = tempfile.mkdtemp(prefix="wmjax_sample_prof_")
    with decode_tuning.override(**(tuning_fields or {})):
        rows = kernel_table(lambda: generate(model, params, prompts, max_new_tokens=new, stop_tokens=[],
                                             cache="full", decode=decode).tokens, iters=1, logdir=logdir)
    tl = device_timeline(logdir)
    print_kernel_table(rows, top=top, title=title)
    n_ev = sum(r["count"] for r in rows)
    steps = new - 1
    log(f"[profile] {title}: device kernel sum {sum(r['total_ms'] for r in rows):.2f} ms, {n_ev:.0f} events = "
        f"{n_ev / steps:.1f} per decode step ({n_ev / steps / n_layers:.1f} per layer); timeline {tl}")
    return rows, n_ev, tl


def bench_profile(args, results):
    """Kernel table of one whole `generate` call per batch size (jax.profiler), device busy time vs span, and
    the compiled HLO (saved next to --json) to map fusions to ops."""
    import jax
    import jax.numpy as jnp
    from wmjax.config import DogeConfig
    from wmjax.models.doge import DogeForCausalLM, init_params
    cfg = DogeConfig.preset(args.preset)
    if args.tiny:
        cfg = cfg.replace(hidden_size=64, intermediate_size=64, num_hidden_layers=2, vocab_size=512)
    dtype = jnp.bfloat16
    params = cast_params(init_params(cfg, jax.random.PRNGKey(0)), dtype)
    model = DogeForCausalLM(cfg, dtype=dtype, param_dtype=dtype)
    rng = np.random.default_rng(0)
    prof = {}
    for bs in args.batch_sizes:
        prompts = rng.integers(0, cfg.vocab_size, (bs, args.prompt_len)).tolist()
        out, first, best = time_generate(model, params, prompts, args.new, args.repeats, cache="full")
        rows, n_ev, tl = _profile_generate(model, params, prompts, args.new, "auto", args.profile_top,
                                           f"generate bs={bs}", cfg.num_hidden_layers)
        dev_ms = sum(r["total_ms"] for r in rows)
        log(f"[profile] bs={bs}: wall {1e3 * best:.2f} ms ({1e3 * best / args.new:.3f} ms/token)")
        prof[bs] = dict(wall_ms=1e3 * best, device_ms=dev_ms, events=n_ev, timeline=tl,
                        kernels=[dict(r, name=r["name"][:200]) for r in rows[:80]])
        if args.json and bs == args.batch_sizes[0]:
            import wmjax.sampling as S  # the compiled text of the whole generate
            ids, mask = S.pad_prompts(prompts)
            kw = dict(model=model, max_new_tokens=args.new, cache_kind="full", cache_length=args.prompt_len + args.new,
                      sampling=S.SamplingParams(), return_logprobs=False, callback=None,
                      cache_dtype=jnp.dtype(dtype), pad_id=0)
            try:
                txt = S._generate_jit.lower(params, jnp.asarray(ids), jnp.asarray(mask),
                                            jnp.full((bs, 1), -1, jnp.int32), jax.random.PRNGKey(0),
                                            **kw).compile().as_text()
                with open(os.path.splitext(args.json)[0] + f"_hlo_bs{bs}.txt", "w") as f:
                    f.write(txt)
            except Exception as e:  # noqa: BLE001
                log(f"[profile] HLO dump failed: {type(e).__name__}: {e}")
    results["profile"] = prof


def bench_decode_kernels(args, results):
    """The fused decode path's kernels alone (pallas_kernels.decode) at the preset's shapes, per batch size: device
    time per call (jax.profiler kernel table, 20 calls) for a few block / warp settings, against the jnp
    reference (XLA), and the max difference to it. The fused step launches per layer: qkv (norm prologue),
    attention, o (residual), gate/up (norm + SwiGLU), down (residual); per step the LM head."""
    import jax
    import jax.numpy as jnp
    from bench.kernel_profile import kernel_table
    from pallas_kernels.decode import (decode_layer_attention, decode_layer_attention_reference, decode_linear,
                                       decode_linear_reference)
    from wmjax.config import DogeConfig
    from wmjax.layers.rope import rope_cos_sin
    cfg = DogeConfig.preset(args.preset)
    h, g, d, hid, ffn = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
                         cfg.intermediate_size)
    vocab = -(-cfg.vocab_size // 64) * 64
    c = -(-(args.prompt_len + args.new) // 64) * 64
    rng = np.random.default_rng(0)
    bf, f32 = jnp.bfloat16, jnp.float32
    a = lambda *shape, dt=bf, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, dt)
    rows_out = []

    def measure(bs, kernel, name, f, ins, ref, post=lambda out: out):
        # post: maps f's outputs to the reference's form before the comparison (outside the timed calls)
        try:
            got = post(f(*ins))
            err = max(float(np.max(np.abs(np.asarray(x, np.float32)[:bs] - np.asarray(y, np.float32)[:bs])))
                      for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)))
            n = 20

            def many():
                out = None
                for _ in range(n):
                    out = f(*ins)
                return out
            kt = kernel_table(many, iters=1)
            row = dict(bs=bs, kernel=kernel, variant=name, device_us=1e3 * sum(k["total_ms"] for k in kt) / n,
                       kernels=sum(k["count"] for k in kt) / n, max_abs_diff=err)
        except Exception as e:  # noqa: BLE001
            row = dict(bs=bs, kernel=kernel, variant=name, error=f"{type(e).__name__}: {str(e)[:300]}")
        log("[decode-kernel]", json.dumps(row))
        rows_out.append(row)

    for bs in args.batch_sizes:
        rows = -(-bs // 16) * 16
        nw = a(hid, dt=f32, scale=0.1) + 1
        linears = {
            "qkv": ((a(rows, hid), a((h + 2 * g) * d, hid, scale=hid ** -0.5)), dict(norm_weight=nw)),
            "o": ((a(rows, h * d), a(hid, h * d, scale=(h * d) ** -0.5)),
                  dict(residual=a(rows, hid), residual_scale=a(hid, dt=f32))),
            "gate_up": ((a(rows, hid), a(ffn, hid, scale=hid ** -0.5)),
                        dict(up_weight=a(ffn, hid, scale=hid ** -0.5), norm_weight=nw)),
            "down": ((a(rows, ffn), a(hid, ffn, scale=ffn ** -0.5)),
                     dict(residual=a(rows, hid), residual_scale=a(hid, dt=f32))),
            "lm_head": ((a(rows, hid), a(vocab, hid, scale=hid ** -0.5)), dict(norm_weight=nw, out_dtype=f32)),
        }
        for kname, (ins, kw) in linears.items():
            want = jax.jit(lambda *x, kw=kw: decode_linear_reference(*x, **kw))
            ref = want(*ins)
            measure(bs, kname, "reference (XLA)", want, ins, ref)
            blocks = [64, 128] if kname == "lm_head" else [16, 32]
            for bn in blocks:
                for bk, warps, stages in [(256, 4, 1), (256, 4, 3), (128, 4, 4), (256, 8, 3)]:
                    f = jax.jit(lambda *x, kw=kw, bn=bn, bk=bk, warps=warps, stages=stages: decode_linear(
                        *x, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, **kw))
                    measure(bs, kname, f"pallas block_n={bn} block_k={bk} warps={warps} stages={stages}", f, ins,
                            ref)
            if bs == 1:
                # the gemv form (real_rows=1: row 0 only, no tensor-core dot, block_n below 16 -> more programs) on
                # one row as the fused step runs it at batch 1; session 5 measured block_n 4 < 8 (warps 4)
                ins1 = tuple(x[:1] if x.ndim == 2 and x.shape[0] == rows else x for x in ins)
                kw1 = {k: (v[:1] if k == "residual" else v) for k, v in kw.items()}
                ref1 = jax.jit(lambda *x, kw=kw1: decode_linear_reference(*x, **kw))(*ins1)
                gemv_variants = ([(8, 4), (16, 4), (32, 4), (16, 8)] if kname == "lm_head" else
                                 [(2, 4), (4, 4), (8, 4), (2, 2), (4, 2), (4, 1)])
                for bn, warps in gemv_variants:
                    f = jax.jit(lambda *x, kw=kw1, bn=bn, warps=warps: decode_linear(
                        *x, block_n=bn, block_k=256, num_warps=warps, num_stages=3, real_rows=1, **kw))
                    measure(bs, kname, f"pallas gemv rows=1 block_n={bn} block_k=256 warps={warps} stages=3", f,
                            ins1, ref1)
        pos = jnp.asarray(rng.integers(args.prompt_len, c - 1, size=bs))
        cos, sin = rope_cos_sin(pos[:, None], d, cfg.rope_theta, dtype=bf)
        valid = jnp.asarray(rng.random((bs, c)) < 0.9, jnp.int32).at[:, c // 2:].set(0)
        ins = (a(rows, (h + 2 * g) * d), cos[:, 0], sin[:, 0], valid, jnp.int32(c // 2), nw[:d], nw[:d],
               a(g, g * d, scale=(g * d) ** -0.5), None, a(g, dt=f32), a(bs, g, c, d), a(bs, g, c, d),
               a(bs, g, c, dt=f32))
        kw = dict(num_heads=h, eps=cfg.rms_norm_eps, scale=d ** -0.5)
        want = jax.jit(lambda *x: decode_layer_attention_reference(*x[:8], None, *x[8:], **kw))
        ins = ins[:8] + ins[9:]
        ref = want(*ins)
        measure(bs, "attention", "reference (XLA)", want, ins, ref)
        # (block_c, warps, stages)
        for bc, warps, stages in [(128, 4, 2), (128, 4, 3), (64, 4, 3), (128, 2, 3)]:
            f = jax.jit(lambda *x, bc=bc, warps=warps, stages=stages: decode_layer_attention(
                *x[:8], None, *x[8:], block_c=bc, num_warps=warps, num_stages=stages, **kw))
            measure(bs, "attention", f"pallas block_c={bc} warps={warps} stages={stages}", f, ins, ref)
    results["decode_kernels"] = rows_out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="Doge-160M")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-new", type=int, default=48)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--long-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 32768])
    p.add_argument("--no-long", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny widths, short runs")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--profile", action="store_true", help="kernel tables of generate (jax.profiler) instead of timing")
    p.add_argument("--profile-top", type=int, default=40)
    p.add_argument("--decode-kernels", action="store_true",
                   help="time the fused path's decode kernels alone (block variants vs the XLA reference)")
    p.add_argument("--decode", type=lambda s: s.split(","), default=["auto"],
                   help="generate(decode=...) paths to time, comma-separated (model, fused, auto; e.g. model,fused); "
                        "the last one is compared with transformers")
    p.add_argument("--decode-tuning", default="",
                   help="pallas_kernels.decode.tuning.override sets, ';'-separated, each 'name=value ...' (e.g. "
                        "';gemv_warps=2 cache_block=64'); every fused / auto path runs under every set; an empty set = "
                        "the tuned defaults. (XLA options: one set per process, through XLA_FLAGS.)")
    p.add_argument("--kernels", type=lambda s: s.split(","), default=[],
                   help="decode paths to also profile (kernel table of one generate call, after timing)")
    p.add_argument("--traceback-after", type=float, default=0,
                   help="dump every thread's Python stack every N seconds (finds where a stalled call waits: "
                        "XLA compile or the device)")
    args = p.parse_args(argv)
    if args.traceback_after > 0:
        import faulthandler
        faulthandler.dump_traceback_later(args.traceback_after, repeat=True)
    if args.tiny:
        args.new, args.prompt_len, args.hf_new, args.repeats = 16, 8, 8, 1
        args.long_lengths = [128, 512]
    import jax
    log(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    results = {"device": jax.devices()[0].device_kind, "args": vars(args)}
    if args.decode_kernels:
        bench_decode_kernels(args, results)
    elif args.profile:
        bench_profile(args, results)
    else:
        if not args.no_long:
            bench_long(args, results)
        bench_main(args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    log("[results]", json.dumps(results, default=str))


if __name__ == "__main__":
    main()
