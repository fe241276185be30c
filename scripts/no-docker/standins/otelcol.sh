# The otel/opentelemetry-collector-contrib stand-in, sourced by scripts/no-docker/standins.sh: standin_otelcol builds it (its
# context: standins/otelcol/), verify_otelcol checks a fresh build by running it.
# shellcheck shell=bash

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
  local version="$1" key="$2" binary="${CACHE_DIR}/otelcol/$2/otelcol-contrib"
  cached_binary otelcol "${key}" otelcol-contrib && return 0
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
  keep_binary otelcol "${key}" "${work}/_build/otelcol-contrib"
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
  if image_current otelcol "${tag}" "${hash}"; then
    STANDIN_TAG="${tag}"
    return 0
  fi
  binary="$(ensure_otelcol_binary "${version}" "${key}")"
  # The host's CA bundle is /etc/ssl/certs/ca-certificates.crt: the name the Dockerfile copies.
  context="$(binary_context otelcol "${binary}" "${HOST_CA_BUNDLE}")"
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
  tail_sampling:
    policies: [{name: errors, type: status_code, status_code: {status_codes: [ERROR]}}]
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
    traces:
      receivers: [otlp]
      processors: [memory_limiter, tail_sampling, batch]
      exporters: [debug, otlp]
'

verify_otelcol() {
  local tag="$1" version="$2" components component
  expect_output "--version" "^otelcol-contrib version ${version//./\\.}" run_container "${tag}" --version &&
    expect_output "runs as 10001" '^10001(:10001)?$' docker image inspect --format '{{.Config.User}}' "${tag}" &&
    expect_output "the default config validates (file provider)" '' \
      run_container "${tag}" validate --config /etc/otelcol-contrib/config.yaml || return 1
  components="$(run_check "components" run_container "${tag}" components)" || return 1
  for component in otlp nginx prometheus memory_limiter batch tail_sampling debug health_check env file; do
    grep -Eq "(name|scheme): ${component}\$" <<<"${components}" || {
      printf '%s\n' "${components}" >&2
      log "check failed: \`components\` does not list ${component}"
      return 1
    }
  done
  log "ok: components lists otlp nginx prometheus memory_limiter batch tail_sampling debug health_check env file"
  # `components` of v0.148.0 leaves out the OTLP exporter (type otlp_grpc, alias otlp): a config
  # that uses it, and every other component, must validate (read through the env provider).
  expect_output "a config using every component validates (env provider, otlp exporter)" '' \
    run_container -e "OTELCOL_PROBE_CONFIG=${OTELCOL_PROBE_CONFIG}" "${tag}" \
    validate --config env:OTELCOL_PROBE_CONFIG
}

