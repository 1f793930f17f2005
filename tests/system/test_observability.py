"""The monitoring stack against a real server: translator-serve + a real Prometheus, on loopback only.

translator-serve (the tiny model) and Prometheus (Debian's `prometheus` package, which .ci/run installs) run
as processes; deploy/prometheus/prometheus.yml is reused with its target pointed at the server's metrics port
and 1 s intervals, with the rules of deploy/prometheus/rules/ loaded. After traffic over gRPC (successes,
INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, a cancelled stream, attention maps), every PromQL
expression of the Grafana dashboard (variables substituted as Grafana would) and of the rules must return
data through Prometheus' HTTP API. promtool checks the config and the rules and runs the rule unit tests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from tests.conftest import ROOT
from tests.support.commands import run, tool
from tests.support.metrics import scrape
from tests.support.processes import free_port, logged, stop
from tests.support.waiting import wait_for

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "translator.json"
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"

JOB = "translator"
MODEL = "tiny"
RATE_INTERVAL = "1m"  # what $__rate_interval stands for here (Grafana computes it from the scrape interval)
MAX_MESSAGE_BYTES = 64 * 1024  # small, so that a request for every attention map gets RESOURCE_EXHAUSTED
SENTENCES = (
    "the dog sees the cat",
    "a big red house",
    "the small cat saw her",
    "the dog and the cat will see him",
    "a house with a red dog",
    "her cat sees the big house that the dog saw",
)

INSTALL = ".ci/run installs it (apt-get install prometheus)"  # promtool and prometheus

pytestmark = pytest.mark.timeout(240)


# ---------------------------------------------------------------------------------------------------------
# promtool: static checks of the shipped files
# ---------------------------------------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    out = run(tool("promtool", INSTALL), "check", "config", PROMETHEUS_CONFIG, stderr=True)
    for rules in RULE_FILES:  # rule_files: rules/*.yml, resolved relative to the config
        assert rules.name in out


def test_promtool_check_rules() -> None:
    run(tool("promtool", INSTALL), "check", "rules", *RULE_FILES, stderr=True)


def test_promtool_test_rules() -> None:
    assert RULE_TESTS
    out = run(tool("promtool", INSTALL), "test", "rules", *RULE_TESTS, stderr=True)
    assert "SUCCESS" in out


def test_error_and_drop_panels_show_zero_rather_than_no_data(tmp_path: Path) -> None:
    """On a healthy server (only OK calls, nothing dropped) the error-ratio panel has a 0 line per method and
    the dropped-sentences panel one 0 line: they showed "No data". Real errors still show as their ratio."""
    queries = dict(dashboard_queries("a:8002"))
    errors = queries["Error ratio by method and code [A]"]
    dropped = queries["Dropped sentences by reason [A]"]
    labels = 'job="translator",instance="a:8002"'

    def calls(method: str, code: str, per_15s: int) -> dict[str, str]:
        return {"series": f'translator_requests_total{{{labels},method="{method}",code="{code}"}}',
                "values": f"0+{per_15s}x40"}

    info = {"series": f'translator_model_info{{{labels},model="{MODEL}",version="1",provider="CPU"}}',
            "values": "1x40"}
    healthy = {
        "interval": "15s",
        "input_series": [calls("Translate", "OK", 15), calls("GetModelInfo", "OK", 1), info],
        "promql_expr_test": [
            {"expr": errors, "eval_time": "5m", "exp_samples": [
                {"labels": '{method="Translate"}', "value": 0},
                {"labels": '{method="GetModelInfo"}', "value": 0},
            ]},
            {"expr": dropped, "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 0}]},
        ],
    }
    failing = {
        "interval": "15s",
        "input_series": [calls("Translate", "OK", 9), calls("Translate", "INVALID_ARGUMENT", 1), info],
        "promql_expr_test": [
            {"expr": errors, "eval_time": "5m", "exp_samples": [
                {"labels": '{method="Translate",code="INVALID_ARGUMENT"}', "value": 0.1},
            ]},
        ],
    }
    path = tmp_path / "panels.test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [], "tests": [healthy, failing]}))
    assert "SUCCESS" in run(tool("promtool", INSTALL), "test", "rules", path, stderr=True)


# ---------------------------------------------------------------------------------------------------------
# The live stack
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[Any]
    port: int
    metrics_port: int
    log: Path

    @property
    def instance(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"


class Prometheus:
    def __init__(self, process: subprocess.Popen[Any], port: int, log: Path) -> None:
        self.process, self.port, self.log = process, port, log

    def api(self, path: str, **params: str) -> Any:
        data = urllib.parse.urlencode(params).encode() if params else None
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", data=data, timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        try:
            data = self.api("/api/v1/query", query=expr)
        except urllib.error.HTTPError as error:  # 400 on a PromQL error: show Prometheus' message
            raise AssertionError(f"{expr}\n-> {error.read().decode()}") from error
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]


def start_server(repository: Path, log: Path) -> Server:
    script = Path(sys.executable).with_name("translator-serve")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "service.server.app"]
    command += [
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--http-port",
        "0",
        "--model-repository",
        str(repository),
        "--model",
        MODEL,
        "--max-message-bytes",
        str(MAX_MESSAGE_BYTES),
        "--quality-sample-rate",
        "1.0",
        "--max-queue-delay-ms",
        "2",
    ]
    # Settings through TRANSLATOR_* variables too, as the images and manifests pass them.
    env = dict(os.environ, TRANSLATOR_THREADS="1", TRANSLATOR_GRACE_PERIOD_S="3", TRANSLATOR_LOG_LEVEL="INFO")
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        entry = logged(log, "ready")
        if entry is not None:
            return Server(process, int(entry["port"]), int(entry["metrics_port"]), log)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    stop(process)
    raise AssertionError(f"translator-serve did not get ready:\n{log.read_text()}")


def start_prometheus(server: Server, folder: Path) -> Prometheus:
    """deploy/prometheus/prometheus.yml with 1 s intervals, the translator job aimed at the server."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(path) for path in RULE_FILES]
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    job.update(scrape_interval="1s", scrape_timeout="1s", static_configs=[{"targets": [server.instance]}])
    config["scrape_configs"] = [job]
    config_file = folder / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    binary = tool("prometheus", INSTALL)
    for _attempt in range(3):  # the free port may be taken between probing and binding
        port = free_port()
        log = folder / "prometheus.log"
        with open(log, "wb") as sink:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                cwd=folder,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        prometheus = Prometheus(process, port, log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return prometheus
            except OSError:
                time.sleep(0.2)
        stop(process)
    raise AssertionError(f"prometheus did not start:\n{log.read_text()}")


def expect_code(code: grpc.StatusCode, call: Any) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value


def drive_traffic(server: Server) -> None:
    """Successes of every kind, client errors, rejections, deadlines and a cancelled stream."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.TranslatorStub(channel)
        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        cross = pb.TranslateOptions(max_length=8, attention=pb.AttentionRequest(kinds=[pb.CROSS]))

        def translate(i: int) -> None:
            texts = [SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 3)]
            options = cross if i % 2 else pb.TranslateOptions(max_length=12)
            stub.Translate(pb.TranslateRequest(texts=texts, options=options), timeout=30)

        with ThreadPoolExecutor(8) as pool:  # concurrent calls: batches of several sentences
            list(pool.map(translate, range(24)))
        request = pb.TranslateStreamRequest(text=SENTENCES[0], options=pb.TranslateOptions(max_length=8))
        *_tokens, last = stub.TranslateStream(request, timeout=30)
        assert last.HasField("translation")
        expect_code(
            grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Translate(pb.TranslateRequest(), timeout=10)
        )
        every_map = pb.TranslateOptions(
            max_length=32,
            attention=pb.AttentionRequest(kinds=[pb.CROSS, pb.DECODER_SELF, pb.ENCODER_SELF]),
        )
        long_texts = [" ".join(SENTENCES * 2)] * 4  # encoder self-attention: 4 x 80 x 80 floats per head
        expect_code(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            lambda: stub.Translate(pb.TranslateRequest(texts=long_texts, options=every_map), timeout=30),
        )
        # Work thrown away: a deadline too short for a big beam search, then a stream cancelled mid-way.
        heavy = pb.TranslateRequest(
            texts=list(SENTENCES) * 6, options=pb.TranslateOptions(beam_size=8, max_length=200)
        )
        for _ in range(5):
            try:
                stub.Translate(heavy, timeout=0.05)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    break
        for _ in range(10):
            stream = stub.TranslateStream(
                pb.TranslateStreamRequest(text=SENTENCES[-1], options=pb.TranslateOptions(max_length=200)),
                timeout=30,
            )
            next(stream)
            stream.cancel()
            time.sleep(0.2)
            if 'reason="cancelled"' in scrape(server.metrics_port):
                break


@dataclass
class Stack:
    server: Server
    prometheus: Prometheus


@pytest.fixture(scope="module")
def stack(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("observability")
    server = start_server(tiny_repository, folder / "server.log")
    prometheus: Prometheus | None = None
    try:
        prometheus = start_prometheus(server, folder)
        wait_for(
            lambda: [s for s in prometheus.query(f'up{{job="{JOB}"}}') if s["value"][1] == "1"],
            timeout=30,
            message="the first scrape",
            every=0.5,
        )
        drive_traffic(server)
        time.sleep(1.5)  # one more scrape in between: counters that grow, not just appear
        drive_traffic(server)
        # Wait for Prometheus to hold the final counts, then for the rules to be evaluated on them.
        answered = sum(
            float(line.rsplit(" ", 1)[1])
            for line in scrape(server.metrics_port).splitlines()
            if line.startswith("translator_requests_total{")
        )
        total = f'sum(translator_requests_total{{job="{JOB}"}})'
        wait_for(
            lambda: [s for s in prometheus.query(total) if float(s["value"][1]) == answered],
            timeout=30,
            message="the last scrape",
            every=0.5,
        )
        time.sleep(2.5)
        yield Stack(server, prometheus)
    finally:
        if prometheus is not None:
            stop(prometheus.process)
        stop(server.process)


def grafana_regex(value: str) -> str:
    """A variable value as Grafana puts it into a Prometheus regex matcher (escaped, backslashes doubled)."""
    return re.escape(value).replace("\\", "\\\\")


def dashboard_queries(instance: str) -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    substitutions = {
        "$__rate_interval": RATE_INTERVAL,
        "$__interval": "15s",
        "$__range": "5m",
        "$instance": grafana_regex(instance),
        "$model": grafana_regex(MODEL),
    }
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in sorted(substitutions, key=len, reverse=True):
                expr = expr.replace(name, substitutions[name])
            assert "$" not in expr, f"unknown variable left in {expr}"
            queries.append((f"{panel['title']} [{target['refId']}]", expr))
    return queries


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(\s*bool\b)?")


def with_bool(expr: str) -> str:
    """`a > 1 and b == 0` -> `a > bool 1 and b == bool 0`: the series an alert compares, whatever their value.

    Comparisons inside label matchers ({code!="OK"}) and strings are left alone.
    """
    out, depth, quote, i = [], 0, "", 0
    while i < len(expr):
        c = expr[i]
        if quote:
            out.append(c)
            if c == "\\":
                out.append(expr[i + 1])
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
            out.append(c)
        elif c in "{}":
            depth += 1 if c == "{" else -1
            out.append(c)
        elif depth == 0 and (match := _COMPARISON.match(expr, i)):
            out.append(match.group(0) if match.group(2) else f"{match.group(1)} bool")
            i = match.end()
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def all_have_data(prometheus: Prometheus, queries: list[tuple[str, str]], timeout: float = 45) -> None:
    """Poll until every query returns at least one sample (recording rules need an evaluation or two)."""
    missing = queries
    deadline = time.monotonic() + timeout
    while True:
        missing = [(name, expr) for name, expr in missing if not prometheus.query(expr)]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert not missing, "no data for:\n" + "\n".join(f"- {name}: {expr}" for name, expr in missing)


def test_with_bool_keeps_matchers() -> None:
    expr = 'a{code!="OK"} > 0.05 and on (job) b == 1'
    assert with_bool(expr) == 'a{code!="OK"} > bool 0.05 and on (job) b == bool 1'
    assert with_bool("x >= bool 1") == "x >= bool 1"


def test_scrape_has_every_metric(stack: Stack) -> None:
    from service.scheduler.metrics import ALL_METRICS

    scraped = stack.prometheus.query(f'{{job="{JOB}", __name__=~"translator_.+"}}')
    names = {sample["metric"]["__name__"] for sample in scraped}
    for metric in ALL_METRICS:
        assert any(name == metric or name.startswith(metric + "_") for name in names), metric
    [target] = stack.prometheus.api("/api/v1/targets")["activeTargets"]
    assert target["health"] == "up" and target["labels"]["instance"] == stack.server.instance


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    queries = dashboard_queries(stack.server.instance)
    assert len(queries) >= 20
    all_have_data(stack.prometheus, queries)
    # A few values that must be right, not just present.
    [info] = stack.prometheus.query(f'translator_model_info{{instance="{stack.server.instance}"}}')
    assert info["metric"]["model"] == MODEL and info["metric"]["provider"] == "CPUExecutionProvider"
    by_code = stack.prometheus.query(f'sum by (code) (translator_requests_total{{job="{JOB}"}})')
    codes = {sample["metric"]["code"] for sample in by_code}
    assert {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"} <= codes, codes


def test_every_rule_expression_returns_data(stack: Stack) -> None:
    queries = []
    for rule in rules():
        if "record" in rule:
            name = rule["record"]
            queries += [(f"record {name}", rule["expr"]), (f"series {name}", name)]
        else:
            stack.prometheus.query(rule["expr"])  # valid as written (firing or not)
            queries.append((f"alert {rule['alert']} (comparisons as bool)", with_bool(rule["expr"])))
    all_have_data(stack.prometheus, queries)
    groups = stack.prometheus.api("/api/v1/rules")["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    assert len(loaded) == len(rules())
    unhealthy = [(rule["name"], rule.get("lastError")) for rule in loaded if rule["health"] != "ok"]
    assert not unhealthy, unhealthy
    # Numbers, not NaN: 0 without server errors (`or ... * 0`), > 0 with the DEADLINE_EXCEEDED calls.
    [errors] = stack.prometheus.query("job:translator_request_errors:ratio_rate5m")
    [rejected] = stack.prometheus.query("job:translator_requests_rejected:ratio_rate5m")
    assert 0 < float(rejected["value"][1]) < 1
    deadlines = stack.prometheus.query('translator_requests_total{code="DEADLINE_EXCEEDED"}')
    assert (0 < float(errors["value"][1]) < 1) if deadlines else float(errors["value"][1]) == 0


def healthcheck(env: dict[str, str]) -> int:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, timeout=30
    ).returncode


def test_image_healthcheck_script(stack: Stack) -> None:
    env = dict(os.environ, TRANSLATOR_HOST="127.0.0.1", TRANSLATOR_PORT=str(stack.server.port))
    out = run(sys.executable, HEALTHCHECK, env=env, timeout=30, stderr=True)
    assert "SERVING" in out
    env["TRANSLATOR_HEALTHCHECK_SERVICE"] = "no.such.Service"
    assert healthcheck(env) == 1


def test_graceful_shutdown_exits_cleanly(stack: Stack) -> None:
    """Last: SIGTERM (what Kubernetes sends after preStop) ends the server within its grace period, exit 0."""
    process = stack.server.process
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0, stack.server.log.read_text()[-3000:]
    assert time.monotonic() - started < 3 + 5  # TRANSLATOR_GRACE_PERIOD_S=3, plus closing time
    log = stack.server.log.read_text()
    assert '"message": "stopped"' in log
    env = dict(
        os.environ,
        TRANSLATOR_HOST="127.0.0.1",
        TRANSLATOR_PORT=str(stack.server.port),
        TRANSLATOR_HEALTHCHECK_TIMEOUT_S="1",
    )
    assert healthcheck(env) == 1
