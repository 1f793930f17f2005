"""What the server process pays per call for waiting on a batch: gRPC's thread-per-call server or grpc.aio.

    .venv/bin/python docs/experiments/aio_handoff.py

No model: each server answers Translate by queueing the call for one of two batch threads, which take up to
16 calls, sleep 4 ms (a batch computed elsewhere, as in the lane processes) and answer them all. `threads`:
gRPC's thread-per-call server, each handler blocked on an Event; `asyncio`: grpc.aio handlers awaiting a
future that the batch thread resolves with call_soon_threadsafe (the server's design). Each server runs in a
process of its own; an asyncio client keeps 64 calls in flight for 8 s. Prints calls/s and the server
process's CPU per call.
"""

from __future__ import annotations

import asyncio
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from service.api.translator.v1 import translator_pb2 as pb  # noqa: E402
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc  # noqa: E402

BATCH_S = 0.004
BATCH_SIZE = 16
CLIENTS = 64
SECONDS = 8.0


def batch_threads(answer: object) -> queue.SimpleQueue:
    """Two threads that answer queued calls in batches; `answer(item)` answers one."""
    waiting: queue.SimpleQueue = queue.SimpleQueue()

    def work() -> None:
        while True:
            items = [waiting.get()]
            while len(items) < BATCH_SIZE:
                try:
                    items.append(waiting.get_nowait())
                except queue.Empty:
                    break
            time.sleep(BATCH_S)
            for item in items:
                answer(item)  # type: ignore[operator]

    for _ in range(2):
        threading.Thread(target=work, daemon=True).start()
    return waiting


def serve_threads(port: int) -> None:
    def answer(item: tuple[threading.Event, list]) -> None:
        done, box = item
        box.append(pb.TranslateResponse())
        done.set()

    waiting = batch_threads(answer)

    class Servicer(pb_grpc.TranslatorServicer):
        def Translate(
            self, request: pb.TranslateRequest, context: grpc.ServicerContext
        ) -> pb.TranslateResponse:
            done, box = threading.Event(), []
            waiting.put((done, box))
            done.wait()
            return box[0]

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=CLIENTS + 8))
    pb_grpc.add_TranslatorServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def serve_asyncio(port: int) -> None:
    def answer(item: tuple[asyncio.AbstractEventLoop, asyncio.Future]) -> None:
        loop, future = item
        loop.call_soon_threadsafe(future.set_result, pb.TranslateResponse())

    waiting = batch_threads(answer)

    class Servicer(pb_grpc.TranslatorServicer):
        async def Translate(  # type: ignore[override]
            self, request: pb.TranslateRequest, context: grpc.aio.ServicerContext
        ) -> pb.TranslateResponse:
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            waiting.put((loop, future))
            return await future

    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_TranslatorServicer_to_server(Servicer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(port: int, pid: int) -> tuple[float, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TranslatorStub(channel)
        await stub.Translate(pb.TranslateRequest(texts=["warm"]), wait_for_ready=True, timeout=30)
        calls = 0
        stop_at = time.monotonic() + SECONDS

        async def client() -> None:
            nonlocal calls
            while time.monotonic() < stop_at:
                await stub.Translate(pb.TranslateRequest(texts=["the big red dog sees her"]))
                calls += 1

        cpu_before, started = cpu_seconds(pid), time.monotonic()
        await asyncio.gather(*[client() for _ in range(CLIENTS)])
        elapsed = time.monotonic() - started
        return calls / elapsed, (cpu_seconds(pid) - cpu_before) / calls * 1000


def main() -> None:
    if len(sys.argv) == 3:  # a server process
        {"threads": serve_threads, "asyncio": serve_asyncio}[sys.argv[1]](int(sys.argv[2]))
        return
    print(f"{'server':<10} {'calls/s':>9} {'server CPU ms/call':>19}")
    for round_ in range(2):
        for kind, port in (("threads", 50311 + round_), ("asyncio", 50321 + round_)):
            process = subprocess.Popen([sys.executable, __file__, kind, str(port)])
            try:
                rate, cpu_ms = asyncio.run(drive(port, process.pid))
            finally:
                process.kill()
                process.wait()
            print(f"{kind:<10} {rate:>9.0f} {cpu_ms:>19.3f}")


if __name__ == "__main__":
    main()
