"""The baseline a user could write instead of running our service: CTranslate2 behind grpc.aio with a small
micro-batcher, answering translator.v1 `Translate` (texts and target tokens) and grpc.health.v1.

It is deliberately minimal (what `translator-bench load --baseline` compares against, not a tuned
competitor): one batch at a time, up to --max-batch-size texts or --max-delay-ms of waiting, greedy search,
the same weights converted from the same checkpoint and the same length rule, so its outputs equal ours
(the load benchmark checks that before timing). It logs `listening` and `ready` as JSON lines, as
translate-serve does, so the benchmark's harness starts it the same way.

    python -m bench.ctranslate2_server --port 0 [--compute-type int8] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.ctranslate2_convert import source_tokens
from bench.engine import ct2_greedy, load_translator, max_length_for
from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.core.vocabulary import Vocabulary


def log(message: str, **fields: Any) -> None:
    print(json.dumps({"time": time.time(), "message": message, **fields}), flush=True)


class MicroBatcher:
    """Requests' texts wait up to `delay_s` for others, up to `max_batch` texts; one batch runs at a time."""

    def __init__(self, translator: Any, vocabulary: Vocabulary, max_positions: int, max_batch: int,
                 delay_s: float, workers: int) -> None:  # fmt: skip
        self.translator, self.vocabulary, self.max_positions = translator, vocabulary, max_positions
        self.workers = workers
        self.max_batch, self.delay_s = max_batch, delay_s
        # One thread calls CTranslate2: each calling thread gets its own OpenMP team, and teams of a pool's
        # changing threads spin against each other (measured: 4x fewer requests/s with asyncio.to_thread).
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ct2")
        self.queue: asyncio.Queue[tuple[list[int], asyncio.Future[list[str]]]] = asyncio.Queue()

    async def translate(self, text: str) -> pb.Translation:
        source = self.vocabulary.encode_source(text)
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        await self.queue.put((source.ids, future))
        tokens = await future
        # The model's text rules (case, names, numbers, marks) apply to its answers whatever runs it.
        ids = [self.vocabulary.tokenizer.token_to_id(token) for token in tokens]
        return pb.Translation(text=self.vocabulary.decode(ids, source), target_tokens=tokens)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.delay_s
            while len(batch) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            sources = [ids for ids, _ in batch]
            try:
                results = await loop.run_in_executor(self.executor, self._translate, sources)
            except Exception as error:  # every caller of the batch gets it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), tokens in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(tokens)

    def _translate(self, sources: list[list[int]]) -> list[list[str]]:
        tokens = [source_tokens(self.vocabulary, ids) for ids in sources]
        caps = [max_length_for(ids, self.max_positions) for ids in sources]
        return ct2_greedy(self.translator, tokens, caps, self.workers)


class Translator(pb_grpc.TranslatorServicer):
    def __init__(self, batcher: MicroBatcher) -> None:
        self.batcher = batcher

    async def Translate(self, request: pb.TranslateRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.TranslateResponse(
            translations=await asyncio.gather(*(self.batcher.translate(text) for text in request.texts))
        )


async def serve(args: argparse.Namespace) -> None:
    from model.checkpoint import DEFAULT_CHECKPOINT

    checkpoint = Path(args.checkpoint or DEFAULT_CHECKPOINT)
    vocabulary = Vocabulary.from_file(checkpoint / "tokenizer.json")
    ct2_dir = Path(args.ct2_dir) if args.ct2_dir else Path(tempfile.mkdtemp(prefix="ct2-baseline-")) / "model"
    if not (ct2_dir / "model.bin").exists():
        from bench.ctranslate2_convert import convert_to_ctranslate2

        convert_to_ctranslate2(checkpoint, ct2_dir)  # float32; int8 is CTranslate2's quantization at load
    max_positions = json.loads((checkpoint / "config.json").read_text())["model"]["max_positions"]
    translator = load_translator(ct2_dir, args.threads, args.compute_type, args.workers)
    delay_s = args.max_delay_ms / 1000
    batcher = MicroBatcher(translator, vocabulary, max_positions, args.max_batch_size, delay_s, args.workers)
    server = grpc.aio.server()
    pb_grpc.add_TranslatorServicer_to_server(Translator(batcher), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    runner = asyncio.create_task(batcher.run())
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log("listening", port=port, metrics_port=None, compute_type=args.compute_type)
    log("ready")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)
    runner.cancel()
    log("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--checkpoint", help="translator-train checkpoint (default: the shipped one)")
    parser.add_argument("--ct2-dir", default=None, help="a converted model to reuse (default: convert now)")
    parser.add_argument("--compute-type", default="float32", choices=["float32", "int8"])
    # CTranslate2's advice for serving on CPU: parallel workers (inter_threads), each single-threaded.
    parser.add_argument("--threads", type=int, default=1, help="threads per worker (intra_threads)")
    parser.add_argument("--workers", type=int, default=2, help="CTranslate2 workers (inter_threads)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    # What the load benchmark's harness passes to every server it starts: accepted, not used.
    ignored_flags = ("--metrics-port", "--http-port", "--model-repository", "--model", "--device",
                     "--log-level", "--max-concurrent-rpcs")  # fmt: skip
    for ignored in ignored_flags:
        parser.add_argument(ignored, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
