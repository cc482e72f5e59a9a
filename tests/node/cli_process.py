"""``replica`` commands run as an operator runs them: a process of their own, in the
repository's root, so that one killed by a signal fails its test, not the test runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMAND_WAIT_S = 60


def replica_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_WAIT_S,
        check=False,
    )
