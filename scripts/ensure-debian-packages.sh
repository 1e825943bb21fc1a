#!/usr/bin/env bash
# Installs the Debian packages the test suite needs, only when they are missing.
# (nginx and redis-server for the end-to-end suite, chromium for the browser tests, node for JS tests.)
set -euo pipefail
need=()
command -v node >/dev/null 2>&1 || need+=(nodejs)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "missing Debian packages: ${need[*]} (run as root or install them)" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
