#!/usr/bin/env bash
# Command-line tools the tests and benchmarks use; idempotent and quick when they are there.
#   wrk       closed-loop load (system package: apt-get or brew)
#   vegeta    open-loop, constant-rate load (built with Go from the module proxy into .venv/bin,
#             pinned; or brew)
#   chromium  the browser the web page's test drives through Playwright (system package: apt-get;
#             elsewhere any Chromium or Chrome on PATH, CHROMIUM=/path, or `playwright install
#             chromium`)
#   kustomize renders k8s/ (make k8s-render): kubectl's own where kubectl is there, else built
#             with Go from the module proxy into .venv/bin, pinned
#   KEDA's ScaledObject schema, for make k8s-validate: from KEDA's Go module, hash-checked,
#             kept in .venv/share/k8s (k8s/check.py)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VEGETA_MODULE=github.com/tsenart/vegeta/v12
VEGETA_VERSION=v12.13.0
KUSTOMIZE_MODULE=sigs.k8s.io/kustomize/kustomize/v5
KUSTOMIZE_VERSION=v5.8.2

if ! command -v wrk >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing wrk with apt-get" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  elif command -v brew >/dev/null; then
    brew install wrk
  else
    echo "warning: wrk missing; install it to run the benchmarks" >&2
  fi
fi

if ! command -v vegeta >/dev/null && [ ! -x "$REPO_ROOT/.venv/bin/vegeta" ]; then
  if command -v go >/dev/null; then
    echo "building vegeta $VEGETA_VERSION with $(go version | cut -d' ' -f3)" >&2
    GOBIN="$REPO_ROOT/.venv/bin" GOFLAGS=-buildvcs=false go install "$VEGETA_MODULE@$VEGETA_VERSION" \
      || echo "warning: could not build vegeta; the open-loop benchmarks need it" >&2
  elif command -v brew >/dev/null; then
    brew install vegeta
  else
    echo "warning: vegeta missing (needs Go or brew); the open-loop benchmarks need it" >&2
  fi
fi

if [ -z "${CHROMIUM:-}" ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null \
  && ! command -v google-chrome >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing chromium with apt-get (for the web page's browser test)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: no Chromium on PATH: the web page's browser test needs one (apt-get install" \
      "chromium, CHROMIUM=/path/to/chrome, or .venv/bin/playwright install chromium)" >&2
  fi
fi

if ! command -v kubectl >/dev/null && ! command -v kustomize >/dev/null \
  && [ ! -x "$REPO_ROOT/.venv/bin/kustomize" ]; then
  if command -v go >/dev/null; then
    echo "building kustomize $KUSTOMIZE_VERSION with $(go version | cut -d' ' -f3)" >&2
    GOBIN="$REPO_ROOT/.venv/bin" GOFLAGS=-buildvcs=false go install "$KUSTOMIZE_MODULE@$KUSTOMIZE_VERSION" \
      || echo "warning: could not build kustomize; make k8s-render needs it (or kubectl)" >&2
  else
    echo "warning: neither kubectl nor kustomize (nor Go to build it): make k8s-render needs one" >&2
  fi
fi

(cd "$REPO_ROOT" && .venv/bin/python -m k8s.check fetch) \
  || echo "warning: could not fetch KEDA's CRD schema; make k8s-validate needs it" >&2
