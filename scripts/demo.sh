#!/usr/bin/env bash
# README command 1: set up the environment (idempotent) and run the pipeline end to end on the
# embedded default (ML-100k, local Ray). Extra arguments go to `slim-ray pipeline`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/slim-ray pipeline --config configs/ml100k.yaml "$@"
