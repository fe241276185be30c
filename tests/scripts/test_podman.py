"""scripts/no-docker/podman.sh starts podman's service so that no checkout holds it: run from /,
and restarted when it was left running in a directory since deleted (where podman can start no
container). Against a stand-in podman that records where it runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.scripts.fakes import FakeTools

# `podman system service ...`: says it is up (the stand-in docker then answers), records its
# directory, and runs until killed.
FAKE_PODMAN = """#!/usr/bin/env bash
printf '%s\\n' "podman $*" >>"${FAKE_LOG:?}"
[ "$1 $2" = "system service" ] || exit 0
pwd >"${FAKE_PODMAN_CWD:?}"
touch "${FAKE_ENGINE_UP:?}"
trap 'kill $! 2>/dev/null; rm -f "$FAKE_ENGINE_UP"; exit 0' TERM
sleep 3600 &
wait
"""


@pytest.fixture
def tools(tmp_path: Path) -> FakeTools:
    tools = FakeTools(tmp_path)
    tools.add("podman", FAKE_PODMAN)
    return tools


def start_service(tools: FakeTools, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **tools.env,
        "ENGINE_RUN_DIR": str(tools.root / "run"),
        "ENGINE_SERVICE_LOG": str(tools.root / "service.log"),
        "ENGINE_WAIT_SECONDS": "10",
        "FAKE_ENGINE": "down",
        "FAKE_ENGINE_UP": str(tools.root / "up"),
        "FAKE_PODMAN_CWD": str(tools.root / "podman-cwd"),
        "FAKE_COMPOSE": "2.40.3",
    }
    script = Path(__file__).resolve().parents[2] / "scripts" / "no-docker" / "podman.sh"
    return subprocess.run(
        ["bash", "-c", f'source "{script}"; exec 3>&1; start_service'],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def service_pid(tools: FakeTools) -> int:
    return int((tools.root / "run" / "mnist-podman-service.pid").read_text())


def stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 15)


def test_the_service_runs_from_the_root_not_the_checkout(tools: FakeTools) -> None:
    checkout = tools.root / "checkout"
    checkout.mkdir()
    result = start_service(tools, checkout)
    try:
        assert result.returncode == 0, result.stderr
        assert (tools.root / "podman-cwd").read_text().strip() == "/"
        assert os.readlink(f"/proc/{service_pid(tools)}/cwd") == "/"
    finally:
        stop(service_pid(tools))


def test_a_service_left_in_a_deleted_checkout_is_restarted(tools: FakeTools) -> None:
    # As an older version left it: started from a checkout that was then deleted.
    checkout = tools.root / "old-checkout"
    checkout.mkdir()
    stale = subprocess.Popen(
        [str(tools.bin / "podman"), "system", "service", "--time=0", "unix:///x"],
        cwd=checkout,
        env={
            **tools.env,
            "FAKE_PODMAN_CWD": str(tools.root / "stale-cwd"),
            "FAKE_ENGINE_UP": str(tools.root / "up"),
        },
    )
    # Reaped as soon as it exits, as a service that is nobody's child is.
    threading.Thread(target=stale.wait, daemon=True).start()
    try:
        deadline = time.monotonic() + 10
        while not (tools.root / "up").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(checkout)
        (tools.root / "run" / "mnist-podman-service.pid").write_text(f"{stale.pid}\n")
        result = start_service(tools, tools.root)
        assert result.returncode == 0, result.stderr
        assert "runs in a deleted directory" in result.stderr
        assert stale.wait(timeout=10) is not None  # the stale one was stopped
        assert service_pid(tools) != stale.pid
        assert os.readlink(f"/proc/{service_pid(tools)}/cwd") == "/"
    finally:
        stale.kill()
        stop(service_pid(tools))
