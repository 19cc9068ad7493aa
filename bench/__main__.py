"""Run fleetpy's benchmarks: each prints a table and writes bench/results/NAME.json.

python -m bench [--quick]                       every benchmark (--quick: a short version, for CI)
python -m bench NAME [flags] [--quick] [--json] one of them; `python -m bench NAME -h` lists its flags
python -m bench report                          PNG charts from the JSON (pip install '.[bench]')
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from bench.common import RESULTS, write

# In the order `python -m bench` runs them; the last two need root (they start lab nodes).
BENCHES = ("placement", "state_notes", "cli", "launch", "failover", "e2e", "fleetd")
# Run only by name: they need programs built outside this repository (Go fleet), or start
# a whole lab per etcd backend (lab_launch, a few minutes), or run rolling replaces, volume moves
# or node kills under a shared-volume unit on a lab (rolling, volume_move, shared_volume).
BY_NAME_ONLY = ("gofleet", "lab_launch", "rolling", "volume_move", "shared_volume")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true", help="a short run that checks the benchmark works")
    common.add_argument("--json", action="store_true", help="print the result as JSON only")
    common.add_argument("--out", type=Path, default=RESULTS, help=f"where NAME.json goes (default {RESULTS})")
    top.add_argument("--quick", action="store_true", help="a short run of every benchmark")
    top.add_argument("--out", type=Path, default=RESULTS)
    sub = top.add_subparsers(dest="name")
    for name in (*BENCHES, *BY_NAME_ONLY):
        module = importlib.import_module(f"bench.{name}")
        bench = sub.add_parser(name, parents=[common], help=module.__doc__.splitlines()[0])
        module.add_arguments(bench)
    sub.add_parser("report", help="draw PNG charts from the results").add_argument(
        "--out", type=Path, default=RESULTS
    )
    return top


def run_one(name: str, args: argparse.Namespace) -> dict:
    module = importlib.import_module(f"bench.{name}")
    started = time.monotonic()
    result = module.run(args)
    result.setdefault("bench", name)
    result.setdefault("quick", args.quick)
    result.setdefault("wall_s", round(time.monotonic() - started, 1))
    path = write(name, result, args.out)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"== {name}: {module.__doc__.splitlines()[0]}")
        print(module.render(result))
        print(f"({result['wall_s']} s; {path})\n")
    return result


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    if args.name == "report":
        from bench.report import charts

        for path in charts(args.out):
            print(path)
        return 0
    if args.name is not None:
        run_one(args.name, args)
        return 0
    failed = []
    for name in BENCHES:
        bench_args = top.parse_args([name, *(["--quick"] if args.quick else []), "--out", str(args.out)])
        try:
            run_one(name, bench_args)
        except Exception as error:  # noqa: BLE001 - one broken benchmark must not hide the others
            print(f"== {name} FAILED: {type(error).__name__}: {error}\n", file=sys.stderr)
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
