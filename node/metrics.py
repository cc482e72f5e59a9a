"""Prometheus text exposition of a node's counters and gauges."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.replica import Replica


class GcPauses:
    """How long the cyclic garbage collector stopped the process (it holds the GIL, so
    every thread waits): collections, their total and their longest, from ``gc.callbacks``.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.count = 0
        self.seconds = 0.0
        self.max_seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self.clock()
            return
        pause = self.clock() - self._started
        self.count += 1
        self.seconds += pause
        self.max_seconds = max(self.max_seconds, pause)

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)


GC_PAUSES = GcPauses()  # the process's one collector; a serving node installs it


def _line(name: str, kind: str, help_text: str, value: float, labels: str = "") -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"]


def render_metrics(replica: Replica) -> str:
    m, state, writer = replica.metrics, replica.state, replica.writer
    region = f'{{region="{replica.identity.region}"}}'
    lines: list[str] = []
    for name, kind, help_text, value in (
        ("replica_writes_total", "counter", "Client writes acknowledged.", m.writes),
        (
            "replica_events_appended_total",
            "counter",
            "Events appended to the log.",
            m.events_appended,
        ),
        (
            "replica_events_ingested_total",
            "counter",
            "Events received from peers and appended.",
            m.events_ingested,
        ),
        (
            "replica_stamps_drifted_total",
            "counter",
            "Remote stamps beyond max drift (not followed).",
            m.stamps_drifted,
        ),
        (
            "replica_stamps_past_clock_total",
            "counter",
            "Local events stamped past the clock, after a write they observed that was ahead.",
            writer.stamped_past_clock,
        ),
        ("replica_commits_total", "counter", "Durable LMDB commits.", writer.commits),
        (
            "replica_commits_refused_total",
            "counter",
            "Commits the storage refused (a full disk, an I/O error): nothing of them written.",
            writer.storage_failures,
        ),
        (
            "replica_writes_failing",
            "gauge",
            "1 while the storage refuses every commit since the last that went through.",
            int(writer.storage_failing() is not None),
        ),
        (
            "replica_commit_requests_total",
            "counter",
            "Requests carried by those commits.",
            writer.requests,
        ),
        (
            "replica_write_queue_requests",
            "gauge",
            "Requests waiting for the writer.",
            writer.queued,
        ),
        ("replica_gc_pauses_total", "counter", "Garbage collections run.", GC_PAUSES.count),
        (
            "replica_gc_pause_seconds_total",
            "counter",
            "Time the garbage collector stopped the process.",
            GC_PAUSES.seconds,
        ),
        (
            "replica_gc_pause_seconds_max",
            "gauge",
            "Longest stop of the process by the garbage collector since start.",
            GC_PAUSES.max_seconds,
        ),
        ("replica_log_seq", "gauge", "Last local sequence number of the log.", state.seq),
        ("replica_own_counter", "gauge", "This replica's last dot counter.", state.counter),
    ):
        lines += _line(name, kind, help_text, value, region)
    lines += [
        "# HELP replica_origin_counter Contiguous counter seen per origin.",
        "# TYPE replica_origin_counter gauge",
    ]
    for origin, seen in sorted(state.summary.origins.items()):
        labels = f'{{region="{replica.identity.region}",origin="{origin}"}}'
        lines.append(f"replica_origin_counter{labels} {seen.contiguous}")
    for report in replica.metric_reporters:
        lines += report()
    return "\n".join(lines) + "\n"
