# The nginx stand-in, sourced by scripts/no-docker/standins.sh: standin_nginx builds it (its
# context: standins/nginx/), verify_nginx checks a fresh build by running it.
# shellcheck shell=bash

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
    expect_output "the njs module loads where the official image has it, with a shared dict" \
      'test is successful' \
      run_container --entrypoint /bin/sh "${tag}" -c '
        printf "load_module /usr/lib/nginx/modules/ngx_http_js_module.so;\nevents {}\nhttp { js_shared_dict_zone zone=probe:64k type=number; }\n" >/tmp/probe.conf
        nginx -t -c /tmp/probe.conf 2>&1' &&
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

