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
body=$(number MAX_UPLOAD_BYTES 4194304)
max_conns=$(number API_MAX_CONNS 1024)
upstream=${API_UPSTREAM:-api:8000}
# One per core by default ("auto" counts the host's, which in a container without a CPU limit
# may be many more than it uses: set it there).
workers=$(printenv NGINX_WORKER_PROCESSES || true)
workers=${workers:-auto}
[ "$workers" = auto ] || workers=$(number NGINX_WORKER_PROCESSES 1)

# The per-client rate limit only when RATE_LIMIT_RPS is set (burst: RATE_LIMIT_BURST, else
# as many as a second's worth).
if [ -n "$(printenv RATE_LIMIT_RPS || true)" ]; then
  rate=$(number RATE_LIMIT_RPS 1)
  burst=$(number RATE_LIMIT_BURST "$rate")
  rate_zone="limit_req_zone \$binary_remote_addr zone=per_client:10m rate=${rate}r/s;"
  rate_limit="limit_req zone=per_client burst=${burst} nodelay;"
  rate_said="rate limit ${rate} r/s per client (burst $burst)"
else
  rate_zone="# no per-client rate limit (RATE_LIMIT_RPS is not set)"
  rate_limit="# no per-client rate limit"
  rate_said="no per-client rate limit"
fi

# Behind a load balancer or proxy (a cloud LB, an Ingress controller), the client is the address
# it names in X-Forwarded-For, believed only from REAL_IP_FROM (addresses or CIDRs, separated by
# spaces): the rate limit and the access log then see clients, not the proxy.
trusted=$(printenv REAL_IP_FROM || true)
if [ -n "$trusted" ]; then
  real_ip=""
  for cidr in $trusted; do
    case "$cidr" in
      *[!0-9A-Fa-f.:/]* | */*/*) echo "entrypoint: REAL_IP_FROM: $cidr is not an address or CIDR" >&2; exit 1 ;;
    esac
    real_ip="$real_ip set_real_ip_from $cidr;"
  done
  real_ip="$real_ip real_ip_header X-Forwarded-For; real_ip_recursive on;"
  real_ip_said="clients named by X-Forwarded-For from $trusted"
else
  real_ip="# no proxy in front (REAL_IP_FROM is not set): the client is the peer"
  real_ip_said="clients are the peers"
fi

# Head sampling of the traces the edge starts (TRACES_SAMPLE_RATIO, 0 to 1): split_clients on
# the trace id, in per cent with two decimals.
ratio=$(printenv TRACES_SAMPLE_RATIO || true)
ratio=${ratio:-0.02}
trace_split=$(awk -v r="$ratio" 'BEGIN {
  if (r !~ /^(0|1)?(\.[0-9]+)?$/ || r == "" || r == "." || r + 0 > 1) exit 1
  p = r * 100
  if (p < 0.01) print "* 00;"; else if (p >= 100) print "* 01;"; else printf "%.2f%% 01; * 00;", p
}') || { echo "entrypoint: TRACES_SAMPLE_RATIO=$ratio must be a number from 0 to 1" >&2; exit 1; }

sed -e "s|@RESOLVER@|$resolver|g" \
    -e "s|@TRACE_SPLIT@|$trace_split|g" \
    -e "s|@RATE_LIMIT_ZONE@|$rate_zone|g" \
    -e "s|@RATE_LIMIT@|$rate_limit|g" \
    -e "s|@MAX_UPLOAD_BYTES@|$body|g" \
    -e "s|@API_UPSTREAM@|$upstream|g" \
    -e "s|@API_MAX_CONNS@|$max_conns|g" \
    -e "s|@WORKER_PROCESSES@|$workers|g" \
    -e "s|@REAL_IP@|$real_ip|g" \
    /etc/nginx/mnist/nginx.conf.template > /tmp/nginx.conf

mkdir -p /tmp/errors
error() { printf '{"detail":"%s"}\n' "$2" > "/tmp/errors/$1.json"; }
error 400 "bad request: the request line or a header is malformed"
error 403 "forbidden"
error 404 "not found: this path is neither the page nor the API (see /docs)"
error 405 "method not allowed on this path"
error 411 "length required: send Content-Length or a chunked body"
error 414 "request URI too long"
error 416 "requested range not satisfiable"
error 431 "request header fields too large"
error 500 "internal error at the edge"
error 501 "not implemented: unsupported Transfer-Encoding or method"
error 505 "HTTP version not supported"
printf '{"detail":"request body too large: the limit is %s bytes"}\n' "$body" > /tmp/errors/413.json
printf '{"detail":"rate limit exceeded: %s; retry shortly"}\n' "$rate_said" > /tmp/errors/429.json
printf '{"detail":"no API replica could answer in time; retry shortly"}\n' > /tmp/errors/50x.json
printf '{"detail":"no API replica could take or answer this request now: every one is full (overloaded), failing or down; retry shortly"}\n' \
  > /tmp/errors/busy.json

echo "entrypoint: $workers worker processes, resolver $resolver, upstream $upstream" \
     "(at most $max_conns requests per replica)," \
     "$rate_said, $real_ip_said, body limit $body bytes, traces sampled at $ratio" >&2
exec nginx -c /tmp/nginx.conf -g 'daemon off;'
