"""The CPU image and the compose stack, built and run for real with podman (as root, as CI runs).

No image registry is reachable, so the base images are made here: Debian from `debootstrap`, a stand-in for
`python:3.11-slim-bookworm` (Debian's python3) and a Prometheus image from Debian's `prometheus` package; they
are kept between runs (podman's image store). `deploy/docker/Dockerfile.cpu` is built unchanged from the
working tree, then:

- the image alone, with a read-only root filesystem: healthy (its HEALTHCHECK and grpc.health.v1 SERVING), a
  translation over gRPC and over REST, `/metrics` counting both, SIGTERM (`podman stop`) exits 0 well within
  the grace period;
- the compose stack's `translator` and `prometheus` services (deploy/compose, CPU variant, with podman-compose
  in a virtual environment of its own): Prometheus scrapes the service (target up) and loads every rule of
  deploy/prometheus/rules. Grafana is not run: no Grafana image or package is reachable from here.

.ci/run installs podman, runc, debootstrap and the CNI dnsname plugin (service names as host names).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import venv
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from tests.conftest import ROOT
from tests.support.processes import free_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(900)

INSTALL = ".ci/run installs it (apt-get install podman runc debootstrap)"
DEBIAN = "localhost/translator-test/debian:bookworm"
PYTHON = "localhost/translator-test/python:3.11-slim-bookworm"
PROMETHEUS = "localhost/translator-test/prometheus:debian"
IMAGE = "localhost/translator-test/translator:cpu"
# podman as root on these machines: runc (crun refuses the hybrid cgroup layout) and ulimits it may set.
CONTAINERS_CONF = """
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
"""
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"podman {' '.join(args[:4])}: {done.stderr[-3000:]}"
    return done


def debian_mirror() -> str:
    """The host's Debian mirror (the one apt uses), for debootstrap."""
    for source in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        if source.exists():
            for line in source.read_text().splitlines():
                words = line.split()
                if words[:1] == ["URIs:"] or (words[:1] == ["deb"] and len(words) > 1):
                    return words[1]
    return "http://deb.debian.org/debian"


def build_from(image: str, containerfile: str, context: Path) -> None:
    (context / "Containerfile").write_text(containerfile)
    podman("build", "--network=host", "--format", "docker", "-t", image, "-f", str(context / "Containerfile"),
           str(context))  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, float]]:
    """The base images (made once per machine) and the project's CPU image (built every run); the seconds
    each step took."""
    assert shutil.which("podman") and shutil.which("debootstrap"), f"podman or debootstrap missing: {INSTALL}"
    folder = tmp_path_factory.mktemp("containers")
    conf = folder / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    previous = os.environ.get("CONTAINERS_CONF")
    os.environ["CONTAINERS_CONF"] = str(conf)
    seconds: dict[str, float] = {}
    try:
        started = time.monotonic()
        if podman("image", "exists", DEBIAN, check=False).returncode != 0:
            rootfs = folder / "rootfs"
            debootstrap = ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), debian_mirror()]
            done = subprocess.run(debootstrap, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            command = ["podman", "import", "-", DEBIAN]
            imported = subprocess.run(command, stdin=tar.stdout, capture_output=True, text=True, timeout=300)
            tar.wait()
            assert imported.returncode == 0, imported.stderr
            shutil.rmtree(rootfs, ignore_errors=True)
        install = "RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y"
        install += " --no-install-recommends"
        clean = "&& rm -rf /var/lib/apt/lists/*"
        if podman("image", "exists", PYTHON, check=False).returncode != 0:
            packages = "python3 python3-venv python-is-python3 ca-certificates"
            build_from(PYTHON, f"FROM {DEBIAN}\n{install} {packages} {clean}\n", folder)
        if podman("image", "exists", PROMETHEUS, check=False).returncode != 0:
            entrypoint = 'ENTRYPOINT ["/usr/bin/prometheus"]'
            build_from(PROMETHEUS, f"FROM {DEBIAN}\n{install} prometheus {clean}\n{entrypoint}\n", folder)
        seconds["base images"] = time.monotonic() - started
        started = time.monotonic()
        # Dockerfile.cpu unchanged; pip inside reads PyPI with the host's CA bundle (mounted for RUN steps).
        dockerfile = ROOT / "deploy/docker/Dockerfile.cpu"
        podman("build", "--network=host", "--format", "docker", "--ignorefile", f"{dockerfile}.dockerignore",
               "-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro", "--build-arg", f"PYTHON_IMAGE={PYTHON}",
               "-f", str(dockerfile), "-t", IMAGE, str(ROOT), timeout=900)  # fmt: skip
        seconds["CPU image"] = time.monotonic() - started
        yield seconds
    finally:
        if previous is None:
            os.environ.pop("CONTAINERS_CONF", None)
        else:
            os.environ["CONTAINERS_CONF"] = previous


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read()
    except OSError:
        return 0, b""


def rest_translate(port: int, text: str) -> str:
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [text]}]}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/toy-en-es/infer",
                                     data=json.dumps(body).encode(), method="POST")  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as answer:
        return str(json.loads(answer.read())["outputs"][0]["data"][0])


