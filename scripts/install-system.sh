#!/usr/bin/env bash
# Install the system packages Run-Flare's runs and tests need (Debian/Ubuntu, as root): the sandbox and toolchains.
# Usage: scripts/install-system.sh [--runtime]   (--runtime: only what the server needs, not the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v apt-get >/dev/null; then
  echo "apt-get not found: install bubblewrap and the toolchains listed in .ci/apt-packages.txt yourself" >&2
  exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
packages=$(grep -v '^\s*#' .ci/apt-packages.txt | sed 's/#.*//' | xargs)
if [ "${1:-}" = "--runtime" ]; then
  packages=$(echo "$packages" | tr ' ' '\n' | grep -vx 'chromium' | xargs)
fi
missing=$(for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done | xargs)
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
