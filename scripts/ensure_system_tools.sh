#!/usr/bin/env bash
# Installs the system tools the test suite uses (Debian packages), when they are missing and we can.
# Placeholder: the deployment work fills in the list (prometheus/promtool, protobuf-compiler, ...).
set -euo pipefail
exit 0
