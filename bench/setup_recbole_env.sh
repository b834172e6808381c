#!/usr/bin/env bash
# Separate environment for the RecBole 1.2.1 baseline (bench only): RecBole needs numpy<2,
# pandas<2.3 and an old ray, which must never enter the project's own environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RECBOLE_VENV:-.bench-venv-recbole}
[ -f "$VENV/.ready" ] && exit 0
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q "torch==2.13.0"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -c constraints-cpu.txt \
  "recbole==1.2.1" "numpy<2" "pandas<2.3" "setuptools<81" "scipy<1.14" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import recbole, torch; print('recbole', recbole.__version__, 'torch', torch.__version__)"
touch "$VENV/.ready"
