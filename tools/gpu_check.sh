#!/usr/bin/env bash
# The GPU check with this checkout's code first on the path (the runs it starts import it too).
# Python: $PYTHON if set, else the active virtual environment's, else python3.
#   tools/gpu_check.sh --json gpu_check.json          # see: tools/gpu_check.sh --help
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}"
python="${python:-python3}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$root/tools/gpu_check.py" "$@"
