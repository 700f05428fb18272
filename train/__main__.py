"""``python -m train [--config configs/<name>.yaml] [--set key=value ...] [--resume]``.

With no arguments: the embedded default run (a tiny Doge on the Python standard library's sources, see
``train/config.py`` DEFAULT_CONFIG / ``configs/tiny.yaml``).

Exit status: 0 done, 2 bad input (one line on stderr naming the key, file or value; --traceback for the stack),
3 training stopped (non-finite loss).  A start that fails on bad input leaves the run dir as it was.
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, dump_yaml, load_config
from .trainer import run

# Bad input found while starting a run (missing/unreadable data or tokenizer file, a malformed token file, a
# corpus too small for the vocabulary, ...): reported as one line, exit status 2.
INPUT_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return " ".join(lines) if lines else type(e).__name__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", help="YAML config (merged over the embedded default)")
    ap.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set optimizer.lr=3e-4 --set mesh.fsdp=2 (repeatable)")
    ap.add_argument("--resume", action="store_true", help="resume from the latest good checkpoint of run_dir")
    ap.add_argument("--run-dir", help="shorthand for --set run_dir=...")
    ap.add_argument("--steps", type=int, help="shorthand for --set train.steps=...")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--traceback", action="store_true",
                    help="on bad input, raise with the full traceback instead of the one-line error")
    args = ap.parse_args(argv)

    overrides = list(args.set)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.resume:
        overrides.append("resume=true")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0

    try:
        res = run(cfg)
    except INPUT_ERRORS as e:  # ConfigError is a ValueError
        if args.traceback:
            raise
        print(f"{'config error' if isinstance(e, ConfigError) else 'error'}: {_one_line(e)}", file=sys.stderr)
        return 2
    if res.stopped:
        print(f"training stopped: {res.stopped}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
