#!/usr/bin/env bash
# Command-line tools the benchmarks use, from the system's packages: wrk (closed-loop load).
# Idempotent and quick when they are already there.
set -euo pipefail

missing=()
command -v wrk >/dev/null || missing+=(wrk)
[ ${#missing[@]} -eq 0 ] && exit 0

if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing ${missing[*]} with apt-get" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
elif command -v brew >/dev/null; then
  brew install "${missing[@]}"
else
  echo "warning: ${missing[*]} missing; install it to run the benchmarks" >&2
fi
