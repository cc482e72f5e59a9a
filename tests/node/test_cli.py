from __future__ import annotations

import subprocess
import sys

import pytest

from node.cli import main


def test_version_and_help_from_the_installed_script() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "node", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("replica ")


def test_help_exits_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "multi-region" in capsys.readouterr().out
