"""What one call costs the server process in CPU: a health check (gRPC's own floor) against a Translate.

    .venv/bin/python docs/experiments/server_cost.py [--event-loop asyncio|uvloop]

Spawns the default server (lane processes on), then for 10 s each keeps 64 calls in flight from an asyncio
client: `grpc.health.v1.Health/Check`, then `Translate` of one short sentence. Prints calls/s and CPU
milliseconds per call of the server process alone and with its lane processes (from /proc). The client runs on
the same cores, as in the load report (on asyncio's own loop whatever the server runs). `--event-loop asyncio`
or `uvloop` picks the server's loop (default: auto, uvloop where installed).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.load import DEFAULT_MODEL, DEFAULT_REPOSITORY
from bench.servers import Setting, cpu_seconds, own_cpu_seconds, spawn_server
from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.server.event_loop import EVENT_LOOPS

CLIENTS = 64
SECONDS = 10.0


async def measure(pid: int, call: Callable[[], Awaitable[object]]) -> tuple[float, float, float]:
    calls = 0
    stop_at = time.monotonic() + SECONDS

    async def client() -> None:
        nonlocal calls
        while time.monotonic() < stop_at:
            await call()
            calls += 1

    own_before, all_before, started = own_cpu_seconds(pid), cpu_seconds(pid) or 0.0, time.monotonic()
    await asyncio.gather(*[client() for _ in range(CLIENTS)])
    elapsed = time.monotonic() - started
    own_ms = (own_cpu_seconds(pid) - own_before) / calls * 1000
    all_ms = ((cpu_seconds(pid) or 0.0) - all_before) / calls * 1000
    return calls / elapsed, own_ms, all_ms


async def run(address: str, pid: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        translator = pb_grpc.TranslatorStub(channel)
        calls = {
            "Health/Check": lambda: health.Check(health_pb2.HealthCheckRequest()),
            "Translate (1 sentence, 5 words)": lambda: translator.Translate(
                pb.TranslateRequest(texts=["the big red dog sees her"])
            ),
        }
        print(f"{'call':32s} {'calls/s':>8s} {'server process ms/call':>23s} {'with lanes ms/call':>19s}")
        for name, call in calls.items():
            await call()  # warm
            rate, own_ms, all_ms = await measure(pid, call)
            print(f"{name:32s} {rate:8.1f} {own_ms:23.3f} {all_ms:19.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto", help="the server's --event-loop")
    args = parser.parse_args()
    setting = Setting("default", {"max_concurrent_rpcs": "256", "event_loop": args.event_loop})
    with spawn_server(setting, DEFAULT_REPOSITORY, DEFAULT_MODEL) as target:
        assert target.pid is not None
        asyncio.run(run(target.address, target.pid))


if __name__ == "__main__":
    main()
