#!/usr/bin/env bash
# The test command: set up .venv if needed (idempotent), then the whole test suite on vLLM 0.32 (the
# CPU build in .venv), then the tests marked `both` on vLLM 0.34 (Model Runner V2; the test
# environment scripts/setup.sh builds: README, "Testing on vLLM 0.34"). Extra args go to both runs.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh" || exit 1
cd "$root"
echo "== vLLM 0.32 (V1 model runner): the whole suite" >&2
.venv/bin/python -m pytest "$@"
rc_032=$?
echo "== vLLM 0.34 (Model Runner V2): the tests marked both" >&2
scripts/with-vllm-0.34.sh .venv/bin/python -m pytest -m both "$@"
rc_034=$?
echo "== vLLM 0.32: exit $rc_032; vLLM 0.34: exit $rc_034" >&2
[[ $rc_032 -ne 0 ]] && exit $rc_032
exit $rc_034
