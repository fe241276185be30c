"""The CPU that telemetry costs per request, in process: python -m benchmarks.telemetry_cost

`make bench-replica BENCH_ARGS="--telemetry --paired"` prices telemetry over HTTP, where a
difference of a few per cent drowns in a shared machine's drift. This runs the app itself (the
real model, the settings as shipped) in one process per measurement, with no HTTP server and
no client: requests go straight to the ASGI app, eight at a time, and the process's own CPU time
is divided by the requests. Modes: telemetry off; metrics only (OTEL_TRACES_EXPORTER=none);
metrics and traces at each sampling ratio given. Both export over OTLP/HTTP to a sink in the
same process (harness.otlp_sink), after a first export outside the measured time. Rounds
alternate the modes; the figure is the median per mode and its ratio to the median with
telemetry off. The denominator lacks the HTTP server's work, so the ratios overstate the cost
per answer over HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import MutableMapping
from typing import Any

from harness.servers import REPO


async def measure(requests: int) -> float:
    """CPU microseconds per request of the app configured by this process's environment."""
    from opentelemetry import metrics, trace

    from app.config import Settings
    from app.main import create_app
    from harness.payloads import payloads

    upload = payloads()["png-28x28"]
    body, content_type = upload.body, upload.content_type
    headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]
    app = create_app(Settings())
    started = asyncio.Event()
    lifespan: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await lifespan.put({"type": "lifespan.startup"})

    async def lifespan_send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()

    task = asyncio.create_task(app({"type": "lifespan", "state": {}}, lifespan.get, lifespan_send))
    await started.wait()

    async def one() -> None:
        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/predict",
            "raw_path": b"/predict",
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                await asyncio.Event().wait()  # the client never disconnects
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        statuses = []

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope, receive, send)
        if statuses != [200]:
            raise RuntimeError(f"answered {statuses}")

    for _ in range(500):
        await one()
    for provider in (metrics.get_meter_provider(), trace.get_tracer_provider()):
        flush = getattr(provider, "force_flush", None)
        if flush is not None:
            flush()  # the exporters' first export (imports, a connection) is not measured
    before = time.process_time()
    for _ in range(requests // 8):
        await asyncio.gather(*(one() for _ in range(8)))
    cpu = time.process_time() - before
    task.cancel()
    return cpu / (requests // 8 * 8) * 1e6


def child(mode: str, requests: int) -> None:
    from harness.otlp_sink import OtlpSink

    with OtlpSink() as sink:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.endpoint
        os.environ.setdefault("OTEL_METRIC_EXPORT_INTERVAL", "5000")  # as compose.yaml
        os.environ["OTEL_SDK_DISABLED"] = "true" if mode == "off" else "false"
        if mode == "metrics":
            os.environ["OTEL_TRACES_EXPORTER"] = "none"
        elif mode != "off":
            os.environ["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
            os.environ["OTEL_TRACES_SAMPLER_ARG"] = mode
        print(f"{asyncio.run(measure(requests)):.2f}", flush=True)
    os._exit(0)  # the exporters' threads need not be waited for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=12000)
    parser.add_argument("--ratios", default="0.02", help="comma-separated sampling ratios")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.requests)
        return
    modes = ["off", "metrics", *args.ratios.split(",")]
    found: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_ in range(args.rounds):
        for mode in modes:
            command = [sys.executable, "-m", "benchmarks.telemetry_cost", "--child", mode]
            output = subprocess.run(
                [*command, "--requests", str(args.requests)],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
                timeout=600,
            ).stdout
            found[mode].append(float(output.split()[-1]))
            print(f"round {round_ + 1}/{args.rounds} {mode:>8}: {found[mode][-1]:.1f} us/request")
    off = statistics.median(found["off"])
    print("\nmode       median CPU per request   vs telemetry off")
    for mode in modes:
        median = statistics.median(found[mode])
        label = mode if mode in ("off", "metrics") else f"traces {mode}"
        print(f"{label:<12} {median:8.1f} us           {median / off:.3f}")


if __name__ == "__main__":
    main()
