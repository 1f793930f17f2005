"""/metrics against hostile clients: 1,000 connections that never finish their headers cost the server no
threads and keep no scraper out; other paths get 404, other methods 405."""

from __future__ import annotations

import http.client
import resource
import socket
import statistics
import struct
import time
from pathlib import Path

from bench.servers import Setting, spawn_server


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def _scrape(host: str, port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, bytes, float]:
    started = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request(method, path)
        answer = connection.getresponse()
        return answer.status, answer.read(), time.perf_counter() - started
    finally:
        connection.close()


def test_slowloris_on_the_metrics_port(tiny_repository: Path, tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))  # the server inherits it
    setting = Setting("slowloris", {"threads": "1", "quality_sample_rate": "0"})
    with spawn_server(setting, tiny_repository, "tiny", log_dir=tmp_path) as target:
        assert target.metrics and target.process is not None
        host, port = target.metrics.rsplit(":", 1)
        status, body, _ = _scrape(host, int(port))
        assert status == 200 and b"translator_requests_total" in body
        threads_before = _threads(target.process.pid)
        hostile = []
        for _ in range(1000):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: slow\r\nX-Never: ")  # and never the blank line
            hostile.append(sock)
        try:
            time.sleep(0.5)
            times = []
            for _ in range(20):
                status, body, seconds = _scrape(host, int(port))
                assert status == 200 and b"translator_requests_total" in body
                times.append(seconds)
            assert statistics.median(times) < 0.1 and max(times) < 1.0, times
            assert _threads(target.process.pid) <= threads_before + 4  # no thread per connection
        finally:
            for sock in hostile:
                sock.close()
        # Clients that reset the connection right after their request (uvloop raises RuntimeError on the
        # write then) or send garbage: answered or dropped, never a traceback in the server's log.
        for index in range(20):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n" if index % 2 else b"\x16\x03\x01 not http\r\n\r\n")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            sock.close()
        time.sleep(0.5)
        log = "".join(path.read_text() for path in tmp_path.glob("server-*.log"))
        assert "Traceback" not in log and "Unhandled exception" not in log, log[-3000:]
        assert _scrape(host, int(port), "/")[0] == 404
        assert _scrape(host, int(port), "/metrics/../secret")[0] == 404
        assert _scrape(host, int(port), "/metrics", "POST")[0] == 405
        status, body, _ = _scrape(host, int(port), "/metrics?name[]=x", "HEAD")
        assert status == 200 and body == b""


def test_slowloris_on_the_rest_port(tiny_repository: Path, tmp_path: Path) -> None:
    """KServe REST (aiohttp behind service.server.http_guard): 1,100 connections that never finish their
    headers, more than the 1,024 kept: the oldest are dropped, a head has 5 s, readiness stays fast."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))
    setting = Setting("slowloris-rest", {"threads": "1", "quality_sample_rate": "0"})
    with spawn_server(setting, tiny_repository, "tiny", log_dir=tmp_path) as target:
        assert target.http and target.process is not None
        host, port = target.http.rsplit(":", 1)
        assert _scrape(host, int(port), "/v2/health/ready")[0] == 200
        threads_before = _threads(target.process.pid)
        hostile = []
        for _ in range(1100):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: slow\r\nX-Never: ")
            hostile.append(sock)
        opened = time.monotonic()
        try:
            time.sleep(0.5)
            times = []
            for _ in range(100):
                status, _, seconds = _scrape(host, int(port), "/v2/health/ready")
                assert status == 200
                times.append(seconds)
            times.sort()
            assert times[98] < 0.1, times[-5:]  # p99
            assert _threads(target.process.pid) <= threads_before + 4  # no thread per connection
            # Past their head deadline every one of them has been closed by the server.
            time.sleep(max(0.0, opened + 6.0 - time.monotonic()))
            for sock in hostile:
                sock.settimeout(2)
                try:
                    assert sock.recv(1) == b""
                except ConnectionResetError:
                    pass  # dropped with a reset: closed all the same
        finally:
            for sock in hostile:
                sock.close()
        log = "".join(path.read_text() for path in tmp_path.glob("server-*.log"))
        assert "Traceback" not in log and "Unhandled exception" not in log, log[-3000:]
