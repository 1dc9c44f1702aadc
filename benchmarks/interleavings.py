"""The long run of the randomized interleaving test: ``--sequences`` seeded random
sequences of scatters, task chains, seceded tasks, actors, P2P, AMM cycles of every
amm_core policy and upstream ReduceReplicas, upstream ``retire_workers``, the
operator's retire/cancel/forget, preStop hooks (several at once), short limits,
kills, SIGTERMs and restarts, on an in-process scheduler with 4-6 workers, checking
after every step that no key is lost (unless every holder was killed outright), that
no worker is left ``closing_gracefully`` once its retirement ended, and that the
retirement records stay within their bound. The driver is tests/interleavings_driver.py
(tests/test_interleavings.py runs 200 sequences of it).

Prints a line per failing sequence as it ends (``--verbose``: every sequence), then
each failing sequence in full (seed, steps as they resolved, what was lost or stuck, a
replay command), a summary, and last:
``sequences=N steps=M lost_keys=K stuck_workers=S``

Exits 1 when an invariant broke (or amm_core raised).

Run: python benchmarks/interleavings.py --sequences 1000 --seed 1
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

# The driver lives with the tests (it reuses their conventions and is what the suite
# runs); this script only adds a command line to it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import interleavings_driver as driver  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1, help="first seed (then seed+1, ...)")
    parser.add_argument("--work-stealing", choices=["on", "off", "alternate"],
                        default="alternate", help="per cluster (default: alternate)")
    parser.add_argument("--per-cluster", type=int, default=driver.PER_CLUSTER,
                        help="sequences per cluster before it is rebuilt")
    parser.add_argument("--show", type=int, default=10,
                        help="failing sequences printed in full (default 10)")
    parser.add_argument("--verbose", action="store_true",
                        help="a line per sequence, and distributed's warnings")
    args = parser.parse_args(argv)
    if not args.verbose:
        for name in ("distributed", "amm_core", "tornado"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

    def progress(r: driver.SequenceResult) -> None:
        if r.failed or args.verbose:
            state = "FAIL" if r.failed else "ok"
            print(f"{state} seed={r.seed} steps={r.steps} lost={len(r.lost)} "
                  f"stuck={len(r.stuck)} errors={len(r.errors)}"
                  f"{' driver-error' if r.driver_error else ''} {r.seconds:.1f}s "
                  f"({', '.join(f'{k} {v:.2f}s' for k, v in r.phases.items())})", flush=True)

    summary = asyncio.run(driver.run_sequences(
        range(args.seed, args.seed + args.sequences),
        work_stealing=args.work_stealing,
        per_cluster=args.per_cluster,
        on_result=progress,
    ))
    for r in summary.failures[: args.show]:
        print(r.report(), flush=True)
    if len(summary.failures) > args.show:
        print(f"... and {len(summary.failures) - args.show} more failing sequence(s): "
              f"{[r.seed for r in summary.failures[args.show:]]}")
    print(summary.details())
    print(summary.last_line())
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
