"""`GET /metrics` on the server's event loop, hardened against slow and idle clients.

No thread per connection (a connection is a coroutine), a deadline for a request's head and for writing
the answer, a head size limit, a deep listen backlog, and 404 for any other path. Connections are bounded:
past the bound the one that has waited longest for its head is closed to make room, so clients that never
finish their headers (slowloris) cannot keep a scraper out. The exposition itself is built on a worker
thread, so a scrape never holds the event loop that serves the gRPC calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("translator.server")

METRICS_PATH = "/metrics"
MAX_CONNECTIONS = 512  # a scrape takes milliseconds: past this many, the longest-waiting head is dropped
HEAD_TIMEOUT_S = 5.0  # a request's line and headers must arrive within this (slowloris)
WRITE_TIMEOUT_S = 10.0  # a client that does not read its answer is dropped after this
MAX_HEAD_BYTES = 16 * 1024
BACKLOG = 1024


class MetricsEndpoint:
    """The Prometheus text exposition of `registry` at `http(s)://host:port/metrics`."""

    def __init__(self, registry: CollectorRegistry, ssl_context: ssl.SSLContext | None = None) -> None:
        self.registry = registry
        self.ssl_context = ssl_context
        self.connections = 0  # open right now
        self._waiting: dict[int, asyncio.StreamWriter] = {}  # still sending their head, oldest first
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful with port 0). An address in use is named."""
        try:
            self._server = await asyncio.start_server(
                self._serve, host, port, ssl=self.ssl_context, backlog=BACKLOG, limit=MAX_HEAD_BYTES,
                ssl_handshake_timeout=HEAD_TIMEOUT_S if self.ssl_context else None,
            )
        except OSError as error:  # say which of the server's two ports it is
            raise OSError(error.errno, f"metrics port {host}:{port}: {error.strerror}") from error
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        key = id(writer)
        if self.connections > MAX_CONNECTIONS and self._waiting:
            oldest = next(iter(self._waiting))
            self._waiting.pop(oldest).transport.abort()  # its readuntil ends at once
        self._waiting[key] = writer
        answered = False
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return  # slow, silent, oversized or gone: closed without a word
            finally:
                self._waiting.pop(key, None)
            method, path = _request_line(head)
            if not method:
                await self._answer(writer, HTTPStatus.BAD_REQUEST, b"not an HTTP request line\n")
            elif method not in ("GET", "HEAD"):
                await self._answer(writer, HTTPStatus.METHOD_NOT_ALLOWED, b"GET /metrics\n")
            elif path.split("?", 1)[0] != METRICS_PATH:
                await self._answer(writer, HTTPStatus.NOT_FOUND, b"not found: the metrics are at /metrics\n")
            else:
                body = await asyncio.to_thread(generate_latest, self.registry)
                full = method == "GET"
                await self._answer(writer, HTTPStatus.OK, body, CONTENT_TYPE_LATEST, send_body=full)
            answered = True
        except (ConnectionError, TimeoutError, ssl.SSLError, RuntimeError, OSError):
            pass  # the client went away, reset or never read (uvloop: RuntimeError): nothing to tell it
        finally:
            self.connections -= 1
            await _close(writer, gracefully=answered)

    @staticmethod
    async def _answer(
        writer: asyncio.StreamWriter,
        status: HTTPStatus,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        send_body: bool = True,
    ) -> None:
        head = (
            f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        if writer.is_closing():
            raise ConnectionError("the client closed the connection")
        writer.write(head.encode("latin-1") + (body if send_body else b""))
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)


async def _close(writer: asyncio.StreamWriter, gracefully: bool) -> None:
    """Close after the answer went out; drop at once (unsent bytes and all) a connection that failed, timed
    out or does not read, so that it holds neither its socket nor its answer."""
    if gracefully:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
            return
    writer.transport.abort()


def _request_line(head: bytes) -> tuple[str, str]:
    """(method, path) of an HTTP request head; empty strings when the first line is not one."""
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    return (parts[0], parts[1]) if len(parts) == 3 else ("", "")


def server_ssl_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """TLS for the endpoint with the gRPC port's certificate; with a client CA, clients must present a
    certificate it signed (mutual TLS), as on the gRPC port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
