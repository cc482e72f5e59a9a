from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.helpers import Node, Nodes


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    """Start ``replica node`` processes; every one is killed at the end, pass or fail."""
    started = Nodes(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture
def node(nodes: Nodes) -> Node:
    """One running eu node on a fresh data directory (``node.url``, ``node.proc``)."""
    return nodes.start("eu")
