"""An experiment, not a scenario of `make bench`: open-loop runs against the running cluster
through nginx, each reported as vegeta saw it next to what the workers' own histograms say of
the same run (time from a worker taking a request up to its answer, the wait for a place in
it, the time from nginx's stamp to the worker) and each container's cores. benchmarks/README.md
uses it for where an answered request's time goes in an overload.

    python -m benchmarks.overload_view --rates 1300 1900 1900 1300

Percentiles of different spans neither add nor subtract: the report puts the two views side by
side; it does not split one request's time between them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from harness import vegeta
from harness.cluster import Cluster, prometheus_query, running_cluster
from harness.payloads import payloads

# Each worker exports every 5 s and Prometheus scrapes every 5 s: a run's last second is in
# Prometheus this long after it ends.
SETTLE_S = 13

# The workers' histograms, as Prometheus names them, with the series each is read over.
HISTOGRAMS = {
    "worker_answer": 'http_server_request_duration_seconds_bucket{http_route=~"/predict.*",'
    'http_response_status_code="200"}',
    "admission_wait": "mnist_admission_wait_seconds_bucket",
    "edge_wait": "mnist_edge_wait_seconds_bucket",
}


def quantile_ms(address: str, series: str, q: float, window: str, at: float) -> float | None:
    """The q-quantile over every worker of what `series` counted in `window` up to `at`."""
    found = prometheus_query(
        address, f"histogram_quantile({q}, sum by (le) (increase({series}[{window}])))", at
    )
    value = float(found[0]["value"][1]) if found else float("nan")
    return None if value != value else round(value * 1000, 1)  # NaN: nothing counted


def measure(
    cluster: Cluster, url: str, address: str, rate: float, seconds: float
) -> dict[str, Any]:
    before = cluster.cpu_seconds() or {}
    started = time.time()
    result = vegeta.run(url, payloads()["png-28x28"], rate=rate, seconds=seconds)
    ended = time.time()
    after = cluster.cpu_seconds() or {}
    time.sleep(SETTLE_S)
    window, at = f"{round(ended - started) + 1}s", ended + 1
    refused = prometheus_query(
        address, f"sum by (mnist_reason) (increase(mnist_rejected_total[{window}]))", at
    )
    return {
        "rate": rate,
        "statuses": result.statuses,
        "answered_per_s": round(result.throughput),
        "vegeta_answered_ms": {q: result.answered_latency_ms.get(q) for q in ("p50", "p99")},
        "workers_ms": {
            name: {
                "p50": quantile_ms(address, series, 0.5, window, at),
                "p99": quantile_ms(address, series, 0.99, window, at),
            }
            for name, series in HISTOGRAMS.items()
        },
        "refused_by_reason": {
            r["metric"].get("mnist_reason", "?"): round(float(r["value"][1])) for r in refused
        },
        "cores": {
            name: round((after[name] - before.get(name, 0.0)) / (ended - started), 2)
            for name in sorted(after)
        },
        "generator_cores": round(result.generator_cpu_seconds / (ended - started), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", required=True, help="req/s, in turn")
    parser.add_argument("--seconds", type=float, default=30.0, help="per run")
    parser.add_argument("--project", default=os.environ.get("COMPOSE_PROJECT_NAME", "mnist"))
    args = parser.parse_args()
    cluster, port = running_cluster(args.project)
    address = cluster.published("prometheus", 9090)
    url = f"http://127.0.0.1:{port}/predict"
    # Every series in Prometheus before the first run: `increase` needs a sample before it.
    vegeta.run(url, payloads()["png-28x28"], rate=min(args.rates), seconds=5)
    time.sleep(SETTLE_S)
    for rate in args.rates:
        record = measure(cluster, url, address, rate, args.seconds)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
