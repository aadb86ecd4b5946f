#!/usr/bin/env bash
# The prepared GPU checks, for a lent GPU machine (run tool, carry [".whl"] made by benchmarks/gpu_wheels.sh):
#   bash benchmarks/gpu_checks.sh flow-update trl
# Parts (each writes $OUT/<part>.json and $OUT/<part>.log; times measured on an H100):
#   flow     about 6 min: benchmarks/flow_overhead.py at Qwen2.5-1.5B's shape (bf16 + LoRA, random weights),
#            L = 256 / 1024 (4096 does not fit: sampling 4096 tokens alone takes about 6 min), N = 16 / 64
#   flow-update  about 6 min: the same without sampling (shares of the update alone), so L = 4096 fits (one repeat there)
#   trl      about 2.5 min: benchmarks/trl_compare.py, one round of ours vs TRL's GRPOTrainer at Qwen2.5-0.5B's shape
#            (128-token responses: generate ran 40-70 ms a token there, host-bound); trl-round2 and trl-round3
#            run the next rounds (the order of the three runs rotated), one per call
#   trl-profile  more than 5 min: the same with a torch.profiler op table of one step per framework; on an H100 only
#            ours' run fitted the 300 s limit (its table: docs/trl-profile-h100-ours.txt)
#   configs  about 3 min: benchmarks/gpu_check.py, memory and step time of the real configs (needs bitsandbytes)
set -uo pipefail
out=${OUT:-results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(flow-update trl)
for part in "${parts[@]}"; do
  case $part in
    flow) timeout 360 python3 benchmarks/flow_overhead.py --shape qwen2.5-1.5b --lengths 256 1024 --batches 16 64 \
            --repeats 2 --sample-repeats 1 --out "$out/flow.json" 2>&1 | grep -vi warn | tee "$out/flow.log" ;;
    flow-update) timeout 170 python3 benchmarks/flow_overhead.py --shape qwen2.5-1.5b --lengths 256 1024 --batches 16 64 \
            --repeats 2 --no-sampling --out "$out/flow-update.json" 2>&1 | grep -vi warn | tee "$out/flow-update.log"
          timeout 240 python3 benchmarks/flow_overhead.py --shape qwen2.5-1.5b --lengths 4096 --batches 16 64 \
            --repeats 1 --no-sampling --out "$out/flow-update-4096.json" 2>&1 | grep -vi warn | tee "$out/flow-update-4096.log" ;;
    trl|trl-round2|trl-round3) round=${part#trl-round}; [ "$round" = trl ] && round=1  # one round a call: each round starts its rotation elsewhere
        timeout 240 python3 benchmarks/trl_compare.py --device cuda --models qwen2.5-0.5b --steps 2 --warmup 1 --repeats 1 --first-round "$round" \
            --prompts-per-step 4 --micro-batch 16 --max-new-tokens 128 --out "$out/$part.json" 2>&1 | grep -vi warn | tee "$out/$part.log" ;;
    trl-profile) timeout 300 python3 benchmarks/trl_compare.py --device cuda --models qwen2.5-0.5b --steps 3 --warmup 1 --repeats 1 \
            --prompts-per-step 4 --micro-batch 16 --max-new-tokens 128 --profile --out "$out/trl-profile.json" 2>&1 | grep -vi warn | tee "$out/trl-profile.log" ;;
    configs) timeout 200 python3 benchmarks/gpu_check.py --steps 2 --out "$out/configs.json" 2>&1 | grep -vi warn | tee "$out/configs.log" ;;
    *) echo "unknown part $part (flow, flow-update, trl, trl-round2, trl-round3, trl-profile, configs)"; exit 2 ;;
  esac
done
