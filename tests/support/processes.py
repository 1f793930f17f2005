"""Programs run as processes by the tests: free ports, their JSON logs, whether they live, stopping them."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A loopback port free at the time of asking (another process may take it before it is bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_entries(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a server's log (translator-serve logs one JSON object a line), in order."""
    lines = path.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def logged(path: Path, message: str) -> dict[str, Any] | None:
    """The first entry of the log at `path` with this `message`; None while there is none."""
    return next((entry for entry in log_entries(path) if entry.get("message") == message), None)


def process_alive(pid: int) -> bool:
    """Whether a process runs (a zombie, exited but not yet reaped, does not)."""
    from bench.servers import proc_stat

    try:
        return proc_stat(pid)[0] != "Z"
    except OSError:
        return False


def stop(process: subprocess.Popen[Any], timeout: float = 10) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds; its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return process.returncode
