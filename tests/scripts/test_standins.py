"""scripts/no-docker/standins.sh builds a stand-in only where the registry cannot be reached:
its pull path against a stand-in `docker` CLI whose registry answers quickly, slowly, with an
error, or not at all."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.scripts.fakes import FakeTools

# Two images of one registry, then one of another: what each would use.
CHOOSE = """
for tag in nginx:1.30.6 prom/prometheus:v3.5.3 ghcr.io/example/app:1; do
  if official_available "$tag"; then echo "$tag official"; else echo "$tag stand-in"; fi
done
"""


@pytest.fixture
def tools(tmp_path: Path) -> FakeTools:
    return FakeTools(tmp_path)


def choose(tools: FakeTools, **env: str) -> subprocess.CompletedProcess[str]:
    return tools.run_script("no-docker/standins.sh", call=CHOOSE, FAKE_ENGINE="docker", **env)


def pulls(tools: FakeTools) -> list[str]:
    return [call.split()[-1] for call in tools.calls if call.startswith("docker pull")]


def test_a_registry_that_answers_serves_the_official_images(tools: FakeTools) -> None:
    result = choose(tools, FAKE_PULL="ok")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == [
        "nginx:1.30.6 official",
        "prom/prometheus:v3.5.3 official",
        "ghcr.io/example/app:1 official",
    ]


def test_a_slow_pull_is_waited_for_however_long_it_takes(tools: FakeTools) -> None:
    # The registry answers at once, then the layers take twice the no-answer limit. (The limit
    # leaves the stand-in docker, a shell script, seconds to start on a loaded machine: at 1 s
    # it once had not printed its first line in time.)
    result = choose(tools, FAKE_PULL="slow", FAKE_PULL_SECONDS="6", STANDINS_REGISTRY_TIMEOUT="3")
    assert result.returncode == 0, result.stderr
    assert "stand-in" not in result.stdout
    assert "nginx:1.30.6: pulled in" in result.stderr


def test_a_registry_that_says_nothing_counts_as_unreachable_once(tools: FakeTools) -> None:
    result = choose(tools, FAKE_PULL="silent", STANDINS_REGISTRY_TIMEOUT="1")
    assert result.returncode == 0, result.stderr
    assert "nginx:1.30.6 stand-in" in result.stdout
    assert "prom/prometheus:v3.5.3 stand-in" in result.stdout
    assert "docker.io: no answer to `docker pull nginx:1.30.6` in 1s" in result.stderr
    # Docker Hub was waited for once; the other registry was tried on its own.
    assert pulls(tools) == ["nginx:1.30.6", "ghcr.io/example/app:1"]


def test_an_unreachable_registry_is_named_and_tried_once(tools: FakeTools) -> None:
    result = choose(tools, FAKE_PULL="unreachable")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("stand-in") == 3
    assert "docker.io cannot be reached from here" in result.stderr
    assert "no such host" in result.stderr
    assert pulls(tools) == ["nginx:1.30.6", "ghcr.io/example/app:1"]


def test_a_pull_cut_partway_stops_the_run_instead_of_building_stand_ins(tools: FakeTools) -> None:
    # The registry answered (the manifest, a layer started), then the link timed out: a slow or
    # broken link to a registry that exists, which a stand-in would only hide.
    result = choose(tools, FAKE_PULL="cut")
    assert result.returncode == 1
    assert "stand-in" not in result.stdout
    assert "`docker pull nginx:1.30.6` failed partway" in result.stderr
    assert "i/o timeout" in result.stderr
    assert "run it again" in result.stderr
    assert pulls(tools) == ["nginx:1.30.6"]


@pytest.mark.parametrize(
    ("behaviour", "said"),
    [("missing", "manifest unknown"), ("denied", "pull access denied")],
)
def test_a_registry_that_answers_no_stops_the_run_with_its_answer(
    tools: FakeTools, behaviour: str, said: str
) -> None:
    result = choose(tools, FAKE_PULL=behaviour)
    assert result.returncode == 1
    assert "official" not in result.stdout
    assert "stand-in" not in result.stdout
    assert "`docker pull nginx:1.30.6` failed" in result.stderr
    assert said in result.stderr
    assert "check the tag in .env" in result.stderr


def test_no_pull_at_all_when_told_not_to(tools: FakeTools) -> None:
    result = choose(tools, FAKE_PULL="ok", STANDINS_PULL="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("stand-in") == 3
    assert pulls(tools) == []