def test_the_cpu_image_serves_read_only_and_stops_cleanly(images: dict[str, float]) -> None:
    grpc_port, rest_port, metrics_port = free_port(), free_port(), free_port()
    name = f"translator-test-{os.getpid()}"
    podman("run", "-d", "--read-only", "--name", name, "-p", f"127.0.0.1:{grpc_port}:8001",
           "-p", f"127.0.0.1:{rest_port}:8000", "-p", f"127.0.0.1:{metrics_port}:8002", IMAGE)  # fmt: skip
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        health = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                return False
            return answer.status == health_pb2.HealthCheckResponse.SERVING

        wait_for(serving, timeout=120, message="the container's server to report SERVING")
        assert podman("healthcheck", "run", name, check=False).returncode == 0  # the image's HEALTHCHECK
        request = pb.TranslateRequest(texts=["the dog sees the cat"])
        answer = pb_grpc.TranslatorStub(channel).Translate(request)
        assert answer.translations[0].text == "el perro ve el gato"
        channel.close()
        assert rest_translate(rest_port, "the dog sees the cat") == "el perro ve el gato"
        status, metrics = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200
        for method in ("Translate", "ModelInfer"):
            assert f'translator_requests_total{{code="OK",method="{method}"}} 1.0' in metrics.decode()
        # Nothing can be written outside the tmpfs mounts.
        probe = podman("exec", name, "sh", "-c", "touch /opt/venv/x", check=False)
        assert probe.returncode != 0 and "Read-only file system" in probe.stderr
        started = time.monotonic()
        podman("stop", "-t", "30", name)
        stopped_in = time.monotonic() - started
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0 and stopped_in < 20, (state, stopped_in)
        assert '"message": "stopped"' in podman("logs", name).stdout + podman("logs", name).stderr
    finally:
        podman("rm", "-f", name, check=False)
    print(f"\ncontainer image times: {', '.join(f'{k} {v:.0f} s' for k, v in images.items())}")


@pytest.fixture(scope="module")
def compose_command(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("podman-compose-venv")
    venv.create(folder, with_pip=True)
    install = subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "-q", "podman-compose"],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert install.returncode == 0, f"cannot install podman-compose from PyPI:\n{install.stderr[-2000:]}"
    return [str(folder / "bin" / "podman-compose")]


def test_the_compose_stack_is_scraped_and_loads_every_rule(
    images: dict[str, float], compose_command: list[str], tmp_path: Path
) -> None:
    """deploy/compose with the CPU variant: the translator service and Prometheus (a local Prometheus image,
    host ports moved to free ones by an override file); Prometheus scrapes translator:8002 by service name."""
    translator_ports = [free_port() for _ in range(3)]
    prometheus_port = free_port()
    override = {
        "services": {
            "translator": {"image": IMAGE, "ports": [
                f"127.0.0.1:{p}:{c}" for p, c in zip(translator_ports, (8000, 8001, 8002), strict=True)
            ]},
            "prometheus": {"image": PROMETHEUS, "ports": [f"127.0.0.1:{prometheus_port}:9090"]},
        }
    }  # fmt: skip
    text = yaml.safe_dump(override).replace("ports:", "ports: !override")
    (tmp_path / "override.yml").write_text(text)
    project = f"translator-test-{os.getpid()}"
    compose = ROOT / "deploy/compose"
    files = ["-f", str(compose / "docker-compose.yml"), "-f", str(compose / "docker-compose.cpu.yml"),
             "-f", str(tmp_path / "override.yml")]  # fmt: skip
    command = [*compose_command, "-p", project, *files]
    started = time.monotonic()
    up = subprocess.run([*command, "up", "-d", "translator", "prometheus"], capture_output=True, text=True,
                        timeout=600)  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        api = f"http://127.0.0.1:{prometheus_port}/api/v1"

        def targets() -> dict[str, str]:
            status, body = http_get(f"{api}/targets")
            if status != 200:
                return {}
            return {t["labels"]["job"]: t["health"] for t in json.loads(body)["data"]["activeTargets"]}

        wait_for(lambda: targets().get("translator") == "up", timeout=120,
                 message="Prometheus to scrape the translator service (target up)")  # fmt: skip
        status, body = http_get(f"{api}/rules")
        assert status == 200
        loaded = {rule["name"] for group in json.loads(body)["data"]["groups"] for rule in group["rules"]}
        shipped = {
            rule.get("record") or rule.get("alert")
            for path in RULES
            for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]
        }
        assert shipped and loaded == shipped, shipped ^ loaded
        # The service answers through the stack's published port.
        assert rest_translate(translator_ports[0], "the dog sees the cat") == "el perro ve el gato"
    finally:
        down = subprocess.run([*command, "down", "-v"], capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr[-2000:]
    print(f"\ncompose stack up, scraped and checked in {time.monotonic() - started:.0f} s")
