"""The stack as a user with Docker starts it: `docker compose up -d --scale api=3` in a fresh
checkout, with nothing made beforehand, Grafana's profile on, as .env has it.

The checkout holds what a clone would (tracked files, and new ones not yet ignored), so no file
`make up` or a test left behind can help. Where the official Grafana image cannot be had, a
double of it (grafana-double/) takes its place: built from the traits of the official image that
the stack relies on, it checks a login the way Grafana takes the admin password.
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.cluster import Cluster
from tests.integration.stack import DIGIT_BODY, DIGIT_TYPE, engine_env, wait_for

REPO = Path(__file__).resolve().parents[2]
PROJECT = "mnist-fresh"
PORT, PROMETHEUS_PORT, GRAFANA_PORT, JAEGER_PORT = 18180, 19190, 13100, 16786
DOUBLE = "localhost/mnist-test/grafana-double:1"
PASSWORD_FILE = "/var/lib/grafana/admin-password"


def checkout(target: Path) -> Path:
    """What `git clone` of this working tree would hold, copied into `target`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = REPO / name.decode()
        if source.is_file():  # not a file deleted but not yet committed
            (target / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name.decode())
    return target


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = checkout(tmp_path_factory.mktemp("clone") / "mnist")
    assert not (root / "secrets").exists()
    return root


def test_every_file_the_stack_mounts_is_in_the_checkout(clone: Path) -> None:
    # Docker refuses to start a container whose bind-mount source or secret file is missing, so
    # on a Docker machine one missing file stops the whole `up`. (podman creates what is
    # missing: this is checked before anything starts.)
    listed = subprocess.run(
        ["docker", "compose", "--profile", "grafana", "config", "--format", "json"],
        cwd=clone,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    config = json.loads(listed)
    sources = [
        Path(volume["source"])
        for service in config["services"].values()
        for volume in service.get("volumes", [])
        if volume["type"] == "bind"
    ] + [Path(secret["file"]) for secret in config.get("secrets", {}).values()]
    assert "grafana" in config["services"]
    assert len(sources) >= 5
    assert [str(path) for path in sources if not path.exists()] == []


@pytest.fixture(scope="module")
def fresh(clone: Path) -> Iterator[Cluster]:
    root = clone
    env = engine_env()
    # The engine and stand-in images as `make up` would set them; everything else from .env.
    for name in ("API_WORKERS", "HTTP_PORT", "PROMETHEUS_PORT", "GRAFANA_PORT", "JAEGER_PORT"):
        env.pop(name, None)
    grafana_here = "grafana" in env.get("COMPOSE_PROFILES", "grafana")
    env.update(
        COMPOSE_PROJECT_NAME=PROJECT,
        COMPOSE_PROFILES="grafana",
        HTTP_PORT=str(PORT),
        PROMETHEUS_PORT=str(PROMETHEUS_PORT),
        GRAFANA_PORT=str(GRAFANA_PORT),
        JAEGER_PORT=str(JAEGER_PORT),
    )
    if not grafana_here:
        context = REPO / "tests" / "integration" / "grafana-double"
        base = f"BASE={env['PYTHON_IMAGE']}"
        subprocess.run(
            ["docker", "build", "-q", "-t", DOUBLE, "--build-arg", base, str(context)],
            env=env,
            check=True,
            capture_output=True,
            timeout=600,
        )
        env["GRAFANA_IMAGE"] = DOUBLE
    cluster = Cluster(env, root=root)
    cluster.compose("down", "--volumes", "--remove-orphans", check=False)
    try:
        # The direct command, in the checkout: no make, no scripts.
        cluster.compose("up", "-d", "--scale", "api=3", timeout=1800)
        yield cluster
    finally:
        logs = cluster.compose("logs", "--no-color", "--tail", "2000", check=False)
        (REPO / ".cache").mkdir(exist_ok=True)
        (REPO / ".cache" / "fresh-clone-stack.log").write_text(logs)
        cluster.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)


def predict(port: int) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/predict", DIGIT_BODY, {"Content-Type": DIGIT_TYPE})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_the_direct_compose_command_serves_predictions(fresh: Cluster) -> None:
    wait_for(lambda: fresh.healthy_replicas() == 3, timeout=300, what="3 healthy API replicas")
    wait_for(lambda: predict(PORT) == 200, timeout=60, what="a prediction through nginx")


def grafana_login(user: str, password: str) -> int:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{GRAFANA_PORT}/api/user", headers={"Authorization": f"Basic {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def grafana_password(cluster: Cluster) -> str:
    return cluster.compose("exec", "-T", "grafana", "cat", PASSWORD_FILE)


def test_grafana_gets_a_generated_password_never_the_default(fresh: Cluster) -> None:
    wait_for(
        lambda: grafana_login("admin", "") == 401, timeout=300, what="Grafana to answer logins"
    )
    password = grafana_password(fresh)
    assert len(password) == 32
    assert password.isalnum()
    assert grafana_login("admin", password) == 200
    assert grafana_login("admin", "admin") == 401
    # Only Grafana's user may read it.
    mode = fresh.compose("exec", "-T", "grafana", "stat", "-c", "%a %u", PASSWORD_FILE).split()
    assert mode == ["600", "472"]


def test_grafana_keeps_its_password_across_a_restart(fresh: Cluster) -> None:
    before = grafana_password(fresh)
    fresh.compose("restart", "grafana")
    wait_for(
        lambda: grafana_login("admin", before) == 200,
        timeout=300,
        what="Grafana to accept the same password after a restart",
    )
    assert grafana_password(fresh) == before


def test_a_database_older_than_the_password_file_is_named_not_given_a_new_one(
    fresh: Cluster,
) -> None:
    # As a grafana-data volume made before grafana/entrypoint.sh: a database, no password file.
    fresh.compose(
        "exec",
        "-T",
        "grafana",
        "sh",
        "-c",
        f"rm {PASSWORD_FILE}; touch /var/lib/grafana/grafana.db",
    )
    fresh.compose("restart", "grafana")
    wait_for(
        lambda: "has no /var/lib/grafana/admin-password" in fresh.compose("logs", "grafana"),
        timeout=120,
        what="Grafana's entrypoint to name the database without a password file",
    )
    # No password was made that Grafana would never apply.
    listed = fresh.compose("exec", "-T", "grafana", "ls", "/var/lib/grafana")
    assert "admin-password" not in listed.split()
