"""A CLI for the progress benchmark: prints `--lines` log lines evenly over `--seconds` (in
batches every 10 ms) under one step line, then runs the simulator with the remaining
arguments to write the real output layout. `--lines 0` is the silent run of the same length.

    python bench/paced_cli.py --lines 100000 --seconds 10 -- analyze REPO --output-dir OUT
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--lines", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--stamp", help="append `<unix time> <output dir>` to this file at start")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if args.stamp:
        out_dir = rest[rest.index("--output-dir") + 1] if "--output-dir" in rest else "?"
        with open(args.stamp, "a", encoding="utf-8") as f:
            f.write(f"{time.time():.6f} {out_dir}\n")
    out = sys.stdout
    out.write("[FONDATION_STEP_1/2] paced output\n")
    out.flush()
    start = time.monotonic()
    ticks = max(1, int(args.seconds / 0.01))
    written = 0
    for tick in range(1, ticks + 1):
        target = args.lines * tick // ticks
        if target > written:
            out.write(
                "".join(f"paced line {n}: simulated tool output\n" for n in range(written, target))
            )
            out.flush()
            written = target
        if args.seconds <= 0:
            break
        delay = start + tick * args.seconds / ticks - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    out.write("[FONDATION_STEP_2/2] writing the course\n")
    out.flush()
    from app import simulator  # after the stamp: the import is not dispatch latency

    return simulator.main(rest)


if __name__ == "__main__":
    sys.exit(main())
