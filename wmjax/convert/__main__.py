"""python -m wmjax.convert --from {hf,wmjax} SRC --to {hf,wmjax} DST [--overwrite] [--dtype bfloat16] [--strict]
[--tokenizer PATH | --no-tokenizer]"""

from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp

from wmjax.config import ConfigError
from wmjax.convert import ConversionError, convert
from wmjax.models.registry import family_of
from wmjax.tokenizer import find_tokenizer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wmjax.convert",
                                 description="Convert checkpoints (Doge, Cheems, OTCE, Om) between their upstream "
                                             "(Hugging Face / PyTorch) format and wmjax's.")
    ap.add_argument("--from", dest="src", nargs=2, metavar=("FORMAT", "DIR"), required=True,
                    help="source: 'hf DIR' (upstream: config.json + model.safetensors / pytorch_model.bin / sharded) or "
                         "'wmjax DIR' (wmjax-native, or a training run dir / its checkpoints/ / a step dir)")
    ap.add_argument("--to", dest="dst", nargs=2, metavar=("FORMAT", "DIR"), required=True,
                    help="destination: 'hf DIR' or 'wmjax DIR' (written atomically)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty destination")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="cast every tensor (default: keep the source dtype)")
    ap.add_argument("--strict", action="store_true",
                    help="HF source: accept only the HF-native layout (no legacy SmallDoge names/layouts)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--step", type=int, default=None,
                    help="wmjax source that is a training run: convert this step (default: the newest good one)")
    tok = ap.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="PATH",
                     help="tokenizer to write with the checkpoint: a sentencepiece .model, a tokenizer.json or a "
                          "directory holding either (default: the one found with the source)")
    tok.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    args = ap.parse_args(argv)
    for (fmt, _), which in ((args.src, "--from"), (args.dst, "--to")):
        if fmt not in ("hf", "wmjax"):
            ap.error(f"{which}: format must be 'hf' or 'wmjax', got {fmt!r}")

    dtype = None
    if args.dtype:
        dtype = getattr(jnp, args.dtype)
    t0 = time.time()
    try:
        cfg = convert(args.src[0], args.src[1], args.dst[0], args.dst[1], overwrite=args.overwrite, dtype=dtype,
                      legacy=False if args.strict else "auto", progress=not args.no_progress,
                      tokenizer=None if args.no_tokenizer else args.tokenizer or "auto", step=args.step)
    except (ConversionError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    flags = []
    if not getattr(cfg, "qk_norm", True) or getattr(cfg, "dt_heads", "kv") != "kv":  # Doge's legacy layouts
        flags = [f"qk_norm={cfg.qk_norm}", f"dt_heads={cfg.dt_heads!r}"]
    print(f"wrote {args.dst[0]} checkpoint {args.dst[1]} ({family_of(cfg).summary(cfg)}"
          f"{', ' + ', '.join(flags) if flags else ''}) in {time.time() - t0:.1f}s")
    if not args.no_tokenizer and not find_tokenizer(args.dst[1]):
        print("note: no tokenizer written (none found with the source); pass --tokenizer PATH to include one",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
