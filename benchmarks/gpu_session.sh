#!/usr/bin/env bash
# One GPU lease, prepared (device time is counted from the start): the proof command first, then
# both models of the shapes pair trained side by side from the repo's weights, each with a time
# budget. Everything worth keeping lands in $OUT (files <= 16 MiB: the target's weights in two parts).
#   CHECK_S (default 270): gpu_check's limit; TRAIN_S (default 230): each training run's budget.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-out/gpu_session}
mkdir -p "$out" out/train-gpu
export PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# data workers hand batches over in shared memory (~150 MB a batch): a container's 64 MB is too little
mount -o remount,size=32G /dev/shm 2>/dev/null
shm_kb=$(df --output=size -k /dev/shm | tail -1)
workers=7; [[ $shm_kb -lt 8000000 ]] && workers=0
echo "/dev/shm ${shm_kb} kB: ${workers} data workers per training run"
timeout "${CHECK_S:-270}" python3 benchmarks/gpu_check.py --json "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
echo "gpu_check exit ${PIPESTATUS[0]}"
for role in guide target; do
  python3 -m vllm_sgl.tasks.train --role "$role" --device cuda --workers $workers --threads 1 --batch 32 --lr 3e-4 \
    --max-turns 6 --steps 20000 --seconds "${TRAIN_S:-230}" --eval-every 500 --log-every 50 --save-every 500 \
    --val-examples 320 --seed 7 --init "vllm_sgl/tasks/weights/shapes_$role.safetensors" --out out/train-gpu \
    > "out/train-gpu/$role.console.log" 2>&1 &
done
wait
tail -n 4 out/train-gpu/*.console.log
cp out/train-gpu/guide.safetensors "$out/"
split -b 15M -d out/train-gpu/target.safetensors "$out/target.safetensors.part"
tar czf "$out/train_logs.tar.gz" -C out/train-gpu guide.log.jsonl target.log.jsonl guide.console.log target.console.log
ls -la "$out"
