"""Run one node: open its replica, serve the API, drain and close cleanly on SIGTERM.

Shutdown order matters for durability: stop accepting, let in-flight requests finish
(their writes commit and are acknowledged), let the writer drain its queue, then
close LMDB. Logs are JSON lines on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import lmdb
from aiohttp import web

from node.api import build_app
from node.config import Settings
from node.counter_record import KEEP_INTERVAL_S, RunDirUnusable
from node.deadlines import close_slow_openings
from node.event_loop import run_on, running_loop_name
from node.http_errors import answer_unparsable_requests_as_json
from node.kv import StorageFailed
from node.lmdb_kv import DataDirBusy, DataFileTruncated, DataFileUnreadable
from node.log import WrongRegion
from node.metrics import GC_PAUSES
from node.replica import Replica
from node.writer import Overloaded, Rejected

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


def server_tls(settings: Settings) -> ssl.SSLContext | None:
    """TLS for the listener; with a CA, clients (peers) must present a certificate it signed."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_ca is not None:
        context.load_verify_locations(settings.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


# The collector's first generation at 100,000 allocations instead of 700, the second at
# 20 first-generation collections instead of 10: a node allocates at a great rate (every
# request, every folded event) and keeps a large heap of decoded views, which every
# collection of an older generation walks again. Bulk ingest of 200k events: about 13.5k
# events/s with (10_000, 10, 10), 16.5k with these. Full collections still run, every
# 20M allocations or so (and only when a quarter of the heap is new since the last).
GC_THRESHOLDS = (100_000, 20, 10)


# A body a handler leaves unread (refused before reading: too large, unauthenticated, not
# the encoding it claims) is not drained for the next request on the connection; the
# connection closes after the answer. aiohttp drains up to 10 s by default, holding a
# slow sender's connection, and logs a traceback when the rest cannot be decoded.
UNREAD_BODY_DRAIN_S = 0.0


def tune_gc() -> None:
    """Collect less often, and never walk again what start-up loaded (modules, the app):
    a fifth of the time of a bulk ingest went to the collector with Python's defaults."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()
    GC_PAUSES.install()  # what the collections cost is in /metrics


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class Extension(Protocol):
    """Something served beside the API (replication): routes, then tasks to run."""

    def install(self, app: web.Application) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


Extensions = Callable[[Replica, Settings], Sequence[Extension]]


def open_replica(settings: Settings) -> Replica:
    return Replica.open(
        settings.data_dir,
        settings.region,
        run_dir=settings.run_dir,
        map_bytes_initial=settings.lmdb_map_bytes_initial,
        metasync=settings.lmdb_metasync,
        previous_format=settings.previous_format,
        max_drift_ms=settings.max_drift_ms,
        batch_requests_max=settings.commit_batch_requests_max,
        queue_requests_max=settings.write_queue_requests_max,
    )


def run_node(settings: Settings, extensions: Extensions = lambda replica, settings: ()) -> int:
    configure_logging(settings.log_level)
    try:
        server_tls(settings)  # its files are read before anything else is done
    except (ssl.SSLError, OSError) as e:
        files = ", ".join(
            f"--{name.replace('_', '-')} {path}"
            for name in ("tls_cert", "tls_key", "tls_ca")
            if (path := getattr(settings, name)) is not None
        )
        print(f"replica: error: cannot use the TLS files ({files}): {e}", file=sys.stderr)
        return 2
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        print(f"replica: error: the data directory {settings.data_dir} is a file", file=sys.stderr)
        return 2
    try:
        replica = open_replica(settings)
    except (WrongRegion, DataDirBusy, DataFileTruncated, DataFileUnreadable, RunDirUnusable) as e:
        print(f"replica: error: {e}", file=sys.stderr)
        return 2
    except lmdb.Error as e:
        print(f"replica: error: cannot open {settings.data_dir}: {e}", file=sys.stderr)
        return 2
    except StorageFailed as e:  # a write at start: the identity, the start's mark
        print(f"replica: error: cannot write to {settings.data_dir}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file where the directory goes, no permission, ...
        where = f" ({e.filename})" if e.filename else ""
        print(
            f"replica: error: cannot use {settings.data_dir} as the data directory: "
            f"{e.strerror or e}{where}",
            file=sys.stderr,
        )
        return 2
    try:
        return run_on(settings.event_loop, serve(replica, settings, extensions(replica, settings)))
    finally:
        replica.close()


async def _housekeeping(replica: Replica) -> None:
    """Every ``KEEP_INTERVAL_S``: make the node's counter record again if its file was
    removed while it runs (``CounterRecord.keep``); while the storage refuses commits and
    none was tried for a while, try one (``Writer.probe_storage``): an idle node's
    ``writes_failing`` ends once the storage takes commits again; and finish the member
    removes of group deletes left (``commands.delete_group``)."""
    record, writer = replica.counter_record, replica.writer
    while True:
        await asyncio.sleep(KEEP_INTERVAL_S)
        if record is not None:
            try:
                record.keep()
            except OSError as exc:
                logger.warning("cannot keep the counter record: %s", exc)
        if writer.storage_quiet():
            with contextlib.suppress(StorageFailed, Overloaded):
                await writer.probe_storage()
        # The removes of group deletes cut short (a stop, a client gone, a refused commit).
        if replica.group_deletes_left():
            try:
                finished = await replica.finish_group_deletes()
                logger.info("finished the member removes of %d deleted groups", finished)
            except (StorageFailed, Overloaded, Rejected) as exc:
                logger.warning("member removes of deleted groups wait: %s", exc)


async def serve(replica: Replica, settings: Settings, extensions: Sequence[Extension] = ()) -> int:
    loop = asyncio.get_running_loop()
    replica.bind(loop)
    app = build_app(replica, settings)
    answer_unparsable_requests_as_json(replica.token_text)
    close_slow_openings(settings.request_head_wait_ms, settings.connections_max)
    for extension in extensions:
        extension.install(app)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        lingering_time=UNREAD_BODY_DRAIN_S,
        keepalive_timeout=settings.idle_connection_wait_ms / 1000,
    )
    await runner.setup()
    tune_gc()
    site = web.TCPSite(
        runner,
        settings.listen_host,
        settings.listen_port,
        shutdown_timeout=SHUTDOWN_WAIT_S,
        ssl_context=server_tls(settings),
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
    for extension in extensions:
        await extension.start()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    scheme = "http" if settings.tls_cert is None else "https"  # as server_tls() decides
    host = settings.listen_host
    url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{settings.listen_port}"  # IPv6
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
    try:
        print(
            f"replica {replica.identity.replica_id} listening on {url} ({running_loop_name()})",
            flush=True,
        )
    except OSError as exc:  # stdout on a full disk: the node serves all the same
        logger.warning("cannot write the listening line to stdout: %s", exc)
    keeper = asyncio.ensure_future(_housekeeping(replica))
    gave_up = asyncio.ensure_future(replica.storage_gave_up.wait())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait((gave_up, stopped), return_when=asyncio.FIRST_COMPLETED)
    for waiting in (gave_up, stopped, keeper):
        waiting.cancel()
    replica.stop_waiting()  # long polls answer now, not when their wait is up
    failed = replica.storage_gave_up.is_set()
    if failed:
        logger.critical(
            "the storage refuses every transaction until it is opened again (LMDB gave up "
            "on it after a failed write): stopping with exit 1, for a supervisor to start "
            "the node again; every write acknowledged before is in it"
        )
    logger.info("stopping: draining in-flight requests")
    for extension in extensions:
        await extension.stop()
    await runner.cleanup()
    logger.info("stopped", extra={"fields": {"seq": replica.state.seq}})
    # The storage gave up: exit 1, for a supervisor to start the node again (which opens
    # it anew); what was acknowledged before is all there.
    return 1 if failed else 0
