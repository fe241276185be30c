# The jaegertracing/jaeger stand-in, sourced by scripts/no-docker/standins.sh: standin_jaeger builds
# it (its context: standins/jaeger/ and the binary), verify_jaeger checks a fresh build by running it.
# shellcheck shell=bash

# --- jaegertracing/jaeger ----------------------------------------------------------------------

# Jaeger v2 releases and the Go module release that carries each (the module keeps v1 numbers:
# "v1.76.0 / v2.13.0" in Jaeger's CHANGELOG). To move to another release, add its pair here and
# change JAEGER_IMAGE in .env.
jaeger_module_version() {
  case "$1" in
    2.13.0) echo v1.76.0 ;;
    *) return 1 ;;
  esac
}

# Builds (or finds in the cache) the Jaeger binary of module release VERSION; prints its path.
# `go install pkg@version` refuses the module (its go.mod has a replace directive), so the module
# is downloaded and built as the main module.
ensure_jaeger_binary() {
  local version="$1" key="$2" binary="${CACHE_DIR}/jaeger/$2/jaeger-linux"
  cached_binary jaeger "${key}" jaeger-linux && return 0
  command -v go >/dev/null || die "building the Jaeger stand-in needs Go (https://go.dev/dl/)"
  local work="${CACHE_DIR}/jaeger/build" started="${SECONDS}" source
  rm -rf "${work}"
  mkdir -p "${work}"
  log "go mod download github.com/jaegertracing/jaeger@${version}"
  source="$(cd "${work}" && GOFLAGS=-mod=mod go mod download -json "github.com/jaegertracing/jaeger@${version}" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [ -d "${source}" ] || die "go mod download of github.com/jaegertracing/jaeger@${version} failed"
  cp -r "${source}" "${work}/src"
  chmod -R u+w "${work}/src"
  log "building Jaeger ${version} (cmd/jaeger); log: ${CACHE_DIR}/jaeger/build.log"
  if ! (cd "${work}/src" && CGO_ENABLED=0 go build -trimpath -o "${work}/jaeger-linux" ./cmd/jaeger) \
    >"${CACHE_DIR}/jaeger/build.log" 2>&1; then
    tail -n 30 "${CACHE_DIR}/jaeger/build.log" >&2
    die "the Jaeger build failed (log above)"
  fi
  cp "${work}/src/cmd/jaeger/sampling-strategies.json" "${work}/sampling-strategies.json"
  expect_output "the Jaeger binary runs" "Jaeger backend v2" "${work}/jaeger-linux" --help
  keep_binary jaeger "${key}" "${work}/jaeger-linux" "${work}/sampling-strategies.json"
  rm -rf "${work}"
  log "Jaeger binary: $(du -h "${binary}" | cut -f1) in $((SECONDS - started))s"
  printf '%s\n' "${binary}"
}

standin_jaeger() {
  local official="$1" tag version module key binary context hash
  version="${official##*:}"
  module="$(jaeger_module_version "${version}")" ||
    die "JAEGER_IMAGE (${official}): no Go module release is known for Jaeger ${version}" \
      "(scripts/no-docker/standins/jaeger.sh, jaeger_module_version)"
  tag="$(standin_tag "${official}")"
  ensure_debian_base sid
  key="$(fingerprint "=jaeger=${module}" "=CGO_ENABLED=0 $(uname -m)")"
  hash="$(fingerprint "${STANDINS_SRC}/jaeger" "=binary=${key}" "=base=$(image_id "${STANDIN_REPO}/debian:sid")")"
  if image_current jaeger "${tag}" "${hash}"; then
    STANDIN_TAG="${tag}"
    return 0
  fi
  binary="$(ensure_jaeger_binary "${module}" "${key}")"
  context="$(binary_context jaeger "${binary}" "$(dirname "${binary}")/sampling-strategies.json")"
  build_image jaeger "${tag}" "${context}" "${hash}" --build-arg "BASE_IMAGE=${STANDIN_REPO}/debian:sid"
  rm -rf "${context}"
  if [ "${BUILT}" = 1 ]; then
    verify_jaeger "${tag}" || reject_image "${tag}"
  fi
  STANDIN_TAG="${tag}"
}

# shellcheck disable=SC2016  # the probe script runs in the container
verify_jaeger() {
  local tag="$1"
  expect_output "runs as 10001" '^10001$' docker image inspect --format '{{.Config.User}}' "${tag}" &&
    # Starts with its built-in all-in-one configuration and answers its health check and API.
    expect_output "starts, is healthy and answers /api/services" '"data"' \
      run_container --entrypoint /bin/sh "${tag}" -c '
        /cmd/jaeger/jaeger-linux >/tmp/jaeger.log 2>&1 &
        for i in $(seq 1 60); do
          if wget -q -O /dev/null http://127.0.0.1:13133/status 2>/dev/null; then
            wget -q -O - http://127.0.0.1:16686/api/services && exit 0
          fi
          sleep 0.5
        done
        tail -n 30 /tmp/jaeger.log
        exit 1'
}
