#!/usr/bin/env bash
# Fresh machine → the whole test suite: system packages, Run-Flare with its test extras, kernelspecs, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system.sh
python3 -m pip install -q -e ".[test]"
python3 -m runflare_server install-kernels >/dev/null
python3 -m pytest "$@"
