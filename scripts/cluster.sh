#!/usr/bin/env bash
# Run the compose stack: what `make up`, `make scale`, `make down` and `make logs` call.
#
#   scripts/cluster.sh up [REPLICAS]     build, start, wait until every replica is healthy
#   scripts/cluster.sh scale REPLICAS    add or remove API replicas (nginx picks them up itself)
#   scripts/cluster.sh down              stop and remove the stack (named volumes are kept)
#   scripts/cluster.sh logs [SERVICE]    follow the logs
#   scripts/cluster.sh grafana-password  print Grafana's admin password (generated on its first start)
#   scripts/cluster.sh env               print the environment the others use (for eval)
#
# On a machine with Docker these are `docker compose` with the repo's .env. Elsewhere,
# scripts/engine.sh brings up podman's Docker API and scripts/no-docker/standins.sh builds
# stand-ins for images that cannot be pulled (up and scale only; both quick when done).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
log() { printf 'cluster: %s\n' "$*" >&2; }
die() { printf 'cluster: error: %s\n' "$*" >&2; exit 1; }

# The containers run as unprivileged users (the API 10001, nginx 101, Prometheus nobody, the
# Collector and Jaeger 10001, Grafana 472) and read the repository's files: config through bind mounts, the
# app and model through the image, whose COPY keeps each file's mode. A checkout made under a
# umask such as 077 leaves them unreadable to those users: name them, with the fix.
readonly CONTAINER_READ=(app model requirements nginx web prometheus otel-collector jaeger grafana)
check_readable() {
  local unreadable
  unreadable="$(find "${CONTAINER_READ[@]}" -name __pycache__ -prune -o \
    \( -type f ! -perm -0004 -print \) -o \( -type d ! -perm -0005 -print \) 2>/dev/null |
    head -n 5 || true)"  # head may end find early: not a failure
  [[ -z "$unreadable" ]] ||
    die "files the containers read are not readable by other users (the checkout's umask?):" \
      "$(tr '\n' ' ' <<<"$unreadable")-- fix with: chmod -R a+rX ${CONTAINER_READ[*]}"
}

setenv() {  # the engine (set up where needed) and the images: for up, scale, env
  local engine standins
  engine="$(scripts/engine.sh)" || die "no container engine (see above)"
  eval "$engine"
  if [[ "${DOCKER_HOST:-}" == unix:///run/podman/* ]]; then
    # No systemd here to schedule podman's health checks: run them ourselves.
    scripts/no-docker/podman-healthchecks.sh start
  fi
  standins="$(scripts/no-docker/standins.sh)" || die "could not provide the images (see above)"
  eval "$standins"
  printf '%s\n%s\n' "$engine" "$standins"
}

probe_engine() {  # only an engine that already runs: for down, logs, grafana-password
  local engine
  engine="$(scripts/engine.sh --probe)" || die "no container engine is running (see above)"
  eval "$engine"
}

env_value() {  # the value of NAME from the environment, else from .env
  local name=$1
  if [[ -n "${!name:-}" ]]; then printf '%s' "${!name}"; return; fi
  sed -n "s/^${name}=//p" .env | tail -n 1
}

wait_healthy() {  # wait_healthy REPLICAS: every replica healthy and nginx answering
  local want=$1 deadline=$((SECONDS + ${UP_TIMEOUT:-300})) port healthy
  port="$(env_value HTTP_PORT)"
  while ((SECONDS < deadline)); do
    healthy="$(docker compose ps api --format '{{.Health}}' 2>/dev/null | grep -c '^healthy$' || true)"
    if [[ "$healthy" -ge "$want" ]] \
       && curl -fsS -o /dev/null "http://127.0.0.1:${port}/readyz" 2>/dev/null; then
      log "$healthy/$want API replicas healthy; nginx answers on port $port"
      return 0
    fi
    sleep 1
  done
  docker compose ps >&2 || true
  die "not healthy after ${UP_TIMEOUT:-300} s ($healthy/$want replicas); see: make logs"
}

print_urls() {
  local port
  port="$(env_value HTTP_PORT)"
  cat >&2 <<MSG

  Draw a digit                      http://localhost:${port}/
  API (the one public entry point)  http://localhost:${port}/predict   docs: http://localhost:${port}/docs
  Prometheus (loopback only)        http://127.0.0.1:$(env_value PROMETHEUS_PORT || true)
  Jaeger, traces (loopback only)    http://127.0.0.1:$(env_value JAEGER_PORT || true)
  Try it:  curl -F file=@digit.png http://localhost:${port}/predict
MSG
  local profiles
  if [[ -v COMPOSE_PROFILES ]]; then profiles=$COMPOSE_PROFILES; else profiles=$(env_value COMPOSE_PROFILES); fi
  if [[ "$profiles" == *grafana* ]]; then
    printf '  Grafana (loopback only)           http://127.0.0.1:%s  user admin, password: make grafana-password\n' \
      "$(env_value GRAFANA_PORT)" >&2
  else
    printf '  Grafana: not running on this machine (its image cannot be had here; see above)\n' >&2
  fi
}

cmd=${1:-}
case "$cmd" in
  up)
    replicas=${2:-$(env_value REPLICAS)}
    check_readable
    setenv >/dev/null
    started=$SECONDS
    log "building the API image and starting $replicas replicas"
    docker compose build api >&2
    docker compose up -d --remove-orphans --scale "api=${replicas}" >&2
    wait_healthy "$replicas"
    log "up in $((SECONDS - started)) s"
    print_urls
    ;;
  scale)
    replicas=${2:?usage: cluster.sh scale REPLICAS}
    setenv >/dev/null
    docker compose up -d --no-recreate --no-build --scale "api=${replicas}" api >&2
    wait_healthy "$replicas"
    ;;
  down)
    probe_engine
    docker compose down --remove-orphans >&2
    ;;
  logs)
    probe_engine
    shift
    docker compose logs -f "$@"
    ;;
  grafana-password)
    probe_engine
    # Generated by grafana/entrypoint.sh on Grafana's first start.
    docker compose exec -T grafana cat /var/lib/grafana/admin-password ||
      die "no password to show: Grafana is not running (make up), has not started yet, or its" \
        "database predates the generated password (its log says how to set one)"
    echo
    ;;
  env)
    setenv
    ;;
  *)
    die "usage: cluster.sh up [REPLICAS] | scale REPLICAS | down | logs [SERVICE] | grafana-password | env"
    ;;
esac
