"""scripts/engine.sh decides between the user's own Docker and podman: tested against a stand-in
`docker` CLI, so that every kind of Docker machine can be met here."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scripts.fakes import FakeTools, no_call

# Instead of setting podman up (apt-get, a service), say that this is where it would start.
PODMAN_PATH = 'require_debian_root() { echo "PODMAN PATH" >&2; exit 3; }'


@pytest.fixture
def tools(tmp_path: Path) -> FakeTools:
    return FakeTools(tmp_path)


def no_docker_here(tools: FakeTools, *, default: str = "", other: str = "", units: str = "") -> str:
    """Setup that points the script's Docker sockets and units into the test directory (where
    none exists unless given)."""
    missing = tools.root / "missing"
    return (
        f"DEFAULT_SOCKETS=({default or missing})\n"
        f"OTHER_SOCKETS=({other or missing})\n"
        f"DOCKER_UNITS=({units or missing})\n"
        f"{PODMAN_PATH}"
    )


@pytest.mark.parametrize("compose", ["2.40.3", "v2.24.6", "5.0.0", "v5.1.2", "2.39.1-desktop.1"])
def test_a_working_docker_with_any_compose_from_2_on_is_used_as_it_is(
    tools: FakeTools, compose: str
) -> None:
    result = tools.run_script(
        "engine.sh", no_docker_here(tools), FAKE_ENGINE="docker", FAKE_COMPOSE=compose
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # nothing to export: plain Docker
    assert "using the Docker engine as it is" in result.stderr
    assert not tools.docker_config.exists()  # no plugin installed over the user's own
    assert no_call(tools, "apt-get", "pip", "pip3", "podman")


def test_docker_without_compose_is_told_what_to_install_not_given_one(tools: FakeTools) -> None:
    result = tools.run_script(
        "engine.sh", no_docker_here(tools), FAKE_ENGINE="docker", FAKE_COMPOSE="none"
    )
    assert result.returncode == 1
    assert "install Docker Compose, the docker-compose-plugin package" in result.stderr
    assert not tools.docker_config.exists()
    assert no_call(tools, "apt-get", "pip", "pip3")


def test_compose_older_than_2_is_refused_by_name(tools: FakeTools) -> None:
    result = tools.run_script(
        "engine.sh", no_docker_here(tools), FAKE_ENGINE="docker", FAKE_COMPOSE="1.29.2"
    )
    assert result.returncode == 1
    assert "docker compose 1.29.2 is too old" in result.stderr


def test_podmans_docker_api_gets_the_classic_builder(tools: FakeTools) -> None:
    result = tools.run_script(
        "engine.sh",
        no_docker_here(tools),
        FAKE_ENGINE="podman",
        FAKE_COMPOSE="5.0.0",
        DOCKER_HOST="unix:///run/user/1000/podman/podman.sock",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "export DOCKER_HOST=unix:///run/user/1000/podman/podman.sock",
        "export DOCKER_BUILDKIT=0",
        "export COMPOSE_BAKE=false",
    ]
    assert not tools.docker_config.exists()


@pytest.fixture
def docker_socket(tmp_path: Path) -> Iterator[Path]:
    """A unix socket where the daemon's would be, that nobody answers on."""
    path = tmp_path / "docker.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    yield path
    listener.close()


def test_a_stopped_daemon_is_named_and_podman_is_not_installed(
    tools: FakeTools, docker_socket: Path
) -> None:
    result = tools.run_script(
        "engine.sh",
        no_docker_here(tools, default=str(docker_socket)),
        FAKE_ENGINE="down",
        FAKE_COMPOSE="5.0.0",
    )
    assert result.returncode == 1
    assert f"the Docker daemon does not answer on {docker_socket}" in result.stderr
    assert "sudo systemctl restart docker" in result.stderr
    assert "PODMAN PATH" not in result.stderr
    assert no_call(tools, "apt-get", "podman")


