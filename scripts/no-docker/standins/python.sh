# The python:3.11-slim-bookworm stand-in, sourced by scripts/no-docker/standins.sh: standin_python builds it (its
# context: standins/python/), verify_python checks a fresh build by running it.
# shellcheck shell=bash

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

