"""Deterministic simulation speed: seeds per minute on two worker processes.

Each seed is ``simulations.deterministic.run_scenario(Scenario(seed=s, ops=1000))``:
three regions, 1,000 client operations, the default faults on (loss, duplication, delay,
partitions, clock skew, a crash and restart), the real node and replication code on real
LMDB in temporary directories, checked against the oracle. Seeds run in two worker
processes forked like ``replica simulate`` does (``ProcessPoolExecutor``, fork context);
the figure is seeds completed per minute of wall time, pool start-up included. Each
seed's CPU time is reported too, and the rate that CPU time would allow on two idle cores:
on a shared machine the wall-clock rate depends on the neighbours, the CPU time much less.

No baseline (the target is absolute). Seeds that find a violation are counted and reported
(a benchmark, not a test: they do not fail the run). Bounded by the seed count and by a
wall-clock limit.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout

from benchmarks.common import Row, row
from benchmarks.replication_lag import cpu_stall_us, stall_share
from simulations.deterministic import Scenario, run_scenario

NAME = "deterministic simulation"
OPS = 1_000
JOBS = 2
FIRST_SEED = 1
LIMIT_S = 900.0  # the whole pool's wall-clock bound


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this worker
    return usage.ru_utime + usage.ru_stime


def _one(seed: int) -> tuple[int, bool, float, float]:
    """One seed: (seed, ok, its wall seconds, its CPU seconds in its worker)."""
    started, cpu = time.perf_counter(), _cpu_s()
    result = run_scenario(Scenario(seed=seed, ops=OPS))
    return seed, result.ok, time.perf_counter() - started, _cpu_s() - cpu


def measure(seeds: int, jobs: int = JOBS) -> tuple[float, list[tuple[int, bool, float, float]]]:
    """Run ``seeds`` seeds on ``jobs`` forked workers; (wall seconds, per-seed results)."""
    context = multiprocessing.get_context("fork")
    done: list[tuple[int, bool, float, float]] = []
    started = time.perf_counter()
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context)
    try:
        futures = [pool.submit(_one, s) for s in range(FIRST_SEED, FIRST_SEED + seeds)]
        for future in as_completed(futures, timeout=LIMIT_S):
            done.append(future.result())
    except FuturesTimeout:
        print(f"simulation speed: stopped at the {LIMIT_S:g} s limit", file=sys.stderr)
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()  # a seed still running past the limit
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return time.perf_counter() - started, done


def run(quick: bool) -> list[Row]:
    seeds = 40 if quick else 300
    stall = cpu_stall_us()
    wall_s, done = measure(seeds)
    stalled = stall_share(stall, cpu_stall_us(), wall_s)
    walls = [wall for _, _, wall, _ in done]
    cpus = [cpu for _, _, _, cpu in done]
    failed = [seed for seed, ok, _, _ in done if not ok]
    rate = len(done) / wall_s * 60 if wall_s > 0 else 0.0
    wall_median = statistics.median(walls) if walls else float("nan")
    cpu_median = statistics.median(cpus) if cpus else float("nan")
    print(
        f"simulation speed: {len(done)}/{seeds} seeds in {wall_s:.1f} s on {JOBS} workers; "
        f"per seed median {wall_median:.3f} s wall, {cpu_median:.3f} s CPU; "
        f"seeds with a violation: {failed[:20]}",
        file=sys.stderr,
    )
    name = NAME + (" (quick)" if quick else "")
    what = (
        f"3 regions, {OPS:,} ops, faults on, {len(done)} seeds on {JOBS} workers"
        f"{', quick' if quick else ''}; some task waited for a CPU {stalled:.0%} of the time"
    )
    return [
        row(name, f"seeds per minute; {what}", rate, "seeds/min", at_least=300, absolute=True),
        row(name, "wall time of one seed, median (in its worker)", wall_median * 1e3, "ms"),
        row(name, "CPU time of one seed, median (its worker's threads)", cpu_median * 1e3, "ms"),
        row(
            name,
            f"seeds per minute that CPU time allows on {JOBS} idle cores ({JOBS} x 60 s / CPU"
            " per seed; an estimate, not a measurement)",
            JOBS * 60 / cpu_median if cpus else float("nan"),
            "seeds/min",
        ),
        row(name, "seeds with a violation or not converged", len(failed), "seeds"),
    ]
