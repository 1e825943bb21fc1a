#!/usr/bin/env bash
# Installs the Debian packages the test suite needs, only when they are missing.
# (nginx and redis-server for the end-to-end suite, chromium for the browser tests, node and npm for JS tests.)
# One `apt-get update`, and only when something is missing. The services are never started here:
# the end-to-end suite runs nginx and Redis in the foreground with its own configs.
set -euo pipefail
need=()
command -v node >/dev/null 2>&1 || need+=(nodejs)
# npm installs the pinned JavaScript clients of tests/clients (npm ci).
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || need+=(redis-server)
# The browser tests drive /usr/bin/chromium (never a browser downloaded by playwright).
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "missing Debian packages: ${need[*]} (run as root or install them)" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d 101: packages must not start their services (nginx would grab port 80).
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1; fi
  trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
