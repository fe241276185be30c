"""Start and stop gunicorn servers on loopback for benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def wait_ready(
    url: str, timeout: float = 120.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s: {last}")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class Server:
    """A server started by `gunicorn`: its loopback port and its master's pid."""

    port: int
    pid: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float | None:
        """CPU time used so far by the master and its workers (all threads), or None where
        there is no /proc to read it from."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        found = False
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended meanwhile
                continue
            # Fields after the command: state, ppid, ..., utime (12th), stime (13th).
            if int(stat.parent.name) == self.pid or int(fields[1]) == self.pid:
                total += int(fields[11]) + int(fields[12])
                found = True
        return total / ticks if found else None


@contextmanager
def gunicorn(
    app: str,
    port: int | None = None,
    *,
    workers: int = 2,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> Iterator[Server]:
    """Run `app` under the service's gunicorn config (on `port`, or a free one); yields it
    once ready."""
    port = port or free_port()
    environment = {
        **os.environ,
        "BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": str(workers),
        "PYTHONPATH": str(REPO),
        **(env or {}),
    }
    output = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(REPO / "app" / "gunicorn.conf.py"), app],
        cwd=REPO,
        env=environment,
        stdout=output,
        stderr=output,
        start_new_session=True,
    )
    server = Server(port, process.pid)
    try:
        wait_ready(server.url + "/readyz", process=process)
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if log:
            output.close()  # type: ignore[union-attr]
