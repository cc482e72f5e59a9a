"""Run one node: open its replica, serve the API, drain and close cleanly on SIGTERM.

Shutdown order matters for durability: stop accepting, let in-flight requests finish
(their writes commit and are acknowledged), let the writer drain its queue, then
close LMDB. Logs are JSON lines on stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from typing import Any

import lmdb
from aiohttp import web

from node.api import build_app
from node.config import Settings
from node.lmdb_kv import DataDirBusy
from node.log import WrongRegion
from node.replica import Replica

SHUTDOWN_WAIT_S = 10.0
logger = logging.getLogger("replica")


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def open_replica(settings: Settings) -> Replica:
    return Replica.open(
        settings.data_dir,
        settings.region,
        map_bytes_initial=settings.lmdb_map_bytes_initial,
        metasync=settings.lmdb_metasync,
        max_drift_ms=settings.max_drift_ms,
        batch_requests_max=settings.commit_batch_requests_max,
        queue_requests_max=settings.write_queue_requests_max,
    )


def run_node(settings: Settings) -> int:
    configure_logging(settings.log_level)
    try:
        replica = open_replica(settings)
    except (WrongRegion, DataDirBusy) as e:
        print(f"replica: error: {e}", file=sys.stderr)
        return 2
    except lmdb.Error as e:
        print(f"replica: error: cannot open {settings.data_dir}: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(replica, settings))
    finally:
        replica.close()


async def serve(replica: Replica, settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    replica.bind(loop)
    runner = web.AppRunner(build_app(replica, settings), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(
        runner, settings.listen_host, settings.listen_port, shutdown_timeout=SHUTDOWN_WAIT_S
    )
    try:
        await site.start()
    except OSError as e:
        print(
            f"replica: error: cannot listen on {settings.listen_host}:{settings.listen_port}: {e}",
            file=sys.stderr,
        )
        await runner.cleanup()
        return 1
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    url = f"http://{settings.listen_host}:{settings.listen_port}"
    logger.info(
        "listening",
        extra={
            "fields": {
                "url": url,
                "replica_id": replica.identity.replica_id,
                "settings": settings.redacted(),
            }
        },
    )
    print(f"replica {replica.identity.replica_id} listening on {url}", flush=True)
    await stop.wait()
    logger.info("stopping: draining in-flight requests")
    await runner.cleanup()
    logger.info("stopped", extra={"fields": {"seq": replica.state.seq}})
    return 0
