"""One replica against its ceiling: `make bench-replica` (python -m benchmarks.replica).

Starts, on loopback, one replica of the service (gunicorn, WEB_CONCURRENCY workers), the same
stack with the model removed (the ceiling: multipart parse + PNG decode), and optionally the
naive `model.predict`-per-request server (the floor). Then loads them in turn with wrk (32
connections, the 28x28 PNG of an MNIST test digit), alternating A B A B ... so that the noise of
a shared machine falls on all of them alike, and reports the median of each and the median of
the per-round ratios. Last, the service's latency at one connection.

Writes benchmarks/results/<date-time>-replica/replica.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import wrk
from benchmarks.bench import payloads
from benchmarks.servers import REPO, gunicorn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--naive", action="store_true", help="also measure the naive server")
    parser.add_argument(
        "--telemetry",
        action="store_true",
        help="also measure the service with OpenTelemetry on (exporting to OTEL_EXPORTER_OTLP_"
        "ENDPOINT, default localhost:4318), to price the instrumentation",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    payload = payloads()["png-28x28"]  # the same upload make bench sends
    # Throughput, not admission, is measured here: no in-flight refusals (wrk's connections are
    # spread unevenly over the workers).
    off = {"OTEL_SDK_DISABLED": "true", "MAX_IN_FLIGHT": "100000"}
    servers = {
        "service": ("app.main:app", off),
        "no-model": ("benchmarks.baselines.nomodel:app", off),
    }
    if args.telemetry:
        servers["service+otel"] = (
            "app.main:app",
            {**off, "OTEL_SDK_DISABLED": "false", "OTEL_METRIC_EXPORT_INTERVAL": "5000"},
        )
    if args.naive:
        servers["naive"] = ("benchmarks.baselines.naive:app", off)
    out_dir = args.out / f"{datetime.now(UTC):%Y%m%d-%H%M%S}-replica"
    out_dir.mkdir(parents=True, exist_ok=True)

    runs: dict[str, list[wrk.Result]] = {name: [] for name in servers}
    single: wrk.Result | None = None
    with ExitStack() as stack:
        urls = {
            name: stack.enter_context(
                gunicorn(app, 18100 + i, workers=args.workers, env=env, log=out_dir / f"{name}.log")
            )
            for i, (name, (app, env)) in enumerate(servers.items())
        }
        for url in urls.values():  # warm up every worker
            wrk.run(url + "/predict", payload, connections=8, seconds=2)
        for round_ in range(args.rounds):
            for name, url in urls.items():
                seconds = args.seconds if name != "naive" else min(args.seconds, 5.0)
                result = wrk.run(
                    url + "/predict", payload, connections=args.connections, seconds=seconds
                )
                runs[name].append(result)
                print(
                    f"round {round_ + 1}/{args.rounds} {name:9s} {result.rps:8.1f} req/s  "
                    f"p50 {result.latency_ms['p50']:7.2f} ms  p99 "
                    f"{result.latency_ms['p99']:7.2f} ms  errors {result.failed}",
                    flush=True,
                )
        single = wrk.run(urls["service"] + "/predict", payload, connections=1, seconds=5)

    ratios = [s.rps / c.rps for s, c in zip(runs["service"], runs["no-model"], strict=True)]
    summary: dict[str, Any] = {
        "machine": {"cores": os.cpu_count()},
        "connections": args.connections,
        "workers": args.workers,
        "rounds": args.rounds,
        "median_rps": {name: statistics.median(r.rps for r in rs) for name, rs in runs.items()},
        "ratio_service_to_no_model": {
            "median": round(statistics.median(ratios), 3),
            "per_round": [round(r, 3) for r in ratios],
        },
        "errors": {name: sum(r.failed for r in rs) for name, rs in runs.items()},
        "ratio_telemetry_on_to_off": None,
        "one_connection": single.as_dict() if single else None,
        "runs": {name: [r.as_dict() for r in rs] for name, rs in runs.items()},
    }
    if "service+otel" in runs:
        otel = [t.rps / s.rps for t, s in zip(runs["service+otel"], runs["service"], strict=True)]
        summary["ratio_telemetry_on_to_off"] = {
            "median": round(statistics.median(otel), 3),
            "per_round": [round(r, 3) for r in otel],
        }
    (out_dir / "replica.json").write_text(json.dumps(summary, indent=2) + "\n")

    print()
    print(f"{'server':13s} {'median req/s':>12s} {'errors':>7s}")
    for name in servers:
        print(f"{name:13s} {summary['median_rps'][name]:12.1f} {summary['errors'][name]:7d}")
    print(
        f"service / no-model: median ratio {summary['ratio_service_to_no_model']['median']:.3f}"
        f" (rounds: {summary['ratio_service_to_no_model']['per_round']})"
    )
    if summary["ratio_telemetry_on_to_off"]:
        otel_ratio = summary["ratio_telemetry_on_to_off"]
        print(
            f"telemetry on / off: median ratio {otel_ratio['median']:.3f} "
            f"(rounds: {otel_ratio['per_round']})"
        )
    if single:
        print(
            f"one connection: p50 {single.latency_ms['p50']:.2f} ms, "
            f"p99 {single.latency_ms['p99']:.2f} ms, {single.rps:.0f} req/s"
        )
    print(
        f"wrk CPU seconds per run: "
        f"{statistics.median(r.generator_cpu_seconds for rs in runs.values() for r in rs):.1f}"
    )
    print(f"written: {out_dir / 'replica.json'}")


if __name__ == "__main__":
    main()
