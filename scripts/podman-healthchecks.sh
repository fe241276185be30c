#!/usr/bin/env bash
# Runs the containers' health checks under podman where nothing else does.
#
# Podman schedules HEALTHCHECKs with systemd timers; on a host without systemd (containers,
# sandboxes, this workplace's machines) they never run, every container stays "starting", and
# compose's `depends_on: condition: service_healthy` waits forever. This loop runs
# `podman healthcheck run` for every running container that has a health check, every
# INTERVAL seconds, which is what the timers would do.
#
#   scripts/podman-healthchecks.sh start   start the loop in the background (idempotent)
#   scripts/podman-healthchecks.sh stop
#   scripts/podman-healthchecks.sh run     the loop itself, in the foreground
set -euo pipefail

readonly PIDFILE=/run/podman/mnist-healthchecks.pid
readonly LOG=/var/log/mnist-podman-healthchecks.log
readonly INTERVAL=${HEALTHCHECK_INTERVAL:-2}

running() { [[ -s $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

case "${1:-}" in
  start)
    if running; then exit 0; fi
    mkdir -p "$(dirname "$PIDFILE")"
    setsid nohup "$0" run >>"$LOG" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    echo "podman-healthchecks: started (pid $!, log $LOG)" >&2
    ;;
  stop)
    if running; then kill "$(cat "$PIDFILE")"; fi
    rm -f "$PIDFILE"
    ;;
  run)
    while true; do
      # Containers whose health status is being tracked (starting, healthy or unhealthy).
      for id in $(podman ps -q --filter health=starting; podman ps -q --filter health=healthy;
                  podman ps -q --filter health=unhealthy); do
        podman healthcheck run "$id" >/dev/null 2>&1 || true
      done
      sleep "$INTERVAL"
    done
    ;;
  *)
    echo "usage: $0 start|stop|run" >&2
    exit 2
    ;;
esac
