#!/usr/bin/env bash
# Fresh machine → the whole test suite: system packages, Run-Flare with its test extras in the project
# virtual environment .venv (or $RUNFLARE_VENV; never the system Python), kernelspecs, then pytest
# with the venv's python. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system.sh
source scripts/venv.sh
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/runflare" install-kernels >/dev/null   # into the venv's own share/jupyter/kernels
status=0
"$VENV/bin/python" -m pytest "$@" || status=$?
venv_hint
exit "$status"
