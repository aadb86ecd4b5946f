"""Tokens per second of each rollout engine (hf, static, paged) on one workload, ratios in one run.

    python benchmarks/engine_throughput.py --out docs/results/engines-cpu.json          # this CPU
    python benchmarks/engine_throughput.py --gpu --out docs/results/engines-gpu.json   # prepared, not run
    python benchmarks/engine_throughput.py --recompiles MODEL --out docs/results/static-recompiles-cpu.json

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

``--recompiles MODEL`` measures instead what compiling ``static`` costs call by call: the model
(stories260K in docs/results.md) with a perturbed LoRA adapter, one sequence of seeded calls
(``RECOMPILE_CALLS``: repeated shapes, a new prompt width, a smaller last chunk, then new widths
past torch._dynamo's recompile limit), each call's seconds and the frames and graphs it compiled
(torch._dynamo's counters), how many of its responses differ from ``hf``'s and how far the
others' sampler log-probs are from ``hf``'s. Each of ``--repeats`` runs is a fresh process whose
inductor cache starts empty (a temporary folder), so its first call pays a cold compile; a call's
figure is the median over runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor
from torch.nn.functional import pad
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import paired_ratio  # noqa: E402
from gpu_check import SHAPES  # noqa: E402

from lightning_flow.engines import Completions, build_engine  # noqa: E402
from lightning_flow.policy import PolicyConfig, SamplingConfig, eos_token_ids, load_policy  # noqa: E402
from lightning_flow.seeded_sampling import response_seeds  # noqa: E402
from lightning_flow.tokenizer import load_tokenizer  # noqa: E402

PROMPTS, PROMPT_TOKENS = 8, 32
CPU_SHAPE = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
# --recompiles: 4 responses a prompt of at most 24 tokens, chunks of 8 rows (two prompts fill one).
RECOMPILE_GROUP, RECOMPILE_TOKENS, RECOMPILE_CHUNK = 4, 24, 8
SHORT, WIDE = "Once upon a time", "Once upon a time there was a little girl"
RECOMPILE_CALLS = [  # (what changes, prompts); the report gives each call's prompt width in tokens
    ("first call (compiles)", [SHORT, "1+2="]),
    ("same shapes", [SHORT, "1+2="]),
    ("same shapes", [SHORT, "1+2="]),
    ("wider prompts", [WIDE, "1+2="]),
    ("wider prompts again", [WIDE, "1+2="]),
    ("narrower prompts, unseen width", ["Once", "Hi"]),
    ("3 prompts: a last chunk of 4 rows", [SHORT, "1+2=", "The dog"]),
    ("3 prompts again", [SHORT, "1+2=", "The dog"]),
    *[(f"wider prompts, new width ({i})", [WIDE + " and her dog" * i, "1+2="]) for i in range(1, 10)],
]


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


def static_recompiles(path: str) -> list[dict]:
    """Each call of ``RECOMPILE_CALLS`` through the compiled static engine: its seconds (and hf's on
    the same call), prompt width, rows, the frames and graphs compiled during it, how many of its
    responses differ from hf's and the largest sampler log-prob gap over the others."""
    from torch._dynamo.utils import counters

    model = load_policy(PolicyConfig(name_or_path=path, lora_rank=4))
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so the merge matters
            parameter.data.normal_(0, 0.05, generator=generator)
    tokenizer = load_tokenizer(path)
    eos = eos_token_ids(model, tokenizer)
    engines = {
        name: build_engine(
            SamplingConfig(
                num_generations=RECOMPILE_GROUP,
                max_new_tokens=RECOMPILE_TOKENS,
                engine=name,
                compile=True if name == "static" else None,
                generation_batch_size=RECOMPILE_CHUNK,
            ),
            tokenizer.pad_token_id,
            eos,
        )
        for name in ("hf", "static")
    }
    calls = []
    for change, texts in RECOMPILE_CALLS:
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        seeds = response_seeds(0, len(calls), texts, RECOMPILE_GROUP)
        args = (model, batch.input_ids, batch.attention_mask, RECOMPILE_GROUP, seeds)
        frames, graphs = counters["frames"]["ok"], counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        out = engines["static"](*args)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        expected = engines["hf"](*args)
        calls.append(
            dict(
                change=change,
                prompt_width=batch.input_ids.shape[1],
                rows=len(seeds),
                seconds=seconds,
                hf_seconds=time.perf_counter() - start,
                frames_compiled=counters["frames"]["ok"] - frames,
                graphs_compiled=counters["stats"]["unique_graphs"] - graphs,
                **dict(zip(("responses_unlike_hf", "max_logp_gap_to_hf"), compared_with(out, expected))),
            )
        )
        print(calls[-1], flush=True)
    return calls


