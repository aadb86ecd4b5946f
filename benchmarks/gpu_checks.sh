#!/usr/bin/env bash
# The prepared GPU checks, for a lent GPU machine (run tool, carry [".whl"] made by benchmarks/gpu_wheels.sh):
#   bash benchmarks/gpu_checks.sh long-step flow-memory   (first, about 6 min: issue 18's 8K step under a 24 GB cap
#   and the credit path's memory at 8K / 16K, never measured on a GPU; then engines (issue 21), configs, merge)
# Parts (each writes $OUT/<part>.json and $OUT/<part>.log; times measured on an H100):
#   flow     about 6 min: benchmarks/flow_overhead.py at Qwen2.5-1.5B's shape (bf16 + LoRA, random weights),
#            L = 256 / 1024 (4096 does not fit: sampling 4096 tokens alone takes about 6 min), N = 16 / 64
#   flow-update  about 3 min: the same without sampling (shares of the update alone), L = 256 / 1024
#   flow-profile  about 1.5 min (estimated): flow-update at N = 16 with one repeat, plus a torch.profiler run of
#            one recorded update per row: the recording's host time against its kernels' time, top operators
#   capture-chunks  about 1.5 min (estimated): benchmarks/capture_chunks.py at the same shape, L = 256 / 1024,
#            N = 16: the capture under the default chunking, without the causal row split, with a 16M-element
#            chunk floor, and both, alternating in one process (picks the GPU's chunking)
#   flow-update-4096  about 4 min: the same at L = 4096 (one repeat), which fits without sampling
#   trl      about 6 min: benchmarks/trl_compare.py at Qwen2.5-0.5B's shape, rounds 1 and 2 of ours vs TRL's
#            GRPOTrainer (the order of the three runs rotated), 3 steps a run of which the first is warm-up
#            (128-token responses: generate ran 40-70 ms a token there, host-bound), after a 20-second
#            warm-up of the GPU and the libraries so that no timed run is a machine's cold first process;
#            trl-round3 runs round 3 alone (about 3 min)
#   trl-phases  about 3 min: benchmarks/trl_phases.py, the same workload with both frameworks in one process,
#            generation and update timed call by call in alternation (5 measured alternations after 1 warm-up)
#   trl-profile  more than 5 min: the same with a torch.profiler op table of one step per framework; on an H100 only
#            ours' run fitted the 300 s limit (its table: docs/results/trl-profile-h100-ours.txt)
#   merge    about 1.5 min (estimated from generate's 40-70 ms a token): benchmarks/sampling_merge.py at
#            Qwen2.5-0.5B's shape, generate with the LoRA adapter merged against unmerged, 4 calls each
#   configs  about 3 min: benchmarks/gpu_check.py, memory and step time of the real configs (needs bitsandbytes)
#   long-step  about 3 min (estimated): benchmarks/long_step.py, Qwen2.5-1.5B's shape (bf16 + LoRA, checkpointing),
#            16 responses of 8,192 tokens under a 24 GiB cap: two update steps with flow credit on fixed rollouts
#            (peak memory, time, credit share) and 256 sampled tokens (tokens/s; the 8K sampling extrapolated)
#   engines  about 5 min (estimated from generate's 40 ms a token at this shape): benchmarks/engine_throughput.py --gpu,
#            64 x 1024, fixed and varied lengths, one round: hf, static + compile (CUDA graphs), paged tokens/s
#   engines-8k  about 8 min (estimated): the same at 16 x 8192, fixed lengths
#   flow-memory  about 3 min (estimated): benchmarks/flow_memory.py memory, the tiny random Llama at T = 8K / 16K
#            on the GPU (credit-path peak against one micro-batch's map, kept graphs, graph solver against the dense one)
set -uo pipefail
out=${OUT:-results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(trl)
for part in "${parts[@]}"; do
  case $part in
    flow) timeout 360 python3 benchmarks/flow_overhead.py --shape qwen2.5-1.5b --lengths 256 1024 --batches 16 64 \
            --repeats 2 --sample-repeats 1 --out "$out/flow.json" 2>&1 | grep -vi warn | tee "$out/flow.log" ;;
    flow-update) timeout 170 python3 benchmarks/flow_overhead.py --shape qwen2.5-1.5b --lengths 256 1024 --batches 16 64 \
            --repeats 2 --no-sampling --out "$out/flow-update.json" 2>&1 | grep -vi warn | tee "$out/flow-update.log" ;;
    flow-profile) timeout 200 python3 benchmarks/flow_overhead.py --shape qwen2.5-1.5b --lengths 256 1024 --batches 16 \
            --repeats 1 --no-sampling --profile --out "$out/flow-profile.json" 2>&1 | grep -vi warn | tee "$out/flow-profile.log" ;;
    capture-chunks) timeout 200 python3 benchmarks/capture_chunks.py --shape qwen2.5-1.5b --lengths 256 1024 --batches 16 \
            --repeats 3 2>&1 | grep -vi warn | tee "$out/capture-chunks.log" ;;
    flow-update-4096) timeout 240 python3 benchmarks/flow_overhead.py --shape qwen2.5-1.5b --lengths 4096 --batches 16 64 \
            --repeats 1 --no-sampling --out "$out/flow-update-4096.json" 2>&1 | grep -vi warn | tee "$out/flow-update-4096.log" ;;
    trl|trl-round3) if [ "$part" = trl ]; then first=1 repeats=2; else first=3 repeats=1; fi
        # Warm the GPU's clocks and the page cache of the libraries: round 1's first run was otherwise the slowest in every part.
        timeout 60 python3 -c "import time, torch, trl, lightning, peft; x = torch.randn(4096, 4096, device='cuda'); t = time.time()
