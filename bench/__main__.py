"""`make bench`: runs every bench/bench_*.py module (or those named on the command line) and prints
each figure beside its baseline measured in the same run."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import pkgutil
import tempfile
import time
from pathlib import Path

from bench.common import Figure, servers


def _modules(selected: list[str]) -> list[str]:
    found = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_"))
    return [m for m in found if not selected or m in selected or m.removeprefix("bench_") in selected]


def _print(figures: list[Figure]) -> None:
    print(f"{'figure':<48} {'value':>14} {'unit':<10} {'baseline':>14}  {'ratio':>6}  target")
    for f in figures:
        base = f"{f.baseline_value:,.1f}" if f.baseline_value is not None else "-"
        ratio = f"{f.ratio():.2f}" if f.ratio() is not None else "-"
        print(f"{f.name:<48} {f.value:>14,.1f} {f.unit:<10} {base:>14}  {ratio:>6}  {f.target or ''}")
        if f.baseline_name:
            print(f"{'  baseline: ' + f.baseline_name:<48}")


async def _run(names: list[str], quick: bool, db: str, redis: str) -> list[Figure]:
    figures: list[Figure] = []
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"== {name} ...", flush=True)
        started = time.perf_counter()
        result = await module.run(database_url=db, redis_url=redis, quick=quick)
        figures.extend(result)
        print(f"   done in {time.perf_counter() - started:.1f}s", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description="Coinlytics benchmarks")
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke check")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="coinlytics-bench-") as tmp, servers(Path(tmp)) as (db, redis):
        figures = asyncio.run(_run(_modules(args.names), args.quick, db, redis))
    print()
    _print(figures)


if __name__ == "__main__":
    main()
