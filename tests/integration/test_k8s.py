"""The Kubernetes manifests (k8s/) as far as this machine can run them: the rendered api, nginx and
Collector under `podman kube play` with the images the stack runs, and the autoscaler's query
against the stack's real Prometheus. (Their schemas and policies: tests/unit/test_k8s.py.)"""

from __future__ import annotations

import shutil

import pytest

from k8s.check import manifests, smoke
from tests.integration.stack import Load, Stack, wait_for


def test_the_rendered_pods_serve_predictions_under_podman(stack: Stack) -> None:
    if shutil.which("podman") is None:
        pytest.skip("needs podman: the manifests run under `podman kube play`")
    try:
        assert smoke(environ=stack.env) == 0
    except SystemExit as exc:  # the check's own failure message
        pytest.fail(str(exc))


def test_the_autoscalers_query_measures_requests_in_progress(stack: Stack) -> None:
    """The ScaledObject's query, run on the stack's Prometheus under load, gives one positive
    figure: the requests in progress over all replicas."""
    (scaled,) = [doc for doc in manifests() if doc["kind"] == "ScaledObject"]
    (trigger,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    query = trigger["metadata"]["query"]

    def in_progress() -> float | None:
        found = stack.prometheus(query)
        assert len(found) <= 1, found  # one figure for the whole Deployment
        value = float(found[0]["value"][1]) if found else 0.0
        return value if value > 0 else None

    with Load(stack, clients=8):
        value = wait_for(in_progress, timeout=60, what=query)
    # At most what the clients keep open (rate() extrapolates to the window's edges: a margin).
    assert value < 8 * 1.5, value
