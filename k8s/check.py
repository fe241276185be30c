"""Render, validate and smoke-test the Kubernetes manifests (k8s/), without a cluster.

    python -m k8s.check render     every manifest, to stdout (make k8s-render)
    python -m k8s.check validate   strict schema validation (make k8s-validate)
    python -m k8s.check smoke      the api, nginx and the Collector under `podman kube play`
                                   (make k8s-smoke)
    python -m k8s.check fetch      KEDA's CRD schema, once (make install)

Rendering is `kubectl kustomize` (kubectl >= 1.27 carries kustomize v5), or `kustomize build`.
Validation checks every built-in resource against the Kubernetes API's schemas for
KUBERNETES_VERSION with kubernetes-validate (offline; strict: an unknown field is an error), and
the KEDA ScaledObject against KEDA's own CRD schema, taken once from KEDA's Go module at
KEDA_VERSION on the Go module proxy, checked against its pinned hash and kept in .venv. The
smoke test runs the rendered pods with the images compose uses (.env's, or the stand-ins'
*_IMAGE), with the names podman's DNS gives them in place of the Services', and sends a
prediction through nginx.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parent.parent
KUBERNETES_VERSION = "1.32"
KEDA_VERSION = "v2.21.0"
KEDA_MODULE = "github.com/kedacore/keda/v2"
KEDA_ZIP_SHA256 = "74b59fe16144250748b716d6dc8789dee52d26164daab732145bed60456013a4"
KEDA_CRD = "config/crd/bases/keda.sh_scaledobjects.yaml"
CACHE = REPO / ".venv" / "share" / "k8s"
GOPROXY = os.environ.get("GOPROXY", "https://proxy.golang.org").split(",")[0]

Manifest = dict[str, Any]
T = TypeVar("T")


def kustomize() -> list[str]:
    """kubectl's kustomize, else kustomize itself (scripts/install-tools.sh builds it)."""
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    for found in (shutil.which("kustomize"), REPO / ".venv" / "bin" / "kustomize"):
        if found and Path(found).exists():
            return [str(found), "build"]
    raise SystemExit("k8s: neither kubectl nor kustomize found (make install builds kustomize)")


def render() -> str:
    """Every manifest of k8s/kustomization.yaml, as one YAML stream."""
    command = [*kustomize(), "--load-restrictor", "LoadRestrictionsNone", str(REPO / "k8s")]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"k8s: {' '.join(command[:2])} failed:\n{result.stderr}")
    return result.stdout


def manifests(text: str | None = None) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(render() if text is None else text) if doc]


def _strict(schema: Any) -> Any:
    """An OpenAPI v3 structural schema as a JSON schema that, like the API server's strict field
    validation, refuses fields it does not define (where it does not preserve unknown ones)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def keda_schema() -> dict[str, Any]:
    """The ScaledObject's schema from KEDA's CRD (fetched once, hash-checked)."""
    cached = CACHE / f"keda-{KEDA_VERSION}-scaledobjects.yaml"
    if not cached.exists():
        url = f"{GOPROXY}/{KEDA_MODULE}/@v/{KEDA_VERSION}.zip"
        try:
            with urllib.request.urlopen(url, timeout=120) as response:
                data = response.read()
        except (OSError, urllib.error.URLError) as exc:
            raise SystemExit(f"k8s: cannot fetch KEDA's CRD from {url}: {exc}") from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != KEDA_ZIP_SHA256:
            raise SystemExit(f"k8s: {url} has sha256 {digest}, expected {KEDA_ZIP_SHA256}")
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            crd = archive.read(f"{KEDA_MODULE}@{KEDA_VERSION}/{KEDA_CRD}")
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(crd)
    crd_doc = yaml.safe_load(cached.read_text())
    (served,) = [v for v in crd_doc["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema: dict[str, Any] = _strict(served["schema"]["openAPIV3Schema"])
    return schema


def problems(docs: list[Manifest]) -> list[str]:
    """What is wrong with these manifests, as messages (none: valid)."""
    import jsonschema
    import kubernetes_validate

    found = []
    scaled_object = None
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("apiVersion") == "keda.sh/v1alpha1" and doc.get("kind") == "ScaledObject":
            scaled_object = scaled_object or keda_schema()
            for error in jsonschema.Draft7Validator(scaled_object).iter_errors(doc):
                where = "/".join(str(part) for part in error.absolute_path)
                found.append(f"{name}: {where}: {error.message}")
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(part) for part in exc.path)
            found.append(f"{name}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            found.append(f"{name}: no schema for it in Kubernetes {KUBERNETES_VERSION}: {exc}")
    return found


def validate() -> int:
    docs = manifests()
    found = problems(docs)
    for message in found:
        print(f"k8s: invalid: {message}", file=sys.stderr)
    kinds = sorted({doc["kind"] for doc in docs})
    print(
        f"k8s: {len(docs)} manifests ({', '.join(kinds)}): "
        + (f"{len(found)} problems" if found else f"valid for Kubernetes {KUBERNETES_VERSION}"),
        file=sys.stderr,
    )
    return 1 if found else 0


# --- The smoke test under podman ---------------------------------------------------------

SMOKE_WORKLOADS = ("api", "nginx", "otel-collector")
# The images of k8s/kustomization.yaml to the variables of .env that name them on this machine
# (stand-ins export their own). The api's is the one compose builds.
LOCAL_IMAGES = {
    "mnist-api": "API_IMAGE",
    "nginx": "NGINX_IMAGE",
    "otel/opentelemetry-collector-contrib": "OTELCOL_IMAGE",
}


def image_env(environ: Mapping[str, str]) -> dict[str, str]:
    """.env's image variables, overridden by those of `environ`."""
    found = {"API_IMAGE": "mnist-api:local"}
    for line in (REPO / ".env").read_text().splitlines():
        name, _, value = line.partition("=")
        if name.endswith("_IMAGE") and not line.startswith("#"):
            found[name] = value
    return found | {name: value for name, value in environ.items() if name.endswith("_IMAGE")}


