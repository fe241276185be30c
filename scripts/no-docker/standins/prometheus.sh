# The prom/prometheus stand-in, sourced by scripts/no-docker/standins.sh: standin_prometheus builds it (its
# context: standins/prometheus/), verify_prometheus checks a fresh build by running it.
# shellcheck shell=bash

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

