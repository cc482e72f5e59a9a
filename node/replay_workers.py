"""Worker processes that fold a long log for a rebuild (``node.rebuild.replay_views``).

Each worker is ``python -m node.replay_workers DIR PART PARTS BLOCK FD``: it opens the
data directory read-only (``lmdb_kv.snapshot``: what was last committed, not the
rebuild's write in progress), takes the entities in stream order in blocks of BLOCK,
folds every PARTS-th block from the PART-th (``views.replayed``) and writes each block to
the pipe FD as it is done, then a last message saying it has finished. The rebuilding
process reads block ``n`` from worker ``n % PARTS``, so it stores the entities in stream
order whoever folded them.

A process of its own, started by its module's name: nothing of the caller's program
runs again in it (as ``multiprocessing``'s spawn would re-run an unguarded main script).
A worker ignores SIGINT (the rebuilding process handles Ctrl-C), and ends quietly once
its pipe has no reader, having ended its read transaction: a slot in LMDB's reader table
left holding an old snapshot would keep the data file from reusing any page freed after.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import struct
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from node import log, views
from node.lmdb_kv import snapshot

WORKER_EXIT_WAIT_S = 5.0  # after its pipe closes; a worker still there then is killed
_LENGTH = struct.Struct(">Q")
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)  # where ``node`` is found


class WorkersUnavailable(RuntimeError):
    """Worker processes could not be started: fold in this process instead."""


class ReplayFailed(RuntimeError):
    """A rebuild's worker process failed: nothing of the rebuild is committed."""


class FoldingWorkers:
    """``parts`` worker processes folding the log in ``data_dir``; ``folded`` yields
    every entity in stream order. Close it (a context manager) to end them."""

    def __init__(self, data_dir: Path, parts: int, block_streams: int) -> None:
        self.parts = parts
        self._processes: list[subprocess.Popen[bytes]] = []
        self._pipes: list[IO[bytes]] = []
        try:
            for part in range(parts):
                self._start(data_dir, part, block_streams)
        except OSError as exc:
            self.close()
            raise WorkersUnavailable(f"cannot start a worker process: {exc}") from exc

    def _start(self, data_dir: Path, part: int, block_streams: int) -> None:
        if not sys.executable:
            raise OSError("no Python executable to start")
        readable, writable = os.pipe()
        try:
            self._pipes.append(os.fdopen(readable, "rb"))
        except BaseException:
            os.close(readable)
            os.close(writable)
            raise
        python_path = os.pathsep.join(filter(None, (_PACKAGE_ROOT, os.environ.get("PYTHONPATH"))))
        args = (str(data_dir), str(part), str(self.parts), str(block_streams), str(writable))
        try:
            self._processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "node.replay_workers", *args],
                    stdin=subprocess.DEVNULL,
                    pass_fds=(writable,),
                    env={**os.environ, "PYTHONPATH": python_path},
                )
            )
        finally:
            os.close(writable)  # the worker's end: a worker that dies leaves the pipe at EOF

    def __enter__(self) -> FoldingWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def folded(self) -> Iterator[views.Replayed]:
        block = 0
        while True:
            message = _read(self._pipes[block % self.parts])
            if message is None:  # no block `block`: none after it either
                break
            number, entities = message
            if number != block:
                raise ReplayFailed(f"a rebuild worker sent block {number}, not {block}")
            yield from entities
            block += 1
        for part, pipe in enumerate(self._pipes):
            if part != block % self.parts and _read(pipe) is not None:
                raise ReplayFailed("a rebuild worker sent a block past the last one")

    def close(self) -> None:
        """End the workers: each still working finds its pipe without a reader and ends
        its read transaction and itself; one that has not by ``WORKER_EXIT_WAIT_S`` is
        killed."""
        for pipe in self._pipes:
            pipe.close()
        for process in self._processes:
            try:
                process.wait(WORKER_EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _read(pipe: IO[bytes]) -> tuple[int, list[views.Replayed]] | None:
    """A worker's next block, or None once it has finished."""
    head = pipe.read(_LENGTH.size)
    length = _LENGTH.unpack(head)[0] if len(head) == _LENGTH.size else 0
    body = pipe.read(length) if length else b""
    if not length or len(body) != length:
        raise ReplayFailed("a rebuild worker ended without finishing its part")
    kind, content = pickle.loads(body)  # from a worker this process started
    if kind == "failed":
        raise ReplayFailed(f"a rebuild worker failed: {content}")
    return None if kind == "done" else content


def _write(pipe: IO[bytes], message: tuple[str, Any]) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    pipe.write(_LENGTH.pack(len(body)))
    pipe.write(body)
    pipe.flush()


def fold_part(data_dir: Path, part: int, parts: int, block_streams: int, pipe: IO[bytes]) -> None:
    """Fold this part's blocks of entities and write each to ``pipe``, then ("done", None);
    ("failed", why) if it cannot."""
    try:
        with snapshot(data_dir) as txn:
            block, entities = -1, list[views.Replayed]()
            for number, stream, wires in log.stored_streams(
                txn, part=part, parts=parts, block_streams=block_streams
            ):
                if number != block and entities:
                    _write(pipe, ("block", (block, entities)))
                    entities = []
                block = number
                entities.append(views.replayed(stream, wires))
            if entities:
                _write(pipe, ("block", (block, entities)))
        _write(pipe, ("done", None))
    except BrokenPipeError:
        raise  # no one reads any more: nothing to say
    except Exception:
        _write(pipe, ("failed", traceback.format_exc(limit=5)))


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.disable()  # as writer.gc_paused: a fold makes nothing cyclic
    data_dir, part, parts, block_streams, fd = argv
    with os.fdopen(int(fd), "wb") as pipe:
        try:
            fold_part(Path(data_dir), int(part), int(parts), int(block_streams), pipe)
        except BrokenPipeError:
            return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:  # closing the pipe flushed into it
        sys.exit(1)
