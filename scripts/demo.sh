#!/usr/bin/env bash
# The main job: set up .venv if needed (idempotent), build the tiny pair (cached), run the demo.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/python -m vllm_sgl.demo "$@"