while time.time() - t < 20: x = (x @ x).tanh_()
torch.cuda.synchronize()"
        timeout 420 python3 benchmarks/trl_compare.py --device cuda --models qwen2.5-0.5b --steps 3 --warmup 1 --repeats $repeats --first-round $first \
            --prompts-per-step 4 --micro-batch 16 --max-new-tokens 128 --out "$out/$part.json" 2>&1 | grep -vi warn | tee "$out/$part.log" ;;
    trl-phases) timeout 300 python3 benchmarks/trl_phases.py --device cuda --models qwen2.5-0.5b --warmup 1 --repeats 5 \
            --prompts-per-step 4 --micro-batch 16 --max-new-tokens 128 --out "$out/trl-phases.json" 2>&1 | grep -vi warn | tee "$out/trl-phases.log" ;;
    trl-profile) timeout 300 python3 benchmarks/trl_compare.py --device cuda --models qwen2.5-0.5b --steps 3 --warmup 1 --repeats 1 \
            --prompts-per-step 4 --micro-batch 16 --max-new-tokens 128 --profile --out "$out/trl-profile.json" 2>&1 | grep -vi warn | tee "$out/trl-profile.log" ;;
    merge) timeout 200 python3 benchmarks/sampling_merge.py --device cuda --models qwen2.5-0.5b --prompts 4 --group 8 \
            --max-new-tokens 128 --lora-rank 16 --repeats 4 --out "$out/merge.json" 2>&1 | grep -vi warn | tee "$out/merge.log" ;;
    configs) timeout 200 python3 benchmarks/gpu_check.py --steps 2 --out "$out/configs.json" 2>&1 | grep -vi warn | tee "$out/configs.log" ;;
    long-step) timeout 420 python3 benchmarks/long_step.py --out "$out/long-step.json" 2>&1 | grep -vi warn | tee "$out/long-step.log" ;;
    engines) timeout 480 python3 benchmarks/engine_throughput.py --gpu --workloads 64x1024 --repeats 1 \
            --out "$out/engines.json" 2>&1 | grep -vi warn | tee "$out/engines.log" ;;
    engines-8k) timeout 580 python3 benchmarks/engine_throughput.py --gpu --workloads 16x8192 --profiles fixed --repeats 1 \
            --out "$out/engines-8k.json" 2>&1 | grep -vi warn | tee "$out/engines-8k.log" ;;
    flow-memory) timeout 300 python3 benchmarks/flow_memory.py memory --lengths 8192 16384 --repeats 2 --dense-from .dense --out "$out/flow-memory.json" 2>&1 | grep -vi warn | tee "$out/flow-memory.log" ;;
    *) echo "unknown part $part (flow, flow-update, flow-profile, capture-chunks, flow-update-4096, trl, trl-round3, trl-phases, trl-profile, merge, configs, long-step, engines, engines-8k, flow-memory)"; exit 2 ;;
  esac
done
