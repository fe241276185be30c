"""Closed-loop load with wrk, which costs the server far less CPU than a Python generator.

`run()` POSTs one multipart body over N connections for a duration and returns throughput,
latency percentiles, responses by status, errors, and wrk's own CPU time (so that the
generator's share of a small machine is on record).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LUA = Path(__file__).resolve().parent / "post.lua"


@dataclass(frozen=True)
class Payload:
    body: bytes
    content_type: str

    @classmethod
    def multipart(
        cls, data: bytes, filename: str, field: str = "file", mime: str = "image/png"
    ) -> Payload:
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                f'filename="{filename}"\r\nContent-Type: {mime}\r\n\r\n'
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return cls(body, f"multipart/form-data; boundary={boundary}")


@dataclass(frozen=True)
class Result:
    connections: int
    seconds: float
    requests: int
    rps: float
    errors: dict[str, int]
    statuses: dict[str, int]
    latency_ms: dict[str, float]
    generator_cpu_seconds: float

    @property
    def failed(self) -> int:
        """Requests that did not end in a 2xx: wrk's transport errors (connect, read, write,
        timeout) and its "status" count of non-2xx answers."""
        return sum(self.errors.values())

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if status.startswith("2"))

    @property
    def throughput(self) -> float:
        """Successful (2xx) responses per second."""
        return self.ok / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit(
            "wrk is not installed: `apt-get install wrk` (Debian/Ubuntu) or "
            "`brew install wrk`; `make install` does this on Debian"
        )
    return path


def run(
    url: str,
    payload: Payload,
    *,
    connections: int,
    seconds: float,
    threads: int = 1,
    timeout_s: float = 10.0,
) -> Result:
    wrk = require_wrk()
    with tempfile.NamedTemporaryFile(suffix=".body") as body:
        body.write(payload.body)
        body.flush()
        env = {**os.environ, "WRK_BODY": body.name, "WRK_CONTENT_TYPE": payload.content_type}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        completed = subprocess.run(
            [
                wrk,
                f"-t{min(threads, connections)}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                f"--timeout={max(1, round(timeout_s))}s",
                "-s",
                str(LUA),
                url,
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in completed.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if completed.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed ({completed.returncode}): {completed.stderr.strip()}\n"
            f"{completed.stdout.strip()}"
        )
    data = json.loads(line.removeprefix("WRK_JSON "))
    duration = data["duration_us"] / 1e6
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Result(
        connections=connections,
        seconds=round(duration, 2),
        requests=data["requests"],
        rps=round(data["requests"] / duration, 1),
        errors=data["errors"],
        statuses=dict(sorted(data["statuses"].items())),
        latency_ms={k: round(v / 1000, 3) for k, v in data["latency_us"].items()},
        generator_cpu_seconds=round(cpu, 2),
    )
