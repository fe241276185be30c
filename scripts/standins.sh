#!/usr/bin/env bash
# Make every image of the stack runnable on this machine: use the official image when it is present
# or can be pulled, otherwise, only where its registry cannot be reached at all, build a local
# stand-in from Debian packages (and, for the OpenTelemetry Collector, from the Go module proxy) and
# point compose at it. A registry that answers with an error (a tag that does not exist, a refused
# login, a rate limit) stops the run with that error: it is not a reason for a stand-in.
#
#   eval "$(scripts/engine.sh)" && eval "$(scripts/standins.sh)"
#
# The official tags are read from .env (PYTHON_IMAGE, NGINX_IMAGE, PROMETHEUS_IMAGE, OTELCOL_IMAGE,
# GRAFANA_IMAGE). For each stand-in in use, stdout gets `export <VAR>=localhost/mnist-standin/...`,
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
#   STANDINS_REBUILD=all|"debian python nginx prometheus otelcol"
#                          rebuild these from scratch (debian: re-debootstrap the rootfs tarballs;
#                          otelcol: rebuild the collector binary too) even if cached
#   STANDINS_FORCE=1       use stand-ins even where the official image is available
#   STANDINS_PULL=0        do not try `docker pull` (only images already present count as available)
#   STANDINS_REGISTRY_TIMEOUT  seconds a `docker pull` may go without a word before its registry
#                          counts as unreachable (default 120); once the registry answers, a pull
#                          takes as long as it takes
#   STANDINS_DEBIAN_MIRROR Debian mirror for debootstrap and apt (default http://deb.debian.org/debian)
set -euo pipefail
shopt -s inherit_errexit  # command substitutions fail like the rest of the script

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly STANDINS_SRC="${REPO_ROOT}/scripts/standins"
readonly CACHE_DIR="${REPO_ROOT}/.cache/standins"
readonly TOOLS_BIN="${REPO_ROOT}/.cache/tools/bin"
readonly ENV_FILE="${REPO_ROOT}/.env"
readonly MANIFEST="${REPO_ROOT}/otel-collector/builder-manifest.yaml"
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

# --- helpers -----------------------------------------------------------------------------------

