"""Writes the provisioned Grafana dashboards: python grafana/build_dashboards.py

The dashboards are code: this file is their source, grafana/dashboards/*.json the output that
Grafana's file provider loads (and that the tests check is up to date, then run panel by panel
against a live Prometheus). Every panel uses the provisioned datasource by its fixed uid.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
API = 'job="mnist-api", host_name=~"$replica"'
WORKER = 'job="mnist-api", host_name=~"$replica", instance=~"$worker"'


def quantile(q: float, metric: str, selector: str, by: str = "le") -> str:
    return f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{selector}}}[1m])))"


def variables(worker: bool = False) -> list[dict[str, Any]]:
    def variable(name: str, label: str, query: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-values"},
            "definition": query,
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {"text": "All", "value": "$__all"},
            "sort": 1,
        }

    found = [
        variable(
            "replica", "Replica", 'label_values(mnist_queue_depth{job="mnist-api"}, host_name)'
        )
    ]
    if worker:
        found.append(
            variable(
                "worker",
                "Worker",
                'label_values(mnist_queue_depth{job="mnist-api", host_name=~"$replica"}, instance)',
            )
        )
    return found


class Dashboard:
    def __init__(self, uid: str, title: str, description: str, worker: bool = False) -> None:
        self.uid, self.title, self.description, self.worker = uid, title, description, worker
        self.panels: list[dict[str, Any]] = []
        self._x = self._y = 0

    def panel(
        self,
        title: str,
        targets: list[tuple[str, str]],
        *,
        unit: str = "short",
        kind: str = "timeseries",
        width: int = 12,
        description: str = "",
        stack: bool = False,
    ) -> Dashboard:
        """A panel; a target that reads raw histogram buckets also shows their exemplars (the
        trace ids of kept traces, linked to Jaeger by the Prometheus datasource)."""
        if self._x + width > 24:
            self._x, self._y = 0, self._y + 8
        panel: dict[str, Any] = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DATASOURCE,
            "gridPos": {"h": 8, "w": width, "x": self._x, "y": self._y},
            "targets": [
                {
                    "datasource": DATASOURCE,
                    "refId": chr(ord("A") + i),
                    "expr": expr,
                    "legendFormat": legend,
                    "range": kind == "timeseries",
                    "instant": kind != "timeseries",
                    "exemplar": kind == "timeseries" and "_bucket{" in expr,
                }
                for i, (expr, legend) in enumerate(targets)
            ],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {
                "legend": {
                    "displayMode": "table",
                    "placement": "bottom",
                    "calcs": ["mean", "max", "lastNotNull"],
                }
            },
        }
        if stack:
            panel["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal"}}
        self.panels.append(panel)
        self._x += width
        return self

    def json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["mnist"],
            "timezone": "browser",
            "schemaVersion": 39,
            "version": 1,
            "editable": False,
            "refresh": "10s",
            "time": {"from": "now-30m", "to": "now"},
            "templating": {"list": variables(self.worker)},
            "panels": self.panels,
        }


def overview() -> Dashboard:
    d = Dashboard(
        "mnist-overview",
        "MNIST service overview",
        "Rate, errors and duration through nginx and per replica.",
    )
    d.panel(
        "Requests/s through nginx",
        [
            ("sum(rate(nginx_requests_total[1m]))", "nginx"),
            ("sum(mnist_reason:mnist_edge_answers:rate1m)", "answered by nginx itself (errors)"),
        ],
        unit="reqps",
        width=8,
    )
    d.panel(
        "Requests/s in the API",
        [("sum(host_name:mnist_http_requests:rate1m)", "all replicas")],
        unit="reqps",
        width=8,
    )
    d.panel(
        "Error ratio (5xx)",
        [("mnist:http_error_ratio:rate1m", "5xx share")],
        unit="percentunit",
        width=8,
    )
    d.panel(
        "Latency of /predict",
        [
            ("mnist:http_duration_seconds:p50", "p50"),
            ("mnist:http_duration_seconds:p95", "p95"),
            # From the buckets themselves (the recording rule's expression), for their exemplars.
            (
                "histogram_quantile(0.99, sum by (le) (rate(http_server_request_duration_seconds_bucket"
                '{job="mnist-api", http_route=~"/predict.*"}[1m])))',
                "p99 (dots: traces)",
            ),
        ],
        unit="s",
        description="The dots are exemplars: requests whose trace was kept; click one for it in Jaeger.",
    )
    d.panel(
        "p99 latency per replica",
        [
            (
                "histogram_quantile(0.99, sum by (host_name, le) "
                '(host_name_le:mnist_http_duration_bucket:rate1m{host_name=~"$replica"}))',
                "{{host_name}}",
            )
        ],
        unit="s",
    )
    d.panel(
        "Requests/s per replica",
        [
            ('host_name:mnist_http_requests:rate1m{host_name=~"$replica"}', "{{host_name}}"),
        ],
        unit="reqps",
        stack=True,
    )
    d.panel(
        "Refused, by reason",
        [
            ("mnist_reason:mnist_shed:rate1m", "replicas: {{mnist_reason}}"),
            (
                'mnist_reason:mnist_edge_answers:rate1m{mnist_reason=~"no_replica|rate_limit"}',
                "edge: {{mnist_reason}}",
            ),
            ("mnist:shed_ratio:rate1m", "replicas' share of prediction requests"),
        ],
        unit="reqps",
        stack=True,
        description="Replicas (503): budget, could not be answered within LATENCY_BUDGET_MS; "
        "queue_full and inference_queue_full, a queue's safety bound. Edge: no_replica (503), "
        "every replica at API_MAX_CONNS or none up; rate_limit (429), a client over "
        "RATE_LIMIT_RPS. The replicas refuse nothing below capacity.",
    )
    d.panel(
        "Waiting before service",
        [
            ("mnist:edge_wait_seconds:p99", "nginx to worker, p99"),
            ("mnist:admission_wait_seconds:p99", "for a place in the worker, p99"),
            (quantile(0.5, "mnist_admission_wait_seconds", API), "for a place in the worker, p50"),
        ],
        unit="s",
        description="Both count against the latency budget, with the service time.",
    )
    d.panel(
        "Replicas and workers reporting",
        [
            ("mnist:replicas:count", "replicas"),
            ("mnist:workers:count", "workers"),
        ],
        width=6,
    )
    d.panel(
        "nginx connections", [("sum by (state) (nginx_connections_current)", "{{state}}")], width=6
    )
    return d


def inference() -> Dashboard:
    d = Dashboard(
        "mnist-inference",
        "MNIST inference internals",
        "Batching, queueing, preprocessing and inference inside the workers.",
    )
    d.panel(
        "Mean batch size",
        [
            (
                f"sum(rate(mnist_batch_size_sum{{{API}}}[1m])) / sum(rate(mnist_batch_size_count{{{API}}}[1m]))",
                "mean",
            ),
            (quantile(0.95, "mnist_batch_size", API), "p95"),
        ],
        width=8,
    )
    d.panel(
        "Queue wait",
        [
            (quantile(0.5, "mnist_queue_wait_seconds", API), "p50"),
            (quantile(0.99, "mnist_queue_wait_seconds", API), "p99"),
        ],
        unit="s",
        width=8,
    )
    d.panel("Queue depth per worker", [(f"mnist_queue_depth{{{API}}}", "{{instance}}")], width=8)
    d.panel(
        "Prediction requests in each worker",
        [
            (
                f"sum by (mnist_state) (mnist_admission_requests{{{API}}})",
                "{{mnist_state}}",
            )
        ],
        stack=True,
        description="active: being served (at most MAX_CONCURRENCY per worker); waiting: "
        "queued for a place.",
    )
    d.panel(
        "Admission wait",
        [
            (quantile(0.5, "mnist_admission_wait_seconds", API), "p50"),
            (quantile(0.99, "mnist_admission_wait_seconds", API), "p99"),
            (quantile(0.99, "mnist_edge_wait_seconds", API), "nginx to worker, p99"),
        ],
        unit="s",
    )
    d.panel(
        "Prediction requests arriving in an overload",
        [
            (
                "sum by (host_name) (rate(mnist_admission_overload_requests_total"
                f"{{{API}}}[1m])) / sum by (host_name) (rate("
                f'http_server_request_duration_seconds_count{{{API}, http_route=~"/predict.*"}}'
                "[1m]))",
                "{{host_name}}",
            )
        ],
        unit="percentunit",
        description="Per replica. An overload begins at a standing queue of most of the latency "
        "budget and lasts until the worker catches up; in it a request waits a tenth of the "
        "budget at most, the newest first (docs/admission.md).",
    )
    d.panel(
        "Inference time per batch",
        [
            (quantile(0.5, "mnist_inference_duration_seconds", API), "p50"),
            (quantile(0.99, "mnist_inference_duration_seconds", API), "p99"),
        ],
        unit="s",
    )
    d.panel(
        "Preprocessing time per upload",
        [
            (quantile(0.5, "mnist_preprocess_duration_seconds", API), "p50"),
            (quantile(0.99, "mnist_preprocess_duration_seconds", API), "p99"),
        ],
        unit="s",
    )
    d.panel(
        "Rejections by reason",
        [
            (
                f"sum by (mnist_reason) (rate(mnist_rejected_total{{{API}}}[5m]))",
                "{{mnist_reason}}",
            ),
        ],
        unit="reqps",
        width=24,
        stack=True,
        description="Bad uploads by kind, and refusals for capacity (503): budget, "
        "queue_full, inference_queue_full, not_ready, shutting_down.",
    )
    return d


def model() -> Dashboard:
    d = Dashboard(
        "mnist-model",
        "MNIST model behaviour",
        "What the model answers: digits, confidence, low-confidence share.",
    )
    d.panel(
        "Replicas by model version",
        [("sum by (model_version) (model_version:mnist_replicas:count)", "{{model_version}}")],
        stack=True,
        width=24,
        description="How many replicas serve each model version: the split while a rollout "
        "replaces them (make rollout; on Kubernetes, the Deployment's rolling update).",
    )
    d.panel(
        "Predictions/s per digit",
        [
            (
                f"sum by (mnist_digit) (rate(mnist_predictions_total{{{API}}}[5m]))",
                "{{mnist_digit}}",
            ),
        ],
        unit="reqps",
        stack=True,
    )
    d.panel(
        "Share of predictions per digit (last hour)",
        [
            (
                f"sum by (mnist_digit) (increase(mnist_predictions_total{{{API}}}[1h])) "
                f"/ ignoring(mnist_digit) group_left sum(increase(mnist_predictions_total{{{API}}}[1h]))",
                "{{mnist_digit}}",
            )
        ],
        unit="percentunit",
        kind="barchart",
    )
    d.panel(
        "Low-confidence share",
        [
            (
                f'(sum(rate(mnist_predictions_total{{{API}, mnist_low_confidence="true"}}[5m])) or vector(0))'
                f" / sum(rate(mnist_predictions_total{{{API}}}[5m]))",
                "low confidence",
            )
        ],
        unit="percentunit",
        width=8,
    )
    d.panel(
        "Median confidence",
        [(quantile(0.5, "mnist_prediction_confidence", API), "p50")],
        unit="percentunit",
        width=8,
    )
    d.panel(
        "Confidence distribution",
        [
            (
                f"sum by (le) (increase(mnist_prediction_confidence_bucket{{{API}}}[5m]))",
                "{{le}}",
            )
        ],
        kind="bargauge",
        width=8,
    )
    return d


def drilldown() -> Dashboard:
    d = Dashboard(
        "mnist-drilldown",
        "MNIST per replica and worker",
        "One replica or worker at a time: choose them above.",
        worker=True,
    )
    d.panel(
        "Requests/s per worker",
        [
            (
                f"sum by (instance) (rate(http_server_request_duration_seconds_count{{{WORKER}}}[1m]))",
                "{{instance}}",
            )
        ],
        unit="reqps",
    )
    d.panel(
        "p99 latency per worker",
        [
            (
                "histogram_quantile(0.99, sum by (instance, le) "
                f"(rate(http_server_request_duration_seconds_bucket{{{WORKER}}}[1m])))",
                "{{instance}}",
            )
        ],
        unit="s",
    )
    d.panel("Queue depth per worker", [(f"mnist_queue_depth{{{WORKER}}}", "{{instance}}")])
    d.panel(
        "Requests waiting for a place, per worker",
        [(f'mnist_admission_requests{{{WORKER}, mnist_state="waiting"}}', "{{instance}}")],
    )
    d.panel(
        "Mean batch size per worker",
        [
            (
                f"sum by (instance) (rate(mnist_batch_size_sum{{{WORKER}}}[1m])) "
                f"/ sum by (instance) (rate(mnist_batch_size_count{{{WORKER}}}[1m]))",
                "{{instance}}",
            )
        ],
    )
    d.panel(
        "Inference p99 per worker",
        [
            (
                quantile(0.99, "mnist_inference_duration_seconds", WORKER, by="instance, le"),
                "{{instance}}",
            )
        ],
        unit="s",
    )
    d.panel(
        "Predictions/s per worker",
        [
            (
                f"sum by (instance) (rate(mnist_predictions_total{{{WORKER}}}[1m]))",
                "{{instance}}",
            )
        ],
        unit="reqps",
    )
    return d


DASHBOARDS = (overview, inference, model, drilldown)


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {
        f"{d.uid}.json": json.dumps(d.json(), indent=2) + "\n"
        for d in (make() for make in DASHBOARDS)
    }


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
