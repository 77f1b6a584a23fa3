#!/usr/bin/env bash
# The exact top-k on CUDA against the CPU, parity and throughput, in one command (bench/gpu.py says
# what it measures). Run from anywhere in the repository:
#
#   bench/gpu.sh wheels   # where pip reaches PyPI: the pure-Python packages a bare CUDA image
#                         # (torch, NumPy, pandas, SciPy, scikit-learn, ...) lacks, into .whl/
#   bench/gpu.sh [ARGS]   # on the CUDA machine: ARGS go to bench/gpu.py (default: 100k and 1M items)
#
# No venv and no network on the CUDA machine: it uses that machine's python3 and installs the
# wheels from .whl/ (no index) into a private folder when RecBole is not importable there. Stops
# after 330 s whatever happens (a device lease is short). Without CUDA it runs the CPU half and
# says so. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
PY=${PYTHON:-python3}
# RecBole 1.2.1 and the two packages it imports that CUDA images lack; all pure Python.
PACKAGES=(recbole==1.2.1 colorlog==4.7.2 texttable==1.7.2)

if [ "${1:-}" = wheels ]; then
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WHEELS" "${PACKAGES[@]}"
    ls "$WHEELS"
    exit 0
fi

if ! "$PY" -c "import recbole, colorlog, texttable" 2>/dev/null; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "RecBole is not importable by $PY and $WHEELS/ holds no wheels: run 'bench/gpu.sh wheels' where pip can download" >&2
        exit 1
    fi
    site=$(mktemp -d /tmp/recbole-bento-site.XXXXXX)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
exec timeout 330 "$PY" bench/gpu.py "$@"