def compared_with(out: Completions, expected: Completions) -> tuple[int, float]:
    """How many responses of ``out`` differ from ``expected``'s (tokens up to their EOS), and the
    largest difference of sampler log-prob over the responses that do not."""
    width = max(out.ids.shape[1], expected.ids.shape[1])

    def widened(rows: Tensor, fill: float) -> Tensor:
        return pad(rows, (0, width - rows.shape[1]), value=fill)

    same = (
        widened(torch.where(out.mask > 0, out.ids, -1), -1)
        == widened(torch.where(expected.mask > 0, expected.ids, -1), -1)
    ).all(1)
    gap = (widened(out.logps, 0.0) - widened(expected.logps, 0.0))[same].abs()
    return int((~same).sum()), gap.max().item() if gap.numel() else 0.0


def cold_process_calls(path: str, threads: int | None) -> list[dict]:
    """``static_recompiles`` in this (fresh) process, with an empty inductor cache."""
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        return static_recompiles(path)


def recompile_summary(runs: list[list[dict]]) -> list[dict]:
    """Per call: its description, median seconds (static, hf) over runs, every run's compiled
    frames and responses unlike hf's, and the largest log-prob gap to hf over runs."""
    return [
        dict(
            change=calls[0]["change"],
            prompt_width=calls[0]["prompt_width"],
            rows=calls[0]["rows"],
            median_s=statistics.median(call["seconds"] for call in calls),
            hf_median_s=statistics.median(call["hf_seconds"] for call in calls),
            frames_compiled=[call["frames_compiled"] for call in calls],
            responses_unlike_hf=[call["responses_unlike_hf"] for call in calls],
            max_logp_gap_to_hf=max(call["max_logp_gap_to_hf"] for call in calls),
        )
        for calls in zip(*runs)
    ]


def write_report(args: argparse.Namespace, **figures) -> None:
    """``figures`` with the command, commit, date, machine and torch version, as JSON to ``args.out``."""
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
        **figures,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="Qwen2.5-1.5B shape, bf16, on CUDA")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", nargs="*", help="N x L pairs such as 64x128 (default: the mode's two)")
    parser.add_argument("--profiles", nargs="*", default=["fixed", "varied"])
    parser.add_argument("--engines", nargs="*", help="default: hf static+compile paged")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--recompiles", metavar="MODEL", help="compile warm-up and recompiles of static")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.recompiles:
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter per run: nothing compiled yet
        with ProcessPoolExecutor(1, mp_context=spawn, max_tasks_per_child=1) as pool:
            runs = [
                pool.submit(cold_process_calls, args.recompiles, args.threads).result()
                for _ in range(args.repeats)
            ]
        summary = recompile_summary(runs)
        write_report(
            args,
            repeats=args.repeats,
            recompile_limit=torch._dynamo.config.recompile_limit,
            calls=summary,
            runs=runs,
        )
        for call in summary:
            print(call)
        return
    workloads = args.workloads or (["64x1024", "16x8192"] if args.gpu else ["64x128", "16x1024"])
    engines = args.engines or ["hf", "static+compile", "paged"]
    shapes = [tuple(map(int, w.split("x"))) for w in workloads]
    model = build_policy(args.gpu, PROMPT_TOKENS + max(length for _, length in shapes))
    results = [
        run_workload(model, engines, rows, length, profile, args.repeats, args.gpu)
        for rows, length in shapes
        for profile in args.profiles
    ]
    write_report(args, repeats=args.repeats, results=results)
    for r in results:
        ratios = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in r["over_hf"].items())
        print(
            f"{r['rows']}x{r['max_new_tokens']} {r['profile']}: "
            f"hf {r['tokens_per_s']['hf']:.0f} tok/s; {ratios}"
        )


if __name__ == "__main__":
    main()
