# Sourced by serve.sh and test.sh: the project virtual environment Run-Flare is installed into.
# It lives in .venv (or $RUNFLARE_VENV) and is made by the system's `python3 -m venv` (Debian/Ubuntu:
# the python3-venv package), so nothing is ever installed into the system interpreter (PEP 668).
# Sets VENV (absolute path) and defines venv_hint.
VENV="${RUNFLARE_VENV:-$PWD/.venv}"
mkdir -p "$(dirname "$VENV")"
VENV="$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")"
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; then
  # absent, or broken (e.g. the Python it was made from is gone): make it afresh
  python3 -m venv --clear "$VENV"
fi

venv_hint() {
  local shown="$VENV"
  [ "$VENV" = "$PWD/.venv" ] && shown=".venv"
  cat <<MSG
Run-Flare is installed in the virtual environment $shown (the system Python is untouched).
Reach it as $shown/bin/runflare, or first: source $shown/bin/activate   (then: runflare --help)
MSG
}
