"""`make bench`, short version (BENCH_QUICK=1), against the real test stack: the benchmark tool
works end to end. Every scenario is measured with the real load generators, the ceiling stack
starts and goes, every plot is written, and the cluster is left as it was found.

It checks what must hold on any machine (no request lost, only deliberate refusals under
overload), not performance figures: those are the benchmark's output, quoted from full runs.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.integration.stack import PORT, PROJECT, REPLICAS, REPO, Stack

SCENARIOS = {
    "replicas",
    "concurrency",
    "ceiling",
    "ratio",
    "closed_round",
    "open_search",
    "open_loop",
    "overload_base",
    "overload",
    "payload",
    "replica",
    "floor",
}
PLOTS = ("concurrency", "replicas", "open_loop", "overload", "payloads")


def quick_bench(stack: Stack, out: Path) -> tuple[dict[str, Any], Path]:
    """Run `make bench`'s quick version against the test stack; its summary and folder."""
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench",
            "--project",
            PROJECT,
            "--port",
            str(PORT),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env={**stack.env, "BENCH_QUICK": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (run,) = out.iterdir()
    return json.loads((run / "summary.json").read_text()), run


def test_quick_bench_measures_every_scenario(stack: Stack, tmp_path: Path) -> None:
    stack.ensure_replicas(REPLICAS)  # earlier tests scale the stack
    nginx_before = stack.compose("ps", "-q", "nginx").strip()
    ceiling = Stack({**stack.env, "COMPOSE_PROJECT_NAME": f"{PROJECT}-ceiling"})
    try:
        summary, run = quick_bench(stack, tmp_path)
    finally:  # whatever happened to the run, its ceiling project must not outlive the test
        leftover = ceiling.compose("ps", "-aq")
        ceiling.compose("down", "--remove-orphans", "--timeout", "5", check=False)
    assert leftover == "", "the bench left its ceiling project behind"

    assert summary["plan"] == "quick"
    assert summary["cluster"] == {
        "project": PROJECT,
        "replicas": REPLICAS,
        "workers_per_replica": 2,
        "telemetry": True,
        "latency_budget_ms": 500.0,
    }
    records = summary["scenarios"]
    assert {r["scenario"] for r in records} == SCENARIOS
    for record in records:
        where = f"{record['scenario']} {record['target']} {record.get('payload')}"
        assert record["requests"] > 0, where
        assert record["throughput"] > 0, where
        # Nothing lost: every request got an HTTP answer, and the only refusals are the
        # deliberate ones (503 shed, 429 rate limit).
        assert set(record["errors_by_status"]) <= {"503", "429"}, (where, record)
        assert set(record["latency_ms"]) >= {"p50", "p90", "p99", "p99.9", "max"}, where
        if record["target"] not in ("floor", "replica"):
            # The engine reports each container's CPU; the loaded project's replicas did work.
            project = PROJECT if record["target"] == "service" else f"{PROJECT}-ceiling"
            cpu = record["cpu_seconds"]
            assert cpu, where
            assert sum(s for n, s in cpu.items() if n.startswith(f"{project}-api-")) > 0, where
    swept = {"replicas", "concurrency"}
    replica_counts = {r["replicas"] for r in records if r["scenario"] in swept}
    assert replica_counts == {1, REPLICAS}
    saturation = summary["saturation"]
    assert saturation["throughput"] > 0
    assert saturation["ratio_to_ceiling"] > 0
    open_saturation = summary["open_saturation"]
    assert 0 < open_saturation["throughput"] <= saturation["throughput"]
    overload = next(r for r in records if r["scenario"] == "overload")
    assert overload["rate"] == round(2 * open_saturation["throughput"], 1)
    # The targets' ratios and the 2x goodput come from alternated rounds (one in the quick plan).
    rounds = [r["concurrency"] for r in records if r["scenario"] == "closed_round"]
    sweep = sorted(r["concurrency"] for r in records if r["scenario"] == "concurrency")
    assert (
        sorted(rounds) == [c for c in sweep if c >= 32] == summary["closed_rounds"]["concurrency"]
    )
    assert set(summary["closed_rounds"]["median"]) == {"256_of_best", "1024_of_64"}
    base = next(r for r in records if r["scenario"] == "overload_base")
    assert base["rate"] == round(open_saturation["throughput"], 1)
    found = summary["overload_rounds"]
    assert found["goodput_per_round"] == [
        round(overload["throughput"] / open_saturation["throughput"], 3)
    ]
    assert found["goodput"] == statistics.median(found["goodput_per_round"])
    assert len(found["round_base_answered_in_full"]) == 1
    assert set(summary["targets"]) == {
        "closed_loop_8_to_256_non_2xx",
        "closed_loop_256_of_best",
        "closed_loop_1024",
        "open_loop_non_2xx_up_to_0.9",
        "overload_2x",
        "one_replica_non_2xx",
    }
    for target in summary["targets"].values():
        assert set(target) == {"target", "measured", "met"}
    assert {r["concurrency"] for r in records if r["scenario"] == "replica"} == {32, 64}
    for name in PLOTS:
        png = (run / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n"), name
        assert len(png) > 10_000, name
    assert "| scenario |" in (run / "report.md").read_text()
    # ~90 s here; the quick run is meant to take under 2 minutes, with slack for a noisy machine.
    assert summary["seconds"] < 180, "BENCH_QUICK should take under 2 minutes"

    # Left as found: the replica count, and nginx as it ran (the ceiling: above).
    assert len(stack.replicas()) == REPLICAS
    assert stack.compose("ps", "-q", "nginx").strip() == nginx_before
