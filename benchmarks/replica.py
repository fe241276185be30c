"""One replica against its ceiling: `make bench-replica` (python -m benchmarks.replica).

Starts, on loopback, one replica of the service (gunicorn, WEB_CONCURRENCY workers), the same
stack with the model removed (the ceiling: multipart parse + PNG decode), optionally the service
with OpenTelemetry on (metrics and traces, the sampling as shipped, exporting to a sink that
accepts OTLP/HTTP and keeps nothing),
the service without its preprocessing, with its model and with one that computes nothing
(`--breakdown`), and the naive `model.predict`-per-request server (the floor). Each is loaded
with wrk (32 connections, the 28x28 PNG of an MNIST test digit), round after round, and
compared with the service: the median of the per-round ratios of throughput, and of the
servers' own CPU time per answer (read from /proc: master and workers, every thread).

Two ways to share one noisy machine fairly:

* alternated (default): A B A B ..., each alone on the machine for `--seconds`;
* `--paired`: each comparison's two servers loaded at the same time, each with half the
  connections, so that whatever slows the machine slows both alike. On a shared machine whose
  speed drifts by 20 % from minute to minute this is the steadier measurement; it is also what
  "side by side" means literally.

Last, the service's latency at one connection. Writes
benchmarks/results/<date-time>-replica/replica.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks import results_dir
from harness import vegeta, wrk
from harness.otlp_sink import OtlpSink
from harness.payloads import payloads
from harness.servers import REPO, Server, gunicorn

SERVICE = "service"
MODEL_ONLY = "model-only"
BATCHING_ONLY = "batching-only"


def load(
    servers: dict[str, Server],
    payload: wrk.Payload,
    connections: int,
    seconds: float,
    rate: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Load every server in `servers` at the same time, closed-loop over `connections` (wrk),
    or open-loop at `rate` requests a second each (vegeta); their results, with CPU per answer."""

    def run(server: Server) -> wrk.Result | vegeta.Result:
        url = server.url + "/predict"
        if rate is not None:
            return vegeta.run(url, payload, rate=rate, seconds=seconds)
        return wrk.run(url, payload, connections=connections, seconds=seconds)

    before = {name: server.cpu_seconds() for name, server in servers.items()}
    with ThreadPoolExecutor(len(servers)) as pool:
        futures = {name: pool.submit(run, server) for name, server in servers.items()}
        results = {name: future.result() for name, future in futures.items()}
    measured = {}
    for name, result in results.items():
        after, start = servers[name].cpu_seconds(), before[name]
        ok = sum(n for status, n in result.statuses.items() if status.startswith("2"))
        cpu_us = (
            round((after - start) / ok * 1e6, 1)
            if after is not None and start is not None and ok
            else None
        )
        measured[name] = {
            **result.as_dict(),
            "rps": round(ok / result.seconds, 1) if result.seconds else 0.0,
            "failed": result.failed,
            "cpu_us_per_answer": cpu_us,
        }
    return measured


def ratio(a: Any, b: Any) -> float | None:
    return a / b if a is not None and b else None


def median_ratio(values: list[float | None]) -> dict[str, Any] | None:
    known = [v for v in values if v is not None]
    if not known:
        return None
    return {"median": round(statistics.median(known), 3), "per_round": [round(v, 3) for v in known]}


