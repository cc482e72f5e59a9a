"""Prometheus text exposition of a node's counters and gauges."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.replica import Replica


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
        ("replica_commits_total", "counter", "Durable LMDB commits.", writer.commits),
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
