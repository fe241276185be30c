"""An experiment, not a scenario of `make bench`: the running cluster behind its own edge (nginx,
admission by time in each worker) against the same replicas behind HAProxy's central queue
(per-server `maxconn` = the workers' MAX_CONCURRENCY, a FIFO queue, 503 after `timeout queue`),
at the same open-loop rates, in turns. docs/admission.md uses it to say what holding the
2x-overload targets would take.

    python -m benchmarks.edge_queue --rate R      # R: the open-loop saturation (make bench's)

It needs `haproxy` (2.x) on the PATH (Debian: apt-get install haproxy) and an engine whose
container addresses the host can reach (Docker or podman on Linux): HAProxy runs on the host and
sends to the replicas' addresses directly. To keep the load generator off the cluster's cores,
start the cluster with benchmarks/compose.onecore.yaml over compose.yaml (every service on CPU 0)
and this under `taskset -c 1`; HAProxy is then run on CPU 0 with one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from harness import vegeta
from harness.cluster import Cluster, engine_get, poll, running_cluster
from harness.payloads import payloads

HAPROXY_PORT = 18090
# JSON, as the cluster's own refusals, and the same Retry-After.
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b'Retry-After: 1\r\nContent-Length: 33\r\n\r\n{"detail":"queued too long here"}'
)


def replica_addresses(cluster: Cluster) -> list[str]:
    found = []
    for container in cluster.replicas():
        networks = engine_get(cluster.env, f"/containers/{container}/json")["NetworkSettings"]
        found += [n["IPAddress"] for n in networks["Networks"].values() if n.get("IPAddress")][:1]
    return found


def haproxy_config(addresses: list[str], *, maxconn: int, queue_ms: int, threads: int) -> str:
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
    bind 127.0.0.1:{HAPROXY_PORT}
    http-request set-header X-Request-Start t=%[date(0,ms)]
    default_backend api
backend api
    balance leastconn
    errorfile 503 refusal.http
{servers}"""


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, required=True, help="the open-loop saturation")
    parser.add_argument("--seconds", type=float, default=20.0, help="per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per edge and rate")
    parser.add_argument("--queue-ms", type=int, default=380, help="HAProxy's timeout queue")
    parser.add_argument("--project", default=os.environ.get("COMPOSE_PROJECT_NAME", "mnist"))
    args = parser.parse_args()
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise SystemExit("haproxy is not installed (Debian: apt-get install haproxy)")

    cluster, port = running_cluster(args.project)
    settings = cluster.container_env("api")
    maxconn = int(settings.get("MAX_CONCURRENCY", "16"))
    cpus = os.sched_getaffinity(0)
    pinned = len(cpus) < (os.cpu_count() or 1)
    edges = {
        "nginx": f"http://127.0.0.1:{port}/predict",
        "haproxy": f"http://127.0.0.1:{HAPROXY_PORT}/predict",
    }
    digit = payloads()["png-28x28"]
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edge-queue-") as tmp:
        (Path(tmp) / "refusal.http").write_bytes(REFUSAL)
        config = Path(tmp) / "haproxy.cfg"
        addresses = replica_addresses(cluster)
        config.write_text(
            haproxy_config(addresses, maxconn=maxconn, queue_ms=args.queue_ms, threads=1)
        )
        # Pinned: HAProxy goes with the cluster, on the CPUs this process is kept off.
        command = [haproxy, "-db", "-f", str(config)]
        if pinned:
            others = sorted(set(range(os.cpu_count() or 1)) - cpus)
            command = ["taskset", "-c", ",".join(map(str, others)), *command]
        with subprocess.Popen(command, cwd=tmp, stdout=subprocess.DEVNULL) as server:
            try:
                poll(lambda: listening(HAPROXY_PORT), timeout=10, what="HAProxy listening")
                for multiple in (1.0, 2.0):
                    for turn in range(args.rounds):
                        order = list(edges) if turn % 2 == 0 else list(reversed(edges))
                        for edge in order:
                            run = vegeta.run(
                                edges[edge], digit, rate=multiple * args.rate, seconds=args.seconds
                            )
                            answered = run.throughput
                            record = {
                                "edge": edge,
                                "of_saturation": multiple,
                                "offered": round(multiple * args.rate),
                                "answered": round(answered),
                                "goodput": round(answered / args.rate, 3),
                                "answered_p50_ms": run.answered_latency_ms.get("p50"),
                                "answered_p99_ms": run.answered_latency_ms.get("p99"),
                                "statuses": run.statuses,
                                "generator_cpu_seconds": round(run.generator_cpu_seconds, 1),
                            }
                            records.append(record)
                            print(json.dumps(record), flush=True)
            finally:
                server.terminate()
    print(
        f"\n{len(addresses)} replicas, maxconn {maxconn}, timeout queue {args.queue_ms} ms, "
        f"generator on CPUs {sorted(cpus)}{' (pinned)' if pinned else ''}; medians:"
    )
    for multiple in (1.0, 2.0):
        for edge in edges:
            runs = [r for r in records if r["edge"] == edge and r["of_saturation"] == multiple]
            print(
                f"  {multiple:.0f}x {edge:8s} goodput "
                f"{statistics.median(r['goodput'] for r in runs):.2f}  answered p99 "
                f"{statistics.median(r['answered_p99_ms'] or 0 for r in runs):.0f} ms"
            )


if __name__ == "__main__":
    main()
