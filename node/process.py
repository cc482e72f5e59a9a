"""A ``replica node`` child process: started, awaited until it serves, stopped cleanly."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

START_WAIT_S = 20.0
SHELL_SETTINGS_DROPPED = ("REPLICA_API_TOKEN", "REPLICA_CONFIG")
STOP_WAIT_S = 15.0


def free_port() -> int:
    """A port free on loopback now (another process may take it before it is bound)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def node_command(region: str, data_dir: Path, listen: str, *extra: str) -> list[str]:
    """The command line of a ``replica node`` run by this interpreter."""
    return [
        sys.executable,
        "-m",
        "node",
        "node",
        "--region",
        region,
        "--data",
        str(data_dir),
        "--listen",
        listen,
        *extra,
    ]


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a child gets when its parent dies


def stopped_with_parent() -> Callable[[], None] | None:
    """What a child runs first (before its program, or as a worker pool's initializer):
    it is sent SIGTERM (a node drains and closes LMDB) when the process that started it
    dies, even by SIGKILL, so that a cluster, a simulation or a test killed mid-run
    leaves no node behind on its ports and data, nor a worker running on.
    Linux only (elsewhere, None: nothing runs). The signal comes when the starting
    *thread* ends, so nodes are started by threads that outlive them (the event loop's,
    or its executor's)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def arm() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)

    return arm


class NodeDidNotStart(RuntimeError):
    """A node process exited, or did not say it was listening in time; the message
    carries the last thing it said."""


def last_error_line_of(stderr: str) -> str:
    """What a node's stderr said last of why it stopped: its ``replica: error:`` line, or
    else its last line, or ''."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("replica: error:")]
    return (errors or lines or [""])[-1]


class NodeProcess:
    def __init__(
        self,
        region: str,
        data_dir: Path,
        port: int,
        *extra_args: str,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        prefix: Sequence[str] = (),
    ) -> None:
        """``prefix`` runs the node inside something, e.g. ``ip netns exec NAME``."""
        self.region, self.data_dir, self.port = region, data_dir, port
        self.url = f"http://{host}:{port}"
        self.args = [*prefix, *node_command(region, data_dir, f"{host}:{port}", *extra_args)]
        # The shell's REPLICA_ settings tune the nodes (REPLICA_PEER_TRANSPORT=http, say),
        # but not its API token nor config file: a cluster's nodes answer the cluster's
        # own requests (an exported token made its readiness checks fail: a review).
        inherited = {k: v for k, v in os.environ.items() if k not in SHELL_SETTINGS_DROPPED}
        self.env = {**inherited, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.returncode: int | None = None

    def start(self) -> NodeProcess:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = self.data_dir.parent / f"{self.region}.log"
        started_at = log.stat().st_size if log.exists() else 0
        with log.open("a") as stderr:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.args,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=self.env,
                preexec_fn=stopped_with_parent(),
            )
        deadline = time.monotonic() + START_WAIT_S
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if "listening on" in line:
                return self
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        with log.open("rb") as written:
            written.seek(started_at)
            said = last_error_line_of(written.read().decode(errors="replace"))
        raise NodeDidNotStart(
            f"node {self.region} did not start" + (f": {said}" if said else "") + f" (see {log})"
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.returncode = self.proc.returncode
        return self.returncode

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
