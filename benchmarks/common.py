"""Shared pieces of the benchmarks: the result row, timing helpers, table and JSON output.

A benchmark module exposes ``def run(quick: bool) -> list[Row]``; ``benchmarks/run.py``
discovers every such module in this package and collects the rows. Every figure is reported
beside a baseline measured in the same run (``ratio`` = figure / baseline, in the unit's own
sense), because absolute times on a shared machine mean little.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    """One measured figure.

    ``name``: the benchmark (e.g. ``"http_writes"``); ``figure``: what was measured
    (e.g. ``"req/s"``, ``"p99"``); ``value`` in ``unit``; ``baseline_value``: the same figure
    for the baseline measured in the same run (None if the target is absolute); ``ratio``:
    value / baseline (None without a baseline); ``target``: the target as text
    (e.g. ``">= 0.7x"``, ``"<= 300 MB"``); ``met``: whether the target is met (None when
    there is no target).
    """

    name: str
    figure: str
    value: float
    unit: str
    baseline_value: float | None
    ratio: float | None
    target: str
    met: bool | None


def ratio(value: float, baseline: float | None) -> float | None:
    """value / baseline, or None when there is no (non-zero) baseline."""
    if baseline is None or baseline == 0:
        return None
    return value / baseline


def row(
    name: str,
    figure: str,
    value: float,
    unit: str,
    baseline: float | None = None,
    *,
    target: str = "",
    at_least: float | None = None,
    at_most: float | None = None,
    absolute: bool = False,
) -> Row:
    """Build a Row and decide ``met``.

    With ``absolute=False`` (default) the bounds apply to the ratio value/baseline; with
    ``absolute=True`` they apply to the value itself. No bounds -> ``met`` is None.
    """
    r = ratio(value, baseline)
    subject = value if absolute else r
    met: bool | None = None
    if at_least is not None or at_most is not None:
        if subject is None or (isinstance(subject, float) and math.isnan(subject)):
            met = False
        else:
            met = (at_least is None or subject >= at_least) and (
                at_most is None or subject <= at_most
            )
    if not target:
        unit_s = "" if not absolute else f" {unit}"
        suffix = "x" if not absolute else ""
        parts = []
        if at_least is not None:
            parts.append(f">= {at_least:g}{suffix}{unit_s}")
        if at_most is not None:
            parts.append(f"<= {at_most:g}{suffix}{unit_s}")
        target = ", ".join(parts)
    return Row(name, figure, float(value), unit, baseline, r, target, met)


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Run ``fn`` once; return (seconds, result)."""
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def best_of(
    fn: Callable[[], Any], repeat: int = 3, *, setup: Callable[[], Any] | None = None
) -> float:
    """Best wall time (s) of ``repeat`` runs of ``fn``; ``setup`` runs untimed before each."""
    best = math.inf
    for _ in range(max(1, repeat)):
        if setup is not None:
            setup()
        gc.collect()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def percentile(samples: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) of ``samples`` by nearest rank; NaN if empty."""
    if not samples:
        return math.nan
    s = sorted(samples)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else math.nan


def rss_mb(pid: int | None = None) -> float:
    """Resident set size in MB (Linux /proc), of this process or ``pid``."""
    path = f"/proc/{pid or 'self'}/status"
    with open(path) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def pin_to_core(core: int, pid: int = 0) -> bool:
    """Pin ``pid`` (0 = this process) to one CPU core if the machine has more than one."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return False
        os.sched_setaffinity(pid, {cpus[core % len(cpus)]})
        return True
    except (AttributeError, OSError):
        return False


# --------------------------------------------------------------------------- output


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if a >= 0.1 or a == 0 else f"{v:.3g}"


def _met(m: bool | None) -> str:
    return "-" if m is None else ("yes" if m else "NO")


def table(rows: Iterable[Row], *, markdown: bool = False) -> str:
    """Rows as an aligned text table (or a Markdown table)."""
    header = ["benchmark", "figure", "value", "unit", "baseline", "ratio", "target", "met"]
    body = [
        [
            r.name,
            r.figure,
            _fmt(r.value),
            r.unit,
            _fmt(r.baseline_value),
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            r.target or "-",
            _met(r.met),
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in b) + " |" for b in body]
        return "\n".join(lines)
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)
    ]
    numeric = {2, 4, 5}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(cells)
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    return "\n".join(out)


def print_table(rows: Iterable[Row], *, file: Any = None) -> None:
    print(table(list(rows)), file=file or sys.stdout, flush=True)


def environment() -> dict[str, Any]:
    """What the figures were measured on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 0
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "system": platform.system(),
        "cpus": cpus,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(
    rows: Iterable[Row], path: str | Path, *, extra: dict[str, Any] | None = None
) -> None:
    """Write rows (and the environment) to ``path`` as JSON."""
    doc: dict[str, Any] = {"environment": environment(), "rows": [asdict(r) for r in rows]}
    if extra:
        doc.update(extra)

    def clean(o: Any) -> Any:
        if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    Path(path).write_text(json.dumps(clean(doc), indent=2) + "\n")


def scratch_dir(prefix: str) -> Any:
    """A temporary directory on a disk-backed file system (fsync must cost what it costs:
    /tmp may be a tmpfs). ``BENCH_TMPDIR`` overrides; the default is /var/tmp."""
    import tempfile

    base = os.environ.get("BENCH_TMPDIR") or ("/var/tmp" if os.path.isdir("/var/tmp") else None)
    return tempfile.TemporaryDirectory(prefix=f"replica-bench-{prefix}-", dir=base)
