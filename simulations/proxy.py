"""A fault proxy for one directed peer link: node A reaches peer B through it.

Faults are set at any time, from outside the nodes: ``cut`` (connections are reset),
``delay_ms`` (each chunk waits), ``loss`` (a connection is dropped with this
probability), ``reset`` (every open connection is closed now). It needs no kernel
queueing discipline, so it works on any machine, unprivileged.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field

CHUNK_BYTES = 64 * 1024


@dataclass
class Faults:
    cut: bool = False
    delay_ms: int = 0
    loss: float = 0.0


@dataclass
class LinkProxy:
    name: str  # "eu->us"
    target_host: str
    target_port: int
    faults: Faults = field(default_factory=Faults)
    rng: random.Random = field(default_factory=random.Random)
    bytes_forwarded: int = 0
    connections_refused: int = 0
    _server: asyncio.Server | None = None
    _open: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.reset()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def reset(self) -> None:
        for writer in list(self._open):
            writer.close()
        self._open.clear()

    def cut(self, cut: bool = True) -> None:
        self.faults.cut = cut
        if cut:
            self.reset()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.faults.cut or self.rng.random() < self.faults.loss:
            self.connections_refused += 1
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        self._open |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._open.discard(w)
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(CHUNK_BYTES):
                if self.faults.delay_ms:
                    await asyncio.sleep(self.faults.delay_ms / 1000)
                # Cut, or reset while this chunk waited: writing to a closed transport
                # raises on uvloop (asyncio's own loop drops the bytes).
                if self.faults.cut or writer.is_closing():
                    return
                writer.write(chunk)
                await writer.drain()
                self.bytes_forwarded += len(chunk)
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()
