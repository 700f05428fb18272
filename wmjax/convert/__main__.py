"""python -m wmjax.convert --from {hf,wmjax} SRC --to {hf,wmjax} DST [--overwrite] [--dtype bfloat16] [--strict]"""

from __future__ import annotations

import argparse
import sys
import time

from wmjax.config import ConfigError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wmjax.convert",
                                 description="Convert Doge checkpoints between Hugging Face and wmjax formats.")
    ap.add_argument("--from", dest="src", nargs=2, metavar=("FORMAT", "DIR"), required=True,
                    help="source: 'hf DIR' (config.json + model.safetensors / pytorch_model.bin / sharded) or "
                         "'wmjax DIR'")
    ap.add_argument("--to", dest="dst", nargs=2, metavar=("FORMAT", "DIR"), required=True,
                    help="destination: 'hf DIR' or 'wmjax DIR' (written atomically)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty destination")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="cast every tensor (default: keep the source dtype)")
    ap.add_argument("--strict", action="store_true",
                    help="HF source: accept only the HF-native layout (no legacy SmallDoge names/layouts)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    for (fmt, _), which in ((args.src, "--from"), (args.dst, "--to")):
        if fmt not in ("hf", "wmjax"):
            ap.error(f"{which}: format must be 'hf' or 'wmjax', got {fmt!r}")

    from wmjax.convert import ConversionError, convert

    dtype = None
    if args.dtype:
        import jax.numpy as jnp

        dtype = getattr(jnp, args.dtype)
    t0 = time.time()
    try:
        cfg = convert(args.src[0], args.src[1], args.dst[0], args.dst[1], overwrite=args.overwrite, dtype=dtype,
                      legacy=False if args.strict else "auto", progress=not args.no_progress)
    except (ConversionError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    flags = [] if cfg.qk_norm and cfg.dt_heads == "kv" else [f"qk_norm={cfg.qk_norm}", f"dt_heads={cfg.dt_heads!r}"]
    print(f"wrote {args.dst[0]} checkpoint {args.dst[1]} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"vocab {cfg.vocab_size}{', MoE' if cfg.is_moe else ''}{', ' + ', '.join(flags) if flags else ''}) "
          f"in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
