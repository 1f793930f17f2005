"""Closed-loop clients against a running server: latency per status code.

python docs/experiments/refusal_latency.py HOST:PORT CONCURRENCY SECONDS CHANNELS [BACKOFF_S]
(a refused client waits BACKOFF_S before its next call).
"""

import asyncio
import random
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from service.api.translator.v1 import translator_pb2 as pb  # noqa: E402
from service.api.translator.v1 import translator_pb2_grpc as rpc  # noqa: E402

addr, conc, dur, nch = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
backoff = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
sents = (Path(__file__).resolve().parents[2] / "bench/data/test_sentences.txt").read_text().splitlines()
lat = {}


async def worker(stub, stop):
    while time.monotonic() < stop:
        req = pb.TranslateRequest(texts=[random.choice(sents)])
        t = time.perf_counter()
        try:
            await stub.Translate(req, timeout=30)
            code = "OK"
        except grpc.aio.AioRpcError as e:
            code = e.code().name
        lat.setdefault(code, []).append((time.perf_counter() - t) * 1000)
        if code != "OK" and backoff:
            await asyncio.sleep(backoff)


async def main():
    chans = [grpc.aio.insecure_channel(addr) for _ in range(nch)]
    stubs = [rpc.TranslatorStub(c) for c in chans]
    stop = time.monotonic() + dur
    await asyncio.gather(*(worker(stubs[i % nch], stop) for i in range(conc)))
    for code, v in sorted(lat.items()):
        v.sort()
        n = len(v)
        print(
            f"{code:20s} n={n:6d} p50={v[n // 2]:8.1f} p99={v[min(n - 1, int(n * 0.99))]:8.1f} "
            f"max={v[-1]:8.1f} ms"
        )


asyncio.run(main())
