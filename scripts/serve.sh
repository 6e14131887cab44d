#!/usr/bin/env bash
# Fresh machine → a running server on http://127.0.0.1:8787 (embedded SQLite store, in-process queue).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system.sh --runtime
python3 -m pip install -q -e ".[kernels]"
python3 -m runflare_server install-kernels >/dev/null
exec python3 -m runflare_server serve "$@"
