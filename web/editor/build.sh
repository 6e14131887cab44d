#!/usr/bin/env bash
# Rebuild server/runflare_server/static/runflare-editor.js (CodeMirror 6, one minified file) from
# web/editor/src/editor.js. Run it after changing the editor or its dependencies, and commit the result:
# the server only serves the built file and never needs npm or Node at run time.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
npm run build
ls -l ../../server/runflare_server/static/runflare-editor.js
