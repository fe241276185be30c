"""Stand-in command-line tools for testing the shell scripts without an engine: a `docker` CLI
whose answers the test chooses (engine, Compose version, pull behaviour), plus tripwires that
record any call that must not happen (apt-get, pip)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from harness.servers import REPO

FAKE_DOCKER = Path(__file__).with_name("fake-docker")

TRIPWIRE = """#!/bin/sh
printf '%s\\n' "$(basename "$0") $*" >>"${FAKE_LOG:?}"
echo "$(basename "$0") must not run in this test" >&2
exit 97
"""


@dataclass
class FakeTools:
    """A bin directory with the stand-in `docker` and tripwires, and the environment that puts
    it first on PATH (HOME and DOCKER_CONFIG point into the test's directory too)."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bin = self.root / "bin"
        self.bin.mkdir()
        self.log = self.root / "calls.log"
        self.log.touch()
        (self.root / "run").mkdir()
        self.docker_config = self.root / "docker-config"
        self.add("docker", FAKE_DOCKER.read_text())
        for name in ("apt-get", "pip", "pip3", "debootstrap", "podman"):
            self.add(name, TRIPWIRE)
        self.env = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "HOME": str(self.root),
            "DOCKER_CONFIG": str(self.docker_config),
            "FAKE_LOG": str(self.log),
            # The podman service's pid file and socket: never this machine's own.
            "ENGINE_RUN_DIR": str(self.root / "run"),
            "LC_ALL": "C.UTF-8",
        }

    def add(self, name: str, text: str) -> Path:
        path = self.bin / name
        path.write_text(text)
        path.chmod(0o755)
        return path

    @property
    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()

    def run_script(
        self, script: str, setup: str = "", call: str = "main", **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Source scripts/SCRIPT, run SETUP (bash: override its arrays or functions), then
        CALL (its main by default); the completed process."""
        source = REPO / "scripts" / script
        program = f'source "{source}"\n{setup}\n{call}\n'
        return subprocess.run(
            ["bash", "-c", program],
            cwd=REPO,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def no_call(tools: FakeTools, *names: str) -> bool:
    """True when none of the named commands was called."""
    return not any(call.split()[0] in names for call in tools.calls)
