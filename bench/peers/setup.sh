#!/usr/bin/env bash
# Create bench/.work/peers-venv: LitServe and Ray Serve with RecBole, apart from the product's venv
# (recbole pins ray<=2.6.3, which Ray Serve 2.x with pydantic 2 cannot satisfy). Also installs wrk,
# the load generator, from the Debian packages when it is missing (needs root or sudo).
#   bench/peers/setup.sh            # or: make bench-peers-env
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${PEERS_VENV:-$ROOT/bench/.work/peers-venv}"
PYTHON="${PYTHON:-python3}"

if ! command -v wrk >/dev/null; then
    if [ "$(id -u)" = 0 ]; then apt-get install -y wrk; else sudo apt-get install -y wrk; fi
fi

"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The CPU wheel before anything that depends on torch (a bare torch requirement pulls CUDA builds).
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -r "$ROOT/bench/peers/requirements.txt"
"$VENV/bin/python" -m pip install -q --no-deps recbole==1.2.1
"$VENV/bin/python" - <<'PY'
import litserve, ray, recbole, torch
from ray import serve  # noqa: F401
print(f"peers venv: litserve {litserve.__version__}, ray {ray.__version__}, "
      f"recbole {recbole.__version__}, torch {torch.__version__}")
PY
touch "$VENV/.installed"
