#!/usr/bin/env bash
# Installs system tools (Debian packages) when they are missing and we can.
#   scripts/ensure_system_tools.sh TOOL...    # `make test`: prometheus promtool h2load; `make bench`: h2load
#   scripts/ensure_system_tools.sh            # with no argument: prometheus promtool
#   prometheus, promtool  <- Debian package `prometheus` (tests/integration/test_deploy.py, test_prometheus.py)
#   h2load                <- Debian package `nghttp2-client` (benchmarks/grpc_floor.py and its test)
#   podman buildah runc catatonit mmdebstrap skopeo  <- the Debian packages of the same names
#                         (`make image` / `make image-test`: scripts/build_image.sh, tests/integration/image_checks.py;
#                         runc rather than crun: see scripts/podman/containers.conf)
# Idempotent and fast when everything is present (no apt call at all). Installs only as root with
# apt-get (CI containers); elsewhere it prints what is missing and the tests that need it skip, saying why.
# Note: on a host running systemd, installing the package also starts a prometheus service on :9090;
# the tests never use fixed ports, so they do not collide with it.
set -euo pipefail

declare -A PACKAGE_OF=([prometheus]=prometheus [promtool]=prometheus [h2load]=nghttp2-client
                       [podman]=podman [buildah]=buildah [runc]=runc [catatonit]=catatonit
                       [mmdebstrap]=mmdebstrap [skopeo]=skopeo)
tools=("$@")
[[ ${#tools[@]} -eq 0 ]] && tools=(prometheus promtool)

missing_tools=()
for tool in "${tools[@]}"; do
  [[ -n "${PACKAGE_OF[$tool]:-}" ]] || { echo "ensure_system_tools: unknown tool $tool" >&2; exit 2; }
  command -v "$tool" >/dev/null 2>&1 || missing_tools+=("$tool")
done
[[ ${#missing_tools[@]} -eq 0 ]] && exit 0

mapfile -t packages < <(for t in "${missing_tools[@]}"; do echo "${PACKAGE_OF[$t]}"; done | sort -u)
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_system_tools: missing ${missing_tools[*]} (Debian: apt-get install ${packages[*]});" \
       "what needs them will be skipped" >&2
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