Runs = dict[str, list[dict[str, Any]]]
Ratios = dict[str, list[float | None]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="open-loop load at this many requests a second (vegeta) instead of closed-loop",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--paired", action="store_true", help="load compared servers together")
    parser.add_argument("--naive", action="store_true", help="also measure the naive server")
    parser.add_argument(
        "--telemetry",
        action="store_true",
        help="also measure the service with OpenTelemetry on, to price the instrumentation",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also measure the service without its preprocessing, with and without its model, "
        "to split its cost beyond the ceiling into batching, inference and preprocessing",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return parser.parse_args()


def servers_to_compare(args: argparse.Namespace) -> dict[str, tuple[str, dict[str, str]]]:
    """Each server by name: its ASGI app and the environment it runs with."""
    off = {"OTEL_SDK_DISABLED": "true"}  # otherwise the settings as shipped
    apps = {
        SERVICE: ("app.main:app", off),
        "no-model": ("benchmarks.baselines.nomodel:app", off),
    }
    if args.telemetry:
        on = {**off, "OTEL_SDK_DISABLED": "false", "OTEL_METRIC_EXPORT_INTERVAL": "5000"}
        apps["service+otel"] = (
            "app.main:app",
            {
                **on,
                # As compose.yaml sets them (wrk sends no traceparent: the ratio decides).
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": os.environ.get("TRACES_SAMPLE_RATIO", "0.02"),
            },
        )
        # Metrics alone: what the traces add is the difference.
        apps["service+metrics"] = ("app.main:app", {**on, "OTEL_TRACES_EXPORTER": "none"})
        # The service again, as shipped with telemetry off: its ratio to the service is this
        # run's noise floor, against which the telemetry's few per cent are read.
        apps["service-again"] = ("app.main:app", dict(off))
    if args.breakdown:
        apps[BATCHING_ONLY] = ("benchmarks.baselines.modelonly:batching_app", off)
        apps[MODEL_ONLY] = ("benchmarks.baselines.modelonly:app", off)
    if args.naive:
        apps["naive"] = ("benchmarks.baselines.naive:app", off)
    return apps


def measure(
    args: argparse.Namespace,
    apps: dict[str, tuple[str, dict[str, str]]],
    payload: wrk.Payload,
    out_dir: Path,
) -> tuple[Runs, Ratios, Ratios, wrk.Result]:
    """Every round: each server's runs, the per-round throughput and CPU ratios of each
    against the service, and the service's one-connection latency."""

    def seconds(name: str) -> float:
        # The naive server is slow (one image at a time, TensorFlow): a few seconds say it all.
        return float(args.seconds if name != "naive" else min(args.seconds, 5.0))

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in apps}
    # Per comparison (the other server against the service), the per-round ratios.
    throughput: dict[str, list[float | None]] = {name: [] for name in apps if name != SERVICE}
    cpu: dict[str, list[float | None]] = {name: [] for name in apps if name != SERVICE}
    with ExitStack() as stack:
        sink = stack.enter_context(OtlpSink())
        for _, env in apps.values():
            if env.get("OTEL_SDK_DISABLED") == "false":
                env["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.endpoint
        servers = {
            name: stack.enter_context(
                gunicorn(app, workers=args.workers, env=env, log=out_dir / f"{name}.log")
            )
            for name, (app, env) in apps.items()
        }
        for server in servers.values():  # warm up every worker
            wrk.run(server.url + "/predict", payload, connections=8, seconds=2)
        for round_ in range(args.rounds):
            if args.paired:
                # The service with each other server in turn, both loaded at once.
                for name in throughput:
                    pair = {SERVICE: servers[SERVICE], name: servers[name]}
                    result = load(
                        pair, payload, max(1, args.connections // 2), seconds(name), args.rate
                    )
                    runs[SERVICE].append(result[SERVICE])
                    runs[name].append(result[name])
                    report(round_, args.rounds, name, result[name])
                    report(round_, args.rounds, SERVICE, result[SERVICE])
                    throughput[name].append(ratio(result[name]["rps"], result[SERVICE]["rps"]))
                    cpu[name].append(
                        ratio(
                            result[name]["cpu_us_per_answer"],
                            result[SERVICE]["cpu_us_per_answer"],
                        )
                    )
                continue
            alone = {}
            for name, server in servers.items():
                alone[name] = load(
                    {name: server}, payload, args.connections, seconds(name), args.rate
                )[name]
                runs[name].append(alone[name])
                report(round_, args.rounds, name, alone[name])
            for name in throughput:
                throughput[name].append(ratio(alone[name]["rps"], alone[SERVICE]["rps"]))
                cpu[name].append(
                    ratio(alone[name]["cpu_us_per_answer"], alone[SERVICE]["cpu_us_per_answer"])
                )
        single = wrk.run(servers[SERVICE].url + "/predict", payload, connections=1, seconds=5)

    return runs, throughput, cpu, single


def summarise(
    args: argparse.Namespace,
    apps: dict[str, tuple[str, dict[str, str]]],
    runs: Runs,
    throughput: Ratios,
    cpu: Ratios,
    single: wrk.Result,
) -> dict[str, Any]:
    def med(name: str, key: str) -> float | None:
        values = [r[key] for r in runs[name] if r[key] is not None]
        return round(statistics.median(values), 1) if values else None

    cpu_medians = {name: med(name, "cpu_us_per_answer") for name in apps}
    summary: dict[str, Any] = {
        "machine": {"cores": os.cpu_count()},
        "mode": "paired" if args.paired else "alternated",
        "connections": args.connections,
        "rate": args.rate,
        "workers": args.workers,
        "rounds": args.rounds,
        "median_rps": {name: med(name, "rps") for name in apps},
        "median_cpu_us_per_answer": cpu_medians,
        "errors": {name: sum(r["failed"] for r in runs[name]) for name in apps},
        # Throughput of the service over the other server's: service / no-model, and
        # telemetry on / off (service+otel / service).
        "ratio_service_to_no_model": median_ratio(
            [1 / r if r else None for r in throughput["no-model"]]
        ),
        "ratio_telemetry_on_to_off": (
            median_ratio(throughput["service+otel"]) if "service+otel" in throughput else None
        ),
        # Throughput of the service's parts over the ceiling's: what the service could reach
        # with free preprocessing (model-only), and with a free model too (batching-only).
        # Alternated rounds only: paired ones load each with the service, not the ceiling.
        "ratio_to_no_model": {}
        if args.paired
        else {
            name: median_ratio(
                [
                    ratio(part["rps"], ceiling["rps"])
                    for part, ceiling in zip(runs[name], runs["no-model"], strict=True)
                ]
            )
            for name in (BATCHING_ONLY, MODEL_ONLY)
            if name in throughput
        },
        # CPU per answer of the other server over the service's.
        "cpu_ratio_to_service": {name: median_ratio(values) for name, values in cpu.items()},
        "breakdown_cpu_us_per_answer": breakdown(cpu_medians),
        "one_connection": single.as_dict(),
        "runs": runs,
    }
    return summary


def print_summary(args: argparse.Namespace, summary: dict[str, Any], single: wrk.Result) -> None:
    print()
    print(
        f"{summary['mode']}, {args.rounds} rounds of {args.seconds:.0f} s, {args.workers} workers"
        + (f", open loop at {args.rate:.0f} req/s" if args.rate else "")
    )
    print(f"{'server':13s} {'median req/s':>12s} {'CPU us/answer':>14s} {'errors':>7s}")
    for name in summary["median_rps"]:
        cpu_us = summary["median_cpu_us_per_answer"][name]
        print(
            f"{name:13s} {summary['median_rps'][name]:12.1f} "
            f"{cpu_us if cpu_us is not None else '-':>14} {summary['errors'][name]:7d}"
        )
    for label, key in (
        ("service / no-model", "ratio_service_to_no_model"),
        ("telemetry on / off", "ratio_telemetry_on_to_off"),
    ):
        if summary[key]:
            print(
                f"{label}: median throughput ratio {summary[key]['median']:.3f} "
                f"(rounds: {summary[key]['per_round']})"
            )
    for name, values in summary["ratio_to_no_model"].items():
        if values:
            print(
                f"{name} / no-model: median throughput ratio {values['median']:.3f} "
                f"(rounds: {values['per_round']})"
            )
    for name, values in summary["cpu_ratio_to_service"].items():
        if values:
            print(f"CPU per answer, {name} / service: median {values['median']:.3f}")
    if summary["breakdown_cpu_us_per_answer"]:
        parts = summary["breakdown_cpu_us_per_answer"]
        print(
            "CPU per answer, medians: "
            + ", ".join(f"{part} {value:.0f} us" for part, value in parts.items())
        )
    print(
        f"one connection: p50 {single.latency_ms['p50']:.2f} ms, "
        f"p99 {single.latency_ms['p99']:.2f} ms, {single.rps:.0f} req/s"
    )


def main() -> None:
    args = parse_args()
    payload = payloads()["png-28x28"]  # the same upload make bench sends
    apps = servers_to_compare(args)
    out_dir = results_dir(args.out, "replica")
    runs, throughput, cpu, single = measure(args, apps, payload, out_dir)
    summary = summarise(args, apps, runs, throughput, cpu, single)
    (out_dir / "replica.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(args, summary, single)
    print(f"written: {out_dir / 'replica.json'}")


def breakdown(cpu_us: dict[str, float | None]) -> dict[str, float] | None:
    """The service's CPU per answer in parts: the ceiling's stack; batching (the queue, the
    inference thread's hand-offs, the answer) beyond it; inference beyond that; preprocessing
    beyond that. Differences of the servers' median CPU per answer, so each part carries the
    noise of two medians. The parts interact: a model that takes longer lets more requests
    queue meanwhile, so its batches are larger and each answer pays less of the hand-offs."""
    stack, batching, model, service = (
        cpu_us.get(name) for name in ("no-model", BATCHING_ONLY, MODEL_ONLY, SERVICE)
    )
    if stack is None or batching is None or model is None or service is None:
        return None
    return {
        "stack": stack,
        "batching": round(batching - stack, 1),
        "inference": round(model - batching, 1),
        "preprocessing": round(service - model, 1),
    }


def report(round_: int, rounds: int, name: str, result: dict[str, Any]) -> None:
    cpu_us = result["cpu_us_per_answer"]
    print(
        f"round {round_ + 1}/{rounds} {name:12s} {result['rps']:8.1f} req/s  "
        f"p50 {result['latency_ms']['p50']:7.2f} ms  p99 {result['latency_ms']['p99']:7.2f} ms  "
        f"CPU {cpu_us if cpu_us is not None else '-'} us/answer  "
        f"errors {result['failed']}",
        flush=True,
    )


if __name__ == "__main__":
    main()
