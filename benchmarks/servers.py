"""Start and stop gunicorn servers on loopback for benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def gunicorn(
    app: str,
    port: int,
    *,
    workers: int = 2,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> Iterator[str]:
    """Run `app` under the service's gunicorn config; yields its base URL once ready."""
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
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base + "/readyz", process=process)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if log:
            output.close()  # type: ignore[union-attr]
