"""An experiment, not a scenario of `make bench`: the running cluster behind its own edge (nginx,
admission by time in each worker) against the same replicas behind HAProxy's central queue
(per-server `maxconn` = the replica's MAX_CONCURRENCY x workers, a FIFO queue, 503 after
`timeout queue`), at the same open-loop rates, R and 2R, in turns (A B B A). docs/admission.md
uses it for what the 2x-overload targets would take.

    python -m benchmarks.edge_queue --rate R

It needs `haproxy` (2.x) on the PATH (Debian: apt-get install haproxy) and an engine whose
container addresses the host can reach (Docker or podman on Linux): HAProxy runs on the host and
sends to the replicas' addresses directly. To keep the load generator off the cluster's cores,
start the cluster with benchmarks/compose.onecore.yaml over compose.yaml (every service on CPU 0)
and this under `taskset -c 1`: HAProxy runs on the replicas' CPUs (their cpuset), one thread.
The runs compare the two edges at the same offered load; they judge no target.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from harness import vegeta
from harness.cluster import Cluster, engine_get, running_cluster
from harness.payloads import payloads
from harness.servers import free_port, wait_ready
from harness.wrk import Payload

# JSON, as the cluster's own refusals, and the same Retry-After.
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b'Retry-After: 1\r\nContent-Length: 33\r\n\r\n{"detail":"queued too long here"}'
)


def replicas(cluster: Cluster) -> tuple[list[str], str]:
    """The replicas' addresses, and the CPUs they are held to ("" when not held)."""
    cpuset = ""
    for container in cluster.replicas():
        info = engine_get(cluster.env, f"/containers/{container}/json")
        cpuset = info["HostConfig"].get("CpusetCpus") or cpuset
    return sorted(cluster.addresses("api")), cpuset


def haproxy_config(
    addresses: list[str], *, port: int, maxconn: int, queue_ms: int, threads: int, errors: Path
) -> str:
    servers = "".join(
        f"    server api{i} {address}:8000 maxconn {maxconn}\n"
        for i, address in enumerate(addresses, 1)
    )
    # The replicas count a request's age from X-Request-Start, as behind nginx.
    return f"""global
    maxconn 8000
    nbthread {threads}
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 10s
    timeout queue {queue_ms}ms
    http-reuse always
frontend edge
    bind 127.0.0.1:{port}
    http-request set-header X-Request-Start t=%[date(0,ms)]
    default_backend api
backend api
    balance leastconn
    errorfile 503 {errors}
{servers}"""


def measure(url: str, digit: Payload, *, edge: str, rate: float, seconds: float) -> dict[str, Any]:
    run = vegeta.run(url, digit, rate=rate, seconds=seconds)
    record = {
        "edge": edge,
        "offered": round(rate),
        "answered": round(run.throughput),
        "answered_p50_ms": run.answered_latency_ms.get("p50"),
        "answered_p99_ms": run.answered_latency_ms.get("p99"),
        "statuses": run.statuses,
        "generator_cpu_seconds": round(run.generator_cpu_seconds, 1),
    }
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, required=True, help="the lower rate (req/s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per edge and rate")
    parser.add_argument("--queue-ms", type=int, default=380, help="HAProxy's timeout queue")
    parser.add_argument("--project", default=os.environ.get("COMPOSE_PROJECT_NAME", "mnist"))
    args = parser.parse_args()
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise SystemExit("haproxy is not installed (Debian: apt-get install haproxy)")

    cluster, port = running_cluster(args.project)
    maxconn = cluster.places_per_replica()
    addresses, cpuset = replicas(cluster)
    if not addresses:
        raise SystemExit("no replica address in the engine's answers")
    haproxy_port = free_port()
    edges = {
        "nginx": f"http://127.0.0.1:{port}/predict",
        "haproxy": f"http://127.0.0.1:{haproxy_port}/predict",
    }
    digit = payloads()["png-28x28"]
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edge-queue-") as tmp:
        errors = Path(tmp) / "refusal.http"
        errors.write_bytes(REFUSAL)
        config = Path(tmp) / "haproxy.cfg"
        config.write_text(
            haproxy_config(
                addresses,
                port=haproxy_port,
                maxconn=maxconn,
                queue_ms=args.queue_ms,
                threads=1,
                errors=errors,
            )
        )
        command = [haproxy, "-db", "-f", str(config)]
        if cpuset:  # HAProxy goes with the cluster, on its CPUs
            if shutil.which("taskset") is None:
                raise SystemExit("the replicas are held to CPUs, and taskset is not installed")
            command = ["taskset", "-c", cpuset, *command]
        with subprocess.Popen(command, stdout=subprocess.DEVNULL) as server:
            try:
                # Listening, and a replica reached through it (its /readyz).
                wait_ready(f"http://127.0.0.1:{haproxy_port}/readyz", timeout=10, process=server)
                for multiple in (1, 2):
                    for turn in range(args.rounds):
                        for edge in list(edges)[:: 1 if turn % 2 == 0 else -1]:  # A B B A
                            record = measure(
                                edges[edge],
                                digit,
                                edge=edge,
                                rate=multiple * args.rate,
                                seconds=args.seconds,
                            )
                            records.append({**record, "multiple": multiple})
            finally:
                server.terminate()
    print(
        f"\n{len(addresses)} replicas (CPUs {cpuset or 'any'}), maxconn {maxconn}, timeout "
        f"queue {args.queue_ms} ms, generator on CPUs {sorted(os.sched_getaffinity(0))}; "
        "medians of the runs:"
    )
    for multiple in (1, 2):
        for edge in edges:
            runs = [r for r in records if r["edge"] == edge and r["multiple"] == multiple]
            p99s = [r["answered_p99_ms"] for r in runs if r["answered_p99_ms"] is not None]
            p99 = f"{statistics.median(p99s):.0f} ms" if p99s else "none answered"
            print(
                f"  {multiple * args.rate:6.0f}/s {edge:8s} answered "
                f"{statistics.median(r['answered'] for r in runs):6.0f}/s, p99 {p99}"
            )


if __name__ == "__main__":
    main()