def test_a_rootless_docker_socket_is_pointed_at(tools: FakeTools, docker_socket: Path) -> None:
    result = tools.run_script(
        "engine.sh",
        no_docker_here(tools, other=str(docker_socket)),
        FAKE_ENGINE="down",
        FAKE_COMPOSE="5.0.0",
    )
    assert result.returncode == 1
    assert f"export DOCKER_HOST=unix://{docker_socket}" in result.stderr
    assert "PODMAN PATH" not in result.stderr


def test_a_socket_this_user_may_not_use_is_named_with_the_fix(
    tools: FakeTools, docker_socket: Path
) -> None:
    result = tools.run_script(
        "engine.sh",
        no_docker_here(tools, default=str(docker_socket)),
        FAKE_ENGINE="denied",
        FAKE_COMPOSE="5.0.0",
    )
    assert result.returncode == 1
    assert f"may not use the Docker socket {docker_socket}" in result.stderr
    assert "add it to the docker group" in result.stderr
    assert no_call(tools, "apt-get", "podman")


def test_an_installed_docker_whose_daemon_never_started_is_told_to_start_it(
    tools: FakeTools,
) -> None:
    unit = tools.root / "docker.service"
    unit.write_text("[Service]\nExecStart=/usr/bin/dockerd\n")
    result = tools.run_script(
        "engine.sh",
        no_docker_here(tools, units=str(unit)),
        FAKE_ENGINE="down",
        FAKE_COMPOSE="5.0.0",
    )
    assert result.returncode == 1
    assert f"Docker is installed ({unit}) but its daemon is not running" in result.stderr
    assert "sudo systemctl start docker" in result.stderr
    assert no_call(tools, "apt-get", "podman")


def test_a_dockerd_on_the_path_counts_as_docker_installed(tools: FakeTools) -> None:
    tools.add("dockerd", "#!/bin/sh\nexit 1\n")
    result = tools.run_script(
        "engine.sh", no_docker_here(tools), FAKE_ENGINE="down", FAKE_COMPOSE="5.0.0"
    )
    assert result.returncode == 1
    assert "Docker is installed" in result.stderr
    assert "PODMAN PATH" not in result.stderr


def test_a_docker_host_that_does_not_answer_is_named(tools: FakeTools) -> None:
    result = tools.run_script(
        "engine.sh",
        no_docker_here(tools),
        FAKE_ENGINE="down",
        FAKE_COMPOSE="5.0.0",
        DOCKER_HOST="tcp://10.0.0.7:2376",
    )
    assert result.returncode == 1
    assert "DOCKER_HOST=tcp://10.0.0.7:2376 does not answer" in result.stderr
    assert "Cannot connect to the Docker daemon" in result.stderr


def test_a_docker_context_that_does_not_answer_is_named(tools: FakeTools) -> None:
    result = tools.run_script(
        "engine.sh",
        no_docker_here(tools),
        FAKE_ENGINE="down",
        FAKE_COMPOSE="5.0.0",
        FAKE_CONTEXT="desktop-linux",
    )
    assert result.returncode == 1
    assert 'the docker context "desktop-linux" does not answer' in result.stderr


def test_only_a_machine_with_no_docker_at_all_takes_the_podman_path(tools: FakeTools) -> None:
    result = tools.run_script(
        "engine.sh", no_docker_here(tools), FAKE_ENGINE="down", FAKE_COMPOSE="none"
    )
    assert result.returncode == 3
    assert "PODMAN PATH" in result.stderr


def test_a_probe_finds_a_running_engine_and_never_sets_one_up(tools: FakeTools) -> None:
    # make down and make logs probe: no podman set-up where no engine runs.
    result = tools.run_script(
        "engine.sh",
        no_docker_here(tools),
        call="main --probe",
        FAKE_ENGINE="down",
        FAKE_COMPOSE="none",
    )
    assert result.returncode == 1
    assert "no container engine is running" in result.stderr
    assert "PODMAN PATH" not in result.stderr
    assert no_call(tools, "apt-get", "podman", "pip", "pip3")
    running = tools.run_script(
        "engine.sh",
        no_docker_here(tools),
        call="main --probe",
        FAKE_ENGINE="docker",
        FAKE_COMPOSE="none",
    )
    assert running.returncode == 0, running.stderr
    assert running.stdout == ""
