#!/usr/bin/env bash
# The prepared GPU checks, for a lent GPU machine (run tool, carry [".whl"] made by benchmarks/gpu_wheels.sh):
#   bash benchmarks/gpu_checks.sh flow configs
# Parts (each writes $OUT/<part>.json and $OUT/<part>.log; times measured on an H100):
#   flow     about 6 min: benchmarks/flow_overhead.py at Qwen2.5-1.5B's shape (bf16 + LoRA, random weights),
#            L = 256 / 1024 / 4096, N = 16 / 64; rows are written as they finish
#   flow-update  about 3 min: the same without sampling (shares of the update alone), so L = 4096 fits
#   configs  about 3 min: benchmarks/gpu_check.py, memory and step time of the real configs (needs bitsandbytes)
set -uo pipefail
out=${OUT:-results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(flow configs)
for part in "${parts[@]}"; do
  case $part in
    flow) timeout 360 python3 benchmarks/flow_overhead.py --shape qwen2.5-1.5b --lengths 256 1024 4096 --batches 16 64 \
            --repeats 2 --sample-repeats 1 --out "$out/flow.json" 2>&1 | grep -vi warn | tee "$out/flow.log" ;;
    flow-update) timeout 200 python3 benchmarks/flow_overhead.py --shape qwen2.5-1.5b --lengths 256 1024 4096 --batches 16 64 \
            --repeats 2 --no-sampling --out "$out/flow-update.json" 2>&1 | grep -vi warn | tee "$out/flow-update.log" ;;
    configs) timeout 200 python3 benchmarks/gpu_check.py --steps 2 --out "$out/configs.json" 2>&1 | grep -vi warn | tee "$out/configs.log" ;;
    *) echo "unknown part $part (flow, flow-update, configs)"; exit 2 ;;
  esac
done
