#!/bin/sh
# Grafana's entrypoint in this stack: the official image's /run.sh, started with an admin password
# that is never the built-in default and needs nothing made before `docker compose up`. The first
# start generates it into the data volume, as Grafana's own user (so no host file's owner or mode
# can keep it from Grafana); later starts reuse it. Read it with
#   docker compose exec grafana cat /var/lib/grafana/admin-password     (or: make grafana-password)
# Grafana applies it when it creates its database; a password changed in Grafana afterwards is not
# written back here.
set -eu

data="${GF_PATHS_DATA:-/var/lib/grafana}"
file="${data}/admin-password"

fail() {
  echo "grafana/entrypoint.sh: error: $*" >&2
  exit 1
}

if [ ! -s "${file}" ] && [ -e "${data}/grafana.db" ]; then
  # A database made before this script (or after the file was removed): its admin password is
  # the one it was made with, and a new file would name a password Grafana never applies.
  echo "grafana/entrypoint.sh: warning: ${data}/grafana.db has no ${file}: the admin password" \
    "is still the one the database was made with. Set one and keep it here:" \
    "docker compose exec grafana sh -c 'grafana cli admin reset-admin-password NEW &&" \
    "printf %s NEW > ${file}'" >&2
  exec /run.sh "$@"
fi

if [ ! -s "${file}" ]; then
  [ -w "${data}" ] || fail "${data} is not writable by uid $(id -u): the admin password cannot be kept there"
  umask 077
  # 32 letters and digits from the kernel's random source (190 bits).
  password="$(LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c 32)"
  [ "${#password}" -eq 32 ] || fail "could not generate a password from /dev/urandom"
  printf '%s' "${password}" >"${file}.new"
  mv "${file}.new" "${file}"
  echo "grafana/entrypoint.sh: generated the password of Grafana's user admin into ${file}" >&2
fi

GF_SECURITY_ADMIN_PASSWORD="$(cat "${file}")" || fail "${file} cannot be read by uid $(id -u)"
[ -n "${GF_SECURITY_ADMIN_PASSWORD}" ] || fail "${file} is empty"
[ "${GF_SECURITY_ADMIN_PASSWORD}" != admin ] || fail "${file} holds Grafana's default password"
export GF_SECURITY_ADMIN_PASSWORD
exec /run.sh "$@"
