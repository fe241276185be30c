#!/usr/bin/env bash
# Runs the containers' health checks under podman where nothing else does.
#
# Podman schedules HEALTHCHECKs with systemd timers; on a host without systemd (containers,
# sandboxes, this workplace's machines) they never run, every container stays "starting", and
# compose's `depends_on: condition: service_healthy` waits forever. This loop runs
# `podman healthcheck run` for every running container that has a health check, which is what
# the timers would do: every STARTING_INTERVAL seconds for a container still starting (so that
# `make up` and --scale see it healthy soon), every INTERVAL seconds (compose's 5 s) once it is
# healthy or unhealthy.
#
# Each check costs a podman process and an exec in the container: on a small machine, checking
# every container every 2 s took a noticeable share of the CPU, in bursts that showed as
# latency spikes in the benchmarks (scripts/no-docker/README.md).
#
#   scripts/no-docker/podman-healthchecks.sh start   start the loop in the background (idempotent)
#   scripts/no-docker/podman-healthchecks.sh stop
#   scripts/no-docker/podman-healthchecks.sh run     the loop itself, in the foreground
set -euo pipefail

readonly PIDFILE=/run/podman/mnist-healthchecks.pid
# The loop runs from a copy of this script, from /: nothing of the checkout that started it is
# held, so deleting that checkout cannot break it (or the containers it checks).
readonly INSTALLED=/run/podman/mnist-healthchecks.sh
readonly LOG=/var/log/mnist-podman-healthchecks.log
readonly INTERVAL=${HEALTHCHECK_INTERVAL:-5}
readonly STARTING_INTERVAL=1
[[ $INTERVAL =~ ^[1-9][0-9]*$ ]] || {
  echo "podman-healthchecks: HEALTHCHECK_INTERVAL=$INTERVAL must be whole seconds" >&2; exit 2; }

running() { [[ -s $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }
# A loop started by an older version from a checkout since deleted: to be replaced.
stale() { [[ "$(readlink "/proc/$(cat "$PIDFILE")/cwd" 2>/dev/null)" == *" (deleted)" ]]; }

case "${1:-}" in
  start)
    if running && ! stale && cmp -s "$0" "$INSTALLED"; then exit 0; fi
    if running; then kill "$(cat "$PIDFILE")"; fi
    mkdir -p "$(dirname "$PIDFILE")"
    [[ "$0" -ef "$INSTALLED" ]] || install -m 0755 "$0" "$INSTALLED"
    (cd / && exec setsid nohup "$INSTALLED" run >>"$LOG" 2>&1 < /dev/null) &
    echo $! > "$PIDFILE"
    echo "podman-healthchecks: started (pid $!, log $LOG)" >&2
    ;;
  stop)
    if running; then kill "$(cat "$PIDFILE")"; fi
    rm -f "$PIDFILE"
    ;;
  run)
    declare -A last=()
    while true; do
      now=$SECONDS
      # "<id> Up 3 minutes (healthy)": containers with a health check show its state.
      while read -r id state; do
        case "$state" in
          *"(starting)") ;;
          *"(healthy)" | *"(unhealthy)") (( now - ${last[$id]:-0} >= INTERVAL )) || continue ;;
          *) continue ;;
        esac
        last[$id]=$now
        podman healthcheck run "$id" </dev/null >/dev/null 2>&1 || true
      done < <(podman ps --format '{{.ID}} {{.Status}}' 2>/dev/null || true)
      sleep "$STARTING_INTERVAL"
    done
    ;;
  *)
    echo "usage: $0 start|stop|run" >&2
    exit 2
    ;;
esac
