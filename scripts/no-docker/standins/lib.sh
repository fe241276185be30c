# Helpers of scripts/no-docker/standins.sh, sourced by it: reading .env, pulling, fingerprints,
# building and checking images, and the debootstrapped Debian bases the stand-ins start from.
# shellcheck shell=bash

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

# Pull output that only an answering registry produces (Docker's and podman's words for a manifest
# found and layers on their way): a network error after it is a slow or broken link, not a
# registry out of reach.
readonly ANSWERED='Pulling from|Pulling fs layer|Downloading|Download complete|Already exists|Copying blob|Digest:'

# Registries found unreachable in this run, with why: each is tried once.
declare -A UNREACHABLE=()

# Pulls TAG with no time limit once its registry answers. Fails (for a stand-in) only when the
# registry cannot be reached: a pull error of that kind before any answer, or no word at all for
# REGISTRY_TIMEOUT seconds. Any other failure, a network error partway included, stops the run
# with the engine's error.
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
  if grep -Eq -- "${ANSWERED}" "${output}"; then
    rm -f "${output}"
    die "\`docker pull ${tag}\` failed partway: ${error}" \
      "-- the registry answered, so the link is slow or broken, not cut off: run it again" \
      "(a pull resumes with the layers it has), or set STANDINS_FORCE=1 to build stand-ins instead"
  fi
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

# The binary FILE of stand-in NAME built for KEY, from the cache: prints its path and succeeds
# when it is there and no rebuild of NAME is asked for.
#   cached_binary NAME KEY FILE
cached_binary() {
  local binary="${CACHE_DIR}/$1/$2/$3"
  [ -x "${binary}" ] && ! wants_rebuild "$1" && printf '%s\n' "${binary}"
}

# Moves the FILEs just built into NAME's cache under KEY, and keeps no other key's.
#   keep_binary NAME KEY FILE...
keep_binary() {
  local name="$1" key="$2" dir="${CACHE_DIR}/$1/$2"
  shift 2
  find "${CACHE_DIR}/${name}" -mindepth 1 -maxdepth 1 -type d -not -name build -not -name "${key}" \
    -exec rm -rf {} +
  mkdir -p "${dir}"
  mv "$@" "${dir}/"
}

# True when TAG was built from inputs HASH and no rebuild of NAME is asked for (then says so).
#   image_current NAME TAG HASH
image_current() {
  if ! wants_rebuild "$1" && [ "$(image_label "$2" "${INPUTS_LABEL}")" = "$3" ]; then
    log "$2: up to date"
    return 0
  fi
  return 1
}

# A fresh build context for a stand-in made of a binary: standins/NAME/, then the FILEs and the
# BINARY, each under its own name (the binary hard-linked where it can be). Prints its path.
#   binary_context NAME BINARY [FILE...]
binary_context() {
  local name="$1" binary="$2" context="${CACHE_DIR}/context/$1"
  shift 2
  rm -rf "${context}"
  mkdir -p "${context}"
  cp -a "${STANDINS_SRC}/${name}/." "${context}/"
  [ "$#" -eq 0 ] || cp "$@" "${context}/"
  ln "${binary}" "${context}/" 2>/dev/null || cp "${binary}" "${context}/"
  printf '%s\n' "${context}"
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

# --- stand-ins made of one Debian sid package --------------------------------------------------

# build_sid_standin NAME TAG SERIES_ARG SERIES: build scripts/no-docker/standins/NAME FROM the sid base with
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

