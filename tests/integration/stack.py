"""What the integration tests use besides the session's stack fixture (conftest.py): the test
project's names and ports, `Stack` (the compose project plus requests and Prometheus queries),
`Load` (clients in a loop) and the polling and counting helpers.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from harness.cluster import Cluster, engine_get, poll
from harness.cluster import engine_env as cluster_env
from tests.helpers import digit_image, multipart, png_bytes

REPO = Path(__file__).resolve().parents[2]
PROJECT = "mnist-test"
PORT = int(os.environ.get("TEST_HTTP_PORT", "18080"))
PROMETHEUS_PORT = int(os.environ.get("TEST_PROMETHEUS_PORT", "19090"))
REPLICAS = 3
T = TypeVar("T")

# Run in a replica: the pid of each gunicorn worker, one a line (a process whose parent is the
# container's first process, gunicorn's master, and whose command line is gunicorn's).
GUNICORN_WORKERS = (
    "import os\n"
    "for p in os.listdir('/proc'):\n"
    "    if p.isdigit() and open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1] == '1'"
    " and 'gunicorn' in open(f'/proc/{p}/cmdline').read(): print(p)"
)


def forget_connections_to(addresses: set[str], env: dict[str, str], stacklevel: int = 2) -> None:
    """Delete the kernel's connection tracking of connections to addresses that a restarted or
    recreated container no longer has, where the engine is rootful podman.

    podman (netavark) publishes a port by DNAT, the host's own connections to 127.0.0.1 too, and
    a restart gives the container a new address. A connection whose SYN found the old container
    gone stays tracked with its translation to the old address (SYN_SENT: 120 s after its last
    retransmission), and a later connection that draws the same source port is sent there and
    fails, EHOSTUNREACH after 3 s. Docker's userland proxy, its default, takes the host's own
    connections itself, and rootless podman forwards ports with a proxy too: nothing to delete."""
    if not addresses or os.geteuid() != 0 or not engine_is_podman(env):
        return
    if shutil.which("conntrack") is None:
        warnings.warn(
            f"cannot delete the connection tracking of {sorted(addresses)}: conntrack is not "
            "installed (apt-get install conntrack); a later connection may fail (EHOSTUNREACH)",
            stacklevel=stacklevel,
        )
        return
    for address in sorted(addresses):
        deleted = subprocess.run(
            ["conntrack", "-D", "--reply-src", address], capture_output=True, text=True
        )
        # Exit status 1 with "0 flow entries have been deleted": nothing was tracked.
        if deleted.returncode != 0 and " 0 flow entries" not in deleted.stderr:
            warnings.warn(
                f"conntrack -D --reply-src {address} failed ({deleted.returncode}): "
                f"{deleted.stderr.strip()}",
                stacklevel=stacklevel,
            )


def engine_is_podman(env: dict[str, str]) -> bool:
    components = engine_get(env, "/version").get("Components") or []
    return any("podman" in str(component.get("Name", "")).lower() for component in components)


def wait_for(
    check: Callable[[], T | None], *, timeout: float, interval: float = 0.5, what: str
) -> T:
    """Poll `check` until it returns something truthy; fail saying what did not happen."""
    try:
        return poll(check, timeout=timeout, interval=interval, what=what)
    except TimeoutError as exc:
        pytest.fail(str(exc))


@dataclass
class Stack(Cluster):
    """The test project: `Cluster` (compose, replicas, engine stats) plus what tests ask of it."""

    port: int = PORT

    def docker(self, *args: str) -> str:
        return subprocess.run(
            ["docker", *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout

    def prometheus_api(self, path: str, **params: str) -> Any:
        """The `data` of a Prometheus HTTP API answer (path: "query", "rules", "alerts", ...)."""
        url = f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def prometheus(self, query: str) -> list[dict[str, Any]]:
        """The result vector of an instant PromQL query."""
        result: list[dict[str, Any]] = self.prometheus_api("query", query=query)["result"]
        return result

    def scalar(self, query: str) -> float | None:
        result = self.prometheus(query)
        return float(result[0]["value"][1]) if result else None

    @contextmanager
    def readdressed(self, service: str, stacklevel: int = 4) -> Iterator[None]:
        """Around a block that restarts or recreates `service`: afterwards, the connections to
        the addresses it no longer has are forgotten (`forget_connections_to`; a warning names
        the frame `stacklevel` up, by default the `with` statement's)."""
        before = self.addresses(service)
        try:
            yield
        finally:
            forget_connections_to(before - self.addresses(service), self.env, stacklevel)

    def restart(self, service: str) -> None:
        """`docker compose restart service`, in `readdressed`."""
        with self.readdressed(service, stacklevel=5):  # the caller's line
            self.compose("restart", service)

    def recreate(self, service: str, **settings: str) -> None:
        """`docker compose up --force-recreate` of `service` alone, with `settings` over the
        project's environment, in `readdressed`."""
        with self.readdressed(service, stacklevel=5):
            changed = replace(self, env={**self.env, **settings})
            changed.compose("up", "-d", "--no-deps", "--force-recreate", service)

    @contextmanager
    def stopped(self, service: str) -> Iterator[None]:
        """`service` stopped for the block, then started again, in `readdressed`."""
        with self.readdressed(service, stacklevel=6):
            self.compose("stop", service)
            try:
                yield
            finally:
                self.compose("start", service)

    def gunicorn_workers(self, container: str) -> list[int]:
        """The pids of the gunicorn workers in a replica (the master's children)."""
        listing = self.docker("exec", container, "python3", "-c", GUNICORN_WORKERS)
        return sorted(int(pid) for pid in listing.split())

    def wait_for_worker_series(self, timeout: float = 120) -> None:
        """Wait until the workers' series in Prometheus are exactly the running workers' (their
        `instance`, `<hostname>-<pid>`): a new worker's exported, a gone one's expired. (A count
        of them can pass while a replacement is not yet exporting and its predecessor is.)"""
        running = set()
        for container in self.replicas():
            host = engine_get(self.env, f"/containers/{container}/json")["Config"]["Hostname"]
            running |= {f"{host}-{pid}" for pid in self.gunicorn_workers(container)}

        def only_theirs() -> bool:
            found = self.prometheus('mnist_queue_depth{job="mnist-api"}')
            reporting = {r["metric"]["instance"] for r in found}
            # poll keeps the last failure for its message: what differs.
            assert reporting == running, sorted(reporting ^ running)
            return True

        wait_for(
            only_theirs,
            timeout=timeout,
            interval=2,
            what=f"series from exactly the {len(running)} running workers",
        )

    def ensure_replicas(self, count: int) -> None:
        try:
            self.scale(count)
        except TimeoutError as exc:
            pytest.fail(str(exc))

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return (
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                response.read(),
            )
        finally:
            connection.close()


DIGIT_BODY, DIGIT_TYPE = multipart(png_bytes(digit_image()))


def predict(stack: Stack) -> tuple[int, str]:
    status, headers, _ = stack.request("POST", "/predict", DIGIT_BODY, {"Content-Type": DIGIT_TYPE})
    return status, headers.get("x-served-by", "")


def total_predictions(stack: Stack) -> float:
    return stack.scalar('sum(mnist_predictions_total{job="mnist-api"})') or 0.0


def settled_total(stack: Stack) -> float:
    """The counter's sum once it stops moving (every worker's last export has landed)."""
    previous: list[float] = []

    def stable() -> tuple[float] | None:
        previous.append(total_predictions(stack))
        # Unchanged for 12 s: longer than an export (5 s) and a scrape (5 s) together, so that
        # no prediction already made is still on its way.
        if len(previous) >= 5 and len(set(previous[-5:])) == 1:
            return (previous[-1],)  # a tuple: truthy even when the total is 0
        return None

    (total,) = wait_for(stable, timeout=120, interval=3, what="the counter to settle")
    return total


@dataclass
class Load:
    """Clients that POST /predict in a loop over keep-alive connections, recording every
    outcome, until stopped."""

    stack: Stack
    clients: int = 4
    # Each request with a traceparent of its own, with these trace flags ("01": sampled).
    traceparent: str | None = None
    statuses: Counter[int | str] = field(default_factory=Counter)
    served_by: Counter[str] = field(default_factory=Counter)
    slowest: float = 0.0  # seconds, the longest a request took
    # When each failed request was sent (monotonic): a request sent into an outage may only
    # fail at its client's timeout.
    failed_at: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _client(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.stack.port, timeout=30)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                headers = {"Content-Type": DIGIT_TYPE}
                if self.traceparent is not None:
                    ids = f"{secrets.token_hex(16)}-{secrets.token_hex(8)}"
                    headers["traceparent"] = f"00-{ids}-{self.traceparent}"
                connection.request("POST", "/predict", body=DIGIT_BODY, headers=headers)
                response = connection.getresponse()
                response.read()
                outcome: int | str = response.status
                host = (response.getheader("x-served-by") or "").split("/")[0]
            except (OSError, http.client.HTTPException) as exc:
                outcome, host = f"{type(exc).__name__}: {exc}", ""
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.stack.port, timeout=30)
            with self._lock:
                self.statuses[outcome] += 1
                self.slowest = max(self.slowest, time.monotonic() - started)
                if outcome != 200:
                    self.failed_at.append(started)
                if host:
                    self.served_by[host] += 1
            time.sleep(0.005)
        connection.close()

    def __enter__(self) -> Load:
        for _ in range(self.clients):
            thread = threading.Thread(target=self._client, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def failures(self) -> dict[int | str, int]:
        return {k: v for k, v in self.statuses.items() if k != 200}


def engine_env() -> dict[str, str]:
    """The environment scripts/cluster.sh sets up (engine, stand-ins), for this project."""
    return cluster_env(
        PROJECT,
        # Two workers per replica (the default is one): every worker of every replica must
        # report, and nothing be counted twice.
        API_WORKERS="2",
        HTTP_PORT=str(PORT),
        PROMETHEUS_PORT=str(PROMETHEUS_PORT),
        GRAFANA_PORT="13000",
        JAEGER_PORT="16687",
    )
