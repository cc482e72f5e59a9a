"""``replica simulate``: run partition simulations and say whether they converge.

Deterministic mode runs seeds (in parallel worker processes) and checks each; live
mode runs one session against real node processes. Exit status 1 on any violation,
with the seed and the exact command that replays it.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm import tqdm

from node.process import stopped_with_parent
from simulations.deterministic import Faults, Scenario, run_scenario
from simulations.report import plot, seed_row, summary_table, write_json
from simulations.workload import Mix

SAMPLE_MS = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("deterministic", "live"), default="deterministic")
    parser.add_argument("--regions", default="eu,us,ap", help="comma-separated region names")
    parser.add_argument("--seed", type=int, default=None, help="one seed (replays exactly)")
    parser.add_argument("--seeds", default="1..100", help="a range of seeds, e.g. 1..300")
    parser.add_argument("--ops", type=int, default=300, help="client operations per seed")
    parser.add_argument("--duration-ms", type=int, default=10_000, help="faulty period per seed")
    parser.add_argument(
        "--faults",
        default="",
        help="e.g. loss=0.1,duplicate=0.05,partitions=3"
        ",one_way=0.5,skew_ms_max=500,crashes=2,down_ms_max=3000"
        ",rollbacks=1,rollback_ms_max=2000,same_boot=0.5 (deterministic mode); or none",
    )
    parser.add_argument(
        "--workload",
        default="",
        help="weights, e.g. profile=4,churn=3,create_delete=1.5,collide=1,lifecycle=1.5",
    )
    parser.add_argument(
        "--previous-format",
        default="",
        metavar="REGIONS",
        help="comma-separated regions whose nodes write as the version before (a cluster"
        " in the middle of a rolling upgrade; deterministic mode)",
    )
    parser.add_argument(
        "--netns",
        action="store_true",
        help="live mode: each node in its own network namespace, links cut by"
        " the kernel (needs root and iproute2)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (deterministic)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of divergence over time")
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")


def _seeds(args: argparse.Namespace) -> list[int]:
    if args.seed is not None:
        return [args.seed]
    first, _, last = str(args.seeds).partition("..")
    return list(range(int(first), int(last or first) + 1))


def _one(scenario: Scenario) -> dict[str, Any]:
    # What a node logs of the seed's faults (a renewal after a rollback) is in its trace.
    # Put back after: a process running seeds in turn may log for itself (a test's).
    loggers = [logging.getLogger(name) for name in ("node", "replication")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        return seed_row(run_scenario(scenario))
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def run_deterministic(args: argparse.Namespace) -> int:
    regions = tuple(r.strip() for r in args.regions.split(",") if r.strip())
    faults = Faults.parse(args.faults) if args.faults else Faults()
    mix = Mix.parse(args.workload) if args.workload else Mix()
    seeds = _seeds(args)
    sample = SAMPLE_MS if args.plot is not None else 0
    scenarios = [
        Scenario(
            seed=s,
            regions=regions,
            ops=args.ops,
            duration_ms=args.duration_ms,
            mix=mix,
            faults=faults,
            sample_ms=sample if s == seeds[0] else 0,
            previous_format=tuple(r.strip() for r in args.previous_format.split(",") if r.strip()),
        )
        for s in seeds
    ]
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    bar_on = None  # tqdm: shown on a terminal, silent in logs
    with tqdm(
        total=len(scenarios),
        unit="seed",
        desc="simulating",
        file=sys.stderr,
        disable=bar_on,
        mininterval=0.5,
    ) as bar:
        if args.jobs <= 1 or len(scenarios) == 1:
            for scenario in scenarios:
                rows.append(_one(scenario))
                bar.update()
        else:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(
                max_workers=args.jobs, mp_context=context, initializer=stopped_with_parent()
            ) as pool:
                futures = [pool.submit(_one, s) for s in scenarios]
                try:
                    for future in as_completed(futures):
                        rows.append(future.result())
                        bar.update()
                        bar.set_postfix(failed=sum(not r["ok"] for r in rows))
                except KeyboardInterrupt:  # the seeds not begun are not run (Ctrl-C)
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    wall_s = time.monotonic() - started
    rows.sort(key=lambda r: r["seed"])
    print(
        f"\nDeterministic simulation: regions {','.join(regions)}, {args.ops} ops and "
        f"{args.duration_ms} ms of faults per seed"
    )
    print(summary_table(rows, wall_s))
    if args.json is not None:
        write_json(args.json, rows, wall_s)
        print(f"  report: {args.json}")
    if args.plot is not None:
        plot(args.plot, rows[0], f"seed {rows[0]['seed']}: divergence over time")
        print(f"  plot: {args.plot}")
    failed = [r for r in rows if not r["ok"]]
    for row in failed[:10]:
        print(f"\nVIOLATION in seed {row['seed']}:")
        for v in row["violations"][:5]:
            print(f"  {v['kind']} at {v['region']}: {v['detail']}")
        if not row["converged"]:
            print("  did not converge after the final heal")
        print(f"  replay: {row['command']}")
    return 1 if failed else 0


def _wrong(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags, before anything runs."""
    if args.seed is None:
        first, dots, last = str(args.seeds).partition("..")
        if not (first.isdigit() and (not dots or last.isdigit())):
            return f"--seeds must be N or N..M, e.g. 1..300, got {args.seeds!r}"
        if dots and int(first) > int(last):
            return f"--seeds {args.seeds}: the first seed is past the last"
    regions = [r.strip() for r in args.regions.split(",") if r.strip()]
    if len(regions) < 2 or len(set(regions)) != len(regions):
        return "--regions needs two or more distinct region names"
    if args.ops < 0 or args.duration_ms < 0 or args.jobs < 1:
        return "--ops and --duration-ms must be 0 or more, --jobs 1 or more"
    for flag, parse in (("--faults", Faults.parse), ("--workload", Mix.parse)):
        text = args.faults if flag == "--faults" else args.workload
        if text:
            try:
                parse(text)
            except ValueError as error:
                return f"{flag}: {error}"
    for flag, path in (("--plot", args.plot), ("--json", args.json)):
        if path is not None and not path.absolute().parent.is_dir():
            return f"{flag}: no directory {path.absolute().parent} to write {path.name} in"
    return None


def main(args: argparse.Namespace) -> int:
    wrong = _wrong(args)
    if wrong is not None:
        print(f"replica: error: {wrong}", file=sys.stderr)
        return 2
    try:
        if args.mode == "live":
            from simulations.live import run_live

            return run_live(args)
        return run_deterministic(args)
    except KeyboardInterrupt:
        print("\nreplica: interrupted; the seeds not finished were not run", file=sys.stderr)
        return 130
