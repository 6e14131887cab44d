#!/usr/bin/env bash
# Install Run-Flare with its test extras and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[test]"
python3 -m runflare_server install-kernels
python3 -m pytest -q "$@"
