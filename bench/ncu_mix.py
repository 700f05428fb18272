"""Instruction mix and warp stalls per kernel from Nsight Compute's SASS page (no GUI needed).

On the GPU machine (ncu is on the PATH there; `--clock-control none` leaves the clocks alone):
    ncu --clock-control none -k regex:selective_scan -c 4 --set full -o $OUT/ss \\
        python3 bench/selective_scan.py --no-check --no-peer --no-ref --nvar 1 --only mamba1
    ncu --import $OUT/ss.ncu-rep --page source --csv --print-source sass > $OUT/sass.csv
    ncu --import $OUT/ss.ncu-rep --page details > $OUT/details.txt      # durations, IPC, occupancy, registers
Then, anywhere:
    python3 bench/ncu_mix.py sass.csv [--top 16]

Prints, per profiled kernel launch: executed warp instructions, static instructions, the opcode mix (share of
executed instructions, opcode without modifiers) and the warp-stall reasons sampled (share of samples).
docs/benchmarks-history.md, Session 10, has the selective scan's tables made this way.
"""

from __future__ import annotations

import argparse
import collections
import csv


def read_kernels(path):
    """[(kernel name, [row dict per SASS instruction])] in the file's order (a name repeats per launch)."""
    out, header = [], None
    with open(path, newline="") as fh:
        for row in csv.reader(fh):
            if not row:
                continue
            if row[0] == "Kernel Name":
                out.append((row[1], []))
                header = None
            elif row[0] == "Address":
                header = row
            elif header and out:
                out[-1][1].append(dict(zip(header, row)))
    return out


def _int(v):
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return 0


def summarize(rows):
    """(executed warp instructions, opcode Counter, stall Counter) of one launch."""
    mix, stalls, total = collections.Counter(), collections.Counter(), 0
    for d in rows:
        n = _int(d.get("Instructions Executed"))
        words = d.get("Source", "").split()
        if words and words[0].startswith("@"):   # predicate guard
            words = words[1:]
        mix[(words[0] if words else "?").split(".")[0]] += n
        total += n
        for k, v in d.items():
            if k.startswith("stall_") and "Not Issued" not in k:
                stalls[k[len("stall_"):]] += _int(v)
    return total, mix, stalls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--top", type=int, default=16)
    args = ap.parse_args(argv)
    for name, rows in read_kernels(args.csv):
        total, mix, stalls = summarize(rows)
        print(f"== {name}: {total / 1e6:.1f}M warp instructions executed, {len(rows)} static")
        print("   mix:   " + ", ".join(f"{op} {c / max(total, 1) * 100:.1f}%" for op, c in mix.most_common(args.top)))
        s = sum(stalls.values()) or 1
        print("   stalls: " + ", ".join(f"{k} {c / s * 100:.0f}%" for k, c in stalls.most_common(8)))


if __name__ == "__main__":
    main()
