#!/bin/sh
# Renders nginx.conf.template into /tmp and runs nginx in the foreground, unprivileged.
#
# Why a script: the resolver must be the engine's DNS, which is 127.0.0.11 under Docker but the
# network gateway under podman (listed first in /etc/resolv.conf, before the host's resolver,
# which does not know service names). So: the first nameserver, only. The official image's
# NGINX_ENTRYPOINT_LOCAL_RESOLVERS takes them all, which makes resolution flaky under podman.
set -eu

resolver=$(awk '$1 == "nameserver" { print $2; exit }' /etc/resolv.conf)
[ -n "$resolver" ] || { echo "entrypoint: no nameserver in /etc/resolv.conf" >&2; exit 1; }
case "$resolver" in *:*) resolver="[$resolver]" ;; esac

number() {  # number NAME DEFAULT: the variable's value if it is a positive integer
  value=$(printenv "$1" || true)
  value=${value:-$2}
  case "$value" in
    '' | *[!0-9]* | 0) echo "entrypoint: $1=$value must be a positive integer" >&2; exit 1 ;;
  esac
  echo "$value"
}
rate=$(number RATE_LIMIT_RPS 1000)
burst=$(number RATE_LIMIT_BURST 2000)
body=$(number MAX_UPLOAD_BYTES 4194304)
max_conns=$(number API_MAX_CONNS 16)
upstream=${API_UPSTREAM:-api:8000}

sed -e "s|@RESOLVER@|$resolver|g" \
    -e "s|@RATE_LIMIT_RPS@|$rate|g" \
    -e "s|@RATE_LIMIT_BURST@|$burst|g" \
    -e "s|@MAX_UPLOAD_BYTES@|$body|g" \
    -e "s|@API_UPSTREAM@|$upstream|g" \
    -e "s|@API_MAX_CONNS@|$max_conns|g" \
    /etc/nginx/mnist/nginx.conf.template > /tmp/nginx.conf

mkdir -p /tmp/errors
printf '{"detail":"request body too large: the limit is %s bytes"}\n' "$body" > /tmp/errors/413.json
printf '{"detail":"rate limit exceeded: %s requests/s per client (burst %s); retry shortly"}\n' \
  "$rate" "$burst" > /tmp/errors/429.json
printf '{"detail":"no API replica could answer in time; retry shortly"}\n' > /tmp/errors/50x.json
printf '{"detail":"no API replica can take this request now: every one is full (overloaded) or none is up; retry shortly"}\n' \
  > /tmp/errors/busy.json

echo "entrypoint: resolver $resolver, upstream $upstream (max $max_conns requests per replica)," \
     "rate limit ${rate} r/s (burst $burst), body limit $body bytes" >&2
exec nginx -c /tmp/nginx.conf -g 'daemon off;'
