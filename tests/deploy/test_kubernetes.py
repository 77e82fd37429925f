"""The Kubernetes manifests: each overlay renders, validates strictly, and agrees with the server it runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from headswap.server.config import ServerConfig, setting_names
from headswap.server.rpc.server import SERVICE_NAME
from tests.deploy import (
    METRIC_NAMES,
    OVERLAYS,
    REPO,
    SHARED_STORE_OVERLAYS,
    container,
    kustomize,
    metric_base,
    parse_dockerfile,
    run_tool,
    server_configmap,
    the,
)

CONFIG_ENVS = setting_names()
DEFAULTS = ServerConfig()
# Kinds from CRDs, which kubernetes-validate has no schema for; each is checked by a test of its own here.
CRD_KINDS = {"PodMonitor"}
EXPECTED_KINDS = {
    "ServiceAccount",
    "ConfigMap",
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "PodMonitor",
}
# The oldest Kubernetes the manifests are written for (deploy/README.md), and the tool's newest.
MIN_KUBERNETES = "1.30.0"
ADAPTER = "deploy/prometheus-adapter"


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def docs(overlay: str) -> list[dict[str, Any]]:
    return kustomize(f"deploy/overlays/{overlay}")[1]


@pytest.fixture(scope="module")
def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return the(docs, "Deployment")


@pytest.fixture(scope="module")
def settings(docs: list[dict[str, Any]], deployment: dict[str, Any]) -> dict[str, str]:
    return server_configmap(docs, deployment)


@pytest.fixture(scope="module")
def config(settings: dict[str, str]) -> ServerConfig:
    """The configuration `headswap serve` would build from the ConfigMap (and nothing else)."""
    return ServerConfig.from_sources(environ=settings)


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_port(deployment: dict[str, Any], port: int | str) -> int:
    """A Service's targetPort or a probe's port (a number or a port name) as the container port number."""
    ports = container(deployment)["ports"]
    if isinstance(port, int):
        assert any(p["containerPort"] == port for p in ports), f"the container does not expose port {port}"
        return port
    named = [p["containerPort"] for p in ports if p.get("name") == port]
    assert len(named) == 1, f"the container has no port named {port!r}"
    return int(named[0])


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity (CPU or bytes) as a number."""
    text = str(value)
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    assert match and match.group(2) in ("", *suffixes), f"not a quantity: {text!r}"
    return float(match.group(1)) * suffixes.get(match.group(2), 1.0)


def effective_security(deployment: dict[str, Any], key: str) -> Any:
    """A security setting as the kubelet applies it: the container's, else the pod's."""
    pod = deployment["spec"]["template"]["spec"].get("securityContext", {})
    return container(deployment).get("securityContext", {}).get(key, pod.get(key))


def prestop_seconds(deployment: dict[str, Any]) -> float:
    hook = container(deployment).get("lifecycle", {}).get("preStop")
    assert hook, "the container needs a preStop hook, so that endpoints update before the drain starts"
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep", "/usr/bin/sleep"), (
        f"preStop: expected a sleep, not {command}"
    )
    return float(command[1])


# --- rendering and schemas -------------------------------------------------------------------------------


def test_overlay_renders_every_object(overlay: str, docs: list[dict[str, Any]]) -> None:
    local = {"PersistentVolumeClaim"} if overlay == "local-store" else set()
    assert {d["kind"] for d in docs} == EXPECTED_KINDS | local
    namespaces = {d["metadata"].get("namespace") for d in docs}
    assert len(namespaces) == 1 and None not in namespaces, f"one namespace for all objects, not {namespaces}"


def _validate(text: str, tmp_path: Path, *version: str) -> tuple[int, list[str]]:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(text, encoding="utf-8")
    args = ["--strict", *(a for v in version for a in ("-k", v)), str(rendered)]
    proc = run_tool("kubernetes-validate", *args)
    return proc.returncode, (proc.stdout + proc.stderr).splitlines()


@pytest.mark.parametrize("version", [MIN_KUBERNETES, None], ids=["oldest", "newest"])
def test_kubernetes_validate_strict(overlay: str, version: str | None, tmp_path: Path) -> None:
    """Built-in kinds must pass the strict schemas; kubernetes-validate only warns about kinds it has no
    schema for (and exits 0), so the only warnings allowed are for the CRD kinds checked further down."""
    text, docs = kustomize(f"deploy/overlays/{overlay}")
    rc, lines = _validate(text, tmp_path, *([version] if version else []))
    problems = [line for line in lines if line.startswith(("ERROR", "FATAL"))]
    assert rc == 0 and not problems, "\n".join(lines)
    passed = {m.group(1) for line in lines if (m := re.search(r" passed for resource (\S+) against", line))}
    builtin = {f"{d['kind'].lower()}/{d['metadata']['name']}" for d in docs if d["kind"] not in CRD_KINDS}
    assert passed == builtin, f"not validated: {sorted(builtin - passed)}\n" + "\n".join(lines)
    unschema = {m.group(1) for line in lines if (m := re.search(r"find schema for kind (\S+)", line))}
    assert unschema == {d["kind"] for d in docs} & CRD_KINDS, "\n".join(lines)


