#!/usr/bin/env bash
# Make every image of the stack runnable on this machine: use the official image when it is present
# or can be pulled, otherwise, only where its registry cannot be reached at all, build a local
# stand-in from Debian packages (and, for the OpenTelemetry Collector, from the Go module proxy) and
# point compose at it. A registry that answers with an error (a tag that does not exist, a refused
# login, a rate limit) stops the run with that error: it is not a reason for a stand-in.
#
#   eval "$(scripts/engine.sh)" && eval "$(scripts/no-docker/standins.sh)"
#
# The official tags are read from .env (PYTHON_IMAGE, NGINX_IMAGE, PROMETHEUS_IMAGE, OTELCOL_IMAGE,
# JAEGER_IMAGE, GRAFANA_IMAGE). For each stand-in in use, stdout gets `export <VAR>=localhost/mnist-standin/...`,
# which compose prefers over .env; nothing is printed for an image used as it is. Grafana has no
# stand-in: where its image cannot be had, COMPOSE_PROFILES is exported without `grafana`.
# Progress goes to stderr. Stand-ins are never tagged with an official name.
#
# Caching (under .cache/standins/): the debootstrapped rootfs tarballs, the collector binary (keyed
# by the builder manifest's hash), and each stand-in image carries a label with the hash of its
# inputs (Dockerfile and files, build arguments, base image): an image whose inputs did not change
# is not rebuilt. A warm run takes about a second.
#
# Environment knobs (all optional):
#   STANDINS_REBUILD=all|"debian python nginx prometheus otelcol jaeger"
#                          rebuild these from scratch (debian: re-debootstrap the rootfs tarballs;
#                          otelcol, jaeger: rebuild their binary too) even if cached
#   STANDINS_FORCE=1       use stand-ins even where the official image is available
#   STANDINS_PULL=0        do not try `docker pull` (only images already present count as available)
#   STANDINS_REGISTRY_TIMEOUT  seconds a `docker pull` may go without a word before its registry
#                          counts as unreachable (default 120); once the registry answers, a pull
#                          takes as long as it takes
#   STANDINS_DEBIAN_MIRROR Debian mirror for debootstrap and apt (default http://deb.debian.org/debian)
set -euo pipefail
shopt -s inherit_errexit  # command substitutions fail like the rest of the script

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
readonly REPO_ROOT
readonly STANDINS_SRC="${REPO_ROOT}/scripts/no-docker/standins"
readonly CACHE_DIR="${REPO_ROOT}/.cache/standins"
readonly TOOLS_BIN="${REPO_ROOT}/.cache/tools/bin"
readonly ENV_FILE="${REPO_ROOT}/.env"
readonly MANIFEST="${STANDINS_SRC}/otelcol/builder-manifest.yaml"
readonly STANDIN_REPO=localhost/mnist-standin
readonly INPUTS_LABEL=org.mnist-standin.inputs
readonly DEBIAN_MIRROR="${STANDINS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
readonly DEBIAN_SECURITY_MIRROR="${DEBIAN_MIRROR%/debian}/debian-security"
readonly REGISTRY_TIMEOUT="${STANDINS_REGISTRY_TIMEOUT:-120}"
readonly REBUILD="${STANDINS_REBUILD:-}"
readonly HOST_CA_DIR=/usr/local/share/ca-certificates
readonly HOST_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
# Collector modules that the Go module proxy here serves but whose checksum-database lookup it
# answers with 404 (sum.golang.org itself is unreachable): fetched with GONOSUMDB, then checked
# against the hashes pinned in UNVERIFIED_SUMS (recorded on first use) instead.
readonly UNVERIFIED_MODULES=github.com/open-telemetry/opentelemetry-collector-contrib/receiver/nginxreceiver
readonly UNVERIFIED_SUMS="${STANDINS_SRC}/otelcol/unverified-modules.sum"

log() { printf 'standins.sh: %s\n' "$*" >&2; }
die() { printf 'standins.sh: error: %s\n' "$*" >&2; exit 1; }
emit() { printf '%s\n' "$*" >&3; }

# The helpers, then one file per image (each defines standin_<name> and verify_<name>).
# shellcheck source=standins/lib.sh
source "${STANDINS_SRC}/lib.sh"
for image in python nginx prometheus otelcol jaeger; do
  # shellcheck source=/dev/null
  source "${STANDINS_SRC}/${image}.sh"
done

# --- main --------------------------------------------------------------------------------------

main() {
  # Only emit() reaches the real stdout (fd 3): `eval "$(scripts/no-docker/standins.sh)"` sees export lines.
  exec 3>&1 1>&2

  command -v docker >/dev/null || die "the docker CLI is not installed"
  timeout 20 docker info >/dev/null 2>&1 ||
    die "no Docker engine answers: run  eval \"\$(scripts/engine.sh)\"  first"
  [ -r "${ENV_FILE}" ] || die "${ENV_FILE} is missing (it pins the official image tags)"

  mkdir -p "${CACHE_DIR}"
  exec 9>"${CACHE_DIR}/.lock"
  flock -w 3600 9 || die "another standins.sh run holds ${CACHE_DIR}/.lock"

  local started="${SECONDS}" var official builder
  local -A builders=(
    [PYTHON_IMAGE]=standin_python
    [NGINX_IMAGE]=standin_nginx
    [PROMETHEUS_IMAGE]=standin_prometheus
    [OTELCOL_IMAGE]=standin_otelcol
    [JAEGER_IMAGE]=standin_jaeger
  )
  for var in PYTHON_IMAGE NGINX_IMAGE PROMETHEUS_IMAGE OTELCOL_IMAGE JAEGER_IMAGE; do
    official="$(env_value "${var}")"
    if official_available "${official}"; then
      log "${official}: official image available"
      continue
    fi
    builder="${builders[${var}]}"
    STANDIN_TAG=""
    "${builder}" "${official}"
    log "${var}: ${official} -> stand-in ${STANDIN_TAG}"
    emit "export ${var}=${STANDIN_TAG}"
  done

  official="$(env_value GRAFANA_IMAGE)"
  if official_available "${official}"; then
    log "${official}: official image available"
  else
    log "NOTICE: ${official} is not available and has no stand-in (Grafana is packaged nowhere" \
      "reachable from here): the Grafana service will not run on this machine. Test dashboards by" \
      "running their panel queries against Prometheus instead."
    # compose.yaml runs Grafana under the `grafana` profile, which .env turns on: drop that one
    # (keeping any other) so that compose does not try to pull the image.
    emit "export COMPOSE_PROFILES=$(profiles_without grafana)"
  fi
  remove_retired_images
  log "done in $((SECONDS - started))s"
}

# Run unless sourced (the functions can be sourced for testing).
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
