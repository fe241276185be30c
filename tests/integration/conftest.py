"""The real stack, started once per test session and always torn down.

It runs as its own compose project (`mnist-test`) on its own port, so that a stack a developer
has up is left alone. Nothing here is mocked: the app's container image, nginx and the engine's
DNS are the real ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.stack import REPLICAS, REPO, Stack, engine_env, wait_for


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
    # The fresh checkout's stack runs first, alone (before the session's stack starts); the
    # soak and the benchmark smoke test load the session's stack for minutes: they run last.
    order = {"test_fresh_clone.py": -1, "test_soak.py": 1, "test_bench.py": 2}
    items.sort(key=lambda item: order.get(Path(str(item.fspath)).name, 0))


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    env = engine_env()
    the_stack = Stack(env)
    the_stack.compose("down", "--remove-orphans", "--volumes", check=False)
    try:
        started = time.monotonic()
        the_stack.compose("build", "api", timeout=3600)
        the_stack.compose("up", "-d", "--scale", f"api={REPLICAS}", timeout=900)
        wait_for(
            lambda: the_stack.healthy_replicas() >= REPLICAS,
            timeout=300,
            what=f"{REPLICAS} healthy API replicas",
        )
        wait_for(
            lambda: the_stack.request("GET", "/readyz")[0] == 200,
            timeout=60,
            what="nginx to reach a ready replica",
        )
        wait_for(lambda: the_stack.prometheus("up"), timeout=120, what="Prometheus to answer")
        print(f"\nstack up in {time.monotonic() - started:.0f} s")
        yield the_stack
    finally:
        logs = the_stack.compose("logs", "--no-color", "--tail", "20000", check=False)
        (REPO / ".cache").mkdir(exist_ok=True)
        (REPO / ".cache" / "integration-stack.log").write_text(logs)
        the_stack.compose("down", "--remove-orphans", "--volumes", "--timeout", "10", check=False)
