"""The ``replica`` command line."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Protocol

from node.config import PORT_MAX, REGION_RE, ConfigError, Settings, load_settings
from node.event_loop import EVENT_LOOP_DEFAULT, run_on


def _positive(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return number


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
        description="Run a replica node. Every setting is a flag, an environment variable"
        " (REPLICA_ and the setting's name in capitals: REPLICA_REGION, REPLICA_DATA_DIR,"
        " REPLICA_PEERS=us=http://h:8002,ap=http://h:8003, REPLICA_LMDB_METASYNC=false) and"
        " a key of the --config TOML file (or REPLICA_CONFIG): region, data_dir, listen,"
        " a [peers] table, ...; flags win over the environment, which wins over the file."
        " An unknown REPLICA_ variable or key is refused. Listens on 127.0.0.1:8001 by"
        " default.",
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
    node.add_argument(
        "--request-head-wait-ms",
        metavar="N",
        help="close a connection whose first request's head has not arrived by then",
    )
    node.add_argument(
        "--request-body-wait-ms", metavar="N", help="answer 408 to a body not in by then"
    )
    node.add_argument(
        "--idle-connection-wait-ms", metavar="N", help="close a kept-alive connection idle so long"
    )
    node.add_argument("--connections-max", metavar="N", help="connections open at once")
    node.add_argument("--max-drift-ms", metavar="N", help="largest clock drift accepted")
    node.add_argument(
        "--no-metasync",
        dest="lmdb_metasync",
        action="store_false",
        help="faster commits; an OS crash may lose the last commit",
    )
    node.add_argument(
        "--previous-format",
        action="store_true",
        help="write events the version before reads (during a rolling upgrade from it)",
    )
    node.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")
    node.add_argument(
        "--event-loop", metavar="LOOP", help="uvloop (the default) or asyncio's own loop"
    )
    node.add_argument("--gossip-interval-ms", metavar="N", help="anti-entropy interval")
    node.add_argument(
        "--peer-transport",
        metavar="KIND",
        help="stream (one WebSocket per peer, the default) or http (a POST per round trip)",
    )
    node.add_argument(
        "--peer-compression",
        metavar="WHEN",
        help="compress peer streams: auto (links without TLS, the default), on or off",
    )
    node.add_argument(
        "--tls-cert", metavar="FILE", help="certificate to serve and present to peers"
    )
    node.add_argument("--tls-key", metavar="FILE", help="its private key")
    node.add_argument("--tls-ca", metavar="FILE", help="CA for peers' certificates (mutual TLS)")
    node.add_argument(
        "--run-dir",
        metavar="DIR",
        help="where to record how far this node's counter went this boot, outside its data"
        " directory (default: /run/replica-store, else the user's or a temporary one)",
    )

    cluster = commands.add_parser(
        "cluster",
        help="run a local multi-region cluster of real node processes until Ctrl-C",
        description="Start one node per region on loopback, each peer link through a fault"
        " proxy, with a generated cluster secret. --demo walks a partition-and-heal session.",
    )
    cluster.add_argument("--regions", default="eu,us,ap", help="comma-separated region names")
    cluster.add_argument(
        "--data",
        dest="data_dir",
        type=Path,
        metavar="DIR",
        help="root of the data directories (default: a new temporary one)",
    )
    cluster.add_argument("--port", type=int, default=0, help="first port (default: free ports)")
    cluster.add_argument(
        "--demo", action="store_true", help="walk a scripted multi-region session, then stop"
    )

    simulate = commands.add_parser(
        "simulate",
        help="partition simulations: does it converge, how fast, does it lose a write?",
        description="Run partition simulations against the real node and replication code,"
        " deterministically in one process (seeded, replayable) or live against real node"
        " processes; check convergence, acknowledged writes and an independent oracle.",
    )
    importlib.import_module("simulations.cli").add_arguments(simulate)

    rebuild = commands.add_parser(
        "rebuild-views", help="rebuild the derived views from the event log (node stopped)"
    )
    rebuild.add_argument("--data", dest="data_dir", type=Path, metavar="DIR", required=True)
    rebuild.add_argument(
        "--workers",
        type=_positive,
        default=None,
        metavar="N",
        help="processes that fold a long log (default: one per core; 1: fold in this one)",
    )

    renew = commands.add_parser(
        "new-incarnation",
        help="give a data directory restored from a backup a new replica id (node stopped)",
    )
    renew.add_argument("--data", dest="data_dir", type=Path, metavar="DIR", required=True)

    backup = commands.add_parser(
        "backup",
        help="copy a data directory, its node running or not, into a new directory",
        description="A consistent snapshot of the replica (LMDB's copy, compacted), synced."
        " A node started on the copy serves as a new incarnation: it takes no dot twice,"
        " and gets what it lacks from its peers.",
    )
    backup.add_argument("--data", dest="data_dir", type=Path, metavar="DIR", required=True)
    backup.add_argument("--to", dest="dest", type=Path, metavar="DIR", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if command == "node":
        return _node(args)
    if command == "simulate":
        code: int = importlib.import_module("simulations.cli").main(argparse.Namespace(**args))
        return code
    if command == "cluster":
        return _cluster(args)
    if command == "rebuild-views":
        return _load_rebuilder()(args["data_dir"], workers=args["workers"])
    if command == "new-incarnation":
        renew: Callable[[Path], int] = importlib.import_module("node.rebuild").renew_incarnation
        return renew(args["data_dir"])
    if command == "backup":
        copy: Callable[[Path, Path], int] = importlib.import_module("node.rebuild").backup
        return copy(args["data_dir"], args["dest"])
    parser.print_help(sys.stderr)
    return 2


def _node(flags: dict[str, object]) -> int:
    config_file = flags.pop("config", None)
    if config_file is None and os.environ.get("REPLICA_CONFIG"):
        config_file = Path(os.environ["REPLICA_CONFIG"])
    assert config_file is None or isinstance(config_file, Path)
    try:
        settings = load_settings(flags, environ=os.environ, config_file=config_file)
    except ConfigError as error:
        print(f"replica: error: {error}", file=sys.stderr)
        return 2
    return _load_runner()(settings)


def _cluster(args: dict[str, object]) -> int:
    regions = [r.strip() for r in str(args["regions"]).split(",") if r.strip()]
    port, root = args["port"], args["data_dir"]
    assert isinstance(port, int)
    assert root is None or isinstance(root, Path)
    demo = importlib.import_module("simulations.cluster_demo") if args["demo"] else None
    wrong = _cluster_error(regions, port, demo_regions=None if demo is None else demo.REGIONS)
    if wrong is not None:
        print(f"replica: error: {wrong}", file=sys.stderr)
        return 2
    if demo is not None:
        code: int = demo.main(root, port)
        return code
    cluster = importlib.import_module("simulations.cluster")
    root = root or Path(tempfile.mkdtemp(prefix="replica-cluster-"))
    code = run_on(EVENT_LOOP_DEFAULT, cluster.run_until_stopped(regions, root, port))
    return code


def _cluster_error(regions: list[str], port: int, *, demo_regions: list[str] | None) -> str | None:
    """What is wrong with ``replica cluster``'s flags, before any node is started
    (``demo_regions``: the regions ``--demo`` walks, when it is given)."""
    if not regions or len(set(regions)) != len(regions):
        return "--regions needs distinct region names"
    for region in regions:
        if not REGION_RE.fullmatch(region):
            return f"--regions: a region name must match [a-z][a-z0-9-]{{0,31}}, got {region!r}"
    if demo_regions is not None and regions != demo_regions:
        return f"--demo walks the regions {','.join(demo_regions)}; leave --regions out"
    last = PORT_MAX - len(regions) + 1
    if port and not 1 <= port <= last:
        return f"--port: the first of {len(regions)} ports must be 1 to {last}"
    return None


# The server and the rebuild tool are imported only when used, so that `replica --help`
# stays fast and the command line does not depend on the storage and HTTP stack.
def _load_runner() -> Callable[[Settings], int]:
    run_node: Callable[[Settings], int] = importlib.import_module("replication.service").run_node
    return run_node


class Rebuilder(Protocol):
    def __call__(self, data_dir: Path, *, workers: int | None) -> int: ...


def _load_rebuilder() -> Rebuilder:
    rebuild_views: Rebuilder = importlib.import_module("node.rebuild").rebuild_views
    return rebuild_views
