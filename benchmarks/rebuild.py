"""Rebuild the views from the log (``node.rebuild.replay_views``), and the memory of a node
holding the log after it.

A node data directory is filled with a log of 1M events (``--quick``: 100k, and the
figure says so) from three origins. Then, each in a fresh process: the rebuild (one
write transaction: clear the views, fold every event again), reporting its time and the
process's RSS after it with the environment still open; and the baseline, the same bare
LMDB scan + msgpack decode + LWW fold of the same log, in one process.

The rebuild runs twice: as ``replica rebuild-views`` runs it, folding in worker
processes (one per core, here two) while the rebuilding process stores what they fold;
and folding in the rebuilding process alone (``--workers 1``), the figure of one core.
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import bare, dataset
from benchmarks.common import Row, row, rss_mb, scratch_dir
from benchmarks.httpbench import Node, fetch_all
from node import log
from node.events import Event
from node.kv import WriteTxn
from node.lmdb_kv import LmdbKV
from node.log import Identity, LogState
from node.replica import Replica

NAME = "rebuild views"
CHUNK_EVENTS = 50_000


def fill(data_dir: Path, n: int) -> None:
    """A node's data directory whose log holds ``n`` events (views left empty)."""
    Replica.open(data_dir, "eu").close()  # its identity, as a node creates it
    kv = LmdbKV(data_dir)
    try:
        with kv.read() as txn:
            raw = txn.get("meta", b"replica_id")
            assert raw is not None
            state = log.load_state(txn, Identity("eu", raw.decode()))
        source = dataset.events(n)
        left = n
        while left > 0:
            chunk = [next(source) for _ in range(min(CHUNK_EVENTS, left))]
            left -= len(chunk)

            # A write may run again (LMDB grows its map and retries): start from the
            # committed state each time, as the writer does.
            def append(
                txn: WriteTxn, chunk: list[Event] = chunk, committed: LogState = state
            ) -> LogState:
                draft = committed.copy()
                for event in chunk:
                    log.append(txn, draft, event)
                    draft.hlc = max(draft.hlc, event.hlc)
                log.save_state(txn, draft)
                return draft

            state = kv.write(append)
    finally:
        kv.close()


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, data_dir: Path) -> dict[str, Any]:
    """Runs in a fresh process over ``data_dir``: ``baseline``; ``rebuild``, as
    ``replica rebuild-views`` does it (its workers, one per core); ``rebuild-1``, folding
    in the rebuilding process alone."""
    if mode == "baseline":
        started = time.perf_counter()
        count = bare.scan_decode_fold(data_dir)
        return {"count": count, "seconds": time.perf_counter() - started}
    from node.rebuild import replay_views, replay_workers

    workers = 1 if mode == "rebuild-1" else replay_workers()
    kv = LmdbKV(data_dir)
    try:
        started = time.perf_counter()
        count = kv.write(lambda txn: replay_views(txn, data_dir=data_dir, workers=workers))
        seconds = time.perf_counter() - started
        return {
            "count": count,
            "seconds": seconds,
            "workers": workers,
            "rss_mb": rss_mb(),
            "rss_anon_mb": _status_mb("RssAnon"),
            "rss_file_mb": _status_mb("RssFile"),
            "peak_mb": _status_mb("VmHWM"),
            # the largest worker's peak (0 without workers): Linux counts it in kB
            "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        }
    finally:
        kv.close()


def _spawn(mode: str, data_dir: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.rebuild", mode, str(data_dir)],
        capture_output=True,
        text=True,
        cwd=str(Path(__file__).resolve().parent.parent),
        timeout=3_600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"rebuild {mode} failed: {done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _proc_mb(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def serve_and_measure(data_dir: Path, users: int) -> dict[str, float]:
    """Start a real node on the rebuilt directory, read users by id and by email, and
    take its RSS: what an operator sees of a node holding the log after a rebuild."""
    ids = [f"u{i:07d}" for i in range(0, users, max(1, users // SERVED_READS))]
    paths = [f"/users/{u}" for u in ids] + [f"/users?email={u}@example.org" for u in ids]
    with Node(data_dir) as node:
        assert node.process.proc is not None
        asyncio.run(fetch_all(node.url, paths, ok=(200, 404)))
        pid = node.process.proc.pid
        return {"rss_mb": _proc_mb(pid, "VmRSS"), "rss_anon_mb": _proc_mb(pid, "RssAnon")}


SERVED_READS = 2_000


def run(quick: bool) -> list[Row]:
    n = 100_000 if quick else 1_000_000
    with scratch_dir("rebuild") as tmp:
        data_dir = Path(tmp) / "node"
        fill(data_dir, n)
        baseline = min((_spawn("baseline", data_dir) for _ in range(2)), key=lambda r: r["seconds"])
        alone = _spawn("rebuild-1", data_dir)
        rebuilt = _spawn("rebuild", data_dir)
        served = serve_and_measure(data_dir, n // 10)
    assert rebuilt["count"] == alone["count"] == baseline["count"] == n, (rebuilt, baseline)
    label = f"{n:,} events" + (" (--quick)" if quick else "")
    workers = rebuilt["workers"]
    how = f"{workers} worker processes" if workers > 1 else "one process (one core)"
    return [
        row(
            NAME,
            f"time, {label}, folded by {how} (the default)",
            rebuilt["seconds"],
            "s",
            baseline["seconds"],
            at_most=3.0,
        ),
        row(
            NAME,
            f"time, {label}, folded in the rebuilding process alone (--workers 1)",
            alone["seconds"],
            "s",
            baseline["seconds"],
        ),
        row(
            NAME,
            f"events/s, {label}",
            n / rebuilt["seconds"],
            "events/s",
            n / baseline["seconds"],
        ),
        row(
            "memory",
            f"node serving {label} after a rebuild: RSS",
            served["rss_mb"],
            "MB",
            at_most=300,
            absolute=True,
        ),
        row("memory", "  of which anonymous (heap)", served["rss_anon_mb"], "MB"),
        row("memory", "rebuild process: RSS after it", rebuilt["rss_mb"], "MB"),
        row("memory", "  of which anonymous (heap)", rebuilt["rss_anon_mb"], "MB"),
        row(
            "memory",
            "  its largest worker process: peak RSS (LMDB's pages of the log included)",
            rebuilt["worker_peak_mb"],
            "MB",
        ),
    ]


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], Path(sys.argv[2]))))
