"""The soak's short version (3 minutes) against the test stack: `make soak` with SOAK_MINUTES=3.
No request fails but the replicas' deliberate refusals (a stall of a shared machine makes them
refuse by the budget); Jaeger's and Prometheus' stores, which fill by design, stay under a share
of their limits, and Prometheus' series grow under 5 %; memory growth and the windows' p99s are
reported, with the cores in use in each (36-s windows move with the machine: `make soak` judges
them, over 5-minute ones); and the figures and the plot are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.integration.stack import PORT, PROJECT, REPLICAS, REPO, Stack


def test_a_three_minute_soak_holds(stack: Stack, tmp_path: Path) -> None:
    stack.ensure_replicas(REPLICAS)
    command = [sys.executable, "-m", "benchmarks.soak", "--minutes", "3", "--port", str(PORT)]
    completed = subprocess.run(
        [*command, "--project", PROJECT, "--out", str(tmp_path)],
        cwd=REPO,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    print(completed.stdout[-3000:])
    (run,) = tmp_path.glob("*-soak")
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["windows"]) == 5
    assert sum(w["requests"] for w in summary["windows"]) > 1000
    assert len(summary["memory_samples"]) >= 6
    workers = [name for name in summary["memory_growth"] if name.startswith("api ")]
    assert len(workers) >= REPLICAS * 2  # the masters and workers of every replica
    assert {"otel-collector", "prometheus", "jaeger"} <= set(summary["memory_growth"])
    shares = summary["store_share_of_limit"]
    assert set(shares) == {"jaeger", "prometheus"}
    assert None not in shares.values(), "a store's memory limit was not read"
    assert all(0 < share < 1 for share in shares.values()), shares
    series = summary["prometheus_head_series"]
    assert None not in series, "Prometheus' head series could not be read"
    assert all(count > 0 for count in series), series
    assert (run / "soak.png").stat().st_size > 10_000
    assert len(summary["checks"]) == 3  # memory growth and p99 drift: reported, judged in 30 min
    assert summary["p99_drift_judged"] is False
    assert all(w["p99_ms"] > 0 for w in summary["windows"])
    assert len(summary["p99_ms_early_late"]) == 2
    for window in summary["windows"]:  # the cores in use, to tell the machine's stalls apart
        cores = window["cpu_cores"]
        assert cores is not None, "no CPU figures: is the engine on this host?"
        assert cores["cluster"] > 0.05, cores
        assert cores["generator"] > 0.01, cores
        assert cores["host"] >= 0.9 * (cores["cluster"] + cores["generator"]), cores
    assert all(summary["checks"].values()), summary["checks"]
    assert completed.returncode == 0, completed.stderr[-2000:]
