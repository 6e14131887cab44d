#!/usr/bin/env bash
# Fresh machine → a running server on http://127.0.0.1:8787 (embedded SQLite store, in-process queue).
# Run-Flare goes into the project virtual environment .venv (or $RUNFLARE_VENV), never the system Python.
# Usage: scripts/serve.sh [--install-only] [runflare serve options]
#   --install-only: install and check that `runflare --help` answers, then stop instead of serving.
set -euo pipefail
cd "$(dirname "$0")/.."
install_only=""
if [ "${1:-}" = "--install-only" ]; then install_only=1; shift; fi
bash scripts/install-system.sh --runtime
source scripts/venv.sh
"$VENV/bin/python" -m pip install -q -e ".[server,kernels]"
"$VENV/bin/runflare" install-kernels >/dev/null   # into the venv's own share/jupyter/kernels
"$VENV/bin/runflare" --help >/dev/null
venv_hint
[ -z "$install_only" ] || exit 0
echo "Serving: $VENV/bin/runflare serve $*"
exec "$VENV/bin/runflare" serve "$@"
