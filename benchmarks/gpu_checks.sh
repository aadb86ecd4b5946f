#!/usr/bin/env bash
# The prepared GPU check, one short call on a lent GPU machine (about 6 minutes on an H100, plus at most
# 180 s for the TRL comparison):
#   run tool: command "bash benchmarks/gpu_checks.sh", carry [".whl"] (made by benchmarks/gpu_wheels.sh)
# Writes $OUT/gpu_check.json (real-config memory and step time), $OUT/flow_overhead.json and
# $OUT/trl_compare.json (ours vs TRL GRPOTrainer, Qwen2.5-0.5B shape, random weights).
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
timeout 180 python3 benchmarks/trl_compare.py --device cuda --models qwen2.5-0.5b --steps 3 --warmup 1 --repeats 1 \
  --prompts-per-step 4 --micro-batch 16 --max-new-tokens 256 --out "$out/trl_compare.json" 2>&1 | grep -vi warn | tee "$out/trl_compare.log"
