#!/usr/bin/env bash
# Submit a program with curl, then watch its run over the WebSocket.
#
#   examples/curl-websocat.sh [FILE] [LANGUAGE_ID]      (default: a small Python program, id 71)
#
# The server address comes from RUNFLARE_URL (default http://localhost:8787); RUNFLARE_AUTH_TOKEN,
# when set, is sent as X-Auth-Token. Streams with `websocat` when it is installed, else with the
# CLI that ships in the `websockets` Python package (`python -m websockets URI`).
set -euo pipefail

BASE="${RUNFLARE_URL:-http://localhost:8787}"
BASE="${BASE%/}"
FILE="${1:-}"
LANGUAGE_ID="${2:-71}"
PYTHON="${PYTHON:-python3}"

if [[ -n "$FILE" ]]; then
  SOURCE="$(cat "$FILE")"
else
  SOURCE=$'import time\nfor i in range(3):\n    print("tick", i, flush=True)\n    time.sleep(0.2)\n'
fi

AUTH=()
QUERY=""
if [[ -n "${RUNFLARE_AUTH_TOKEN:-}" ]]; then
  AUTH=(-H "X-Auth-Token: $RUNFLARE_AUTH_TOKEN")
  QUERY="?X-Auth-Token=$RUNFLARE_AUTH_TOKEN"
fi

# 1. Create the submission. The JSON body is built by Python so any source text is escaped right.
BODY="$(SOURCE="$SOURCE" LANGUAGE_ID="$LANGUAGE_ID" "$PYTHON" -c \
  'import json, os; print(json.dumps({"source_code": os.environ["SOURCE"], "language_id": int(os.environ["LANGUAGE_ID"])}))')"
RESPONSE="$(curl -sS --fail-with-body -X POST "$BASE/api/v1/submissions" \
  -H "Content-Type: application/json" "${AUTH[@]}" --data-binary "$BODY")"
echo "created: $RESPONSE"
TOKEN="$("$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["token"])' <<<"$RESPONSE")"

# 2. Stream its events. The server replays what already happened, then closes with 1000 at the end.
WS="${BASE/#http/ws}/api/v1/submissions/$TOKEN/ws$QUERY"
echo "streaming: $WS"
if command -v websocat >/dev/null 2>&1; then
  websocat --text --unidirectional "$WS"
else
  # The websockets CLI closes the connection when its stdin ends: keep its stdin open while it runs.
  exec 3< <(exec sleep 600)
  KEEPER=$!
  trap 'kill "$KEEPER" 2>/dev/null; wait "$KEEPER" 2>/dev/null || true' EXIT
  if [[ -t 1 ]]; then
    "$PYTHON" -m websockets "$WS" <&3
  else
    # Not a terminal: drop the CLI's cursor-control sequences and prompts.
    "$PYTHON" -m websockets "$WS" <&3 | sed -u -e 's/\x1b[78]//g' -e 's/\x1b\[[0-9;]*[A-Za-z]//g' -e 's/\r//g' -e 's/^> //' -e '/^$/d'
  fi
  exec 3<&-
fi

# 3. The final state over REST (what a Judge0 client would read).
echo "result:"
curl -sS --fail-with-body "$BASE/api/v1/submissions/$TOKEN?fields=status,stdout,stderr,time,memory" "${AUTH[@]}"
echo
