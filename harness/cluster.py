"""The compose cluster, seen from the benchmarks (and the integration tests): scale it, wait
for it, and read each container's CPU time from the engine.

Everything goes through `docker compose` and the Docker Engine API with the environment that
`scripts/cluster.sh env` prints (Docker itself, or podman's Docker API on machines without it),
so the same code drives both engines.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from harness.servers import REPO

T = TypeVar("T")


def engine_env(project: str, **overrides: str) -> dict[str, str]:
    """This process's environment plus what scripts/cluster.sh sets up (engine, stand-in
    images), for compose project `project`."""
    env = {**os.environ, "COMPOSE_PROJECT_NAME": project, **overrides}
    # Tests turn the SDK off in their own process; the stack's workers must keep it on.
    env.pop("OTEL_SDK_DISABLED", None)
    exports = subprocess.run(
        ["scripts/cluster.sh", "env"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=3600,
    ).stdout
    for line in exports.splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = value.strip("'\"")
    return env


def poll(check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.5) -> T:
    """Call `check` until it returns something truthy; TimeoutError saying what did not happen."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except Exception as exc:  # a poll may fail while things settle
            last = exc
        else:
            if result:
                return result
            last = result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def engine_get(env: Mapping[str, str], path: str, timeout: float = 10.0) -> Any:
    """GET a Docker Engine API path from the engine `env` points at (its DOCKER_HOST, unix://
    or tcp://; Docker's default socket without one); the decoded JSON."""
    docker_host = env.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    url = urllib.parse.urlsplit(docker_host)
    connection: http.client.HTTPConnection
    if url.scheme == "unix":
        connection = _UnixConnection(url.path, timeout)
    elif url.scheme in ("tcp", "http"):
        connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)
    else:
        raise ValueError(f"unsupported DOCKER_HOST {docker_host!r}")
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError(f"engine API {path}: {response.status} {body[:200]!r}")
        return json.loads(body)
    finally:
        connection.close()


def prometheus_query(address: str, query: str, at: float | None = None) -> list[dict[str, Any]]:
    """The result vector of an instant PromQL query to the Prometheus at `address` (host:port),
    evaluated at `at` (epoch seconds) or now."""
    params = {"query": query} if at is None else {"query": query, "time": f"{at:.3f}"}
    url = f"http://{address}/api/v1/query?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as response:
        result: list[dict[str, Any]] = json.load(response)["data"]["result"]
    return result


@dataclass
class Cluster:
    """One compose project of this repository's compose.yaml (plus override files)."""

    env: dict[str, str]
    files: tuple[str, ...] = ()
    root: Path = REPO  # the checkout whose compose.yaml and .env it runs
    project: str = field(init=False)

    def __post_init__(self) -> None:
        self.project = self.env["COMPOSE_PROJECT_NAME"]

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        options = [item for name in self.files for item in ("-f", name)]
        if options:
            options = ["-f", "compose.yaml", *options]
        completed = subprocess.run(
            ["docker", "compose", *options, *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and completed.returncode != 0:
            raise RuntimeError(
                f"docker compose {' '.join(args)} failed ({completed.returncode}):\n"
                f"{completed.stdout}\n{completed.stderr}"
            )
        return completed.stdout

    def replicas(self) -> list[str]:
        """IDs of the running API containers."""
        return self.compose("ps", "-q", "api").split()

    def healthy_replicas(self) -> int:
        return self.compose("ps", "api", "--format", "{{.Health}}").split().count("healthy")

    def scale(self, count: int, timeout: float = 180) -> None:
        """`docker compose up --scale api=N`, then wait until N replicas are healthy."""
        self.compose("up", "-d", "--no-recreate", "--no-build", "--scale", f"api={count}", "api")
        poll(
            lambda: self.healthy_replicas() == count and len(self.replicas()) == count,
            timeout=timeout,
            what=f"{count} healthy API replicas",
        )

    def published(self, service: str, port: int) -> str:
        """host:port on which `service`'s container port is published."""
        return self.compose("port", service, str(port)).strip().splitlines()[0]

    def addresses(self, service: str) -> set[str]:
        """The IPv4 addresses of `service`'s running containers."""
        found = set()
        for container in self.compose("ps", "-q", service).split():
            settings = engine_get(self.env, f"/containers/{container}/json")["NetworkSettings"]
            networks = (settings.get("Networks") or {}).values()
            found |= {n["IPAddress"] for n in networks if n.get("IPAddress")}
        return found

    def places_per_replica(self) -> int:
        """Requests a running replica serves at once: MAX_CONCURRENCY in each of its workers."""
        running = self.container_env("api")
        return int(running.get("MAX_CONCURRENCY", "16")) * int(running.get("WEB_CONCURRENCY", "1"))

    def container_env(self, service: str) -> dict[str, str]:
        """The environment of a running container of `service`."""
        container = self.compose("ps", "-q", service).split()[0]
        info = engine_get(self.env, f"/containers/{container}/json")
        return dict(item.partition("=")[::2] for item in info["Config"]["Env"])

    def cpu_seconds(self) -> dict[str, float] | None:
        """CPU time (user + system) so far of each running container of the project, by
        name, from the engine's stats; None where the engine does not report it."""
        label = json.dumps({"label": [f"com.docker.compose.project={self.project}"]})
        try:
            containers = engine_get(
                self.env, "/containers/json?filters=" + urllib.parse.quote(label)
            )
            usage = {}
            for container in containers:
                stats = engine_get(
                    self.env, f"/containers/{container['Id']}/stats?stream=false&one-shot=true"
                )
                total = stats.get("cpu_stats", {}).get("cpu_usage", {}).get("total_usage")
                if total:
                    usage[container["Names"][0].lstrip("/")] = total / 1e9
        except (OSError, ValueError, KeyError):
            return None
        return usage or None


def running_cluster(project: str, port: int | None = None) -> tuple[Cluster, int]:
    """The running cluster of compose project `project` and nginx's published port (`port`,
    when given, instead); exits saying what to do when none runs."""
    cluster = Cluster(engine_env(project))
    if not cluster.replicas():
        raise SystemExit(
            f"no running cluster in compose project {project!r}: start it with `make up`"
        )
    return cluster, port or int(cluster.published("nginx", 8080).rpartition(":")[2])
