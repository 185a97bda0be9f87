#!/usr/bin/env bash
# Install Debian's chromium for the report page's browser test (tests/test_report.py). Idempotent; run as root
# (CI does, before `make test`):
#
#   sudo deploy/setup-chromium.sh
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
  echo "setup-chromium.sh: $(chromium --version 2>/dev/null | head -1) already installed"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "setup-chromium.sh: run as root (it uses apt-get)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
chromium --version
