"""`python -m bench [--smoke] [--only NAME ...]`: run the benchmarks, print `name: value`
lines (each benchmark's ratio last), and a summary. Exits non-zero only when something is
broken (a benchmark raised), never because a number is slow."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from bench.common import BenchError, Result, machine

BENCHMARKS = (
    "ack",
    "ack_dup",
    "ack_busy",
    "dispatch",
    "start",
    "progress",
    "clone",
    "memory",
    "resume",
    "board",
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="short run, for CI (~2 min)")
    p.add_argument("--only", action="append", choices=BENCHMARKS, help="run only NAME")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    info = machine()
    for key, value in info.items():
        print(f"machine.{key}: {value}", flush=True)
    print(f"mode: {'smoke' if args.smoke else 'full'}", flush=True)
    results: list[Result] = []
    broken: list[str] = []
    started = time.monotonic()
    for name in names:
        t0 = time.monotonic()
        module = importlib.import_module(f"bench.{name}")
        try:
            results += module.run(args.smoke)
        except (BenchError, Exception) as exc:
            broken.append(name)
            print(f"{name}.error: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(file=sys.stderr)
        print(f"{name}.wall_s: {time.monotonic() - t0:.1f}", flush=True)
    print("summary:", flush=True)
    for r in results:
        verdict = "n/a" if r.met is None else ("meets" if r.met else "MISSES")
        ratio = "n/a" if r.ratio is None else f"{r.ratio:.3g}"
        print(f"  {r.name}: {r.ratio_name}={ratio} goal {r.goal or '-'} -> {verdict}", flush=True)
    print(f"total_wall_s: {time.monotonic() - started:.1f}", flush=True)
    if args.json:
        doc = {
            "machine": info,
            "mode": "smoke" if args.smoke else "full",
            "results": [r.__dict__ for r in results],
            "broken": broken,
        }
        args.json.write_text(json.dumps(doc, indent=2, default=str))
    if broken:
        print(f"broken: {', '.join(broken)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
