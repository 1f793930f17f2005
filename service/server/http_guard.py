"""A listening socket for an asyncio HTTP protocol (aiohttp's), hardened against slow and idle clients.

aiohttp has size limits for a request's line, headers and body, but no deadline for a request's head and
none for a client that stops reading its answer: such clients would keep their connections (and answers)
forever. Here each connection must finish its first head within HEAD_TIMEOUT_S; a connection whose answer
stays unread (the transport's buffer full) for `write_timeout_s` is dropped, answer and all; connections are
bounded, and past the bound the one that has waited longest for its head is dropped to make room (or, when
none is waiting, the new one is refused); the listen backlog is deep. Idle keep-alive connections are closed
by aiohttp's own keepalive timeout (KEEPALIVE_S).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Any

HEAD_TIMEOUT_S = 5.0
KEEPALIVE_S = 15.0
MAX_CONNECTIONS = 1024
BACKLOG = 1024
_HEAD_END = b"\r\n\r\n"


class GuardedServer:
    """Serves `factory`'s protocols (one per connection) with the deadlines and bounds above."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        name: str,
        write_timeout_s: float = 30.0,
        on_stalled: Callable[[], object] | None = None,
    ) -> None:
        self.factory = factory
        self.name = name
        self.write_timeout_s = write_timeout_s
        self.on_stalled = on_stalled  # called for each connection dropped for not reading its answer
        self.connections: dict[_Guarded, None] = {}  # open, oldest first
        self.waiting: dict[_Guarded, None] = {}  # still sending their first head, oldest first
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen; returns the bound port (useful with port 0). An address in use is named."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _Guarded(self, self.factory()), host, port, backlog=BACKLOG, ssl=ssl_context,
                ssl_handshake_timeout=HEAD_TIMEOUT_S if ssl_context else None,
            )  # fmt: skip
        except OSError as error:
            raise OSError(error.errno, f"{self.name} port {host}:{port}: {error.strerror}") from error
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop accepting connections; the open ones go on."""
        if self._server is not None:
            self._server.close()

    async def stop(self) -> None:
        """Stop accepting and drop every connection still open."""
        if self._server is None:
            return
        self._server.close()
        for connection in list(self.connections):
            connection.drop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self._server = None


class _Guarded(asyncio.Protocol):
    """One connection: forwards everything to the HTTP protocol, and drops it if its head is too slow."""

    def __init__(self, guard: GuardedServer, inner: asyncio.Protocol) -> None:
        self.guard, self.inner = guard, inner
        self.transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stall: asyncio.TimerHandle | None = None
        self._tail = b""
        self._started = False  # a byte other than CR/LF came (blank lines before a request line do not count)
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self.guard
        self.transport = transport
        if len(guard.connections) >= MAX_CONNECTIONS:
            if not guard.waiting:  # every connection has sent its head: no room for one more
                self._refused = True
                transport.abort()
                return
            next(iter(guard.waiting)).drop()
        guard.connections[self] = None
        guard.waiting[self] = None
        self._timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT_S, self.drop)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._timer is not None:
            chunk = data if self._started else data.lstrip(b"\r\n")
            self._started = self._started or bool(chunk)
            seen = self._tail + chunk
            if _HEAD_END in seen:
                self._head_done()
            else:
                self._tail = seen[-(len(_HEAD_END) - 1) :]
        self.inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        if self._refused:
            return None
        return self.inner.eof_received()  # type: ignore[attr-defined]

    def pause_writing(self) -> None:
        # The client takes nothing more: it has write_timeout_s to start reading again.
        if self._stall is None:
            self._stall = asyncio.get_running_loop().call_later(self.guard.write_timeout_s, self._stalled)
        if not self._refused:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if not self._refused:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self.guard.connections.pop(self, None)
        if not self._refused:
            self.inner.connection_lost(exc)

    def _stalled(self) -> None:
        self._stall = None
        if self.guard.on_stalled is not None:
            self.guard.on_stalled()
        self.drop()

    def _head_done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.guard.waiting.pop(self, None)

    def drop(self) -> None:
        """Close at once, unsent bytes and all."""
        self._head_done()
        transport: Any = self.transport
        if transport is not None:
            transport.abort()
