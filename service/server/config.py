"""Server settings: one dataclass, each field a `--flag` and a `TRANSLATOR_*` environment variable.

A flag given on the command line wins over the environment variable, which wins over the default.

The parser is derived from the dataclass so a setting, its default and its help text live in one place, and
`translator-serve --help` always documents what the code does.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from service.core.model_format import FLOAT32, PRECISIONS, STEP_GRAPHS
from service.server.event_loop import EVENT_LOOPS

ROOT = Path(__file__).resolve().parents[2]
ENV_PREFIX = "TRANSLATOR_"
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Calls gRPC admits beyond --max-concurrent-rpcs when --grpc-max-calls is not given: health checks, metadata
# and the refusals of excess translation calls are answered while every translation slot is busy.
RESERVED_GRPC_CALLS = 256
# gRPC channel arguments are C ints.
INT32_MAX = 2**31 - 1


class ConfigError(ValueError):
    """A setting out of range; the message names the flag and the value."""


def _optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("", "none", "newest", "auto") else int(text)


def _optional_text(text: str) -> str | None:
    return text if text.strip() else None


def _optional_path(text: str) -> Path | None:
    return Path(text) if text.strip() else None


def _setting(
    default: Any,
    help: str,
    type: Callable[[str], Any],
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
    shown: str | None = None,
    secret: bool = False,
) -> Any:
    """A field with what the parser needs; `shown` is the default as --help tells it (when not the value);
    a `secret` setting is never logged."""
    shown = shown if shown is not None else ("unset" if default is None else str(default))
    metadata = {
        "help": help,
        "type": type,
        "choices": choices,
        "metavar": metavar,
        "shown": shown,
        "secret": secret,
    }
    return field(default=default, metadata=metadata, repr=not secret)


@dataclass(frozen=True)
class ServerConfig:
    # Network.
    host: str = _setting("0.0.0.0", "address the gRPC server binds", str)
    port: int = _setting(8001, "gRPC port (Triton's convention); 0 picks a free port", int)
    http_port: int = _setting(
        8000,
        "KServe v2 REST port (HTTP/JSON, Triton's convention); 0 picks a free port, -1 disables it",
        int,
    )
    metrics_port: int = _setting(
        8002, "Prometheus /metrics HTTP port; 0 picks a free port, -1 disables it", int
    )
    max_concurrent_rpcs: int = _setting(
        256,
        "most translation calls (Translate, TranslateStream, ModelInfer) handled at once (their texts in the "
        "batcher); one more gets RESOURCE_EXHAUSTED at once",
        int,
    )
    grpc_max_calls: int | None = _setting(
        None,
        "calls of every method gRPC admits at once (beyond them it answers RESOURCE_EXHAUSTED itself); must "
        "exceed --max-concurrent-rpcs: the calls beyond the translation calls are health checks, metadata "
        "and the refusals of excess translation calls",
        _optional_int,
        metavar="N",
        shown=f"--max-concurrent-rpcs + {RESERVED_GRPC_CALLS}",
    )
    max_message_bytes: int = _setting(
        64 * 1024 * 1024,
        "largest gRPC message the server sends, in bytes (attention maps make answers large)",
        int,
    )
    max_receive_message_bytes: int = _setting(
        4 * 1024 * 1024,
        "largest gRPC message the server accepts, in bytes; a larger request gets RESOURCE_EXHAUSTED",
        int,
    )
    write_timeout_s: float = _setting(
        30.0,
        "how long one message of a stream may wait for its client to read it; past it the call ends and its "
        "slot is freed (the client, if it reads again, gets DEADLINE_EXCEEDED)",
        float,
    )
    max_unread_bytes: int = _setting(
        512 * 1024 * 1024,
        "most bytes of stream messages held for clients that have not read them yet; a large message beyond "
        "it gets RESOURCE_EXHAUSTED instead of more memory",
        int,
    )
    tls_cert: Path | None = _setting(
        None, "PEM server certificate chain; enables TLS (with --tls-key)", _optional_path, metavar="PATH"
    )
    tls_key: Path | None = _setting(None, "PEM private key of --tls-cert", _optional_path, metavar="PATH")
    tls_client_ca: Path | None = _setting(
        None,
        "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)",
        _optional_path,
        metavar="PATH",
    )
    auth_tokens_file: Path | None = _setting(
        None,
        "file of bearer tokens, one a line: translator.v1 and KServe calls must then carry `authorization: "
        "Bearer <token>` (health and reflection stay open)",
        _optional_path,
        metavar="PATH",
    )
    auth_tokens: str | None = _setting(
        None,
        "bearer tokens separated by commas, as --auth-tokens-file (prefer the variable or the file: a flag "
        "shows in the process list)",
        _optional_text,
        metavar="TOKENS",
        shown="unset",
        secret=True,
    )
    # Traces.
    otlp_endpoint: str | None = _setting(
        None,
        "OpenTelemetry traces of every call, sent over OTLP/HTTP to this URL (e.g. "
        "http://collector:4318/v1/traces); unset: no tracing at all",
        _optional_text,
        metavar="URL",
    )
    trace_sample_rate: float = _setting(
        1.0, "fraction of calls traced when the caller's trace context does not decide it", float
    )
    # Model.
    model_repository: Path = _setting(
        ROOT / "model_repository",
        "model repository folder (<repository>/<model>/<version>/)",
        Path,
        metavar="PATH",
    )
    model: str = _setting("toy-en-es", "model name: its folder in the repository", str)
    model_version: int | None = _setting(
        None, "model version folder to serve", _optional_int, metavar="N", shown="the newest"
    )
    device: str = _setting(
        "auto", "where onnxruntime runs the model: auto takes CUDA when available", str, choices=DEVICES
    )
    precision: str = _setting(
        FLOAT32,
        "which of the model's graphs to serve: float32, int8 (int8 weights: faster on CPU, quality in "
        "docs/PERFORMANCE.md) or float16 (for GPUs); the model version must offer it (translator-export "
        "writes all three)",
        str,
        choices=PRECISIONS,
    )
    step_graph: str = _setting(
        "dynamic",
        "the decoder step: dynamic (caches grown each step: fastest on CPU) or fixed (caches of a fixed size "
        "written in place, every shape fixed for a batch: what a GPU's captured CUDA graphs need, and "
        "captured there; docs/decisions/fixed-step.md)",
        str,
        choices=STEP_GRAPHS,
    )
    threads: int | None = _setting(
        None,
        "engine threads (on CPU each runs one decoding lane)",
        _optional_int,
        metavar="N",
        shown="one per core",
    )
    lanes: int | None = _setting(
        None,
        "parallel decoding lanes a batch is split over (CPU: --threads is shared among them; GPU: their "
        "kernel launches overlap)",
        _optional_int,
        metavar="N",
        shown="one per thread on CPU, 1 on GPU",
    )
    lane_processes: str = _setting(
        "on",
        "on: each decoding lane runs in a process of its own, so that its search never waits for the "
        "server's interpreter lock (docs/LOAD.md); off: lanes are threads of the server",
        str,
        choices=("on", "off"),
    )
    event_loop: str = _setting(
        "auto",
        "the gRPC server's asyncio event loop: uvloop (less server CPU per call: docs/LOAD.md), asyncio (the "
        "standard library's), or auto (uvloop where installed)",
        str,
        choices=EVENT_LOOPS,
    )
    # Dynamic batching.
    iteration_batching: str = _setting(
        "off",
        "on: greedy requests without attention maps join a running batch between decoding steps; off: a "
        "batch runs to its end before its worker starts the next (measured faster on CPU: docs/LOAD.md)",
        str,
        choices=("on", "off"),
    )
    batch_workers: int | None = _setting(
        None,
        "batches run at the same time (each on its share of the lanes)",
        _optional_int,
        metavar="N",
        shown="one per lane on CPU, 1 on GPU",
    )
    max_batch_size: int = _setting(64, "most sentences computed together in one batch", int)
    max_batch_tokens: int = _setting(
        4096, "most padded source tokens (sentences x longest) in one batch; 0: no token limit", int
    )
    max_queue_delay_ms: float = _setting(
        5.0,
        "longest wait, from the oldest queued sentence's arrival, for more sentences before a batch starts",
        float,
    )
    max_queue_size: int = _setting(
        1024,
        "most sentences waiting in the queue; a request that does not fit "
        "fails at once with RESOURCE_EXHAUSTED",
        int,
    )
    quality_sample_rate: float = _setting(
        0.1,
        "fraction of attention-free batches that also compute "
        "cross-attention, only to observe its entropy metric",
        float,
    )
    # Request limits.
    max_texts_per_request: int = _setting(128, "most texts in one request", int)
    max_tokens_per_text: int = _setting(256, "most source tokens in one text (</s> not counted)", int)
    max_beam_size: int = _setting(8, "largest accepted beam size", int)
    default_beam_size: int = _setting(1, "beam size of requests that leave it unset (1: greedy)", int)
    max_length_limit: int = _setting(
        256, "largest accepted max_length (decoding steps); also caps the automatic 2 x source + 10", int
    )
    # Lifecycle.
    grace_period_s: float = _setting(30.0, "on SIGTERM/SIGINT, how long in-flight calls may still run", float)
    log_level: str = _setting("INFO", "logging level", str.upper, choices=LOG_LEVELS)

    @property
    def grpc_call_limit(self) -> int:
        """--grpc-max-calls, or --max-concurrent-rpcs plus the reserve when it is not given."""
        if self.grpc_max_calls is not None:
            return self.grpc_max_calls
        return self.max_concurrent_rpcs + RESERVED_GRPC_CALLS

    def validate(self) -> None:
        """Raise ConfigError naming the first setting out of range."""

        def need(condition: bool, name: str, rule: str) -> None:
            if not condition:
                raise ConfigError(f"--{name.replace('_', '-')} {rule}, got {getattr(self, name)!r}")

        # Every numeric setting has both bounds: an absurd value fails here, naming its flag, instead of
        # overflowing somewhere at run time (a huge queue delay overflowed the batcher's timed waits).
        for name, (low, high) in NUMERIC_BOUNDS.items():
            value = getattr(self, name)
            if value is None:
                continue
            need(
                (isinstance(value, int) or math.isfinite(value)) and low <= value <= high,
                name,
                f"must be between {low} and {high}",
            )
        need(
            self.grpc_max_calls is None or self.grpc_max_calls > self.max_concurrent_rpcs,
            "grpc_max_calls",
            f"must exceed --max-concurrent-rpcs ({self.max_concurrent_rpcs}): health checks need room "
            "while every translation call waits",
        )
        need(
            1 <= self.default_beam_size <= self.max_beam_size,
            "default_beam_size",
            f"must be between 1 and --max-beam-size ({self.max_beam_size})",
        )
        # A request bigger than the whole queue could never be accepted.
        need(
            self.max_texts_per_request <= self.max_queue_size,
            "max_texts_per_request",
            f"must not exceed --max-queue-size ({self.max_queue_size})",
        )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")

    def as_log_fields(self) -> dict[str, Any]:
        def shown(name: str, value: Any, secret: bool) -> Any:
            if secret and value is not None:
                return "(set)"
            return str(value) if isinstance(value, Path) else value

        return {f.name: shown(f.name, getattr(self, f.name), f.metadata["secret"]) for f in fields(self)}

    def bearer_tokens(self) -> tuple[bytes, ...]:
        """The tokens calls must carry (none: no check), from --auth-tokens and --auth-tokens-file; a file
        that cannot be read, or settings that name no token, raise ValueError naming the cause."""
        tokens = [t.strip() for t in (self.auth_tokens or "").split(",") if t.strip()]
        if self.auth_tokens is not None and not tokens:
            raise ValueError("--auth-tokens is set but names no token: unset it, or give tokens")
        if self.auth_tokens_file is not None:
            try:
                lines = self.auth_tokens_file.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as error:
                cause = f"--auth-tokens-file {self.auth_tokens_file}: cannot read it ({error})"
                raise ValueError(cause) from None
            tokens += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not tokens:
                raise ValueError(f"--auth-tokens-file {self.auth_tokens_file} holds no token")
        # gRPC metadata values are printable ASCII: a token of other characters could never be sent.
        if any(not (token.isascii() and token.isprintable() and " " not in token) for token in tokens):
            raise ValueError("a bearer token must be printable ASCII without spaces")
        return tuple(token.encode() for token in tokens)


# (lowest, highest) accepted value of every numeric setting (None, where allowed, means "unset").
NUMERIC_BOUNDS: dict[str, tuple[float, float]] = {
    "port": (0, 65535),
    "metrics_port": (-1, 65535),
    "http_port": (-1, 65535),
    "max_concurrent_rpcs": (1, 100_000),
    "grpc_max_calls": (2, 100_000),
    "max_message_bytes": (1, INT32_MAX),
    "max_receive_message_bytes": (1, INT32_MAX),
    "write_timeout_s": (0.001, 86_400),
    "trace_sample_rate": (0.0, 1.0),
    "max_unread_bytes": (1, 2**48),
    "model_version": (0, 2**63 - 1),
    "threads": (1, 4096),
    "lanes": (1, 4096),
    "batch_workers": (1, 4096),
    "max_batch_size": (1, 1_000_000),
    "max_batch_tokens": (0, 1_000_000_000),
    "max_queue_delay_ms": (0, 60_000),  # a minute: beyond that no client waits for its batch
    "max_queue_size": (1, 100_000_000),
    "quality_sample_rate": (0, 1),
    "max_texts_per_request": (1, 1_000_000),
    "max_tokens_per_text": (1, 1_000_000),
    "max_beam_size": (1, 1024),
    "default_beam_size": (1, 1024),
    # service.server.requests.MAX_LENGTH_PENALTY keeps steps ** length_penalty finite up to 1000 steps.
    "max_length_limit": (1, 1000),
    "grace_period_s": (0, 86_400),
}


def env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="translator-serve",
        description="Serve a translator model over gRPC: translator.v1.Translator, KServe v2 "
        "inference.GRPCInferenceService, grpc.health.v1 and server reflection on one port, "
        "Prometheus metrics on another.",
        epilog=f"Every flag can also be set by an environment variable {ENV_PREFIX}<FLAG> (upper case, "
        f"'-' as '_', e.g. {env_name('max_batch_size')}); a flag given on the command line wins.",
    )
    for setting in fields(ServerConfig):
        meta = setting.metadata
        parser.add_argument(
            f"--{setting.name.replace('_', '-')}",
            dest=setting.name,
            type=meta["type"],
            choices=meta["choices"],
            metavar=meta["metavar"],
            default=None,
            help=f"{meta['help']} (default: {meta['shown']}; env {env_name(setting.name)})",
        )
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Settings from the command line, then the environment, then the defaults; exits with usage on errors."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for setting in fields(ServerConfig):
        given = getattr(args, setting.name)
        if given is not None:
            values[setting.name] = given
            continue
        raw = environ.get(env_name(setting.name))
        if raw is None or raw == "":
            continue
        meta = setting.metadata
        try:
            value = meta["type"](raw)
        except ValueError:
            flag = setting.name.replace("_", "-")
            parser.error(f"{env_name(setting.name)}={raw!r} is not a valid value for --{flag}")
        if meta["choices"] is not None and value not in meta["choices"]:
            parser.error(f"{env_name(setting.name)}={raw!r}: choose from {', '.join(meta['choices'])}")
        values[setting.name] = value
    config = ServerConfig(**values)
    try:
        config.validate()
    except ConfigError as error:
        parser.error(str(error))
    return config
