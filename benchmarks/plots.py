"""PNG plots of one benchmark run, from its summary (benchmarks/bench.py)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

PERCENTILES = ("p50", "p90", "p99", "p99.9")
COLORS = {"service": "tab:blue", "ceiling": "tab:green", "floor": "tab:red"}


def write_all(summary: dict[str, Any], out: Path) -> list[Path]:
    written = []
    for name, draw in (
        ("concurrency", concurrency),
        ("replicas", replicas),
        ("open_loop", open_loop),
        ("overload", overload),
        ("payloads", payloads),
    ):
        figure = draw(summary)
        path = out / f"{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def _records(summary: dict[str, Any], scenario: str, **match: Any) -> list[dict[str, Any]]:
    return [
        r
        for r in summary["scenarios"]
        if r["scenario"] == scenario and all(r.get(k) == v for k, v in match.items())
    ]


def _title(summary: dict[str, Any], what: str) -> str:
    cluster, machine = summary["cluster"], summary["machine"]
    return (
        f"{what}\n{cluster['replicas']} replicas x {cluster['workers_per_replica']} worker(s), "
        f"telemetry {'on' if cluster['telemetry'] else 'off'}; {machine['cores']} cores, "
        f"{summary['started'][:16]}"
    )


def _concurrency_axis(axis: Axes) -> None:
    axis.set_xscale("log", base=2)
    axis.set_xlabel("concurrent connections (closed loop, wrk)")
    axis.grid(True, which="both", alpha=0.3)


def concurrency(summary: dict[str, Any]) -> Figure:
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    service = _records(summary, "concurrency")
    for label, records in (
        ("service", service),
        ("ceiling (no model)", _records(summary, "ceiling")),
        ("floor (naive, host)", _records(summary, "floor")),
    ):
        if records:
            left.plot(
                [r["concurrency"] for r in records],
                [r["throughput"] for r in records],
                "o-",
                color=COLORS[label.split()[0]],
                label=label,
            )
    left.axhline(
        summary["saturation"]["throughput"], color="gray", linestyle=":", label="saturation"
    )
    left.set_ylabel("answered requests/s (2xx)")
    left.set_ylim(bottom=0)
    left.legend()
    _concurrency_axis(left)
    for percentile in PERCENTILES:
        right.plot(
            [r["concurrency"] for r in service],
            [r["latency_ms"][percentile] for r in service],
            "o-",
            label=percentile,
        )
    right.set_yscale("log")
    right.set_ylabel("service latency, ms")
    right.legend()
    _concurrency_axis(right)
    figure.suptitle(_title(summary, "Concurrency sweep: throughput and latency"))
    return figure


def replicas(summary: dict[str, Any]) -> Figure:
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_count: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for scenario in ("replicas", "concurrency"):
        for record in _records(summary, scenario):
            by_count[record["replicas"]].append(record)
    counts = sorted(by_count)
    for count in counts:
        records = sorted(by_count[count], key=lambda r: r["concurrency"])
        left.plot(
            [r["concurrency"] for r in records],
            [r["throughput"] for r in records],
            "o-",
            label=f"{count} replica{'s' if count > 1 else ''}",
        )
    left.set_ylabel("answered requests/s (2xx)")
    left.set_ylim(bottom=0)
    left.legend()
    _concurrency_axis(left)
    peaks = [max(r["throughput"] for r in by_count[c]) for c in counts]
    right.bar([str(c) for c in counts], peaks, color="tab:blue", alpha=0.7, label="total (peak)")
    right.plot(
        [str(c) for c in counts],
        [p / c for p, c in zip(peaks, counts, strict=True)],
        "o-",
        color="tab:orange",
        label="per replica",
    )
    cores = summary["machine"]["cores"]
    right.set_xlabel(f"replicas (the machine has {cores} cores: past that, they share them)")
    right.set_ylabel("requests/s")
    right.legend()
    right.grid(True, axis="y", alpha=0.3)
    figure.suptitle(_title(summary, "Replica sweep: the same sweep at each replica count"))
    return figure


def open_loop(summary: dict[str, Any]) -> Figure:
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    records = sorted(_records(summary, "open_loop"), key=lambda r: r["rate"])
    rates = [r["rate"] for r in records]
    for percentile in PERCENTILES:
        left.plot(
            rates,
            [r["answered_latency_ms"].get(percentile) for r in records],
            "o-",
            label=percentile,
        )
    saturation = summary["open_saturation"]["throughput"]
    budget = summary["cluster"]["latency_budget_ms"]
    for axis in (left, right):
        axis.axvline(
            saturation, color="gray", linestyle=":", label=f"open-loop saturation {saturation:.0f}"
        )
        axis.set_xlabel("offered load, requests/s (open loop, vegeta)")
        axis.grid(True, which="both", alpha=0.3)
    left.axhline(budget, color="tab:red", linestyle="--", alpha=0.5, label="latency budget")
    left.set_yscale("log")
    left.set_ylabel("latency of answered requests, ms")
    left.legend(fontsize=8)
    right.plot(rates, [r["throughput"] for r in records], "o-", label="answered (2xx)/s")
    right.plot(rates, rates, color="gray", alpha=0.4, label="offered")
    right.set_ylabel("requests/s")
    right.legend()
    figure.suptitle(_title(summary, "Constant arrival rate: latency against offered load"))
    return figure


def overload(summary: dict[str, Any]) -> Figure:
    record = _records(summary, "overload")[0]
    figure, axis = plt.subplots(figsize=(10, 4.5))
    seconds = [point["second"] for point in record["timeline"]]
    bottom = [0] * len(seconds)
    groups = (
        ("answered (2xx)", "tab:blue", lambda s: s.startswith("2")),
        ("refused: 503", "tab:orange", lambda s: s == "503"),
        ("refused: 429", "tab:purple", lambda s: s == "429"),
        ("other", "tab:red", lambda s: not (s.startswith("2") or s in ("503", "429"))),
    )
    for label, color, match in groups:
        counts = [
            sum(n for status, n in point["statuses"].items() if match(status))
            for point in record["timeline"]
        ]
        if any(counts):
            axis.bar(seconds, counts, bottom=bottom, color=color, label=label, width=0.9)
            bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    axis.set_xlabel("second of the run")
    axis.set_ylabel("requests sent in that second")
    latency = axis.twinx()
    latency.plot(
        seconds, [point["answered_p99_ms"] for point in record["timeline"]], "k.-", label="p99"
    )
    latency.axhline(
        summary["cluster"]["latency_budget_ms"], color="tab:red", linestyle="--", alpha=0.5
    )
    latency.set_ylabel("p99 of answered, ms (dashed: the budget)")
    latency.set_ylim(bottom=0)
    axis.legend(loc="upper left", fontsize=8)
    answered = sum(n for s, n in record["statuses"].items() if s.startswith("2"))
    figure.suptitle(
        _title(
            summary,
            f"Overload at {record['rate']:.0f} req/s (2x the open-loop saturation): "
            f"{answered / record['requests']:.0%} answered",
        )
    )
    return figure


def payloads(summary: dict[str, Any]) -> Figure:
    records = _records(summary, "payload")
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["payload"] for r in records]
    left.bar(names, [r["throughput"] for r in records], color="tab:blue", alpha=0.8)
    left.set_ylabel("answered requests/s (2xx)")
    for percentile in ("p50", "p99"):
        right.plot(names, [r["latency_ms"][percentile] for r in records], "o-", label=percentile)
    right.set_ylabel("latency, ms")
    right.set_ylim(bottom=0)
    right.legend()
    for axis in (left, right):
        axis.grid(True, axis="y", alpha=0.3)
        axis.tick_params(axis="x", labelsize=8)
    concurrency_ = records[0]["concurrency"] if records else "-"
    figure.suptitle(_title(summary, f"Payload mix at {concurrency_} connections"))
    return figure
