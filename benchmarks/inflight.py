"""Latency against requests in progress per replica: the measurement behind the autoscaler's
target (k8s/autoscaling.yaml). `make bench-inflight`, against the running cluster as shipped.

One replica (the cluster is scaled to 1 and back), as a Kubernetes pod with its one worker:
closed-loop load through nginx with wrk at rising concurrency, each step STEP_SECONDS long. For
each step it records the clients' p50/p95/p99 and throughput, the replica's CPU (the engine's
stats, in cores) and the figure the autoscaler reads: the ScaledObject's own Prometheus query
(requests in progress at the replica, from its latency histograms' sums), over the step. It
writes benchmarks/results/<date-time>-inflight/summary.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from benchmarks import results_dir
from harness import wrk
from harness.cluster import Cluster, engine_get, prometheus_query, running_cluster
from harness.payloads import payloads
from harness.servers import REPO
from k8s.check import manifests

CONCURRENCY = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
STEP_SECONDS = 30
# A worker exports every 5 s and Prometheus scrapes every 5 s: a sample reflects the counts of
# up to LAG seconds before it. A step's figure is read from the samples taken from LAG seconds
# after its start to its end, all of which reflect the step's load alone.
LAG = 10
# Between steps: the last step's requests leave the next step's window.
PAUSE_SECONDS = 12


def autoscaler_query() -> str:
    (scaled,) = [doc for doc in manifests() if doc["kind"] == "ScaledObject"]
    (trigger,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    query: str = trigger["metadata"]["query"]
    return query


def prometheus(port: int, query: str, at: float) -> float | None:
    found = prometheus_query(f"127.0.0.1:{port}", query, at)
    return float(found[0]["value"][1]) if found else None


def replica_cpu(cluster: Cluster, container: str) -> float:
    """CPU seconds the replica has used (the engine's stats)."""
    usage = cluster.cpu_seconds() or {}
    name = str(engine_get(cluster.env, f"/containers/{container}/json")["Name"]).lstrip("/")
    if name not in usage:
        raise SystemExit(f"no CPU figure for {name} from the engine")
    return usage[name]


def over(query: str, seconds: int) -> str:
    """The query with its range ([1m]) replaced by one step's."""
    return query.replace("[1m]", f"[{seconds}s]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=os.environ.get("COMPOSE_PROJECT_NAME", "mnist"))
    parser.add_argument("--port", type=int, default=None, help="nginx's published port")
    parser.add_argument("--seconds", type=int, default=STEP_SECONDS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    cluster, port = running_cluster(args.project, args.port)
    prometheus_port = int(cluster.published("prometheus", 9090).rpartition(":")[2])
    before = len(cluster.replicas())
    query = over(autoscaler_query(), args.seconds - LAG)
    payload = payloads()["png-28x28"]
    url = f"http://127.0.0.1:{port}/predict"
    steps: list[dict[str, Any]] = []
    cluster.scale(1)
    (replica,) = cluster.replicas()
    try:
        time.sleep(PAUSE_SECONDS)
        wrk.run(url, payload, connections=8, seconds=5)  # warm-up
        for connections in CONCURRENCY:
            cpu_before = replica_cpu(cluster, replica)
            result = wrk.run(url, payload, connections=connections, seconds=args.seconds)
            ended = time.time()
            cpu = replica_cpu(cluster, replica) - cpu_before
            time.sleep(2)  # the last scrape before `ended` is stored
            in_flight = prometheus(prometheus_port, query, ended)
            step = {
                "connections": connections,
                "in_flight": in_flight,
                # Of one core: what the autoscaler's CPU metric reads against a 1-CPU request.
                "cpu_utilisation": round(cpu / result.seconds, 3),
                "throughput": round(result.throughput, 1),
                "p50_ms": result.latency_ms["p50"],
                "p95_ms": result.latency_ms["p95"],
                "p99_ms": result.latency_ms["p99"],
                "statuses": result.statuses,
            }
            steps.append(step)
            time.sleep(PAUSE_SECONDS)
            print(
                f"{connections:4d} connections: in flight {in_flight or 0:6.2f}, "
                f"CPU {step['cpu_utilisation']:5.0%}, "
                f"{step['throughput']:7.1f} r/s, p50 {step['p50_ms']:6.1f} "
                f"p95 {step['p95_ms']:6.1f} p99 {step['p99_ms']:6.1f} ms, {result.statuses}",
                flush=True,
            )
    finally:
        cluster.scale(before)
    out = results_dir(args.out, "inflight")
    summary = {"query": query, "step_seconds": args.seconds, "replicas": 1, "steps": steps}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'summary.json'}")


if __name__ == "__main__":
    main()
