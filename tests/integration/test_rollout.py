"""`scripts/cluster.sh rollout` (make rollout): every API replica replaced, one at a time, by
one of the image it builds, under load, with no request failed.

A checkout's image is the one the session's stack already runs, so the first rollout builds a
new one from it (a compose override through COMPOSE_FILE) that serves the same model under
another version, as a new model would: which image and which model version each replica runs
tell old from new, and the metrics show the split while it runs. It is tagged with a name of its
own, so that the image other compose projects on this machine use (mnist-api:local) is left
alone. The second rolls back to the checkout's own image, which leaves the stack as the tests
after these expect it.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.stack import REPLICAS, REPO, Load, Stack, predict, wait_for

NEW_IMAGE = "mnist-api:rollout-test"
NEW_VERSION_SUFFIX = "-rollout-test"
# The new image: the checkout's, serving its model under another version. Built from a context
# of its own (compose's classic builder, which podman's Docker API takes, has no inline
# Dockerfiles).
DOCKERFILE = f"""\
FROM mnist-api:local
USER 0
RUN python3 -c "import json; p = '/srv/model/metrics.json'; d = json.load(open(p)); \\
    d['version'] += '{NEW_VERSION_SUFFIX}'; json.dump(d, open(p, 'w'))"
USER 10001:10001
"""


def override(context: Path) -> str:
    return f"""\
services:
  api:
    image: {NEW_IMAGE}
    build:
      context: {context}
      dockerfile: Dockerfile
"""


@dataclass
class Rollout:
    old: dict[str, str]  # container id -> image id, before
    new: dict[str, str]  # after
    built: str  # the image id the service's image name (in `env`) points at after it
    output: str  # the command's stdout: one "old -> new" line per replica
    seconds: float
    requests: int  # answered through nginx while it ran
    load: Load
    versions: list[dict[str, int]]  # replicas by model version, as Prometheus had them meanwhile


def images(stack: Stack, containers: list[str]) -> dict[str, str]:
    return {c: stack.docker("inspect", "-f", "{{.Image}}", c).strip() for c in containers}


def replicas_by_version(stack: Stack) -> dict[str, int]:
    """The model dashboard's "Replicas by model version", from Prometheus."""
    found = stack.prometheus("model_version:mnist_replicas:count")
    return {s["metric"]["model_version"]: int(float(s["value"][1])) for s in found}


def hostnames(stack: Stack, containers: list[str]) -> set[str]:
    return {stack.docker("inspect", "-f", "{{.Config.Hostname}}", c).strip() for c in containers}


def rollout(stack: Stack, env: dict[str, str]) -> Rollout:
    """Run the rollout on the test project with load through nginx all along."""
    stack.ensure_replicas(REPLICAS)
    old = images(stack, stack.replicas())
    versions: list[dict[str, int]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(2):
            versions.append(replicas_by_version(stack))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with Load(stack) as load:
        time.sleep(2)
        before = load.total
        started = time.monotonic()
        completed = subprocess.run(
            ["scripts/cluster.sh", "rollout"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        seconds = time.monotonic() - started
        requests = load.total - before
        time.sleep(2)
    done.set()
    watcher.join()
    log = "\n".join(line for line in completed.stderr.splitlines() if line.startswith("cluster:"))
    print(f"\n{completed.stdout}{log}")
    print(f"rollout: {seconds:.0f} s, {requests} requests meanwhile, slowest {load.slowest:.2f} s")
    assert completed.returncode == 0, completed.stderr[-4000:]
    image_name = Stack(env).compose("config", "--images", "api").split()[0]
    built = stack.docker("image", "inspect", "-f", "{{.Id}}", image_name).strip()
    return Rollout(
        old,
        images(stack, stack.replicas()),
        built,
        completed.stdout,
        seconds,
        requests,
        load,
        versions,
    )


def check(stack: Stack, done: Rollout) -> None:
    load = done.load
    assert load.failures == {}, f"{load.failures} of {load.total} requests failed"
    assert done.requests >= max(200, 10 * done.seconds), (done.requests, load.statuses)
    # As many replicas as before, every one a new container on the image just built, and no
    # old one left, running or stopped.
    assert len(done.new) == REPLICAS, done.new
    assert not set(done.new) & set(done.old), (done.old, done.new)
    assert set(stack.compose("ps", "-a", "-q", "api").split()) == set(done.new)
    assert set(done.new.values()) == {done.built}, (done.new, done.built)
    assert stack.healthy_replicas() == REPLICAS
    assert len([line for line in done.output.splitlines() if " -> " in line]) == REPLICAS
    # The new replicas took requests while the rollout ran (each was in nginx's rotation
    # before an old one left), and now they alone answer.
    new_hosts = hostnames(stack, list(done.new))
    assert new_hosts <= set(load.served_by), (new_hosts, load.served_by)
    answered: set[str] = set()
    for _ in range(10 * REPLICAS):
        status, served_by = predict(stack)
        assert status == 200
        answered.add(served_by.split("/")[0])
    assert answered == new_hosts, (answered, new_hosts)


@pytest.fixture(scope="module")
def new_image_env(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """The stack's environment with the override that makes the rollout build a new image."""
    folder = tmp_path_factory.mktemp("rollout")
    (folder / "Dockerfile").write_text(DOCKERFILE)
    (folder / "override.yaml").write_text(override(folder))
    files = ["compose.yaml", str(folder / "override.yaml")]
    yield {**stack.env, "COMPOSE_FILE": os.pathsep.join(files)}
    try:  # unused once the stack is back on the checkout's image
        stack.docker("image", "rm", NEW_IMAGE)
    except subprocess.CalledProcessError as exc:
        print(f"{NEW_IMAGE} left: {exc.stderr}")


def test_a_rollout_replaces_every_replica_under_load_and_fails_no_request(
    stack: Stack, new_image_env: dict[str, str]
) -> None:
    done = rollout(stack, new_image_env)
    assert set(done.old.values()).isdisjoint({done.built}), "the rollout built no new image"
    check(stack, done)
    # The split while it ran: the old version and the new one side by side, then the new alone.
    (old_version,) = done.versions[0]
    new_version = old_version + NEW_VERSION_SUFFIX
    assert any(len(seen) == 2 for seen in done.versions), done.versions
    assert all(set(seen) <= {old_version, new_version} for seen in done.versions), done.versions
    wait_for(
        lambda: replicas_by_version(stack) == {new_version: REPLICAS},
        timeout=90,
        what=f"{REPLICAS} replicas on model {new_version} alone",
    )
    # The replaced replicas said they were stopping: once their series are gone from the
    # Collector (metric_expiration, 30 s), none counts as missing: no MnistReplicaMissing.
    wait_for(
        lambda: stack.scalar("mnist:replicas:count") == REPLICAS,
        timeout=90,
        what="the replaced replicas' series to expire",
    )
    time.sleep(15)  # the alert's `for` (10 s) and a rule evaluation
    assert stack.scalar("mnist:replicas_missing:count") == 0
    missing = [
        a
        for a in stack.prometheus_api("alerts")["alerts"]
        if a["labels"]["alertname"] == "MnistReplicaMissing"
    ]
    assert missing == [], missing  # neither firing nor pending


def test_a_rollout_back_to_the_checkouts_image(stack: Stack) -> None:
    done = rollout(stack, stack.env)
    check(stack, done)
