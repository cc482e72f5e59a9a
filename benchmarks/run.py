"""Run the benchmarks: ``python -m benchmarks.run [--quick] [--only NAME ...] [--readme]``.

Discovers every module of this package that exposes ``run(quick: bool) -> list[Row]``,
runs them one after the other, each in a fresh interpreter (``--child``), prints each
one's rows as it finishes and the whole table at the end, and writes
``benchmarks/results.json``. ``--readme`` also puts the table into the "Performance"
section of README.md (between its bench markers).

Missed targets are reported, not failed: the exit status is non-zero only when a
benchmark could not run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchmarks
from benchmarks.common import Row, print_table, table, write_json

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
README = HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
# Shown first, in this order; any other module follows by name.
ORDER = (
    "http_writes",
    "http_reads",
    "http_instructions",
    "ingest",
    "ingest_instructions",
    "rebuild",
    "crdt_merge",
    "append_vs_eventsourcing",
    "wire_bytes",
)


def discover() -> dict[str, Callable[[bool], list[Row]]]:
    found: dict[str, Callable[[bool], list[Row]]] = {}
    names = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__))
    for name in sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)):
        if name == "run":
            continue
        module = importlib.import_module(f"benchmarks.{name}")
        run = getattr(module, "run", None)
        if callable(run):
            found[name] = run
    return found


SETTLE_S = 1.0  # after the sync, before the next benchmark starts


def settle() -> None:
    """Write back what the previous benchmark left dirty in the page cache before the
    next one starts (its writes were still going to the disk under the next one's
    fsyncs: replication lag's p99 was 60 ms after the others, 24 ms run alone)."""
    os.sync()
    time.sleep(SETTLE_S)


def run_apart(name: str, *, quick: bool) -> list[Row]:
    """Run one benchmark in a fresh interpreter, as a node process starts: none inherits
    another's heap, module caches or collector state. In one process, batched appends
    measured after the ingest benchmark ran 6% slower against their baseline than alone."""
    with tempfile.TemporaryDirectory(prefix="bench-rows-") as tmp:
        out = Path(tmp) / "rows.json"
        command = [sys.executable, "-m", "benchmarks.run", "--child", name, "--out", str(out)]
        done = subprocess.run(command + (["--quick"] if quick else []), cwd=HERE.parent)
        if done.returncode != 0:
            raise RuntimeError(f"benchmark {name} exited with status {done.returncode}")
        return [Row(**fields) for fields in json.loads(out.read_text())["rows"]]


def update_readme(rows: list[Row], *, quick: bool, when: str) -> bool:
    text = README.read_text()
    if START not in text or END not in text:
        return False
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    note = f"Measured {when}" + (
        " with `--quick` (smaller data sets, shorter runs)" if quick else ""
    )
    block = f"{START}\n{note}:\n\n{table(rows, markdown=True)}\n{END}"
    README.write_text(head + block + tail)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description="Run the benchmarks."
    )
    parser.add_argument("--quick", action="store_true", help="smaller data sets, shorter runs")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="benchmark modules to run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    parser.add_argument("--readme", action="store_true", help="update README's Performance table")
    parser.add_argument("--child", metavar="NAME", help=argparse.SUPPRESS)  # see run_apart
    args = parser.parse_args(argv)

    found = discover()
    if args.child:
        write_json(found[args.child](args.quick), args.out)
        return 0
    chosen = list(found) if not args.only else args.only
    unknown = [name for name in chosen if name not in found]
    if unknown:
        parser.error(f"no benchmark {', '.join(unknown)}; there are: {', '.join(found)}")

    rows: list[Row] = []
    failed: dict[str, str] = {}
    timings: dict[str, float] = {}
    for name in chosen:
        print(f"== {name}{' (quick)' if args.quick else ''}", file=sys.stderr, flush=True)
        settle()
        started = time.perf_counter()
        try:
            got = run_apart(name, quick=args.quick)
        except Exception:
            failed[name] = traceback.format_exc()
            print(failed[name], file=sys.stderr, flush=True)
            continue
        finally:
            timings[name] = round(time.perf_counter() - started, 1)
        rows += got
        print_table(got, file=sys.stderr)
        print(f"   ({timings[name]} s)", file=sys.stderr, flush=True)

    extra: dict[str, Any] = {"quick": args.quick, "seconds": timings, "failed": failed}
    write_json(rows, args.out, extra=extra)
    print()
    print_table(rows)
    missed = [r for r in rows if r.met is False]
    print(f"\n{len(rows)} figures, {len(missed)} targets missed; written to {args.out}")
    if args.readme:
        when = time.strftime("%Y-%m-%d", time.gmtime())
        if not update_readme(rows, quick=args.quick, when=when):
            print("README.md has no bench markers; not updated", file=sys.stderr)
    if failed:
        print(f"failed to run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