# The smoke test's Deployments are renamed with this prefix: their pods' names are its own.
SMOKE_PREFIX = "mnist-k8s-smoke-"


def pod_name(deployment: Manifest) -> str:
    """The name `podman kube play` gives a Deployment's first pod, also its DNS name."""
    return f"{deployment['metadata']['name']}-pod-0"


def pod_host(workload: str) -> str:
    """The DNS name of a smoke workload's pod on its podman network (it has no Services)."""
    return f"{SMOKE_PREFIX}{workload}-pod-0"


def for_podman(docs: list[Manifest], env: dict[str, str], port: int) -> list[Manifest]:
    """The smoke workloads of the rendered manifests and their ConfigMaps, as `podman kube
    play` runs them: local images, pod names for Service names, one pod each, nginx published
    on 127.0.0.1:`port` and the Collector's Prometheus export on `port + 1`."""
    chosen = [
        copy.deepcopy(doc)
        for doc in docs
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] in SMOKE_WORKLOADS
    ]
    maps = {
        volume["configMap"]["name"]
        for doc in chosen
        for volume in doc["spec"]["template"]["spec"].get("volumes", [])
        if "configMap" in volume
    }
    renames = {
        "otel-collector:4318": f"{pod_host('otel-collector')}:4318",
        "api.$(POD_NAMESPACE).svc.cluster.local:8000": f"{pod_host('api')}:8000",
    }
    for doc in chosen:
        doc["metadata"]["name"] = SMOKE_PREFIX + doc["metadata"]["name"]
        doc["spec"]["replicas"] = 1
        for container in doc["spec"]["template"]["spec"]["containers"]:
            repository = container["image"].rsplit(":", 1)[0]
            container["image"] = env[LOCAL_IMAGES[repository]]
            for item in container.get("env", []):
                if item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == (
                    "metadata.namespace"
                ):  # not one podman knows
                    item["value"] = doc["metadata"]["namespace"]
                    del item["valueFrom"]
                for old, new in renames.items():
                    if isinstance(item.get("value"), str):
                        item["value"] = item["value"].replace(old, new)
            # podman publishes every containerPort on the host's every address: only these
            # two, on loopback. And it runs an httpGet probe with curl inside the container,
            # which these images do not have: the probes are left to the schema check.
            published = {("nginx", "http"): port, ("otel-collector", "export"): port + 1}
            container["ports"] = [
                {
                    **named,
                    "hostPort": published[container["name"], named["name"]],
                    "hostIP": "127.0.0.1",
                }
                for named in container.get("ports", [])
                if (container["name"], named["name"]) in published
            ]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                container.pop(probe, None)
    return chosen + [
        doc for doc in docs if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] in maps
    ]


