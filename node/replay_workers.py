"""Worker processes that fold a long log for a rebuild (``node.rebuild.replay_views``).

Each worker is ``python -P -m node.replay_workers ROOT DIR PART PARTS BLOCK FD``: it opens
the data directory read-only (``lmdb_kv.snapshot``: what was last committed, not the
rebuild's write in progress), takes the entities in stream order in blocks of BLOCK,
folds every PARTS-th block from the PART-th (``views.replayed``) and writes each block to
the pipe FD as it is done, then a last message saying it has finished. The rebuilding
process reads block ``n`` from worker ``n % PARTS``, so it stores the entities in stream
order whoever folded them.

A process of its own, started by its module's name, with this package (ROOT, which it
checks) ahead of the current directory on its path: nothing of the caller's program
runs again in it (as ``multiprocessing``'s spawn would re-run an unguarded main script),
and it folds with the code the rebuilding process runs. In a process group of its own
(a terminal's Ctrl-C goes to the rebuilding process, which closes it), it ends quietly
once its pipe has no reader, having ended its read transaction: a slot in LMDB's reader
table left holding an old snapshot would keep the data file from reusing any page freed
after it (``LmdbKV`` frees the slots of dead processes when a write fails). A worker
silent for ``WORKER_SILENCE_MAX_S`` fails the rebuild, saying which and in what state.
"""

from __future__ import annotations

import gc
import os
import pickle
import select
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
# A worker sends a block every few milliseconds to seconds: one silent this long is stuck
# (stopped, or starved), and the rebuild fails rather than wait forever.
WORKER_SILENCE_MAX_S = 120.0
READ_BYTES_MAX = 1 << 20
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
        self._pipes: list[int] = []  # the read end of each worker's pipe
        try:
            if not sys.executable:
                raise OSError("no Python executable to start")
            for part in range(parts):
                self._start(data_dir, part, block_streams)
        except BaseException as exc:
            self.close()
            if isinstance(exc, OSError):
                raise WorkersUnavailable(f"cannot start a worker process: {exc}") from exc
            raise

    def _start(self, data_dir: Path, part: int, block_streams: int) -> None:
        readable, writable = os.pipe()
        self._pipes.append(readable)
        # This package first, and not the current directory (-P): a worker runs the
        # code this process runs, whatever directory it was started from.
        python_path = os.pathsep.join(filter(None, (_PACKAGE_ROOT, os.environ.get("PYTHONPATH"))))
        args = (str(data_dir), str(part), str(self.parts), str(block_streams), str(writable))
        try:
            self._processes.append(
                subprocess.Popen(
                    [sys.executable, "-P", "-m", "node.replay_workers", _PACKAGE_ROOT, *args],
                    stdin=subprocess.DEVNULL,
                    pass_fds=(writable,),
                    env={**os.environ, "PYTHONPATH": python_path},
                    process_group=0,  # a terminal's Ctrl-C is this process's to handle
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
            message = self._read(block % self.parts)
            if message is None:  # no block `block`: none after it either
                break
            number, entities = message
            if number != block:
                raise ReplayFailed(f"a rebuild worker sent block {number}, not {block}")
            yield from entities
            block += 1
        for part in range(self.parts):
            if part != block % self.parts and self._read(part) is not None:
                raise ReplayFailed("a rebuild worker sent a block past the last one")

    def _read(self, part: int) -> tuple[int, list[views.Replayed]] | None:
        """Worker ``part``'s next block, or None once it has finished."""
        head = self._read_exactly(part, _LENGTH.size)
        body = self._read_exactly(part, _LENGTH.unpack(head)[0])
        kind, content = pickle.loads(body)  # from a worker this process started
        if kind == "failed":
            raise ReplayFailed(f"{self._worker(part)} failed: {content}")
        return None if kind == "done" else content

    def _read_exactly(self, part: int, size: int) -> bytes:
        pipe, chunks, left = self._pipes[part], list[bytes](), size
        while left:
            if not select.select([pipe], [], [], WORKER_SILENCE_MAX_S)[0]:
                raise ReplayFailed(
                    f"{self._worker(part)} sent nothing for {WORKER_SILENCE_MAX_S:g} s"
                    f" (state {_process_state(self._processes[part].pid)})"
                )
            chunk = os.read(pipe, min(left, READ_BYTES_MAX))
            if not chunk:
                ended = self._processes[part].wait()
                how = f"killed by signal {-ended}" if ended < 0 else f"exit code {ended}"
                raise ReplayFailed(f"{self._worker(part)} ended ({how}) before its part was done")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _worker(self, part: int) -> str:
        return f"rebuild worker {part} (pid {self._processes[part].pid})"

    def close(self) -> None:
        """End the workers: each still working finds its pipe without a reader and ends
        its read transaction and itself; one that has not by ``WORKER_EXIT_WAIT_S`` is
        killed (its slot in LMDB's reader table is freed by the next ``reader_check``)."""
        for pipe in self._pipes:
            os.close(pipe)
        self._pipes = []
        for process in self._processes:
            try:
                process.wait(WORKER_EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _process_state(pid: int) -> str:
    """A process's state as Linux tells it (R, S, D, T for stopped...), or "unknown"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return "unknown"


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
    package_root, data_dir, part, parts, block_streams, fd = argv
    with os.fdopen(int(fd), "wb") as pipe:
        try:
            if package_root != _PACKAGE_ROOT:  # its folds would not be the starter's
                _write(pipe, ("failed", f"it runs {_PACKAGE_ROOT}, not {package_root}"))
                return 1
            fold_part(Path(data_dir), int(part), int(parts), int(block_streams), pipe)
        except BrokenPipeError:
            return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:  # closing the pipe flushed into it
        sys.exit(1)
