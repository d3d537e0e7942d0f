#!/usr/bin/env bash
# The prepared GPU check: `banax bench` unchanged, then the check_every table.
# Run from anywhere on a machine whose JAX has a GPU backend:  bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
uv run --no-sync python -c "import jax; print('devices:', jax.devices())"
uv run --no-sync banax bench --repeats 7
uv run --no-sync python benchmarks/gpu.py
