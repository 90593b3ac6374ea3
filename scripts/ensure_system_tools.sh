#!/usr/bin/env bash
# Installs the system tools the test suite uses (Debian packages), when they are missing and we can.
#   prometheus, promtool  <- Debian package `prometheus` (tests/integration/test_deploy.py, test_prometheus.py)
# Idempotent and fast when everything is present (no apt call at all). Installs only as root with
# apt-get (CI containers); elsewhere it prints what is missing and the tests that need it skip, saying why.
# Note: on a host running systemd, installing the package also starts a prometheus service on :9090;
# the tests never use fixed ports, so they do not collide with it.
set -euo pipefail

declare -A PACKAGE_OF=([prometheus]=prometheus [promtool]=prometheus)

missing_tools=()
for tool in "${!PACKAGE_OF[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing_tools+=("$tool")
done
[[ ${#missing_tools[@]} -eq 0 ]] && exit 0

mapfile -t packages < <(for t in "${missing_tools[@]}"; do echo "${PACKAGE_OF[$t]}"; done | sort -u)
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_system_tools: missing ${missing_tools[*]} (Debian: apt-get install ${packages[*]});" \
       "tests that need them will be skipped" >&2
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when apt does not know the packages yet (fresh containers have none).
if ! apt-cache show "${packages[@]}" >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
fi
echo "ensure_system_tools: installing ${packages[*]} for ${missing_tools[*]}" >&2
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
for tool in "${missing_tools[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || { echo "ensure_system_tools: $tool still missing" >&2; exit 1; }
done
