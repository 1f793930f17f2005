"""`translator-serve`: the gRPC server process.

One port serves translator.v1.Translator, KServe v2 inference.GRPCInferenceService, grpc.health.v1 and server
reflection; Prometheus metrics have their own HTTP port. Lifecycle:

1. bind the ports with health NOT_SERVING (orchestrators can probe while the model loads);
2. load the model and run real translations through the batcher (warm-up), then health SERVING;
3. on SIGTERM/SIGINT: health NOT_SERVING, stop accepting calls (new ones get UNAVAILABLE), let the in-flight
   ones finish within --grace-period-s (those still unfinished just before its end get UNAVAILABLE), exit 0.
   A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from prometheus_client import disable_created_metrics

from service.api.inference import grpc_service_pb2_grpc
from service.api.translator.v1 import translator_pb2_grpc
from service.core.model_format import ModelLoadError, resolve
from service.core.options import ATTENTION_KINDS, TranslateOptions
from service.engine.engine import Engine
from service.scheduler.batcher import Batcher, BatchingSettings
from service.scheduler.job import Job
from service.scheduler.metrics import ServerMetrics
from service.scheduler.status import RequestFailed
from service.server import kserve, tracing, translator_api
from service.server.config import ServerConfig, load_config
from service.server.event_loop import new_event_loop
from service.server.health import HealthService
from service.server.kserve_rest import RestEndpoint
from service.server.logs import configure_logging
from service.server.metrics_http import MetricsEndpoint
from service.server.middleware import Registrar, add_reflection
from service.server.requests import Limits
from service.server.runtime import Runtime
from service.server.tls import http_ssl_context, server_credentials, server_credentials_configured

log = logging.getLogger("translator.server")

SERVICE_NAMES = (translator_api.SERVICE_NAME, kserve.SERVICE_NAME)


def _fields(**fields: Any) -> dict[str, Any]:
    return {"fields": fields}


class TranslatorServer:
    """The server of one process (or of one test): `start()`, `load()`, then `stop(grace)`.

    `engine` lets a caller serve an engine it built (tests wrap its backend); by default `load()` builds it
    from the configured repository.
    """

    def __init__(self, config: ServerConfig, engine: Engine | None = None, seed: int | None = None) -> None:
        config.validate()
        self.config = config
        self.metrics = ServerMetrics()
        self.runtime = Runtime(config, self.metrics)
        self.health = HealthService(lambda: self.runtime.readiness, SERVICE_NAMES)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._engine = engine
        self._seed = seed
        self._tokens: tuple[bytes, ...] = ()
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._rest_endpoint: RestEndpoint | None = None
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        """Bind and start serving: health and metadata answer at once, inference once `load()` is done.

        The gRPC server is asyncio's (grpc.aio), on an event loop of its own thread (uvloop's by default,
        --event-loop): a call is a coroutine (a translation call waits for its job without holding a thread),
        which costs the server process less CPU per call than gRPC's thread-per-call server
        (docs/experiments/server_cost.py).
        """
        self._tokens = self.config.bearer_tokens()  # an unreadable token file fails before any port is bound
        if self.config.otlp_endpoint is not None:
            tracing.enable(self.config.otlp_endpoint, sample_rate=self.config.trace_sample_rate)
        loop = new_event_loop(self.config.event_loop)
        self._loop = loop
        self._loop_thread = threading.Thread(target=loop.run_forever, name="grpc-loop", daemon=True)
        self._loop_thread.start()
        try:
            self._on_loop(self._start_server())
        except BaseException:
            self._close_loop()
            raise
        if self.config.metrics_port >= 0:
            self._metrics_endpoint = MetricsEndpoint(self.metrics.registry, http_ssl_context(self.config))
            self.metrics_port = self._on_loop(
                self._metrics_endpoint.start(self.config.host, self.config.metrics_port)
            )
        if self.config.http_port >= 0:
            self._rest_endpoint = RestEndpoint(
                kserve.InferenceService(self.runtime),
                self._tokens,
                self.config.max_receive_message_bytes,
                http_ssl_context(self.config),
            )
            self.http_port = self._on_loop(self._rest_endpoint.start(self.config.host, self.config.http_port))
        log.info(
            "listening",
            extra=_fields(
                port=self.port,
                http_port=self.http_port,
                metrics_port=self.metrics_port,
                host=self.config.host,
                tls=server_credentials_configured(self.config),
                mutual_tls=self.config.tls_client_ca is not None,
                bearer_tokens=len(self._tokens),
            ),
        )

    def _on_loop(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Run a coroutine on the server's event loop and wait for its result (from any other thread)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _close_loop(self) -> None:
        """Cancel what still runs on the loop (after the server stopped: nothing that can still answer),
        finish its async generators and worker threads, then stop and close it."""
        loop, thread = self._loop, self._loop_thread
        if loop is None or thread is None:
            return

        async def drain() -> None:
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await loop.shutdown_asyncgens()
            await loop.shutdown_default_executor()

        try:
            asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout=10.0)
        except Exception:
            log.exception("closing the server's event loop")
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            self._loop = self._loop_thread = None

    async def _start_server(self) -> None:
        config = self.config
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_receive_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),
                # A client process that stops answering altogether (suspended, its host gone) is found by
                # pings and its connection closed: what gRPC held for it is freed. A frozen reader that is
                # alive answers pings: --write-timeout-s and --max-unread-bytes bound those.
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
            ],
            # Translation calls beyond --max-concurrent-rpcs are refused by the handlers (Runtime.
            # translation_slot), which keeps health checks answered. This is gRPC's own backstop (it counts
            # every call, health included): calls in flight stay bounded.
            maximum_concurrent_rpcs=config.grpc_call_limit,
        )
        # Translation and KServe calls need a bearer token when tokens are configured; health (gRPC's and
        # KServe's probes) and reflection stay open, as orchestrators and tools probe them.
        probes = frozenset(f"/{kserve.SERVICE_NAME}/{name}" for name in kserve.PROBE_METHODS)
        ours, theirs = Registrar(server, self.metrics, self._tokens, probes), Registrar(server, None)
        translator_pb2_grpc.add_TranslatorServicer_to_server(
            translator_api.TranslatorService(self.runtime), ours
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            kserve.InferenceService(self.runtime), ours
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, theirs)  # NOT_SERVING until loaded
        add_reflection(theirs, SERVICE_NAMES)  # type: ignore[arg-type]
        ours.flush()
        theirs.flush()
        host = f"[{config.host}]" if ":" in config.host and not config.host.startswith("[") else config.host
        address = f"{host}:{config.port}"
        credentials = server_credentials(config)
        self.port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
        await server.start()
        self._server = server

    def load(self) -> None:
        """Load and warm up the model, then report SERVING."""
        config = self.config
        started = time.monotonic()
        engine = self._engine or Engine(
            resolve(config.model_repository, config.model, config.model_version, precision=config.precision),
            device=config.device,
            threads=config.threads,
            max_length_limit=config.max_length_limit,
            lanes=config.lanes,
            lane_processes=config.lane_processes == "on",
            step_graph=config.step_graph,
        )
        limits = self._limits(engine)
        settings = BatchingSettings(
            max_batch_size=config.max_batch_size,
            max_batch_tokens=config.max_batch_tokens,
            max_queue_delay_s=config.max_queue_delay_ms / 1000,
            max_queue_size=config.max_queue_size,
            quality_sample_rate=config.quality_sample_rate,
            workers=config.batch_workers or engine.lanes,
            iteration_batching=config.iteration_batching == "on",
        )
        batcher = Batcher(engine, settings, self.metrics, seed=self._seed)
        batcher.start()
        self.runtime.engine, self.runtime.batcher, self.runtime.limits = engine, batcher, limits
        model = engine.model
        log.info(
            "model loaded",
            extra=_fields(
                model=model.name,
                version=model.version,
                path=str(model.path),
                provider=engine.provider,
                precision=model.precision,
                step_graph=engine.step_graph,
                lanes=engine.lanes,
                batch_workers=settings.workers,
                load_s=round(time.monotonic() - started, 3),
                limits=limits.__dict__,
            ),
        )
        warm_up_ms = self._warm_up(engine, batcher)
        self.metrics.model_info.labels(
            model=model.name, version=str(model.version), provider=engine.provider, precision=model.precision
        ).set(1)
        if not self.runtime.become_ready():  # stop() began while it loaded: it stays draining
            return
        self._on_loop(self.health.changed())
        log.info(
            "ready",
            extra=_fields(
                model=model.name,
                version=model.version,
                provider=engine.provider,
                port=self.port,
                metrics_port=self.metrics_port,
                warm_up_ms=warm_up_ms,
            ),
        )

    def _limits(self, engine: Engine) -> Limits:
        """The configured limits, lowered where the model's positions cannot follow."""
        config = self.config
        positions = engine.model.max_positions
        max_tokens = config.max_tokens_per_text
        if positions is not None and max_tokens + 1 > positions:  # the source gets </s> appended
            log.warning(
                "max_tokens_per_text lowered to the model's positions",
                extra=_fields(configured=max_tokens, used=positions - 1),
            )
            max_tokens = positions - 1
        max_length = engine.max_length_limit  # the engine caps it by the model's positions
        if max_length < config.max_length_limit:
            log.warning(
                "max_length_limit lowered to the model's positions",
                extra=_fields(configured=config.max_length_limit, used=max_length),
            )
        return Limits(
            max_texts_per_request=config.max_texts_per_request,
            max_tokens_per_text=max_tokens,
            max_beam_size=config.max_beam_size,
            max_length=max_length,
            default_beam_size=config.default_beam_size,
        )

    def _warm_up(self, engine: Engine, batcher: Batcher) -> float:
        """Real translations through the whole path, plain and with every attention output, before SERVING."""
        started = time.monotonic()
        words = [engine.vocabulary.id_to_token(i) for i in range(4, min(engine.vocabulary.size, 8))]
        sources = engine.encode_texts([" ".join(words) or "hello"])
        length = min(4, engine.max_length_limit)
        served = batcher.metrics
        batcher.metrics = ServerMetrics()  # throwaway: the warm-up is no traffic for the served metrics
        try:
            for options in (
                TranslateOptions(max_length=length),
                TranslateOptions(max_length=length, attention=frozenset(ATTENTION_KINDS)),
            ):
                try:
                    batcher.run(Job(sources, options, urgent=True))
                except RequestFailed as failure:
                    raise RuntimeError(
                        f"the warm-up translation failed: {failure.code.name}: {failure.message}"
                    ) from None
            batcher.wait_idle()  # the batch metrics (outcome() did the per-text ones)
        finally:
            batcher.metrics = served
        return round((time.monotonic() - started) * 1000, 1)

    def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new calls, finish in-flight ones within `grace` seconds."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.grace_period_s if grace is None else grace
        started = time.monotonic()
        log.info(
            "shutting down",
            extra=_fields(
                grace_period_s=grace, queued=self.runtime.batcher.depth if self.runtime.batcher else 0
            ),
        )
        self.runtime.begin_draining()
        if self._loop is not None:
            self._on_loop(self.health.changed())  # open watches send NOT_SERVING and end
        # gRPC refuses new calls from now on and cancels whatever still runs when the grace period ends. The
        # batcher closes a little before that: it finishes the queued and running work until then and fails
        # the rest with UNAVAILABLE (dropped as "shutdown"), so no in-flight call is merely cancelled.
        stopped = (
            asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop)
            if self._server is not None and self._loop is not None
            else None
        )
        try:
            if self.runtime.batcher is not None:
                self.runtime.batcher.close(timeout=max(grace - min(1.0, grace / 4), 0.0))
            if stopped is not None:
                stopped.result()
        finally:
            if self._loop is not None:
                for endpoint in (self._rest_endpoint, self._metrics_endpoint):
                    if endpoint is not None:
                        self._on_loop(endpoint.stop())
            self._close_loop()
            if self.runtime.engine is not None and self._engine is None:  # an engine it was given stays open
                self.runtime.engine.close()
            if self.config.otlp_endpoint is not None:
                tracing.disable()  # spans still waiting are sent first
        log.info("stopped", extra=_fields(shutdown_s=round(time.monotonic() - started, 3)))


def main(argv: Sequence[str] | None = None) -> int:
    config = load_config(argv)
    configure_logging(config.log_level)
    disable_created_metrics()  # `*_created` series double the scrape size and no dashboard reads them
    log.info("starting", extra=_fields(pid=os.getpid(), settings=config.as_log_fields()))
    server = TranslatorServer(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set():
            log.warning("second signal: exiting without waiting", extra=_fields(signal=signum))
            os._exit(1)
        log.info("signal received", extra=_fields(signal=signal.Signals(signum).name))
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
        server.load()
    except (ModelLoadError, OSError, RuntimeError, ValueError) as error:
        log.error("cannot serve", extra=_fields(error=str(error)))
        server.stop(0)
        return 1
    while not stop.wait(1.0):
        pass
    server.stop(config.grace_period_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
