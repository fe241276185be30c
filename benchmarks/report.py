"""The tables of one benchmark run, as Markdown (report.md) and as plain text (the console)."""

from __future__ import annotations

from typing import Any


def _rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in summary["scenarios"]:
        load = f"c={r['concurrency']}" if r["concurrency"] is not None else f"{r['rate']:.0f}/s"
        latency = r.get("answered_latency_ms") or r["latency_ms"]
        cpu = r.get("cpu_seconds") or {}
        api_cpu = sum(s for name, s in cpu.items() if "-api-" in name)
        # Per answer, not per request sent: a refusal costs the replicas next to nothing, so
        # dividing by requests sent would make a run that refuses more look cheaper.
        answered = sum(n for status, n in r["statuses"].items() if status.startswith("2"))
        rows.append(
            [
                r["scenario"],
                r["target"],
                r["payload"],
                str(r["replicas"] or "-"),
                load,
                str(r["requests"]),
                ", ".join(f"{k}: {v}" for k, v in r["errors_by_status"].items()) or "0",
                f"{r['throughput']:.0f}",
                *(f"{latency.get(p, float('nan')):.1f}" for p in ("p50", "p90", "p99", "p99.9")),
                f"{latency.get('max', float('nan')):.0f}",
                f"{1000 * api_cpu / answered:.2f}" if api_cpu and answered else "-",
                f"{r['generator_cpu_seconds']:.1f}",
            ]
        )
    return rows


HEADER = [
    "scenario",
    "target",
    "payload",
    "replicas",
    "load",
    "requests",
    "errors",
    "req/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "API CPU ms/answer",
    "generator CPU s",
]


def _targets(summary: dict[str, Any]) -> list[str]:
    return [
        f"{name}: {t['measured']} (target {t['target']}) {'met' if t['met'] else 'MISSED'}"
        for name, t in summary["targets"].items()
    ]


def _headline(summary: dict[str, Any]) -> list[str]:
    cluster, machine, saturation = summary["cluster"], summary["machine"], summary["saturation"]
    lines = [
        f"{summary['plan']} run of {summary['started']}, {summary['seconds']} s; "
        f"{cluster['replicas']} replicas x {cluster['workers_per_replica']} worker(s), telemetry "
        f"{'on' if cluster['telemetry'] else 'off'}",
        f"machine: {machine['cores']} cores ({machine['cpu']}), {machine['memory_gib']} GiB, "
        f"{machine['engine']}",
        f"saturation: {saturation['throughput']:.0f} req/s at {saturation['concurrency']} "
        f"connections; service / ceiling {saturation['ratio_to_ceiling']:.3f} "
        f"(rounds {saturation['ratio_per_round']})",
        f"open-loop saturation: {summary['open_saturation']['throughput']:.0f} req/s "
        f"({summary['open_saturation']['of_closed_loop']:.2f} of the closed-loop figure); "
        f"latency budget {cluster['latency_budget_ms']:.0f} ms",
    ]
    costs = summary.get("overload_costs")
    if costs:
        parts = ", ".join(
            f"{name} {c['us_per_refusal']} us (an answer: {c['us_per_answer']} us)"
            for name, c in costs.items()
            if isinstance(c, dict)
        )
        lines.append(
            f"at 2x: {costs['refused_per_second']} refusals/s, each costing {parts}: "
            f"{costs['cores_on_refusals']} cores on refusals"
        )
    return lines


def markdown(summary: dict[str, Any]) -> str:
    lines = ["# Benchmark run", "", *(f"- {line}" for line in _headline(summary)), ""]
    lines += ["## Targets", "", *(f"- {line}" for line in _targets(summary)), ""]
    lines += ["## Every measurement", ""]
    lines.append("| " + " | ".join(HEADER) + " |")
    lines.append("|" + "---|" * len(HEADER))
    lines += ["| " + " | ".join(row) + " |" for row in _rows(summary)]
    plots = ("concurrency", "replicas", "open_loop", "overload", "payloads")
    lines += ["", "## Plots", "", *(f"![{name}]({name}.png)" for name in plots), ""]
    return "\n".join(lines)


def text(summary: dict[str, Any]) -> str:
    rows = [HEADER, *_rows(summary)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    table = [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join([*_headline(summary), "", *table, "", *_targets(summary)])
