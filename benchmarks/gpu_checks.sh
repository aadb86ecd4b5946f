#!/usr/bin/env bash
# The prepared GPU check, one short call on a lent GPU machine (about 6 minutes on an H100):
#   run tool: command "bash benchmarks/gpu_checks.sh", carry [".whl"] (made by benchmarks/gpu_wheels.sh)
# Writes $OUT/gpu_check.json (real-config memory and step time) and $OUT/flow_overhead.json.
set -uo pipefail
out=${OUT:-results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 240 python3 benchmarks/gpu_check.py --steps 3 --out "$out/gpu_check.json" 2>&1 | grep -vi warn | tee "$out/gpu_check.log"
timeout 240 python3 benchmarks/flow_overhead.py --shape qwen2.5-1.5b --qlora --lengths 256 1024 --batches 16 64 --repeats 2 \
  --out "$out/flow_overhead.json" 2>&1 | grep -vi warn | tee "$out/flow_overhead.log"
