"""What merging the LoRA adapter for sampling saves: ``generate`` merged against unmerged, one process.

    python benchmarks/sampling_merge.py                                   # demo policy and stories260K, CPU
    python benchmarks/sampling_merge.py --models qwen2.5-0.5b --device cuda --max-new-tokens 128

The same policy (LoRA on all linear layers, its B drawn at random so the adapter changes the
output) samples the same prompts with the same per-response seeds through
``lightning_flow.engines.hf.HFEngine``, with ``sampling.merge_adapter`` on and off in alternating
order, ``--repeats`` calls each after one warm-up call of each. Responses run to
``--max-new-tokens`` only where the model never samples EOS (random real-shape weights); the
token count is reported. Printed: each side's median time and tokens/s, the median over the
alternations of merged / unmerged time, the number of responses whose tokens differ (the
merged weights are rounded once, so a rare draw at a CDF boundary may differ), and on a GPU each
side's allocator peak above what was allocated before the call (the merged copy shows there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import paired_ratio  # noqa: E402
from gpu_check import SHAPES, synchronize  # noqa: E402
from trl_compare import FOLDERS, model_folder  # noqa: E402

from lightning_flow.engines.hf import HFEngine  # noqa: E402
from lightning_flow.policy import PolicyConfig, SamplingConfig, eos_token_ids, load_policy  # noqa: E402
from lightning_flow.tokenizer import load_tokenizer  # noqa: E402


def compare(folder: Path, args: argparse.Namespace) -> dict:
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    torch.manual_seed(0)
    policy = load_policy(
        PolicyConfig(str(folder), dtype=dtype, lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank)
    ).to(args.device)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    tokenizer = load_tokenizer(str(folder))
    eos = eos_token_ids(policy, tokenizer)
    generator = torch.Generator().manual_seed(0)
    low = len(tokenizer.all_special_ids) + 1
    prompts = torch.randint(
        low, min(90, len(tokenizer)), (args.prompts, args.prompt_length), generator=generator
    ).to(args.device)
    mask = torch.ones_like(prompts)
    seeds = torch.arange(args.prompts * args.group)
    times: dict[bool, list[float]] = {True: [], False: []}
    peaks = {True: 0, False: 0}  # CUDA allocator peak above the call's start (the merged copy shows here)
    outputs: dict[bool, torch.Tensor] = {}
    for call in range(args.repeats + 1):
        for merge in (True, False) if call % 2 == 0 else (False, True):
            sampling = SamplingConfig(
                num_generations=args.group, max_new_tokens=args.max_new_tokens, merge_adapter=merge
            )
            synchronize()
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            engine = HFEngine(sampling, tokenizer.pad_token_id, eos)
            outputs[merge] = engine(policy, prompts, mask, args.group, seeds).ids
            synchronize()
            if call > 0:  # the first call of each is warm-up
                times[merge].append(time.perf_counter() - start)
            if args.device == "cuda":
                peaks[merge] = max(peaks[merge], torch.cuda.max_memory_allocated() - before)
    tokens = int((outputs[True] != tokenizer.pad_token_id).sum())
    width = min(outputs[True].shape[1], outputs[False].shape[1])
    differing = int((outputs[True][:, :width] != outputs[False][:, :width]).any(1).sum()) + int(
        outputs[True].shape != outputs[False].shape
    )
    merged, unmerged = statistics.median(times[True]), statistics.median(times[False])
    return dict(
        merged_s=merged,
        unmerged_s=unmerged,
        merged_over_unmerged=paired_ratio(times[True], times[False]),
        tokens=tokens,
        merged_tok_s=tokens / merged,
        unmerged_tok_s=tokens / unmerged,
        responses=len(seeds),
        responses_differing=differing,
        times=times,
        merged_peak_mib=peaks[True] / 2**20,
        unmerged_peak_mib=peaks[False] / 2**20,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["demo", "stories260K"],
        help=f"{sorted(FOLDERS)}, smoke (2-layer random Qwen2) or real shapes {sorted(SHAPES)}",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8, help="responses per prompt")
    parser.add_argument("--prompt-length", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=12, help="measured calls of each side")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            folder = model_folder(name, Path(tmp))
            row = results[name] = compare(folder, args)
            print(
                f"{name}: merged {row['merged_s'] * 1e3:.1f} ms ({row['merged_tok_s']:,.0f} tok/s), "
                f"unmerged {row['unmerged_s'] * 1e3:.1f} ms ({row['unmerged_tok_s']:,.0f} tok/s); "
                f"merged / unmerged {row['merged_over_unmerged']:.3f}; {row['tokens']} tokens; "
                f"{row['responses_differing']} of {row['responses']} responses differ"
                + (
                    f"; sampling's peak above the weights {row['merged_peak_mib']:.0f} vs "
                    f"{row['unmerged_peak_mib']:.0f} MiB"
                    if args.device == "cuda"
                    else ""
                ),
                flush=True,
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(dict(args=vars(args), device=args.device, results=results), indent=1, default=str)
        )


if __name__ == "__main__":
    main()
