"""The Kubernetes manifests (k8s/) as rendered: valid against the API's and KEDA's schemas, with
the guarantees of compose.yaml, and network policies that let through only what must pass.
(They run under podman in tests/integration/test_k8s.py.)"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml

from k8s.check import REPO, Manifest, manifests, problems

Docs = list[Manifest]


@pytest.fixture(scope="module")
def docs() -> Docs:
    return manifests()


def find(docs: Docs, kind: str, name: str) -> Manifest:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def workloads(docs: Docs) -> list[Manifest]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}


def test_every_manifest_is_valid_and_an_unknown_field_is_not(docs: Docs) -> None:
    assert problems(docs) == []
    broken = copy.deepcopy(docs)
    api = find(broken, "Deployment", "api")
    api["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    scaled = find(broken, "ScaledObject", "api")
    scaled["spec"]["triggers"][0]["metricTyp"] = "AverageValue"
    scaled["spec"]["minReplicaCount"] = "two"
    found = problems(broken)
    assert len(found) == 3, found
    assert any("readinesProbe" in message for message in found)
    assert any("metricTyp" in message for message in found)


def test_the_images_are_the_tags_pinned_in_env(docs: Docs) -> None:
    pinned = dict(
        line.split("=", 1)
        for line in (REPO / ".env").read_text().splitlines()
        if re.match(r"^[A-Z_]+_IMAGE=", line)
    )
    used = {
        container["image"]
        for doc in workloads(docs)
        for container in doc["spec"]["template"]["spec"]["containers"]
    }
    expected = {pinned[name] for name in ("NGINX_IMAGE", "OTELCOL_IMAGE", "PROMETHEUS_IMAGE")}
    expected |= {pinned["JAEGER_IMAGE"], pinned["GRAFANA_IMAGE"], "mnist-api:local"}
    assert used == expected


def test_every_container_is_unprivileged_read_only_and_bounded(docs: Docs) -> None:
    for doc in workloads(docs):
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            where = f"{doc['metadata']['name']}/{container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            resources = container["resources"]
            assert set(resources["requests"]) == {"cpu", "memory"}, where
            assert set(resources["limits"]) == {"memory"}, where  # no CPU throttling


def test_the_api_rolls_out_with_no_pod_missing_and_drains_before_it_stops(docs: Docs) -> None:
    api = find(docs, "Deployment", "api")
    assert "replicas" not in api["spec"]  # the autoscaler's
    assert api["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = api["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = int(command[1])
    graceful = int(env_of(container)["GRACEFUL_TIMEOUT"])
    # The pod leaves DNS (5 s TTL) and nginx re-resolves (valid=5s) before it stops serving.
    assert drain >= 10
    assert pod["terminationGracePeriodSeconds"] > drain + graceful
    # A pod per node where it can be.
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    for name in ("api", "nginx"):
        budget = find(docs, "PodDisruptionBudget", name)
        assert budget["spec"] == {
            "maxUnavailable": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
        }


def test_the_api_settings_are_compose_yamls_defaults(docs: Docs) -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]["api"]["environment"]

    def default(value: object) -> str:  # "${NAME:-default}" -> default
        found = re.fullmatch(r"\$\{[A-Z_]+:-(.*)\}", str(value))
        return found.group(1) if found else str(value)

    expected = {name: default(value) for name, value in compose.items()}
    expected.pop("OTEL_SDK_DISABLED")
    expected["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://otel-collector:4318"
    (container,) = find(docs, "Deployment", "api")["spec"]["template"]["spec"]["containers"]
    assert env_of(container) == expected


def test_nginx_resolves_the_headless_api_service(docs: Docs) -> None:
    service = find(docs, "Service", "api")
    assert service["spec"]["clusterIP"] == "None"  # one address per ready pod
    (port,) = service["spec"]["ports"]
    nginx = find(docs, "Deployment", "nginx")
    container = nginx["spec"]["template"]["spec"]["containers"][0]
    assert env_of(container)["API_UPSTREAM"] == (
        f"api.$(POD_NAMESPACE).svc.cluster.local:{port['port']}"
    )
    # $(POD_NAMESPACE) expands only if it is defined before API_UPSTREAM.
    names = [item["name"] for item in container["env"]]
    assert names.index("POD_NAMESPACE") < names.index("API_UPSTREAM")


def test_config_comes_from_the_files_compose_mounts(docs: Docs) -> None:
    nginx = find(
        docs,
        "ConfigMap",
        next(d["metadata"]["name"] for d in docs if d["metadata"]["name"].startswith("nginx-")),
    )
    for name in ("entrypoint.sh", "nginx.conf.template", "proxy.conf", "web.conf"):
        assert nginx["data"][name] == (REPO / "nginx" / name).read_text()
    collector = find(docs, "Deployment", "otel-collector")
    args = collector["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == [
        "--config=/etc/otelcol-contrib/config.yaml",
        "--config=/etc/otelcol-contrib/kubernetes.yaml",
    ]
    prometheus = find(docs, "StatefulSet", "prometheus")
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]["prometheus"]
    flags = prometheus["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [flag.split("=")[0] for flag in flags] == [
        flag.split("=")[0] for flag in compose["command"]
    ]


def test_grafanas_password_comes_only_from_a_secret_the_repo_does_not_hold(docs: Docs) -> None:
    assert not [d for d in docs if d["kind"] == "Secret"]
    grafana = find(docs, "Deployment", "grafana")
    pod = grafana["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    path = env["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    (mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "optional" not in volume["secret"]  # no Secret, no start
    (item,) = volume["secret"]["items"]
    assert f"{mount['mountPath']}/{item['path']}" == path


# --- Network policies: who can reach whom ---------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def allowed(docs: Docs, source: tuple[str, str], target: str, port: str) -> bool:
    """Whether a pod named `source` = (namespace, app) may open `port` (a named port) on the
    pod `target` of this namespace, under these NetworkPolicies (ingress only)."""
    namespace, app = source
    target_labels = {"app.kubernetes.io/name": target}
    policies = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy" and selects(d["spec"]["podSelector"], target_labels)
    ]
    assert policies, f"no policy selects {target}"
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and port not in [p["port"] for p in rule["ports"]]:
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                if "namespaceSelector" in peer:
                    if selects(
                        peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace}
                    ):
                        return True
                elif namespace == "mnist" and selects(
                    peer["podSelector"], {"app.kubernetes.io/name": app}
                ):
                    return True
    return False


PODS = ["nginx", "api", "otel-collector", "prometheus", "jaeger", "grafana"]
OPEN = {  # (target, its port): who may connect
    ("nginx", "http"): "anyone",
    ("api", "http"): {"nginx"},
    ("otel-collector", "otlp-http"): {"api", "nginx"},
    ("otel-collector", "export"): {"prometheus"},
    ("otel-collector", "metrics"): {"prometheus"},
    ("prometheus", "http"): {"grafana", "keda"},
    ("jaeger", "otlp-grpc"): {"otel-collector"},
    ("jaeger", "query"): {"grafana"},
    ("grafana", "http"): set(),
}


@pytest.mark.parametrize(("target", "port"), sorted(OPEN))
def test_only_what_needs_a_service_reaches_it(docs: Docs, target: str, port: str) -> None:
    sources = [("mnist", app) for app in PODS] + [("keda", "keda-operator"), ("other", "x")]
    reached = {
        ("keda" if namespace == "keda" else app if namespace == "mnist" else "outside")
        for namespace, app in sources
        if allowed(docs, (namespace, app), target, port)
    }
    expected = OPEN[target, port]
    if expected == "anyone":
        assert reached == {*PODS, "keda", "outside"}
    else:
        assert reached == expected


def test_the_autoscaler_scales_the_api_on_in_flight_requests_and_cpu(docs: Docs) -> None:
    scaled = find(docs, "ScaledObject", "api")["spec"]
    assert scaled["scaleTargetRef"] == {"name": "api"}
    assert 1 < scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    prometheus, cpu = scaled["triggers"]
    assert prometheus["type"] == "prometheus"
    assert prometheus["metricType"] == "AverageValue"
    assert "http_server_request_duration_seconds_sum" in prometheus["metadata"]["query"]
    namespace = find(docs, "Namespace", "mnist")["metadata"]["name"]
    assert prometheus["metadata"]["serverAddress"] == (
        f"http://prometheus.{namespace}.svc.cluster.local:9090"
    )
    assert cpu["type"] == "cpu"
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_every_file_of_a_mounted_folder_is_in_a_config_map(docs: Docs) -> None:
    """A file added to one of the folders compose mounts must reach Kubernetes too."""
    generated = {
        content
        for doc in docs
        if doc["kind"] == "ConfigMap"
        for content in doc.get("data", {}).values()
    }
    folders = [
        "nginx",
        "web",
        "web/static",
        "otel-collector",
        "prometheus",
        "prometheus/rules",
        "jaeger",
        "grafana/dashboards",
        *(f"grafana/provisioning/{name}" for name in ("datasources", "dashboards", "alerting")),
        "grafana/provisioning/plugins",
    ]
    for folder in folders:
        for path in sorted((REPO / folder).iterdir()):
            if path.is_file():
                assert path.read_text() in generated, f"{path.relative_to(REPO)} is in no ConfigMap"


NGINX_RECEIVERS = ["nginx", "prometheus/edge"]  # stub_status, and the edge's answers (edge.js)


def test_the_collector_on_kubernetes_drops_only_the_nginx_receivers() -> None:
    """kubernetes.yaml replaces the metrics pipeline's receivers (lists are not merged): it must
    list every one of config.yaml's but those that scrape nginx, which the nginx pods' sidecars
    replace, scraping the same pages the same way."""
    config = yaml.safe_load((REPO / "otel-collector/config.yaml").read_text())
    override = yaml.safe_load((REPO / "otel-collector/kubernetes.yaml").read_text())
    compose = config["service"]["pipelines"]["metrics"]["receivers"]
    kubernetes = override["service"]["pipelines"]["metrics"]["receivers"]
    assert set(NGINX_RECEIVERS) <= set(compose)
    assert kubernetes == [name for name in compose if name not in NGINX_RECEIVERS]
    assert override.keys() == {"service"}  # nothing else differs
    sidecar = yaml.safe_load((REPO / "otel-collector/nginx-sidecar.yaml").read_text())
    assert sidecar["service"]["pipelines"]["metrics"]["receivers"] == NGINX_RECEIVERS
    assert (
        sidecar["receivers"]["nginx"]["collection_interval"]
        == (config["receivers"]["nginx"]["collection_interval"])
    )
    (central,) = config["receivers"]["prometheus/edge"]["config"]["scrape_configs"]
    (local,) = sidecar["receivers"]["prometheus/edge"]["config"]["scrape_configs"]
    assert central["static_configs"] == [{"targets": ["nginx:8081"]}]
    assert local["static_configs"] == [{"targets": ["127.0.0.1:8081"]}]
    assert {**local, "static_configs": None} == {**central, "static_configs": None}
