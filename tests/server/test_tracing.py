"""Traces: a call's span continues the caller's W3C trace context (gRPC metadata, HTTP headers) and a
translation call's span has its stages as children, checked with an in-memory exporter on a real server."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from service.api.translator.v1 import translator_pb2 as pb
from service.server import tracing
from service.server.app import TranslatorServer
from tests.support.server import HOST, Client, make_config, running
from tests.support.waiting import wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def traced(tiny_repository: Path) -> Iterator[tuple[TranslatorServer, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tracing.enable(exporter=exporter)
    try:
        with running(make_config(tiny_repository)) as server:
            yield server, exporter
    finally:
        tracing.disable()


Spans = tuple[ReadableSpan, list[ReadableSpan]]
Traced = tuple[TranslatorServer, InMemorySpanExporter]


def spans_of(exporter: InMemorySpanExporter, name: str, count: int) -> Spans:
    """The one server span called `name` and its children, once `count` children have ended."""

    def found() -> Spans | None:
        spans = exporter.get_finished_spans()
        servers = [s for s in spans if s.name == name and s.kind == SpanKind.SERVER]
        if len(servers) != 1:
            return None
        server_id = servers[0].context.span_id
        children = [s for s in spans if s.parent is not None and s.parent.span_id == server_id]
        return (servers[0], children) if len(children) >= count else None

    wait_for(lambda: found() is not None, timeout=10, message=f"the {name} span and {count} children")
    result = found()
    assert result is not None
    return result


def check_stages(server: ReadableSpan, children: list[ReadableSpan], texts: int) -> None:
    names = sorted(child.name for child in children)
    assert names == sorted(["queue", "encode", "decode"] * texts + ["answer"]), names
    for child in children:
        assert child.context.trace_id == server.context.trace_id
        # Inside the call (the stages are dated from the monotonic clock: allow a millisecond).
        slack = 1_000_000
        assert server.start_time - slack <= child.start_time <= child.end_time <= server.end_time + slack
    for index in range(texts):
        queue, encode, decode = (
            next(c for c in children if c.name == stage and c.attributes["translator.text"] == index)
            for stage in ("queue", "encode", "decode")
        )
        assert queue.end_time <= encode.start_time + 1 and encode.end_time <= decode.start_time + 1
        assert decode.attributes["translator.steps"] >= 1


def test_a_grpc_translate_continues_the_callers_trace(traced: Traced) -> None:
    server, exporter = traced
    exporter.clear()
    assert server.port
    client = Client(server.port)
    try:
        request = pb.TranslateRequest(texts=["the cat", "a big red dog"])
        answer = client.translator.Translate(request, metadata=(("traceparent", TRACEPARENT),))
    finally:
        client.close()
    assert len(answer.translations) == 2
    span, children = spans_of(exporter, "Translate", 7)
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID
    assert span.attributes["rpc.system"] == "grpc" and span.attributes["rpc.status_code"] == "OK"
    check_stages(span, children, texts=2)


def test_a_rest_infer_continues_the_callers_trace(traced: Traced) -> None:
    server, exporter = traced
    exporter.clear()
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["the small cat"]}]}
    request = urllib.request.Request(
        f"http://{HOST}:{server.http_port}/v2/models/tiny/infer", data=json.dumps(body).encode(),
        method="POST", headers={"traceparent": TRACEPARENT},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert json.loads(answer.read())["outputs"][0]["data"]
    span, children = spans_of(exporter, "ModelInfer", 4)
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID
    assert span.attributes["rpc.system"] == "http"
    check_stages(span, children, texts=1)


def test_calls_without_a_trace_context_and_failed_calls(traced: Traced) -> None:
    server, exporter = traced
    exporter.clear()
    assert server.port
    client = Client(server.port)
    try:
        stream = list(client.translator.TranslateStream(pb.TranslateStreamRequest(text="the cat")))
        assert stream[-1].HasField("translation")
        with pytest.raises(grpc.RpcError):
            client.translator.Translate(pb.TranslateRequest(texts=[""]))
    finally:
        client.close()
    span, children = spans_of(exporter, "TranslateStream", 4)
    assert span.parent is None  # a trace of its own
    check_stages(span, children, texts=1)
    failed, stages = spans_of(exporter, "Translate", 0)
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes["rpc.status_code"] == "INVALID_ARGUMENT" and stages == []


class Collector(http.server.BaseHTTPRequestHandler):
    """A stand-in OpenTelemetry collector: keeps the OTLP/HTTP bodies posted to it."""

    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        Collector.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_spans_go_to_the_otlp_endpoint_only_when_it_is_set(tiny_repository: Path) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    with running(make_config(tiny_repository)):
        assert not tracing.enabled()
    collector = http.server.ThreadingHTTPServer((HOST, 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://{HOST}:{collector.server_address[1]}/v1/traces"
    try:
        with running(make_config(tiny_repository, otlp_endpoint=endpoint)) as server:
            assert tracing.enabled() and server.port
            client = Client(server.port)
            try:
                request, metadata = pb.TranslateRequest(texts=["the cat"]), (("traceparent", TRACEPARENT),)
                assert client.translator.Translate(request, metadata=metadata).translations
            finally:
                client.close()
        assert not tracing.enabled()  # the server's stop ended it, sending what was left
    finally:
        collector.shutdown()
    spans = [
        span
        for body in Collector.bodies
        for resource in ExportTraceServiceRequest.FromString(body).resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    [translate] = [span for span in spans if span.name == "Translate"]
    assert translate.trace_id.hex() == TRACE_ID
    assert {span.name for span in spans} >= {"Translate", "queue", "encode", "decode", "answer"}
