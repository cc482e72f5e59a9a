"""The ``replica`` command line."""

from __future__ import annotations

import argparse
from importlib.metadata import version


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replica",
        description="A CRDT-based multi-region replica store for identity data.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {version('replica-store')}"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    return 0
