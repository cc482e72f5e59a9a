"""The ``replica`` command line."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from node.config import ConfigError, Settings, load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replica",
        description="A CRDT-based multi-region replica store for identity data.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {version('replica-store')}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    # Defaults are suppressed so that only the flags the user passed override the
    # environment and the config file; the defaults themselves live in node.config.
    node = commands.add_parser(
        "node",
        help="run this region's replica node",
        description="Run a replica node. Every flag can also be set as REPLICA_<NAME>"
        " (e.g. REPLICA_REGION, REPLICA_PEERS=us=http://h:8002,ap=http://h:8003) or in"
        " the --config TOML file; flags win over the environment, which wins over the file.",
        argument_default=argparse.SUPPRESS,
    )
    node.add_argument("--region", help="this node's region name, e.g. eu")
    node.add_argument("--data", dest="data_dir", metavar="DIR", help="data directory")
    node.add_argument("--listen", metavar="HOST:PORT", help="address to serve on")
    node.add_argument(
        "--peer", action="append", metavar="NAME=URL", help="another region (repeatable)"
    )
    node.add_argument(
        "--cluster-secret",
        metavar="SECRET",
        help="shared secret between nodes; prefer REPLICA_CLUSTER_SECRET, as other local"
        " users can read command lines",
    )
    node.add_argument(
        "--api-token", metavar="TOKEN", help="client API token; prefer REPLICA_API_TOKEN"
    )
    node.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    node.add_argument("--body-bytes-max", metavar="N", help="largest request body accepted")
    node.add_argument("--max-drift-ms", metavar="N", help="largest clock drift accepted")
    node.add_argument(
        "--no-metasync",
        dest="lmdb_metasync",
        action="store_false",
        help="faster commits; an OS crash may lose the last commit",
    )
    node.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")

    rebuild = commands.add_parser(
        "rebuild-views", help="rebuild the derived views from the event log (node stopped)"
    )
    rebuild.add_argument("--data", dest="data_dir", type=Path, metavar="DIR", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if command == "node":
        return _node(args)
    if command == "rebuild-views":
        return _load_rebuilder()(args["data_dir"])
    parser.print_help(sys.stderr)
    return 2


def _node(flags: dict[str, object]) -> int:
    config_file = flags.pop("config", None)
    assert config_file is None or isinstance(config_file, Path)
    try:
        settings = load_settings(flags, environ=os.environ, config_file=config_file)
    except ConfigError as error:
        print(f"replica: error: {error}", file=sys.stderr)
        return 2
    return _load_runner()(settings)


# The server and the rebuild tool are imported only when used, so that `replica --help`
# stays fast and the command line does not depend on the storage and HTTP stack.
def _load_runner() -> Callable[[Settings], int]:
    run_node: Callable[[Settings], int] = importlib.import_module("replication.service").run_node
    return run_node


def _load_rebuilder() -> Callable[[Path], int]:
    rebuild_views: Callable[[Path], int] = importlib.import_module("node.rebuild").rebuild_views
    return rebuild_views
