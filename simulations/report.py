"""What a simulation run reports: a row per seed, a summary table, JSON, and a plot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from simulations.deterministic import Result


def seed_row(result: Result) -> dict[str, Any]:
    """The picklable, JSON-able summary of one seed."""
    report = result.report
    return {
        "seed": result.scenario.seed,
        "ok": result.ok,
        "converged": result.converged,
        "heal_to_converge_ms": result.heal_to_converge_ms,
        "wall_s": round(result.wall_s, 3),
        "rounds": result.rounds,
        "messages": result.messages,
        "bytes_sent": result.bytes_sent,
        "events": len(result.union),
        "bytes_per_event": round(result.bytes_per_event, 1),
        "acknowledged": len(result.acknowledged),
        "undone": len(result.undone),
        "rejected": result.rejected,
        "refused": result.refused,
        "superseded": report.superseded if report else None,
        "lost": report.lost if report else None,
        "conflicts_resolved": report.conflicts_resolved if report else None,
        "violations": [
            {"kind": v.kind, "region": v.region, "detail": v.detail}
            for v in (report.violations if report else [])
        ],
        "trace_digest": result.trace_digest,
        "command": result.scenario.command(),
        "divergence": result.divergence,
        "partition_windows_ms": result.windows,
        "duration_ms": result.scenario.duration_ms,
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary_table(rows: list[dict[str, Any]], wall_s: float) -> str:
    converge = [r["heal_to_converge_ms"] for r in rows if r["heal_to_converge_ms"] is not None]
    failed = [r for r in rows if not r["ok"]]
    lines = [
        ("seeds", f"{len(rows)} ({len(rows) - len(failed)} ok, {len(failed)} with violations)"),
        ("seeds per minute", f"{len(rows) / max(wall_s, 1e-9) * 60:.0f} (wall {wall_s:.1f} s)"),
        (
            "converged after heal (virtual ms)",
            "n/a"
            if not converge
            else f"p50 {statistics.median(converge):.0f}  p99 {_pct(converge, 0.99):.0f}"
            f"  max {max(converge):.0f}",
        ),
        ("wall per seed (s)", f"p50 {statistics.median(r['wall_s'] for r in rows):.2f}"),
        ("rounds per seed", f"p50 {statistics.median(r['rounds'] for r in rows):.0f}"),
        (
            "bytes sent per event",
            f"p50 {statistics.median(r['bytes_per_event'] for r in rows):.0f}",
        ),
        (
            "acknowledged writes",
            f"{sum(r['acknowledged'] for r in rows)}"
            f" (refused by the node: {sum(r['rejected'] for r in rows)})",
        ),
        (
            "acknowledged, then undone by rollbacks",
            f"{sum(r['undone'] for r in rows)} (not counted above, nor held as lost)",
        ),
        ("sync messages refused as bad", f"{sum(r['refused'] for r in rows)}"),
        ("superseded LWW writes", f"{sum(r['superseded'] or 0 for r in rows)}"),
        ("lost acknowledged writes", f"{sum(r['lost'] or 0 for r in rows)}"),
        ("conflicts resolved", f"{sum(r['conflicts_resolved'] or 0 for r in rows)}"),
    ]
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in lines)


def write_json(path: Path, rows: list[dict[str, Any]], wall_s: float) -> None:
    path.write_text(json.dumps({"wall_s": wall_s, "seeds": rows}, indent=1))


def plot(path: Path, row: dict[str, Any], title: str) -> None:
    """Divergence over time (keys that differ between replicas), partitions shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 3.6))
    for start, end in row["partition_windows_ms"]:
        axes.axvspan(start / 1000, end / 1000, color="tab:red", alpha=0.12, lw=0)
    xs = [t / 1000 for t, _ in row["divergence"]]
    ys = [n for _, n in row["divergence"]]
    axes.step(xs, ys, where="post", color="tab:blue", lw=1.4, label="keys that differ")
    heal_s = row["duration_ms"] / 1000
    axes.axvline(x=heal_s, color="tab:gray", ls=":", lw=1, label="final heal")
    if row["heal_to_converge_ms"] is not None:
        converged_s = heal_s + row["heal_to_converge_ms"] / 1000
        axes.axvline(x=converged_s, color="tab:green", ls="--", lw=1, label="converged")
    axes.set_xlabel("virtual time (s); shaded: partition windows")
    axes.set_ylabel("divergent keys")
    axes.set_title(title, fontsize=10)
    axes.set_ylim(bottom=0)
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
