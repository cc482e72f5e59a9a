"""CPU instructions per event of replication ingest, counted by valgrind: the ingest figure
without the neighbours' noise.

Events per second on a shared machine move by a tenth or more from one run to the next
for the same code; the instructions an event costs do not. The same events as
``benchmarks.ingest`` (its data set and its 1 MB sync requests) go through
``Replicator.handle`` into a fresh durable node, its writer inline (one thread, so the
count is that of the work alone); the baseline is the same bare LMDB scan + msgpack
decode + LWW fold over the same events. Each side runs twice under ``valgrind
--tool=callgrind`` in a fresh process: once only loading its input, once doing the work
too; the difference over the event count is the figure. Kernel time (fsync) is not
counted. Needs valgrind; without it the benchmark reports nothing.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import msgpack

from benchmarks import bare, dataset, ingest
from benchmarks.common import Row, row, scratch_dir
from node import events as ev
from replication.protocol import RawEvent

NAME = "ingest instructions"
RUN_WAIT_S = 1_800.0  # one side under valgrind, generously


def available() -> bool:
    return shutil.which("valgrind") is not None


def _node(bodies_path: Path, work: bool) -> None:
    from node.replica import Replica, wall_clock_ms
    from node.server import tune_gc
    from replication.replicator import Replicator
    from replication.transport import MemoryTransport

    bodies = msgpack.unpackb(bodies_path.read_bytes())
    tune_gc()  # as a node process does at start-up

    async def main(data_dir: Path) -> None:
        replica = Replica.open(data_dir, "eu", threaded_writer=False)
        try:
            replica.bind(asyncio.get_running_loop())
            replicator = Replicator(replica, MemoryTransport(), ["us"], now_ms=wall_clock_ms)
            if work:
                for body in bodies:
                    await replicator.handle(body)
        finally:
            replica.close()

    with tempfile.TemporaryDirectory(dir=bodies_path.parent) as tmp:
        asyncio.run(main(Path(tmp) / "node"))


def _bare(log_path: Path, work: bool) -> None:
    if work:
        bare.scan_decode_fold(log_path)


def _instructions(side: str, path: Path, work: bool) -> int:
    """The instructions callgrind counts for one child run."""
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "benchmarks.ingest_instructions",
            side,
            str(path),
            "work" if work else "load",
        ],
        capture_output=True,
        text=True,
        cwd=str(Path(__file__).resolve().parent.parent),
        env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict and set orders each run
        timeout=RUN_WAIT_S,
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{side} under callgrind failed: {done.stderr[-2000:]}")
    return int(found.group(1))


def _per_event(side: str, path: Path, n: int) -> float:
    return (_instructions(side, path, True) - _instructions(side, path, False)) / n


def run(quick: bool) -> list[Row]:
    if not available():
        print("   valgrind is not installed: no instruction counts", file=sys.stderr)
        return []
    n = 5_000 if quick else 20_000
    encoded = []
    for e in dataset.events(n):
        data = ev.encode(e)
        encoded.append((RawEvent(e.dot, data), len(data)))
    with scratch_dir("ingest-instructions") as tmp:
        base = Path(tmp)
        bodies_path = base / "bodies.msgpack"
        bodies_path.write_bytes(msgpack.packb(ingest.sync_bodies(encoded)))
        bare.write_log(base / "bare", (raw.data for raw, _ in encoded))
        node_k = _per_event("node", bodies_path, n) / 1e3
        bare_k = _per_event("bare", base / "bare", n) / 1e3
    figure = f"instructions per event ingested ({n:,} events in 1 MB syncs, inline writer)"
    return [row(NAME, figure, node_k, "k", bare_k)]


if __name__ == "__main__":
    side, where, mode = sys.argv[1:4]
    (_node if side == "node" else _bare)(Path(where), mode == "work")
