#!/usr/bin/env bash
# The container engine and Docker Compose (>= 2) the stack runs on; prints the environment that
# the other scripts (and `docker compose`) need.
#
#   eval "$(scripts/engine.sh)"            use an engine, setting podman up where there is none
#   eval "$(scripts/engine.sh --probe)"    only find one that already runs (make down, make logs)
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
# - A Debian host with no Docker at all, as root: podman serving the Docker API, set up by
#   scripts/no-docker/podman.sh (see scripts/no-docker/README.md).
# - Anywhere else: fail with a message saying what is missing.
set -euo pipefail
shopt -s inherit_errexit  # command substitutions fail like the rest of the script

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
log() { printf 'engine.sh: %s\n' "$*" >&2; }
die() { printf 'engine.sh: error: %s\n' "$*" >&2; exit 1; }
emit() { printf '%s\n' "$*" >&3; }
# The podman path's functions and constants (PODMAN_HOST, podman_setup, install_compose_plugin).
# shellcheck source=no-docker/podman.sh
source "${REPO_ROOT}/scripts/no-docker/podman.sh"

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
  local probe=0
  [ "${1:-}" = --probe ] && probe=1

  command -v docker >/dev/null || die "the docker CLI is not installed (it is the client for any engine)"

  # 1. An engine that already works (real Docker, or DOCKER_HOST pointing at a live socket).
  if engine_answers; then
    if engine_is_podman; then
      [ "${probe}" = 1 ] || { repair_service; ensure_compose install; }
      log "using the podman engine at ${DOCKER_HOST:-the default socket}"
      [ -n "${DOCKER_HOST:-}" ] && emit "export DOCKER_HOST=${DOCKER_HOST}"
      emit "export DOCKER_BUILDKIT=0"
      emit "export COMPOSE_BAKE=false"
    else
      [ "${probe}" = 1 ] || ensure_compose no-install
      log "using the Docker engine as it is"
    fi
    return 0
  fi

  # 2. Docker is here but does not answer: say why. Nothing is installed on a Docker machine.
  local problem
  if problem="$(docker_problem)"; then
    die "${problem}"
  fi

  # 3. No Docker at all: podman serving the Docker API (already running, for a probe).
  if [ "${probe}" = 1 ]; then
    engine_answers "${PODMAN_HOST}" || die "no container engine is running (make up starts one)"
    emit "export DOCKER_HOST=${PODMAN_HOST}"
    emit "export DOCKER_BUILDKIT=0"
    emit "export COMPOSE_BAKE=false"
    return 0
  fi
  podman_setup
  ensure_compose install
}

# Run unless sourced (the functions can be sourced for testing).
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