def test_kubernetes_validate_is_strict(tmp_path: Path) -> None:
    """The check above means something: a field the API does not know fails it."""
    _, docs = kustomize("deploy/overlays/cpu")
    broken = the(docs, "Deployment")
    broken["spec"] = {**broken["spec"], "replicaz": 2}
    rc, lines = _validate(yaml.safe_dump(broken), tmp_path)
    assert rc != 0 and any("replicaz" in line for line in lines), "\n".join(lines)


def test_podmonitor_structure(docs: list[dict[str, Any]], deployment: dict[str, Any]) -> None:
    """No schema for this CRD in kubernetes-validate: check its shape and what it points at by hand."""
    monitor = the(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert monitor["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    spec = monitor["spec"]
    allowed = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"}
    assert set(spec) <= allowed, f"unexpected PodMonitor spec fields: {sorted(set(spec) - allowed)}"
    assert set(spec["selector"]) == {"matchLabels"}
    assert selects(spec["selector"]["matchLabels"], pod_labels(deployment)), "the PodMonitor selects no pod"
    endpoints = spec["podMetricsEndpoints"]
    assert isinstance(endpoints, list) and len(endpoints) == 1
    (endpoint,) = endpoints
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
    assert endpoint["port"] == "metrics" and endpoint.get("path", "/metrics") == "/metrics"
    assert container_port(deployment, endpoint["port"]) == DEFAULTS.metrics_port
    for key in ("interval", "scrapeTimeout"):
        if key in endpoint:
            assert re.fullmatch(r"[0-9]+(ms|s|m)", endpoint[key]), f"{key}: not a Prometheus duration"


def test_prometheus_adapter_config_renders_and_validates(tmp_path: Path) -> None:
    text, docs = kustomize(ADAPTER)
    assert [d["kind"] for d in docs] == ["ConfigMap"]
    rc, lines = _validate(text, tmp_path)
    assert rc == 0 and any(" passed for resource configmap/" in line for line in lines), "\n".join(lines)


# --- the server's contract -------------------------------------------------------------------------------


def test_configmap_holds_only_server_settings(settings: dict[str, str], config: ServerConfig) -> None:
    unknown = set(settings) - CONFIG_ENVS
    assert not unknown, f"not settings of headswap serve (ServerConfig): {sorted(unknown)}"
    assert config.port == DEFAULTS.port and config.metrics_port == DEFAULTS.metrics_port


def test_ports_match_the_server(
    docs: list[dict[str, Any]], deployment: dict[str, Any], config: ServerConfig
) -> None:
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    expected = {"grpc": DEFAULTS.port, "metrics": DEFAULTS.metrics_port}
    if config.health_port:  # TLS on the gRPC port: the probes ask the plaintext health-only port
        expected["health"] = config.health_port
        assert config.tls.enabled, "a health-only port is for servers whose gRPC port speaks TLS"
    assert ports == expected
    assert {"grpc": config.port, "metrics": config.metrics_port} == {
        "grpc": DEFAULTS.port,
        "metrics": DEFAULTS.metrics_port,
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container(deployment)[probe]["grpc"]["port"] == (config.health_port or config.port), (
            f"{probe} asks the wrong port"
        )
    services = [d for d in docs if d["kind"] == "Service"]
    for service in services:
        for port in service["spec"]["ports"]:
            target = container_port(deployment, port.get("targetPort", port["port"]))
            assert target == ports[port["name"]], f"Service {service['metadata']['name']}: {port}"


def test_probes_ask_the_services_the_server_reports(deployment: dict[str, Any]) -> None:
    server = container(deployment)
    assert SERVICE_NAME == "headswap.v1.HeadswapService"
    assert server["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    assert server["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert server["livenessProbe"]["grpc"].get("service", "") == ""
    assert server["startupProbe"]["periodSeconds"] * server["startupProbe"]["failureThreshold"] >= 120, (
        "give the backbone at least 2 minutes to load and warm up"
    )


def test_grpc_service_is_headless_and_metrics_service_separate(
    docs: list[dict[str, Any]], deployment: dict[str, Any]
) -> None:
    by_port = {p["name"]: s for s in docs if s["kind"] == "Service" for p in s["spec"]["ports"]}
    grpc, metrics = by_port["grpc"], by_port["metrics"]
    assert grpc is not metrics, "gRPC and metrics should be separate Services"
    assert grpc["spec"].get("clusterIP") == "None", "the gRPC Service must be headless (clusterIP: None)"
    assert [p["name"] for p in grpc["spec"]["ports"]] == ["grpc"]
    for service in (grpc, metrics):
        assert selects(service["spec"]["selector"], pod_labels(deployment))


def test_store_and_tmp_are_the_only_writable_paths(
    docs: list[dict[str, Any]], deployment: dict[str, Any], config: ServerConfig
) -> None:
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container(deployment)["volumeMounts"]}
    if any(d["kind"] == "PersistentVolumeClaim" for d in docs):  # the local store
        store = container_env(deployment)["HEADSWAP_STORE"]["value"]
        assert set(mounts) == {store, "/tmp"}
        claim = mounts[store]["persistentVolumeClaim"]["claimName"]
        the(docs, "PersistentVolumeClaim", claim)
    else:  # PostgreSQL: nothing written but /tmp (TLS certificates are mounted read-only)
        writable = {
            p
            for p in mounts
            if not any(
                m["mountPath"] == p and m.get("readOnly") for m in container(deployment)["volumeMounts"]
            )
        }
        assert writable == {"/tmp"}
    assert "emptyDir" in mounts["/tmp"]
    # The backbones are the ones exported into the image (the text one by default).
    from tests.deploy.test_dockerfile import exports

    stages = parse_dockerfile()
    assert str(config.backbone_dir) == stages[-1].env()["HEADSWAP_BACKBONE"]
    exported = {out for _, out in exports(stages).values()}
    assert {str(directory) for _, directory in config.backbones} <= exported


def test_runs_as_the_image_user_non_root_read_only(deployment: dict[str, Any]) -> None:
    user = parse_dockerfile()[-1].of("USER")[-1].args.split(":")[0]
    assert effective_security(deployment, "runAsNonRoot") is True
    assert str(effective_security(deployment, "runAsUser")) == user == "10001"
    assert effective_security(deployment, "readOnlyRootFilesystem") is True
    assert effective_security(deployment, "allowPrivilegeEscalation") is False
    assert effective_security(deployment, "privileged") in (None, False)
    assert effective_security(deployment, "capabilities") == {"drop": ["ALL"]}
    assert effective_security(deployment, "seccompProfile") == {"type": "RuntimeDefault"}
    assert deployment["spec"]["template"]["spec"].get("automountServiceAccountToken") is False


def test_termination_outlasts_prestop_and_drain(deployment: dict[str, Any], config: ServerConfig) -> None:
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    prestop = prestop_seconds(deployment)
    assert grace > config.grace_seconds, "terminationGracePeriodSeconds must outlast HEADSWAP_GRACE_SECONDS"
    assert grace > prestop + config.grace_seconds, (
        f"terminationGracePeriodSeconds {grace} <= preStop {prestop} s + drain {config.grace_seconds} s"
    )
    liveness = container(deployment)["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > config.grace_seconds, (
        "liveness (NOT_SERVING once draining) would kill the container before the drain ends"
    )


def test_resources_are_requested_and_limited(deployment: dict[str, Any]) -> None:
    resources = container(deployment)["resources"]
    for key in ("cpu", "memory"):
        request, limit = quantity(resources["requests"][key]), quantity(resources["limits"][key])
        assert 0 < request <= limit, f"{key}: request {request} and limit {limit}"


def test_single_writer_store(docs: list[dict[str, Any]], deployment: dict[str, Any]) -> None:
    """The local store belongs to one process: on a ReadWriteOnce volume, one pod at any time."""
    claims = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    if not claims:
        return  # the PostgreSQL store: test_shared_store_scales_out
    (claim,) = claims
    if set(claim["spec"]["accessModes"]) & {"ReadWriteOnce", "ReadWriteOncePod"}:
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"]["type"] == "Recreate", (
            "a rolling update would start a 2nd writer"
        )
        assert the(docs, "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 1


def container_env(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(deployment).get("env", [])}


def test_shared_store_scales_out(
    overlay: str, docs: list[dict[str, Any]], deployment: dict[str, Any], settings: dict[str, str]
) -> None:
    """The PostgreSQL store lets replicas share heads: several pods, rolling updates without a gap, an HPA
    that can scale, a PDB that keeps one serving, and the store's URL (a password) from a Secret."""
    if overlay not in SHARED_STORE_OVERLAYS:
        return
    assert deployment["spec"]["replicas"] >= 2
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0
    hpa = the(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    assert the(docs, "PodDisruptionBudget")["spec"] == {
        "minAvailable": 1,
        "selector": the(docs, "PodDisruptionBudget")["spec"]["selector"],
    }
    store = container_env(deployment)["HEADSWAP_STORE"]
    assert store["valueFrom"]["secretKeyRef"] == {"name": "headswap-store", "key": "url"}
    assert "HEADSWAP_STORE" not in settings, "a URL with a password belongs in a Secret, not a ConfigMap"
    assert settings["HEADSWAP_STORE_MIGRATE"] == "true"
    assert settings["HEADSWAP_AUTH"] == "keys", "every call but health needs an API key"
    pepper = container_env(deployment)["HEADSWAP_AUTH_PEPPER"]
    assert pepper["valueFrom"]["secretKeyRef"] == {"name": "headswap-auth", "key": "pepper"}
    assert "HEADSWAP_AUTH_PEPPER" not in settings
    assert not any(d["kind"] == "PersistentVolumeClaim" for d in docs)


def test_pdb_selects_the_pods(docs: list[dict[str, Any]], deployment: dict[str, Any]) -> None:
    pdb = the(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(deployment))
    assert (
        "maxUnavailable" in pdb["spec"] or pdb["spec"].get("minAvailable", 0) < deployment["spec"]["replicas"]
    ), "a PDB that allows no eviction of the single pod blocks node drains"


def test_overlay_device(overlay: str, deployment: dict[str, Any], config: ServerConfig) -> None:
    if overlay not in ("gpu", "cpu", "gpu-tls"):
        return  # local-store picks its device like the base (auto)
    resources = container(deployment)["resources"]
    pod = deployment["spec"]["template"]["spec"]
    if overlay.startswith("gpu"):
        assert str(resources["limits"].get("nvidia.com/gpu")) == "1", "the gpu overlay must ask for one GPU"
        assert config.device == "cuda"
        assert pod.get("nodeSelector") or pod.get("tolerations"), "steer the pod to GPU nodes"
    else:
        asked = {**resources.get("requests", {}), **resources.get("limits", {})}
        assert "nvidia.com/gpu" not in asked, "the cpu overlay must not ask for a GPU"
        assert config.device == "cpu"
        base = container(the(kustomize("deploy/base")[1], "Deployment"))["resources"]
        assert quantity(resources["requests"]["cpu"]) > quantity(base["requests"]["cpu"]), (
            "more CPUs than the base"
        )


# --- autoscaling -----------------------------------------------------------------------------------------


def adapter_rules() -> list[dict[str, Any]]:
    configmap = the(kustomize(ADAPTER)[1], "ConfigMap")
    rules = yaml.safe_load(configmap["data"]["config.yaml"])["rules"]
    assert isinstance(rules, list) and rules
    return list(rules)


def test_hpa_scales_the_deployment_on_the_adapter_metric(
    docs: list[dict[str, Any]], deployment: dict[str, Any]
) -> None:
    hpa = the(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 0 < quantity(metric["pods"]["target"]["averageValue"]) <= 1, "a target in seconds, e.g. 50m"
    produced = {rule["name"]["as"] for rule in adapter_rules()}
    assert metric["pods"]["metric"]["name"] == "headswap_queue_time_seconds"
    assert metric["pods"]["metric"]["name"] in produced, (
        f"no adapter rule produces it (rules make {produced})"
    )


def test_adapter_rule_is_mean_queue_time_per_pod() -> None:
    (rule,) = [r for r in adapter_rules() if r["name"]["as"] == "headswap_queue_time_seconds"]
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"])
    assert series and re.fullmatch(rule["name"]["matches"], series.group(0)), "name.matches misses the series"
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    query = " ".join(rule["metricsQuery"].split())
    numerator, _, denominator = query.partition(" / ")
    assert re.search(
        r'rate\(headswap_stage_duration_seconds_sum\{stage="queue",<<\.LabelMatchers>>\}\[2m\]\)', numerator
    )
    assert re.search(
        r'rate\(headswap_stage_duration_seconds_count\{stage="queue",<<\.LabelMatchers>>\}\[2m\]\)',
        denominator,
    )
    assert query.count("by (<<.GroupBy>>)") == 2, "sum both sides by the adapter's group (the pod)"
    for name in re.findall(r"headswap_[a-z_]+", query + rule["seriesQuery"]):
        assert metric_base(name) in METRIC_NAMES, f"{name} is not a metric of the server"


def test_readme_documents_the_crds_and_the_store() -> None:
    text = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    for needle in ("prometheus-operator", "prometheus-adapter", "PodMonitor", "ReadWriteOnce", "PostgreSQL"):
        assert needle in text, f"deploy/README.md should mention {needle}"
