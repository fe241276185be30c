"""Metrics end to end: workers -> OTLP -> collector -> Prometheus, rules, alerts, dashboards.

Runs before test_nginx_cluster.py (file order), on the stack as started: 3 replicas.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.cluster import engine_get
from tests.helpers import multipart, png_bytes
from tests.integration.stack import (
    REPLICAS,
    Stack,
    predict,
    settled_total,
    total_predictions,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "grafana" / "dashboards").glob("*.json"))


def test_every_worker_of_every_replica_reports(stack: Stack) -> None:
    for _ in range(60):  # touch every worker
        predict(stack)

    def series() -> tuple[set[str], set[str]] | None:
        found = stack.prometheus('mnist_queue_depth{job="mnist-api"}')
        hosts = {r["metric"]["host_name"] for r in found}
        workers = {r["metric"]["instance"] for r in found}
        # Each worker's first export lands on its own schedule (every 5 s): wait for all.
        return (hosts, workers) if len(workers) >= 2 * REPLICAS else None

    hosts, workers = wait_for(
        series, timeout=60, what=f"series from {2 * REPLICAS} workers of {REPLICAS} replicas"
    )
    assert len(hosts) == REPLICAS
    assert len(workers) == 2 * REPLICAS  # API_WORKERS=2 in this stack: one series per worker
    assert all(re.fullmatch(r".+-\d+", w) for w in workers)  # <hostname>-<pid>


def test_predictions_counter_rises_by_exactly_n(stack: Stack) -> None:
    before = settled_total(stack)
    n = 250
    for _ in range(n):
        assert predict(stack)[0] == 200
    wait_for(
        lambda: total_predictions(stack) >= before + n,
        timeout=60,
        what=f"the counter to rise by {n}",
    )
    after = settled_total(stack)
    assert round(after - before) == n  # nothing lost, nothing double-counted


def test_http_duration_buckets_suit_a_millisecond_service(stack: Stack) -> None:
    result = stack.prometheus(
        'count by (le) (http_server_request_duration_seconds_bucket{job="mnist-api"})'
    )
    bounds = sorted(float(r["metric"]["le"]) for r in result)
    assert bounds[0] <= 0.001
    assert 0.002 in bounds
    assert 0.005 in bounds


def test_every_rule_is_valid_and_loaded(stack: Stack) -> None:
    checked = stack.compose(
        "exec",
        "-T",
        "prometheus",
        "promtool",
        "check",
        "rules",
        "/etc/prometheus/rules/recording.yml",
        "/etc/prometheus/rules/alerts.yml",
    )
    assert "SUCCESS" in checked
    config = stack.compose(
        "exec", "-T", "prometheus", "promtool", "check", "config", "/etc/prometheus/prometheus.yml"
    )
    assert "SUCCESS" in config
    groups = stack.prometheus_api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {r["name"] for r in rules if r["type"] == "alerting"} == {
        "MnistHighErrorRatio",
        "MnistHighLatencyP99",
        "MnistReplicaMissing",
        "MnistShedding",
        "MnistEdgeWaitHigh",
        "MnistEdgeRefusals",
        "MnistEdgeFailures",
        "CollectorDown",
    }
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]


def substitute(expr: str) -> str:
    return expr.replace("$replica", ".*").replace("$worker", ".*").replace("$__rate_interval", "1m")


def panel_queries() -> list[tuple[str, str, str]]:
    found = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                found.append((path.stem, panel["title"], target["expr"]))
        for variable in dashboard["templating"]["list"]:
            found.append((path.stem, f"variable {variable['name']}", variable["definition"]))
    return found


def test_dashboards_are_generated_from_their_source() -> None:
    from grafana.build_dashboards import render

    assert {p.name: p.read_text() for p in DASHBOARDS} == render()
    for path in DASHBOARDS:
        text = path.read_text()
        assert "${DS_" not in text  # no unfilled import inputs
        dashboard = json.loads(text)
        for panel in dashboard["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}


def test_every_dashboard_panel_returns_data(stack: Stack) -> None:
    # Traffic of every kind the dashboards show: good uploads, a blank one (low confidence),
    # bad ones (rejections).
    blank_body, blank_type = multipart(png_bytes(np.zeros((28, 28))))
    bad_body, bad_type = multipart(b"not an image")
    for _ in range(20):
        predict(stack)
        stack.request("POST", "/predict", blank_body, {"Content-Type": blank_type})
        stack.request("POST", "/predict", bad_body, {"Content-Type": bad_type})
    time.sleep(12)  # an export (5 s), a scrape (5 s), a rule evaluation

    def missing() -> list[str] | None:
        empty = []
        for dashboard, title, expr in panel_queries():
            query = substitute(expr)
            if query.startswith("label_values("):
                metric, _, label = query.removeprefix("label_values(").rstrip(")").rpartition(", ")
                ok = any(label in r["metric"] for r in stack.prometheus(metric))
            else:
                ok = bool(stack.prometheus(query))
            if not ok:
                empty.append(f"{dashboard} / {title}: {expr}")
        return empty or None

    deadline = time.monotonic() + 60
    while (empty := missing()) and time.monotonic() < deadline:
        predict(stack)
        time.sleep(3)
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_requests_do_not_notice_a_stopped_collector(stack: Stack) -> None:
    def latencies() -> list[float]:
        samples = []
        for _ in range(150):
            started = time.perf_counter()
            status, _ = predict(stack)
            samples.append(time.perf_counter() - started)
            assert status == 200
        return samples

    with_collector = statistics.median(latencies())
    with stack.stopped("otel-collector"):
        time.sleep(6)  # at least one failed export per worker
        without = latencies()
    assert statistics.median(without) < with_collector * 2 + 0.005, (with_collector, without)
    wait_for(
        lambda: stack.scalar('up{job="otel-collector"}') == 1,
        timeout=60,
        what="the collector to be scraped again",
    )


@pytest.mark.parametrize("replicas", [5])
def test_series_follow_a_scale_up(stack: Stack, replicas: int) -> None:
    stack.ensure_replicas(replicas)
    for _ in range(80):
        predict(stack)
    wait_for(
        lambda: stack.scalar("mnist:replicas:count") == replicas,
        timeout=90,
        what=f"series from {replicas} replicas",
    )


def test_replica_missing_alert_fires(stack: Stack) -> None:
    """A replica that hangs (frozen: it stops reporting without a graceful stop) pages once its
    series expire from the Collector (30 s); a graceful stop does not (test_rollout.py)."""
    victim = stack.replicas()[0]
    host = engine_get(stack.env, f"/containers/{victim}/json")["Config"]["Hostname"]
    stack.docker("pause", victim)

    def fired_for_the_victim() -> bool:  # not for a replica gone earlier, ageing out of 10 min
        return (
            not stack.prometheus(f'mnist_queue_depth{{job="mnist-api", host_name="{host}"}}')
            and stack.scalar("mnist:replicas_missing:count") == 1
            and any(
                a["labels"]["alertname"] == "MnistReplicaMissing" and a["state"] == "firing"
                for a in alerts(stack)
            )
        )

    try:
        wait_for(
            fired_for_the_victim,
            timeout=150,
            interval=3,
            what=f"MnistReplicaMissing to fire, {host} the one replica missing",
        )
        assert stack.scalar("mnist:replicas_missing:count") == 1
    finally:
        stack.docker("unpause", victim)
    stack.ensure_replicas(REPLICAS)


def alerts(stack: Stack) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = stack.prometheus_api("alerts")["alerts"]
    return found
