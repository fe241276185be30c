"""Open-loop load at a constant arrival rate with vegeta.

A closed-loop generator (wrk) sends the next request only when an answer comes back, so a slow
server slows its own load and the latency of the requests it never sent goes unrecorded
(coordinated omission). vegeta sends on a fixed schedule whatever the server does, opening more
connections when answers are late, so queueing shows in the latencies.

`run()` returns, for one rate: requests, the rate actually sent, responses by status, the
throughput of 2xx answers, latency percentiles of every answer and of the 2xx ones, a
per-second timeline, and vegeta's own CPU time.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.wrk import Payload

TIMEOUT_S = 10
# On a small machine the generator competes with the system under test for the CPU, and every
# millisecond it waits to be scheduled is counted as server latency. A higher priority (where
# allowed: root; elsewhere `nice` says so and runs it unchanged) keeps it measuring on time.
PRIORITY = ["nice", "-n", "-10"] if shutil.which("nice") else []


@dataclass(frozen=True)
class Result:
    rate: float
    seconds: float
    requests: int
    sent_rate: float
    statuses: dict[str, int]
    throughput: float
    latency_ms: dict[str, float]
    answered_latency_ms: dict[str, float]
    timeline: list[dict[str, Any]]
    generator_cpu_seconds: float

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.statuses.items() if not status.startswith("2"))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentiles(values_ms: list[float]) -> dict[str, float]:
    """Nearest-rank percentiles, mean and max (the keys wrk.py reports)."""
    if not values_ms:
        return {}
    ordered = sorted(values_ms)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]

    figures = {f"p{q:g}": rank(q) for q in (50, 75, 90, 99, 99.9)}
    figures["mean"] = sum(ordered) / len(ordered)
    figures["max"] = ordered[-1]
    return {k: round(v, 3) for k, v in figures.items()}


def require_vegeta() -> str:
    # `make install` builds it into the virtualenv's bin/, which need not be on PATH.
    path = shutil.which("vegeta") or shutil.which("vegeta", path=str(Path(sys.executable).parent))
    if path is None:
        raise SystemExit(
            "vegeta is not installed: `make install` builds it with Go "
            "(go install github.com/tsenart/vegeta/v12@v12.13.0), or `brew install vegeta`"
        )
    return path


def target(url: str, payload: Payload) -> str:
    """One vegeta target in its JSON format."""
    return json.dumps(
        {
            "method": "POST",
            "url": url,
            "body": base64.b64encode(payload.body).decode(),
            "header": {"Content-Type": [payload.content_type]},
        }
    )


def run(url: str, payload: Payload | Sequence[Payload], *, rate: float, seconds: float) -> Result:
    """`rate` requests a second for `seconds`; several payloads are sent in turn."""
    vegeta = require_vegeta()
    payloads = [payload] if isinstance(payload, Payload) else list(payload)
    with tempfile.TemporaryDirectory(prefix="vegeta-") as tmp:
        targets, results = Path(tmp) / "targets.json", Path(tmp) / "results.bin"
        targets.write_text("".join(target(url, each) + "\n" for each in payloads))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        # -max-body=0: the answers are counted and timed, not kept. A request that gets no
        # answer in TIMEOUT_S counts as an error with status 0.
        attack = subprocess.run(
            [
                *PRIORITY,
                vegeta,
                "attack",
                "-format=json",
                f"-targets={targets}",
                f"-rate={max(1, round(rate))}/1s",
                f"-duration={max(1, round(seconds))}s",
                f"-timeout={TIMEOUT_S}s",
                "-max-body=0",
                f"-output={results}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if attack.returncode != 0:
            raise RuntimeError(f"vegeta attack failed ({attack.returncode}): {attack.stderr}")
        encoded = subprocess.run(
            [vegeta, "encode", "-to=csv", str(results)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return summarize(encoded, rate=rate, generator_cpu_seconds=cpu)


def summarize(encoded_csv: str, *, rate: float, generator_cpu_seconds: float) -> Result:
    """Figures from `vegeta encode -to=csv` rows: timestamp (ns), status code, latency (ns),
    bytes out, bytes in, error, ... (status 0 is a request that got no HTTP answer)."""
    rows = [
        (int(row[0]), row[1], int(row[2]) / 1e6)
        for row in csv.reader(io.StringIO(encoded_csv))
        if row
    ]
    if not rows:
        raise RuntimeError("vegeta recorded no requests")
    first = min(start for start, _, _ in rows)
    last = max(start for start, _, _ in rows)
    statuses: Counter[str] = Counter()
    answered: list[float] = []
    # Second by second: what was answered and shed, and the latency of the answered.
    per_second: dict[int, Counter[str]] = defaultdict(Counter)
    answered_per_second: dict[int, list[float]] = defaultdict(list)
    for start, code, latency_ms in rows:
        second = (start - first) // 1_000_000_000
        statuses[code] += 1
        per_second[second][code] += 1
        if code.startswith("2"):
            answered.append(latency_ms)
            answered_per_second[second].append(latency_ms)
    seconds = max(per_second) + 1
    timeline = [
        {
            "second": second,
            "statuses": dict(sorted(per_second[second].items())),
            "answered_p99_ms": percentiles(answered_per_second[second]).get("p99"),
        }
        for second in sorted(per_second)
    ]
    return Result(
        rate=rate,
        seconds=seconds,
        requests=len(rows),
        sent_rate=round((len(rows) - 1) / ((last - first) / 1e9), 1) if last > first else 0.0,
        statuses=dict(sorted(statuses.items())),
        throughput=round(len(answered) / seconds, 1),
        latency_ms=percentiles([latency for _, _, latency in rows]),
        answered_latency_ms=percentiles(answered),
        timeline=timeline,
        generator_cpu_seconds=round(generator_cpu_seconds, 2),
    )
