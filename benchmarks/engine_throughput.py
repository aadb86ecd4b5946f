"""Tokens per second of each rollout engine (hf, static, paged) on one workload, ratios in one run.

    python benchmarks/engine_throughput.py --out docs/results/engines-cpu.json          # this CPU
    python benchmarks/engine_throughput.py --gpu --out docs/results/engines-gpu.json   # prepared, not run

Each workload is N responses of at most L new tokens (8 prompts of 32 tokens, N / 8 responses
each) from a Llama/Qwen2 with random weights and a LoRA adapter (rank 16, B perturbed so the merge
matters), sampled with per-response seeds as a training step does. Two length profiles:
``fixed``, where no EOS exists (an id outside the vocabulary), so every response runs to L; and
``varied``, where the ``L // 2`` ... ids a random model draws uniformly all end a response, so
lengths are about geometric with mean L / 4 (capped at L) and an engine that stops computing
finished rows gains. Useful tokens are the responses' tokens up to and including their EOS.

Per round the engines run in a rotated order; a figure is the median over ``--repeats`` rounds
after one warm-up round (``static`` compiles then; its warm-up seconds are reported apart), and
each ratio pairs the engines' runs of the same round (median of the per-round ratios).

CPU: a 2-layer, 128-wide Llama (vocabulary 1024), float32, N x L in {64 x 128, 16 x 1024};
``static`` runs compiled (``static+compile``; ``--engines static`` adds the CPU default, no
compile, which costs attention over the whole static cache at every token). GPU (``--gpu``):
Qwen2.5-1.5B's shape in bfloat16, N x L in {64 x 1024, 16 x 8192}; static compiles (CUDA graphs).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import paired_ratio  # noqa: E402
from gpu_check import SHAPES  # noqa: E402

from lightning_flow.engines import build_engine  # noqa: E402
from lightning_flow.policy import SamplingConfig  # noqa: E402
from lightning_flow.seeded_sampling import response_seeds  # noqa: E402

PROMPTS, PROMPT_TOKENS = 8, 32
CPU_SHAPE = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def build_policy(gpu: bool, longest: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if gpu:
        config = Qwen2Config(vocab_size=151_936, max_position_embeddings=longest, **SHAPES["qwen2.5-1.5b"])
        base = Qwen2ForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    else:
        base = LlamaForCausalLM(LlamaConfig(vocab_size=1024, max_position_embeddings=longest, **CPU_SHAPE))
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.02)
    return model.train()


def end_ids(profile: str, vocab: int, max_new_tokens: int) -> list[int]:
    """EOS ids: none reachable (fixed), or as many as make a uniform draw end with chance 4 / L."""
    if profile == "fixed":
        return [vocab]  # outside the vocabulary: never sampled
    return list(range(4, 4 + max(1, 4 * vocab // max_new_tokens)))


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_workload(model, engines: list[str], rows: int, length: int, profile: str, repeats: int, gpu: bool):
    vocab = model.config.vocab_size
    eos = end_ids(profile, vocab, length)
    device = "cuda" if gpu else "cpu"
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(4 + len(eos), vocab, (PROMPTS, PROMPT_TOKENS), generator=generator).to(device)
    mask = torch.ones_like(prompts)
    group = rows // PROMPTS
    seeds = response_seeds(0, 0, [str(i) for i in range(PROMPTS)], group)
    built = {}
    for name in engines:
        engine, compile_on = (name.split("+")[0], "+compile" in name)
        cfg = SamplingConfig(
            num_generations=group,
            max_new_tokens=length,
            engine=engine,
            compile=compile_on if engine == "static" else None,
        )
        built[name] = build_engine(cfg, pad_token_id=0, eos_ids=eos)
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, list[int]] = {name: [] for name in engines}
    warmup: dict[str, float] = {}
    for round_ in range(repeats + 1):
        order = engines[round_ % len(engines) :] + engines[: round_ % len(engines)]
        for name in order:
            synchronize()
            start = time.perf_counter()
            out = built[name](model, prompts, mask, group, seeds)
            synchronize()
            elapsed = time.perf_counter() - start
            if round_ == 0:
                warmup[name] = elapsed
            else:
                seconds[name].append(elapsed)
                tokens[name].append(int(out.mask.sum()))
            print(f"{rows}x{length} {profile} {name} round {round_}: {elapsed:.2f} s", flush=True)
    rates = {name: [t / s for t, s in zip(tokens[name], seconds[name])] for name in engines}
    return dict(
        rows=rows,
        max_new_tokens=length,
        profile=profile,
        eos_ids=len(eos),
        useful_tokens={name: statistics.median(tokens[name]) for name in engines},
        median_s={name: statistics.median(seconds[name]) for name in engines},
        tokens_per_s={name: statistics.median(rates[name]) for name in engines},
        over_hf={name: paired_ratio(rates[name], rates["hf"]) for name in engines},
        warmup_s=warmup,
        seconds=seconds,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="Qwen2.5-1.5B shape, bf16, on CUDA")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", nargs="*", help="N x L pairs such as 64x128 (default: the mode's two)")
    parser.add_argument("--profiles", nargs="*", default=["fixed", "varied"])
    parser.add_argument("--engines", nargs="*", help="default: hf static+compile paged")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    workloads = args.workloads or (["64x1024", "16x8192"] if args.gpu else ["64x128", "16x1024"])
    engines = args.engines or ["hf", "static+compile", "paged"]
    shapes = [tuple(map(int, w.split("x"))) for w in workloads]
    model = build_policy(args.gpu, PROMPT_TOKENS + max(length for _, length in shapes))
    results = [
        run_workload(model, engines, rows, length, profile, args.repeats, args.gpu)
        for rows, length in shapes
        for profile in args.profiles
    ]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    report = dict(
        command=" ".join(sys.argv),
        commit=commit,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine=torch.cuda.get_device_name()
        if args.gpu
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        torch=torch.__version__,
        dtype="bfloat16" if args.gpu else "float32",
        repeats=args.repeats,
        results=results,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for r in results:
        ratios = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in r["over_hf"].items())
        print(
            f"{r['rows']}x{r['max_new_tokens']} {r['profile']}: "
            f"hf {r['tokens_per_s']['hf']:.0f} tok/s; {ratios}"
        )


if __name__ == "__main__":
    main()