# The value of KEY in .env (the last assignment wins, as in compose; surrounding quotes removed).
# Without a value: DEFAULT if one is given (even empty), else fail.
env_value() {
  local key="$1" value
  value="$(sed -n "s/^[[:space:]]*${key}[[:space:]]*=[[:space:]]*//p" "${ENV_FILE}" | tail -n 1)"
  value="${value%\"}" value="${value#\"}" value="${value%\'}" value="${value#\'}"
  if [ -z "${value}" ]; then
    [ $# -ge 2 ] || die "${ENV_FILE} does not set ${key}"
    value="$2"
  fi
  printf '%s\n' "${value}"
}

# COMPOSE_PROFILES as compose would see it (the environment, else .env) without the profile NAME.
profiles_without() {
  local profiles profile kept=()
  if [ -n "${COMPOSE_PROFILES+set}" ]; then
    profiles="${COMPOSE_PROFILES}"
  else
    profiles="$(env_value COMPOSE_PROFILES '')"
  fi
  for profile in ${profiles//,/ }; do
    [ "${profile}" = "$1" ] || kept+=("${profile}")
  done
  (IFS=,; printf '%s\n' "${kept[*]}")
}

# True when NAME is listed in STANDINS_REBUILD (or it says "all").
wants_rebuild() {
  local word
  for word in ${REBUILD//,/ }; do
    [ "${word}" = all ] || [ "${word}" = "$1" ] && return 0
  done
  return 1
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# `docker run --rm` through podman's Docker API exits 0 whatever the container's status
# (containers/podman#18889), so checks run a named container, take its status, then remove it.
run_container() {
  local name="mnist-standin-check-$$-${RANDOM}" status=0
  docker run --name "${name}" "$@" || status=$?
  docker rm -f "${name}" >/dev/null 2>&1 || true
  return "${status}"
}

image_id() { docker image inspect --format '{{.Id}}' "$1"; }

image_label() {
  docker image inspect --format "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true
}

# True when the official image TAG can be used: it is present under an official name (podman may
# resolve a short name like nginx:1.30.6 to any local image whose name ends in /nginx:1.30.6, such
# as a stand-in, so the names are checked), or `docker pull` gets it. False only when its registry
# cannot be reached; any other pull failure stops the run.
official_available() {
  local tag="$1" names
  if [ "${STANDINS_FORCE:-0}" = 1 ]; then
    return 1
  fi
  if names="$(docker image inspect --format '{{range .RepoTags}}{{println .}}{{end}}' "${tag}" 2>/dev/null)" &&
    grep -v -e "^${STANDIN_REPO}/" -e '^$' <<<"${names}" | grep -q .; then
    return 0
  fi
  [ "${STANDINS_PULL:-1}" = 0 ] && return 1
  pull_official "${tag}"
}

# The registry host of an image reference (docker.io for Docker Hub's short names).
registry_of() {
  local first="${1%%/*}"
  if [[ "$1" == */* && ("${first}" == *.* || "${first}" == *:* || "${first}" == localhost) ]]; then
    printf '%s\n' "${first}"
  else
    printf 'docker.io\n'
  fi
}

# Pull errors that mean the registry was not reached at all (DNS, routing, a dead proxy, TLS that
# never completes), as opposed to an answer from it.
readonly UNREACHABLE_ERRORS='no such host|name resolution|server misbehaving|connection refused|network is unreachable|no route to host|i/o timeout|TLS handshake timeout|context deadline exceeded|Client\.Timeout exceeded|proxyconnect'

# Registries found unreachable in this run, with why: each is tried once.
declare -A UNREACHABLE=()

# Pulls TAG with no time limit once its registry answers. Fails (for a stand-in) only when the
# registry cannot be reached: a pull error of that kind, or no word at all for REGISTRY_TIMEOUT
# seconds. Any other failure stops the run with the engine's error.
pull_official() {
  local tag="$1" registry output pid started="${SECONDS}" status=0 error
  registry="$(registry_of "${tag}")"
  if [ -n "${UNREACHABLE[${registry}]+set}" ]; then
    return 1
  fi
  log "${tag}: not present; pulling it"
  output="$(mktemp)"
  docker pull "${tag}" >"${output}" 2>&1 &
  pid=$!
  while kill -0 "${pid}" 2>/dev/null; do
    if [ ! -s "${output}" ] && [ $((SECONDS - started)) -ge "${REGISTRY_TIMEOUT}" ]; then
      kill "${pid}" 2>/dev/null || true
      wait "${pid}" 2>/dev/null || true
      rm -f "${output}"
      UNREACHABLE[${registry}]="no answer in ${REGISTRY_TIMEOUT}s"
      log "${registry}: no answer to \`docker pull ${tag}\` in ${REGISTRY_TIMEOUT}s: it cannot be" \
        "reached from here, so stand-ins are built (STANDINS_REGISTRY_TIMEOUT to wait longer)"
      return 1
    fi
    sleep 0.2
  done
  wait "${pid}" || status=$?
  if [ "${status}" = 0 ]; then
    rm -f "${output}"
    log "${tag}: pulled in $((SECONDS - started))s"
    return 0
  fi
  error="$(sed '/^[[:space:]]*$/d' "${output}" | tail -n 1)"
  rm -f "${output}"
  if grep -Eqi -- "${UNREACHABLE_ERRORS}" <<<"${error}"; then
    UNREACHABLE[${registry}]="${error}"
    log "${registry} cannot be reached from here (${error}): stand-ins are built for its images"
    return 1
  fi
  die "\`docker pull ${tag}\` failed: ${error}" \
    "-- the registry answered, so no stand-in is built: check the tag in .env (or docker login)," \
    "or set STANDINS_FORCE=1 to build stand-ins all the same"
}

# The stand-in tag for an official tag: localhost/mnist-standin/<last path part>:<tag>.
standin_tag() {
  local official="$1" repo="${1%:*}"
  printf '%s/%s:%s\n' "${STANDIN_REPO}" "${repo##*/}" "${official##*:}"
}

# A short hash of the contents of files and directories (with their relative names) and of strings
# given as "=text". Used as the cache key of an image or a binary.
fingerprint() {
  local arg
  for arg in "$@"; do
    case "${arg}" in
      =*) printf 'string %s\n' "${arg#=}" ;;
      *)
        if [ -d "${arg}" ]; then
          (cd "${arg}" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum)
        elif [ -f "${arg}" ]; then
          printf 'file %s %s\n' "$(basename "${arg}")" "$(sha256sum <"${arg}" | cut -d' ' -f1)"
        else
          printf 'missing %s\n' "${arg}"
        fi
        ;;
    esac
  done | sha256sum | cut -c1-16
}

# Runs a command for a check; on failure prints its output and fails. Returns the output on stdout.
run_check() {
  local description="$1" output
  shift
  if ! output="$("$@" 2>&1)"; then
    printf '%s\n' "${output}" | tail -n 30 >&2
    log "check failed: ${description}"
    return 1
  fi
  printf '%s\n' "${output}"
}

# Like run_check, and the output must match the extended regex PATTERN.
expect_output() {
  local description="$1" pattern="$2" output
  shift 2
  output="$(run_check "${description}" "$@")" || return 1
  if ! grep -Eq -- "${pattern}" <<<"${output}"; then
    printf '%s\n' "${output}" | tail -n 30 >&2
    log "check failed: ${description} (expected /${pattern}/)"
    return 1
  fi
  log "ok: ${description}"
}

# Builds TAG from CONTEXT unless an image with the same inputs hash exists.
#   build_image NAME TAG CONTEXT HASH [--build-arg K=V ...]
# Sets BUILT=1 when it built. Extra arguments go to `docker build`.
build_image() {
  local name="$1" tag="$2" context="$3" hash="$4"
  shift 4
  BUILT=0
  if ! wants_rebuild "${name}" && [ "$(image_label "${tag}" "${INPUTS_LABEL}")" = "${hash}" ]; then
    log "${tag}: up to date"
    return 0
  fi
  log "${tag}: building (inputs ${hash})"
  local started="${SECONDS}" options=() previous
  previous="$(image_id "${tag}" 2>/dev/null || true)"
  # A forced rebuild also ignores the engine's layer cache (fresh packages from the archive).
  wants_rebuild "${name}" && options+=(--no-cache)
  docker build "${options[@]}" --label "${INPUTS_LABEL}=${hash}" -t "${tag}" "$@" "${context}" >&2 ||
    die "building ${tag} failed (context ${context})"
  log "${tag}: built in $((SECONDS - started))s"
  retire_image "${previous}" "${tag}"
  BUILT=1
}

# Images that a rebuild replaced; removed at the end of the run where nothing uses them any more.
RETIRED_IMAGES=()

# Remembers the image ID that TAG pointed to before a rebuild (if it changed).
retire_image() {
  local previous="$1" tag="$2"
  [ -n "${previous}" ] && [ "${previous}" != "$(image_id "${tag}" 2>/dev/null || true)" ] &&
    RETIRED_IMAGES+=("${previous}")
  return 0
}

# Removes the replaced images, newest first (children before their parents). The engine refuses
# to remove an image that a container or another image still uses: such ones stay.
remove_retired_images() {
  local i
  for ((i = ${#RETIRED_IMAGES[@]} - 1; i >= 0; i--)); do
    docker image rm "${RETIRED_IMAGES[i]}" >/dev/null 2>&1 || true
  done
}

# After a failed check of a fresh build: untag it so that the next run builds it again.
reject_image() {
  docker image rm "$1" >/dev/null 2>&1 || true
  die "$1 failed its checks (see above); removed it"
}

# --- Debian base images ------------------------------------------------------------------------

require_debootstrap() {
  [ "$(id -u)" = 0 ] || die "building a Debian base image needs root (debootstrap)"
  command -v debootstrap >/dev/null ||
    die "building a Debian base image needs debootstrap (Debian: apt-get install debootstrap," \
      "which scripts/engine.sh does when it sets up podman)"
}

# Unmounts whatever debootstrap left mounted under DIR, then removes DIR.
remove_rootfs_dir() {
  local dir="$1" mountpoint
  [ -d "${dir}" ] || return 0
  while read -r mountpoint; do
    umount -l "${mountpoint}" 2>/dev/null || true
  done < <(awk -v prefix="${dir}/" 'index($2, prefix) == 1 { print $2 }' /proc/mounts | sort -r)
  rm -rf --one-file-system "${dir}"
}

# Container conventions of the official Debian images, applied to a debootstrapped rootfs.
tweak_rootfs() {
  local root="$1" suite="$2"
  if [ "${suite}" = sid ]; then
    printf 'deb %s sid main\n' "${DEBIAN_MIRROR}" >"${root}/etc/apt/sources.list"
    # Mirrors may serve sid's Release file past its Valid-Until (seen on the build machines).
    printf 'Acquire::Check-Valid-Until "false";\n' >"${root}/etc/apt/apt.conf.d/99mnist-no-check-valid-until"
  else
    cat >"${root}/etc/apt/sources.list" <<EOF
deb ${DEBIAN_MIRROR} ${suite} main
deb ${DEBIAN_MIRROR} ${suite}-updates main
deb ${DEBIAN_SECURITY_MIRROR} ${suite}-security main
EOF
  fi
  # Services must not start inside image builds.
  printf '#!/bin/sh\nexit 101\n' >"${root}/usr/sbin/policy-rc.d"
  chmod 0755 "${root}/usr/sbin/policy-rc.d"
  # No package caches or translations in images.
  cat >"${root}/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  printf 'Acquire::Languages "none";\n' >"${root}/etc/apt/apt.conf.d/docker-no-languages"
  # "slim": no documentation, manual pages or translations (copyright files are kept).
  cat >"${root}/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  find "${root}/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
  rm -rf "${root}/usr/share/man/"* "${root}/usr/share/info/"* "${root}/usr/share/groff/"* \
    "${root}/usr/share/lintian/"*
  find "${root}/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} + 2>/dev/null || true
  # Host details that debootstrap copies in; the engine provides its own at run time.
  : >"${root}/etc/resolv.conf"
  printf 'localhost\n' >"${root}/etc/hostname"
  [ -e "${root}/etc/machine-id" ] && : >"${root}/etc/machine-id"
  rm -rf "${root}/var/lib/apt/lists/"* "${root}/var/cache/apt/"*.bin "${root}/var/cache/apt/archives/"*.deb \
    "${root}/var/log/"*.log "${root}/var/log/apt/"* "${root}/tmp/"* "${root}/root/".bash_history
}

# Suites whose base image this run has already (re)built: STANDINS_REBUILD=debian rebuilds each once.
declare -A BASES_DONE=()

# Builds .cache/standins/rootfs-SUITE.tar with debootstrap (minbase), unless cached.
ensure_rootfs_tarball() {
  local suite="$1" tarball="${CACHE_DIR}/rootfs-$1.tar"
  if [ -s "${tarball}" ] && ! wants_rebuild debian; then
    return 0
  fi
  require_debootstrap
  local root="${CACHE_DIR}/rootfs-${suite}.tmp" started="${SECONDS}"
  remove_rootfs_dir "${root}"
  mkdir -p "${root}"
  # Remove a half-made rootfs (and anything debootstrap left mounted in it) on failure.
  trap 'remove_rootfs_dir "'"${root}"'"' EXIT
  log "debootstrap --variant=minbase ${suite} (${DEBIAN_MIRROR}); log: ${CACHE_DIR}/debootstrap-${suite}.log"
  if ! debootstrap --variant=minbase "${suite}" "${root}" "${DEBIAN_MIRROR}" \
    >"${CACHE_DIR}/debootstrap-${suite}.log" 2>&1; then
    tail -n 20 "${CACHE_DIR}/debootstrap-${suite}.log" >&2
    [ -f "${root}/debootstrap/debootstrap.log" ] && tail -n 20 "${root}/debootstrap/debootstrap.log" >&2
    die "debootstrap ${suite} failed (log above)"
  fi
  tweak_rootfs "${root}" "${suite}"
  tar --numeric-owner --xattrs -C "${root}" -cf "${tarball}.tmp" .
  mv "${tarball}.tmp" "${tarball}"
  remove_rootfs_dir "${root}"
  trap - EXIT
  log "rootfs-${suite}.tar: $(du -h "${tarball}" | cut -f1) in $((SECONDS - started))s"
}

# Imports localhost/mnist-standin/debian:SUITE from its rootfs tarball unless present.
ensure_debian_base() {
  local suite="$1" tag="${STANDIN_REPO}/debian:$1"
  if image_exists "${tag}" && { [ -n "${BASES_DONE[${suite}]:-}" ] || ! wants_rebuild debian; }; then
    return 0
  fi
  BASES_DONE[${suite}]=1
  ensure_rootfs_tarball "${suite}"
  log "importing ${tag}"
  local previous
  previous="$(image_id "${tag}" 2>/dev/null || true)"
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    "${CACHE_DIR}/rootfs-${suite}.tar" "${tag}" >/dev/null ||
    die "docker import of ${CACHE_DIR}/rootfs-${suite}.tar failed"
  retire_image "${previous}" "${tag}"
  expect_output "${tag} runs" "^${suite}|^[0-9]+(\.[0-9]+)*$|/sid$" \
    run_container "${tag}" cat /etc/debian_version
}

# --- python:3.11-slim-bookworm -----------------------------------------------------------------

standin_python() {
  local official="$1" tag context hash
  [[ "${official##*:}" == 3.11-slim-bookworm ]] ||
    die "the python stand-in is Debian bookworm's Python 3.11; ${official} asks for something else"
  tag="$(standin_tag "${official}")"
  ensure_debian_base bookworm
  context="${CACHE_DIR}/context/python"
  rm -rf "${context}"
  mkdir -p "${context}/certs"
  cp -a "${STANDINS_SRC}/python/." "${context}/"
  # The egress proxy's CA certificates (none on an ordinary machine).
  find "${HOST_CA_DIR}" -maxdepth 1 -name '*.crt' -exec cp {} "${context}/certs/" \; 2>/dev/null || true
  hash="$(fingerprint "${context}" "=base=$(image_id "${STANDIN_REPO}/debian:bookworm")")"
  build_image python "${tag}" "${context}" "${hash}" \
    --build-arg "BASE_IMAGE=${STANDIN_REPO}/debian:bookworm"
  if [ "${BUILT}" = 1 ]; then
    verify_python "${tag}" || reject_image "${tag}"
  fi
  STANDIN_TAG="${tag}"
}

verify_python() {
  local tag="$1" probe
  expect_output "python is Python 3.11" '^Python 3\.11\.' run_container "${tag}" python --version &&
    expect_output "python3 is Python 3.11" '^Python 3\.11\.' run_container "${tag}" python3 --version &&
    expect_output "python is /usr/local/bin/python" '^/usr/local/bin/python$' \
      run_container "${tag}" sh -c 'command -v python' || return 1
  # A Dockerfile FROM the stand-in can pip and `uv pip install --system` through the egress proxy,
  # into the official site-packages.
  probe="$(mktemp -d)"
  cat >"${probe}/Dockerfile" <<EOF
FROM ${tag}
RUN pip install --no-cache-dir --quiet six && python -c "import six; print('pip:', six.__file__)"
RUN pip install --no-cache-dir --quiet uv && uv pip install --system --quiet idna && \\
    python -c "import idna; print('uv:', idna.__file__)"
EOF
  expect_output "pip and uv install inside docker build FROM it" \
    'uv: /usr/local/lib/python3\.11/site-packages/idna/' \
    docker build --no-cache -t "${STANDIN_REPO}/selftest:python" "${probe}" || {
    rm -rf "${probe}"
    return 1
  }
  rm -rf "${probe}"
  docker image rm "${STANDIN_REPO}/selftest:python" >/dev/null 2>&1 || true
}

# --- stand-ins made of one Debian sid package --------------------------------------------------

# build_sid_standin NAME TAG SERIES_ARG SERIES: build scripts/standins/NAME FROM the sid base with
# the package's version series passed as build argument SERIES_ARG. Sets BUILT (see build_image)
# and SID_STANDIN_HASH (the image's fingerprint).
build_sid_standin() {
  local name="$1" tag="$2" series_arg="$3" series="$4" context
  ensure_debian_base sid
  context="${STANDINS_SRC}/${name}"
  SID_STANDIN_HASH="$(fingerprint "${context}" "=base=$(image_id "${STANDIN_REPO}/debian:sid")" "=series=${series}")"
  build_image "${name}" "${tag}" "${context}" "${SID_STANDIN_HASH}" \
    --build-arg "BASE_IMAGE=${STANDIN_REPO}/debian:sid" --build-arg "${series_arg}=${series}"
}

# --- nginx -------------------------------------------------------------------------------------

standin_nginx() {
  local official="$1" tag version
  version="${official##*:}"
  [[ "${version}" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "NGINX_IMAGE must pin a version (x.y.z), not ${official}"
  tag="$(standin_tag "${official}")"
  build_sid_standin nginx "${tag}" NGINX_SERIES "${version%.*}"
  if [ "${BUILT}" = 1 ]; then
    verify_nginx "${tag}" "${version}" || reject_image "${tag}"
  fi
  STANDIN_TAG="${tag}"
}

# shellcheck disable=SC2016  # the probe scripts run in the container
verify_nginx() {
  local tag="$1" version="$2" installed
  installed="$(run_container "${tag}" nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')"
  if [ "${installed}" != "${version}" ]; then
    log "warning: ${tag} has nginx ${installed} (Debian sid's), the official tag names ${version}"
  fi
  expect_output "nginx -V has the stub_status module" 'http_stub_status_module' \
    run_container "${tag}" nginx -V &&
    expect_output "/bin/sh, sed, awk, envsubst and curl are there" '/envsubst' \
      run_container --entrypoint /bin/sh "${tag}" -c 'for c in sed awk envsubst curl; do command -v "$c" || exit 1; done' &&
    # What the project's nginx config needs: a zone, `server ... resolve`, a resolver, keepalive,
    # stub_status; the entrypoint renders templates with envsubst; nginx serves.
    expect_output "upstream with zone + resolve + resolver passes nginx -t and serves stub_status" \
      'Active connections' \
      run_container -e PROBE_PORT=8080 --entrypoint /bin/sh "${tag}" -c '
        set -e
        mkdir -p /etc/nginx/templates
        cat >/etc/nginx/templates/default.conf.template <<"EOF"
resolver 127.0.0.11 valid=5s ipv6=off;
upstream api {
    zone api 64k;
    server api:8000 resolve;
    keepalive 64;
}
server {
    listen ${PROBE_PORT};
    location / { proxy_pass http://api; }
    location = /stub_status { stub_status; }
}
EOF
        /docker-entrypoint.sh nginx -t
        grep -q "listen 8080;" /etc/nginx/conf.d/default.conf
        nginx
        for i in 1 2 3 4 5 6 7 8 9 10; do
          curl -fsS http://127.0.0.1:8080/stub_status && break
          sleep 0.3
        done
        nginx -s quit'
}

# --- prom/prometheus ---------------------------------------------------------------------------

standin_prometheus() {
  local official="$1" tag version
  version="${official##*:}"
  version="${version#v}"
  [[ "${version}" =~ ^3\.[0-9]+\.[0-9]+$ ]] || die "PROMETHEUS_IMAGE must pin a 3.x version (v3.y.z), not ${official}"
  tag="$(standin_tag "${official}")"
  build_sid_standin prometheus "${tag}" PROMETHEUS_SERIES "${version%.*}"
  if [ "${BUILT}" = 1 ]; then
    verify_prometheus "${tag}" "${version}" || reject_image "${tag}"
  fi
  prometheus_otlp_notice "${tag}" "${SID_STANDIN_HASH}"
  STANDIN_TAG="${tag}"
}

# Debian's Prometheus (3.5.3+ds1) is built without the native OTLP receiver: the official image's
# --web.enable-otlp-receiver is an unknown flag there. Says so on every run that uses such a
# stand-in (the finding is cached per image hash, so a warm run does not start a container).
prometheus_otlp_notice() {
  local tag="$1" hash="$2" file="${CACHE_DIR}/prometheus-otlp.$2" help
  if [ ! -s "${file}" ]; then
    rm -f "${CACHE_DIR}"/prometheus-otlp.*
    help="$(run_container "${tag}" --help 2>&1 || true)"
    if grep -q 'web\.enable-otlp-receiver' <<<"${help}"; then echo yes; else echo no; fi >"${file}"
  fi
  if [ "$(cat "${file}")" = no ]; then
    log "NOTICE: ${tag} (Debian's Prometheus) has no native OTLP receiver" \
      "(--web.enable-otlp-receiver is an unknown flag): feed Prometheus by scraping the collector's" \
      "prometheus exporter, which works with both images."
  fi
}

# shellcheck disable=SC2016  # the probe script runs in the container
verify_prometheus() {
  local tag="$1" version="$2" output
  output="$(run_container "${tag}" --version 2>&1 | head -n 1)"
  if ! grep -q "version ${version}[+ ]" <<<"${output}"; then
    log "warning: ${tag}: ${output} (Debian sid's); the official tag names ${version}"
  fi
  expect_output "runs as nobody" '^nobody$' run_container --entrypoint id "${tag}" -un &&
    expect_output "promtool on PATH accepts the default config" 'SUCCESS' \
      run_container --entrypoint promtool "${tag}" check config /etc/prometheus/prometheus.yml &&
    # Starts with the official CMD's flags and answers /-/ready; /prometheus is writable.
    expect_output "starts and gets ready" 'Ready' \
      run_container --entrypoint /bin/sh "${tag}" -c '
        /bin/prometheus --config.file=/etc/prometheus/prometheus.yml --storage.tsdb.path=/prometheus \
          >/tmp/prometheus.log 2>&1 &
        for i in $(seq 1 40); do
          wget -q -O - http://127.0.0.1:9090/-/ready 2>/dev/null && exit 0
          sleep 0.5
        done
        cat /tmp/prometheus.log
        exit 1'
}

# --- otel/opentelemetry-collector-contrib ------------------------------------------------------

# dist.version of the builder manifest (e.g. 0.148.0).
manifest_version() {
  awk '/^dist:/ { in_dist = 1; next } /^[^[:space:]#]/ { in_dist = 0 }
       in_dist && $1 == "version:" { print $2; exit }' "${MANIFEST}"
}

# The cache key of the collector binary: the manifest and the build settings.
otelcol_key() {
  local arch
  case "$(uname -m)" in
    x86_64) arch=amd64 ;;
    aarch64 | arm64) arch=arm64 ;;
    *) arch="$(uname -m)" ;;
  esac
  fingerprint "${MANIFEST}" "=CGO_ENABLED=0 linux/${arch}"
}

# Builds (or finds in the cache) the collector binary for KEY; prints its path.
ensure_otelcol_binary() {
  local version="$1" key="$2" dir binary
  dir="${CACHE_DIR}/otelcol/${key}"
  binary="${dir}/otelcol-contrib"
  if [ -x "${binary}" ] && ! wants_rebuild otelcol; then
    printf '%s\n' "${binary}"
    return 0
  fi
  command -v go >/dev/null || die "building the collector stand-in needs Go (https://go.dev/dl/)"

  # The builder of the same release as the manifest's components.
  local builder="${TOOLS_BIN}/ocb-v${version}"
  if [ ! -x "${builder}" ]; then
    log "go install go.opentelemetry.io/collector/cmd/builder@v${version}"
    local gobin
    gobin="$(mktemp -d)"
    GOBIN="${gobin}" go install "go.opentelemetry.io/collector/cmd/builder@v${version}" >&2 ||
      die "go install of the OpenTelemetry Collector Builder v${version} failed"
    mkdir -p "${TOOLS_BIN}"
    mv "${gobin}/builder" "${builder}"
    rm -rf "${gobin}"
  fi

  local work="${CACHE_DIR}/otelcol/build" started="${SECONDS}"
  rm -rf "${work}"
  mkdir -p "${work}"
  cp "${MANIFEST}" "${work}/manifest.yaml"
  log "building the collector (${MANIFEST#"${REPO_ROOT}"/}, key ${key}); log: ${CACHE_DIR}/otelcol/build.log"
  # output_path (./_build) is relative to the working directory.
  if ! (cd "${work}" &&
    CGO_ENABLED=0 GONOSUMDB="${GONOSUMDB:+${GONOSUMDB},}${UNVERIFIED_MODULES}" \
      "${builder}" --config manifest.yaml) >"${CACHE_DIR}/otelcol/build.log" 2>&1; then
    tail -n 30 "${CACHE_DIR}/otelcol/build.log" >&2
    die "the collector build failed (log above)"
  fi
  [ -x "${work}/_build/otelcol-contrib" ] || die "the builder produced no ${work}/_build/otelcol-contrib"
  check_unverified_sums "${work}/_build/go.sum"
  expect_output "the collector binary runs" "version ${version//./\\.}" "${work}/_build/otelcol-contrib" --version
  # Keep only this key's binary.
  find "${CACHE_DIR}/otelcol" -mindepth 1 -maxdepth 1 -type d -not -name build -not -name "${key}" \
    -exec rm -rf {} +
  mkdir -p "${dir}"
  mv "${work}/_build/otelcol-contrib" "${binary}"
  rm -rf "${work}"
  log "collector binary: $(du -h "${binary}" | cut -f1) in $((SECONDS - started))s"
  printf '%s\n' "${binary}"
}

# The go.sum lines of the UNVERIFIED_MODULES must equal those pinned in UNVERIFIED_SUMS; lines not
# pinned yet (a new version) are added to it, to be reviewed and committed.
check_unverified_sums() {
  local gosum="$1" module path version sum line
  touch "${UNVERIFIED_SUMS}"
  for module in ${UNVERIFIED_MODULES//,/ }; do
    while read -r path version sum; do
      line="${path} ${version} ${sum}"
      if grep -qF -- "${path} ${version} " "${UNVERIFIED_SUMS}"; then
        grep -qxF -- "${line}" "${UNVERIFIED_SUMS}" ||
          die "checksum mismatch for ${path} ${version}: go.sum has ${sum}," \
            "${UNVERIFIED_SUMS#"${REPO_ROOT}"/} pins another"
      else
        printf '%s\n' "${line}" >>"${UNVERIFIED_SUMS}"
        log "pinned ${line} in ${UNVERIFIED_SUMS#"${REPO_ROOT}"/} (not verifiable against sum.golang.org here)"
      fi
    done < <(grep "^${module} " "${gosum}")
  done
}

standin_otelcol() {
  local official="$1" tag version key binary context hash
  version="$(manifest_version)"
  [ -n "${version}" ] || die "no dist.version in ${MANIFEST}"
  [ "${official##*:}" = "${version}" ] ||
    die "OTELCOL_IMAGE (${official}) and ${MANIFEST#"${REPO_ROOT}"/} (dist.version ${version}) must name the same release"
  tag="$(standin_tag "${official}")"
  key="$(otelcol_key)"
  # The image's inputs: its Dockerfile and config, the CA bundle and the binary's cache key (so an
  # up-to-date image needs no binary: a fresh checkout does not rebuild the collector).
  hash="$(fingerprint "${STANDINS_SRC}/otelcol" "${HOST_CA_BUNDLE}" "=binary=${key}")"
  if ! wants_rebuild otelcol && [ "$(image_label "${tag}" "${INPUTS_LABEL}")" = "${hash}" ]; then
    log "${tag}: up to date"
    STANDIN_TAG="${tag}"
    return 0
  fi
  binary="$(ensure_otelcol_binary "${version}" "${key}")"
  context="${CACHE_DIR}/context/otelcol"
  rm -rf "${context}"
  mkdir -p "${context}"
  cp -a "${STANDINS_SRC}/otelcol/." "${context}/"
  cp "${HOST_CA_BUNDLE}" "${context}/ca-certificates.crt"
  ln "${binary}" "${context}/otelcol-contrib" 2>/dev/null || cp "${binary}" "${context}/otelcol-contrib"
  build_image otelcol "${tag}" "${context}" "${hash}"
  rm -rf "${context}"
  if [ "${BUILT}" = 1 ]; then
    verify_otelcol "${tag}" "${version}" || reject_image "${tag}"
  fi
  STANDIN_TAG="${tag}"
}

# A collector config that uses every component of the manifest (validated, not run).
readonly OTELCOL_PROBE_CONFIG='
extensions:
  health_check: {endpoint: "0.0.0.0:13133"}
receivers:
  otlp:
    protocols: {grpc: {endpoint: "0.0.0.0:4317"}, http: {endpoint: "0.0.0.0:4318"}}
  nginx: {endpoint: "http://nginx:8081/status", collection_interval: 5s}
  prometheus:
    config:
      scrape_configs:
        - job_name: self
          static_configs: [{targets: ["127.0.0.1:8888"]}]
processors:
  memory_limiter: {check_interval: 1s, limit_mib: 200, spike_limit_mib: 50}
  batch: {}
exporters:
  prometheus: {endpoint: "0.0.0.0:8889"}
  debug: {}
  otlp: {endpoint: "upstream:4317"}
service:
  extensions: [health_check]
  pipelines:
    metrics:
      receivers: [otlp, nginx, prometheus]
      processors: [memory_limiter, batch]
      exporters: [prometheus, debug, otlp]
'

verify_otelcol() {
  local tag="$1" version="$2" components component
  expect_output "--version" "^otelcol-contrib version ${version//./\\.}" run_container "${tag}" --version &&
    expect_output "runs as 10001" '^10001(:10001)?$' docker image inspect --format '{{.Config.User}}' "${tag}" &&
    expect_output "the default config validates (file provider)" '' \
      run_container "${tag}" validate --config /etc/otelcol-contrib/config.yaml || return 1
  components="$(run_check "components" run_container "${tag}" components)" || return 1
  for component in otlp nginx prometheus memory_limiter batch debug health_check env file; do
    grep -Eq "(name|scheme): ${component}\$" <<<"${components}" || {
      printf '%s\n' "${components}" >&2
      log "check failed: \`components\` does not list ${component}"
      return 1
    }
  done
  log "ok: components lists otlp nginx prometheus memory_limiter batch debug health_check env file"
  # `components` of v0.148.0 leaves out the OTLP exporter (type otlp_grpc, alias otlp): a config
  # that uses it, and every other component, must validate (read through the env provider).
  expect_output "a config using every component validates (env provider, otlp exporter)" '' \
    run_container -e "OTELCOL_PROBE_CONFIG=${OTELCOL_PROBE_CONFIG}" "${tag}" \
    validate --config env:OTELCOL_PROBE_CONFIG
}

# --- main --------------------------------------------------------------------------------------

main() {
  # Only emit() reaches the real stdout (fd 3): `eval "$(scripts/standins.sh)"` sees export lines.
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
  )
  for var in PYTHON_IMAGE NGINX_IMAGE PROMETHEUS_IMAGE OTELCOL_IMAGE; do
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