def _podman(*args: str, check: bool = True) -> str:
    result = subprocess.run(["podman", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


@contextmanager
def played(docs: list[Manifest], network: str) -> Iterator[Path]:
    """The manifests running under `podman kube play` on their own network; torn down after."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "smoke.yaml"
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        # `kube down` stops at the first pod that is not there: a half-made earlier run's
        # pods are removed by name.
        pods = [pod_name(doc) for doc in docs if doc["kind"] == "Deployment"]

        def remove() -> None:
            _podman("pod", "rm", "--force", "--ignore", *pods, check=False)
            _podman("network", "rm", "--force", network, check=False)

        remove()
        _podman("network", "create", network)
        try:
            _podman("kube", "play", "--network", network, str(path))
            yield path
        except BaseException:
            for name in _podman("ps", "-a", "--format", "{{.Names}}", check=False).split():
                if not name.startswith(SMOKE_PREFIX):
                    continue
                logs = subprocess.run(["podman", "logs", "--tail", "15", name], capture_output=True)
                tail = (logs.stdout + logs.stderr).decode(errors="replace")
                print(f"--- {name}\n{tail}", file=sys.stderr)
            raise
        finally:
            _podman("kube", "down", str(path), check=False)
            remove()


def _get(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, data=body, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


def prediction(port: int, body: bytes, content_type: str) -> Any:
    """A prediction answered through nginx, or None (the api may still be loading its model)."""
    status, answer = _get(f"http://127.0.0.1:{port}/predict", body, {"Content-Type": content_type})
    return json.loads(answer) if status == 200 else None


def exports_both(port: int) -> bool:
    """Whether the Collector's Prometheus export on `port` has the api's predictions and the nginx
    pod's requests, named by the pod (its sidecar's resource attribute)."""
    try:
        lines = _get(f"http://127.0.0.1:{port}/metrics")[1].decode().splitlines()
    except (OSError, urllib.error.URLError):
        return False
    nginx = f'host_name="{pod_host("nginx")}"'
    return any(line.startswith("mnist_predictions_total{") for line in lines) and any(
        line.startswith("nginx_requests_total{") and nginx in line for line in lines
    )


def check_hardening(docs: list[Manifest]) -> None:
    """Each running container as its manifest says: its user, a read-only root, no capabilities."""
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in pod["containers"]:
            name = f"{pod_name(doc)}-{container['name']}"
            (found,) = json.loads(_podman("inspect", name))
            user = container["securityContext"].get(
                "runAsUser", pod["securityContext"]["runAsUser"]
            )
            state = (
                found["Config"]["User"].split(":")[0],
                found["HostConfig"]["ReadonlyRootfs"],
                found["BoundingCaps"] or [],
            )
            if state != (str(user), True, []):
                raise SystemExit(f"k8s: {name} runs as (user, read-only, capabilities) {state}")
    print("k8s: every container runs as its user, read-only, with no capabilities", file=sys.stderr)


def waited(check: Callable[[], T | None], *, timeout: float, interval: float, what: str) -> T:
    """harness.cluster.poll, its timeout as this command's failure."""
    from harness.cluster import poll

    try:
        return poll(check, timeout=timeout, interval=interval, what=what)
    except TimeoutError as exc:
        raise SystemExit(f"k8s: {exc}") from None


def smoke(port: int = 18280, environ: Mapping[str, str] = os.environ) -> int:
    if shutil.which("podman") is None:
        raise SystemExit(
            "k8s: the smoke test runs the manifests with `podman kube play`: install podman"
        )
    from harness.mnist_slice import load_test_slice
    from harness.payloads import payloads

    payload = payloads()["png-28x28"]  # the first MNIST test digit
    label = int(load_test_slice()[1][0])
    docs = for_podman(manifests(), image_env(environ), port)
    with played(docs, "mnist-k8s-smoke"):
        answer = waited(
            lambda: prediction(port, payload.body, payload.content_type),
            timeout=180,
            interval=1,
            what="a prediction through nginx",
        )
        print(f"k8s: prediction through nginx: {answer}", file=sys.stderr)
        if answer.get("digit") != label:
            raise SystemExit(f"k8s: the digit {label} was read as {answer.get('digit')}")
        # Both pods' figures reach the Collector: the api's OTLP, and nginx's stub_status
        # through its sidecar.
        waited(
            lambda: exports_both(port + 1),
            timeout=60,
            interval=2,
            what="the Collector to export the api's and nginx's metrics",
        )
        print("k8s: the Collector exports the api's and nginx's metrics", file=sys.stderr)
        check_hardening(docs)
    print("k8s: smoke passed; torn down", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else ""
    if command == "render":
        sys.stdout.write(render())
        return 0
    if command == "validate":
        return validate()
    if command == "fetch":
        keda_schema()
        return 0
    if command == "smoke":
        return smoke()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
