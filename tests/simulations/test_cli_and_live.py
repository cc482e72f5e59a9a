"""``replica simulate`` as a user runs it: both modes, the report, the plot, exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from node.cli import main
from simulations import netns
from simulations.variants import VARIANTS


def test_deterministic_run_writes_a_report_and_a_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, picture = tmp_path / "report.json", tmp_path / "divergence.png"
    code = main(
        [
            "simulate",
            "--seeds",
            "1..4",
            "--ops",
            "60",
            "--duration-ms",
            "3000",
            "--jobs",
            "2",
            "--json",
            str(report),
            "--plot",
            str(picture),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4 (4 ok, 0 with violations)" in out
    seeds = json.loads(report.read_text())["seeds"]
    assert [s["seed"] for s in seeds] == [1, 2, 3, 4]
    assert all(s["ok"] and s["lost"] == 0 for s in seeds)
    assert seeds[0]["divergence"], "the plotted seed samples divergence over time"
    assert picture.read_bytes().startswith(b"\x89PNG")


def test_a_violation_exits_1_with_the_command_that_replays_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with VARIANTS["replication_skips_an_event"]():  # in this process: --jobs 1
        code = main(["simulate", "--seed", "3", "--ops", "80", "--jobs", "1", "--faults", "none"])
    out = capsys.readouterr().out
    assert code == 1
    assert "VIOLATION in seed 3" in out
    assert "replay: replica simulate --seed 3 " in out


def test_live_mode_against_three_real_processes_has_no_violation(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "simulate",
            "--mode",
            "live",
            "--seed",
            "11",
            "--ops",
            "150",
            "--duration-ms",
            "3000",
            "--faults",
            "loss=0.05,partitions=1,crashes=1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "no violation" in out
    acknowledged = re.search(r"(\d+) writes acknowledged", out)
    assert acknowledged is not None
    assert int(acknowledged.group(1)) > 50, out  # a real workload went through


def test_live_mode_in_network_namespaces_or_a_clear_refusal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Where the machine allows namespaces (root, iproute2), the kernel enforces the
    partitions; elsewhere the option is refused with the reason, never half-run."""
    code = main(
        [
            "simulate",
            "--mode",
            "live",
            "--netns",
            "--seed",
            "4",
            "--ops",
            "120",
            "--duration-ms",
            "2500",
            "--faults",
            "partitions=2,one_way=0.5,crashes=1",
        ]
    )
    captured = capsys.readouterr()
    why = netns.available()
    if why is None:
        assert code == 0, captured.out
        assert "no violation" in captured.out
        spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"rs{os.getpid() % 100_000}-" not in spaces  # every namespace was removed
    else:
        assert code == 2
        assert why in captured.err


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--seeds", "5..1"], "first seed is past the last"),
        (["--seeds", "abc"], "--seeds must be N or N..M"),
        (["--faults", "bogus=1"], "unknown fault 'bogus'"),
        (["--faults", "loss=2"], "loss must be a chance from 0 to 1"),
        (["--faults", "crashes=x"], "crashes must be a whole number"),
        (["--workload", "nope=1"], "unknown workload kind 'nope'"),
        (["--workload", "churn=-1"], "must be 0 or more"),
        (["--plot", "/no/such/dir/p.png"], "no directory /no/such/dir"),
        (["--regions", "eu"], "two or more distinct region names"),
    ],
)
def test_flags_it_cannot_use_are_one_line_errors(
    flags: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each ended in a traceback (a review), or was taken (loss=2)."""
    assert main(["simulate", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("replica: error: "), err
    assert said in err, err
