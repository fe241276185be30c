#!/usr/bin/env bash
# Run the compose stack: what `make up`, `make scale`, `make rollout`, `make down` and `make logs`
# call.
#
#   scripts/cluster.sh up [REPLICAS]     build, start, wait until every replica is healthy
#   scripts/cluster.sh scale REPLICAS    add or remove API replicas (nginx picks them up itself)
#   scripts/cluster.sh rollout           rebuild the API image (a new model or code) and replace
#                                        the replicas with it one at a time, no request lost
#                                        (UP_TIMEOUT: how long each new one has to be healthy)
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

# A rollout: for each old replica, one more from the new image; once it is healthy and nginx
# sends it requests, the old one is stopped (gunicorn finishes what it holds; nginx retries
# what reaches it as it goes: proxy_next_upstream ... non_idempotent) and removed. At no time
# are there fewer replicas serving than before.
readonly ROUTE_TIMEOUT=30  # nginx re-resolves the service name every 5 s (resolver valid=5s)

cname() { local name; name="$(docker inspect -f '{{.Name}}' "$1")"; printf '%s' "${name#/}"; }
image_of() { docker inspect -f '{{.Image}}' "$1"; }
short() { local id=${1#sha256:}; printf '%s' "${id:0:12}"; }

model_version() {  # what a replica serves, asked inside it (it has no host port)
  docker exec "$1" python3 -c 'import json, os, urllib.request
port = os.environ.get("BIND", "0.0.0.0:8000").rpartition(":")[2] or "8000"
with urllib.request.urlopen(f"http://127.0.0.1:{port}/model", timeout=5) as response:
    print(json.load(response)["version"])' 2>/dev/null || printf 'unknown'
}

nginx_port() {  # the port nginx is published on now (the stack may predate HTTP_PORT's value)
  local port
  port="$(docker compose port nginx 8080 2>/dev/null | tail -n 1 || true)"
  port=${port##*:}
  if [[ -n "$port" ]]; then printf '%s' "$port"; else env_value HTTP_PORT; fi
}

wait_replica_healthy() {  # wait_replica_healthy ID: the compose health check passes
  local id=$1 deadline=$((SECONDS + ${UP_TIMEOUT:-300})) state
  while ((SECONDS < deadline)); do
    state="$(docker inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$id" 2>/dev/null ||
      true)"
    [[ "$state" == "running healthy" ]] && return 0
    sleep 1
  done
  return 1
}

wait_routed() {  # wait_routed ID PORT: nginx sends a request to it (its X-Served-By)
  local host headers deadline=$((SECONDS + ROUTE_TIMEOUT))
  host="$(docker inspect -f '{{.Config.Hostname}}' "$1")"
  while ((SECONDS < deadline)); do
    # least_conn: an idle new replica is among the first picked once nginx has its address.
    headers="$(curl -sS -m 5 -D - -o /dev/null "http://127.0.0.1:$2/readyz" 2>/dev/null || true)"
    grep -qi "^x-served-by: ${host}/" <<<"$headers" && return 0
    sleep 0.2
  done
  return 1
}

remove_replica() {  # remove_replica ID: a graceful stop within compose's stop_grace_period
  local grace
  grace="$(docker inspect -f '{{.Config.StopTimeout}}' "$1")"
  [[ "$grace" =~ ^[0-9]+$ ]] || grace=10  # the engine's default
  docker stop -t "$grace" "$1" >/dev/null
  docker rm "$1" >/dev/null
}

api_state() {  # the replicas and their images: what a failed rollout leaves
  local id
  for id in $(docker compose ps -a -q api); do
    printf '  %s  %s  image %s\n' "$(cname "$id")" \
      "$(docker inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$id")" \
      "$(short "$(image_of "$id")")" >&2
  done
}

# Replicas replaced so far, and to replace: what the EXIT trap reports of a rollout that stops.
ROLLED=0 ROLLING=0
rollout_stopped() {
  ((ROLLED == ROLLING)) && return
  log "rollout stopped with $ROLLED of $ROLLING replicas replaced; the API containers now:"
  api_state
}

rollout() {
  local project image port id new new_name old_name ran count listed waited line
  local stopped="" summary=()
  local -a old all before
  project="$(docker compose config 2>/dev/null | sed -n 's/^name: //p' | head -n 1)"
  mapfile -t old < <(docker compose ps -q api)
  ((${#old[@]})) ||
    die "no API replicas running in compose project ${project:-?}: start the cluster (make up)"
  # A stopped replica counts towards --scale (compose would start it again): not ours to decide.
  mapfile -t all < <(docker compose ps -a -q api)
  for id in "${all[@]}"; do
    [[ " ${old[*]} " == *" $id "* ]] || stopped+="$(cname "$id") "
  done
  [[ -z "$stopped" ]] ||
    die "API containers of project $project are not running: ${stopped}--" \
      "start or remove them first"
  port="$(nginx_port)"
  ROLLING=${#old[@]}
  log "project $project: replacing its $ROLLING API replicas one at a time (nginx on port $port)"
  docker compose build api >&2 ||
    die "could not build the API image (see above); nothing was changed"
  image="$(docker image inspect -f '{{.Id}}' "$(docker compose config --images api)")"
  for id in "${old[@]}"; do
    [[ "$(image_of "$id")" == "$image" ]] || break
  done
  [[ "$(image_of "$id")" != "$image" ]] ||
    log "the image is unchanged ($(short "$image")): replacing the replicas anyway"
  trap rollout_stopped EXIT

  for id in "${old[@]}"; do
    mapfile -t before < <(docker compose ps -a -q api)
    count=$((${#before[@]} + 1))
    # --no-recreate: the running replicas, old ones too, are left as they are; the one added is
    # created from the image just built (checked below).
    docker compose up -d --no-recreate --no-build --scale "api=$count" api >&2 ||
      die "could not start a new replica (see above)"
    new=""
    while read -r listed; do
      [[ " ${before[*]} " == *" $listed "* ]] || new+="${new:+ }$listed"
    done < <(docker compose ps -a -q api)
    [[ -n "$new" && "$new" != *" "* ]] ||
      die "expected one new API container after --scale api=$count, found: ${new:-none}"
    new_name="$(cname "$new")" old_name="$(cname "$id")"
    if [[ "$(image_of "$new")" != "$image" ]]; then
      ran="$(short "$(image_of "$new")")"
      remove_replica "$new"
      die "the new replica $new_name ran image $ran, not the one built ($(short "$image")):" \
        "removed it; $old_name and the others were left serving"
    fi
    log "$new_name started to replace $old_name; waiting until it is healthy"
    waited=$SECONDS
    if ! wait_replica_healthy "$new"; then
      docker logs --tail 30 "$new" >&2 || true
      remove_replica "$new"
      die "the new replica $new_name was not healthy within ${UP_TIMEOUT:-300} s (its log" \
        "above): removed it; $old_name and the others were left serving"
    fi
    # Healthy is not yet in use: nginx learns of the address at its next re-resolution.
    wait_routed "$new" "$port" ||
      die "nginx sent no request to $new_name within $ROUTE_TIMEOUT s although it is" \
        "healthy; it and $old_name were left running"
    log "$new_name healthy and in nginx's rotation after $((SECONDS - waited)) s"
    line="$old_name ($(short "$id"), image $(short "$(image_of "$id")"),"
    line+=" model $(model_version "$id"))"
    log "stopping $old_name (it finishes what it holds)"
    remove_replica "$id"
    ((++ROLLED))
    line+=" -> $new_name ($(short "$new"), image $(short "$image"), model $(model_version "$new"))"
    summary+=("$line")
    log "replaced $ROLLED/$ROLLING: $line"
  done

  # What is left: as many replicas as before, every one healthy and on the new image.
  mapfile -t all < <(docker compose ps -a -q api)
  ((${#all[@]} == ROLLING)) || die "expected $ROLLING API replicas at the end, found ${#all[@]}"
  for id in "${all[@]}"; do
    [[ "$(image_of "$id")" == "$image" ]] || die "$(cname "$id") is not on the new image"
  done
  wait_healthy "$ROLLING"
  log "rollout done: $ROLLING replicas on image $(short "$image")"
  printf '%s\n' "${summary[@]}"
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
  rollout)
    check_readable
    setenv >/dev/null
    started=$SECONDS
    rollout
    log "rollout in $((SECONDS - started)) s"
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
    die "usage: cluster.sh up [REPLICAS] | scale REPLICAS | rollout | down | logs [SERVICE] | grafana-password | env"
    ;;
esac
