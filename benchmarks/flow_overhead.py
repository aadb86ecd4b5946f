"""What flow credit costs: capture and solver time against one training step, and capture memory.

    python benchmarks/flow_overhead.py                                   # CPU, tiny Llama
    python benchmarks/flow_overhead.py --shape qwen2.5-1.5b --qlora      # GPU, real shape, random weights

For each response length L and batch size N (responses per step), on random token ids of that
shape whose responses end in a ``\\boxed{}`` answer:
- step: one training step of the same config = sampling N responses of exactly L tokens
  (``min_new_tokens``) + the update's forward/backward over them in micro-batches;
- capture: what recording the head/layer-mean attention adds to the update's own forward, as the
  training step does it (the recorder's stopwatch), and the whole update with / without recording;
- solver: FlowCredit's work per micro-batch (answer tokens, graph, h-transform, throughput, weights);
- memory: what recording adds to the update's peak (here every micro-batch's maps are kept for the
  solver timing, as the training step does not: it frees each after credit), as a multiple of one
  [N, T, T] float32 map (target: at most 1.5); and for a single sequence, a
  dedicated capture pass against an eager forward with ``output_attentions`` over all layers
  (CUDA: allocator peak; CPU: torch.profiler memory events).
Times are medians over ``--repeats``; shares are capture / step and solver / step from the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import SHAPES, random_model_folder  # noqa: E402
from lightning_flow.callbacks.flow_credit import FlowCredit  # noqa: E402

from lightning_flow.adapter_merge import merged_lora  # noqa: E402
from lightning_flow.capture import PROFILER_RANGE, AttentionRecorder, capture_attention  # noqa: E402
from lightning_flow.loss import completion_mask  # noqa: E402
from lightning_flow.module import GRPOConfig, GRPOModule  # noqa: E402
from lightning_flow.objectives import policy_loss  # noqa: E402
from lightning_flow.policy import PolicyConfig, SamplingConfig  # noqa: E402
from lightning_flow.rollouts import Rollouts  # noqa: E402
from lightning_flow.tiny import build_char_tokenizer, build_tiny_llama  # noqa: E402


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def extra_peak_bytes(fn) -> int:
    """Peak tensor memory that ``fn`` adds: the CUDA allocator's peak, or on the CPU the peak of
    live bytes in torch.profiler's memory events (allocations and frees in time order)."""
    if torch.cuda.is_available():
        synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:  # frees are negative
        live += nbytes
        peak = max(peak, live)
    return peak


def make_rollouts(module: GRPOModule, n: int, prompt_length: int, length: int, seed: int) -> Rollouts:
    """Random ids of the benchmark's shape; each response ends with a boxed answer and EOS."""
    tokenizer, device = module.tokenizer, module.device
    generator = torch.Generator().manual_seed(seed)
    low = len(tokenizer.all_special_ids) + 1  # skip special ids
    tail = tokenizer("\\boxed{7}", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    prompt_ids = torch.randint(low, 90, (n, prompt_length), generator=generator)
    completion_ids = torch.randint(low, 90, (n, length), generator=generator)
    completion_ids[:, -len(tail) :] = torch.tensor(tail)
    mask, truncated = completion_mask(completion_ids, module.eos_ids)
    completions = [
        tokenizer.decode(row[: int(k)].tolist(), skip_special_tokens=True)
        for row, k in zip(completion_ids, mask.sum(1))
    ]
    ones = torch.ones(n)
    return Rollouts(
        prompt_ids=prompt_ids.to(device),
        prompt_mask=torch.ones_like(prompt_ids).to(device),
        completion_ids=completion_ids.to(device),
        completion_mask=mask.to(device),
        is_truncated=truncated.to(device),
        prompts=[""] * n,
        completions=completions,
        golds=["7"] * n,
        rewards=ones[:, None].to(device),
        total_rewards=ones.to(device),
        advantages=torch.randn(n, generator=generator).to(device),
        zero_std_groups=torch.zeros(n // 2, dtype=torch.bool, device=device),
        token_weights=torch.ones_like(mask).to(device),
    )


class StepParts:
    """Sampling exactly ``length`` tokens, the update, and the update that records attention per
    micro-batch as the training step does (the maps of the credited rows of each micro-batch, in
    ``maps``), and the credit of those maps as FlowCredit computes it."""

    def __init__(self, module: GRPOModule, rollouts: Rollouts, length: int, credit: FlowCredit) -> None:
        self.module, self.rollouts, self.length, self.credit = module, rollouts, length, credit
        # (rollout rows, [k, T, T]) of the last recorded update
        self.maps: list[tuple[list[int], torch.Tensor]] = []

    def sample(self) -> None:
        module, rollouts = self.module, self.rollouts
        with torch.no_grad(), merged_lora(module.policy) if module.sampling.merge_adapter else nullcontext():
            module.policy.eval()  # as the hf engine samples: eval mode, adapter merged
            module.policy.generate(
                input_ids=rollouts.prompt_ids,
                attention_mask=rollouts.prompt_mask,
                do_sample=True,
                min_new_tokens=self.length,
                max_new_tokens=self.length,
                pad_token_id=module.tokenizer.pad_token_id,
            )
            module.policy.train()

    def update(self, record: bool = False) -> float:
        """One update over the micro-batches; with ``record``, each one's forward records the maps of
        its credited rows (as ``GRPOModule.first_pass``); returns the recorder's seconds."""
        module, rollouts = self.module, self.rollouts
        self.maps, captured = [], 0.0
        credited = rollouts.credited.tolist()
        for rows in module.micro_batches(rollouts):
            if record:
                local = [
                    j
                    for j in range(rows.stop - rows.start)
                    if j + rows.start < len(rollouts) and credited[rows.start + j]
                ]
                with AttentionRecorder(module.policy, module.attention_layers) as recorder:
                    logps, entropy = module.completion_logps(
                        rollouts, rows, recorder, torch.tensor(local, device=module.device)
                    )
                self.maps.append(([rows.start + j for j in local], recorder.take()))
                captured += recorder.stopwatch.seconds()
            else:
                logps, entropy = module.completion_logps(rollouts, rows)
            loss, _ = policy_loss(
                logps, logps.detach(), rollouts.advantages[rows], rollouts.completion_mask[rows]
            )
            loss.backward()
        module.policy.zero_grad(set_to_none=True)
        return captured

    def solve(self) -> None:
        """FlowCredit's work on the last recorded update's maps (answer tokens, graphs, flow, weights)."""
        self.rollouts.entropy = torch.zeros_like(self.rollouts.completion_mask)
        self.rollouts.flow_graphs = []
        for rows, maps in self.maps:
            self.credit.compute(self.rollouts, rows, maps, self.module.tokenizer)


def eager_all_layers(module: GRPOModule, rollouts: Rollouts, rows: slice) -> None:
    base = module.policy.get_base_model()
    base.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            base.model(
                input_ids=rollouts.input_ids[rows],
                attention_mask=rollouts.attention_mask[rows],
                output_attentions=True,
                use_cache=False,
            )
    finally:
        base.set_attn_implementation("sdpa")


def build_policy_folder(args, folder: Path) -> None:
    if args.shape == "tiny":
        tokenizer = build_char_tokenizer()
        build_tiny_llama(tokenizer, hidden_size=64, layers=6, heads=8, max_positions=32768).save_pretrained(
            folder
        )
        tokenizer.save_pretrained(folder)
    else:
        random_model_folder(SHAPES[args.shape], folder)


def build_module(args: argparse.Namespace, folder: Path) -> GRPOModule:
    """The policy (``--shape``, bf16 on a GPU, LoRA r 16, checkpointing for real shapes) in a
    GRPOModule on the GPU when there is one, asking for attention at the default layers."""
    build_policy_folder(args, folder)
    cuda = torch.cuda.is_available()
    module = GRPOModule(
        PolicyConfig(
            str(folder),
            dtype="bfloat16" if cuda else "float32",
            load_in_4bit=args.qlora,
            lora_rank=16,
            gradient_checkpointing=args.shape != "tiny",
        ),
        SamplingConfig(num_generations=2),
        GRPOConfig(micro_batch_size=args.micro_batch),
    ).to("cuda" if cuda else "cpu")
    module.request_attention(None)
    return module


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and workload options this script shares with capture_chunks.py."""
    parser.add_argument(
        "--shape",
        default="tiny",
        choices=["tiny", *SHAPES],
        help="tiny: 6-layer 8-head Llama (CPU); else Qwen2.5's real dimensions",
    )
    parser.add_argument("--qlora", action="store_true", help="4-bit NF4 base weights")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_shape_arguments(parser)
    parser.add_argument(
        "--sample-repeats",
        type=int,
        default=None,
        help="repeats of the sampling part (default: --repeats; it is the slow part at L = 4096)",
    )
    parser.add_argument(
        "--no-sampling",
        action="store_true",
        help="leave sampling out: 'step' is the update alone, "
        "so shares are of the update (an upper bound of the step's)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="per row, also profile one recorded update: the recording's host and device time, and the top "
        "operators",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        module = build_module(args, Path(tmp))
        credit = FlowCredit(signal="flow")
        device_name = torch.cuda.get_device_name() if cuda else "cpu"
        print(
            f"device: {device_name}; model: {args.shape}; capture layers {module.attention_layers}; "
            f"step = {'the update alone' if args.no_sampling else 'sampling + update'}"
        )
        header = (
            f"{'L':>5} {'N':>4} {'step s':>8} {'capture s':>9} {'solver s':>8} {'capture %':>9} "
            f"{'solver %':>8} "
            f"{'update+rec/update':>17} {'capture/map':>11} {'1 seq capture MiB':>17} {'1 seq eager MiB':>15}"
        )
        print(header)
        for length in args.lengths:
            for n in args.batches:
                rollouts = make_rollouts(module, n, args.prompt_length, length, seed=length + n)
                parts = StepParts(module, rollouts, length, credit)
                sample, update, solve = parts.sample, parts.update, parts.solve
                # warm-up: each path's first call (kernel set-up, allocator) is left out
                (
                    update(),
                    update(record=True),
                    solve(),
                )
                plain, recorded, captures = [], [], []
                for _ in range(args.repeats):  # interleaved, so both see the same machine state
                    plain.append(median_time(update, 1))
                    recorded.append(median_time(lambda: captures.append(update(record=True)), 1))
                sampling = (
                    0.0 if args.no_sampling else median_time(sample, args.sample_repeats or args.repeats)
                )
                step = sampling + statistics.median(plain)
                capture = statistics.median(captures)
                solver = median_time(solve, args.repeats)
                total = length + args.prompt_length
                one_map = n * total * total * 4
                # The recorded update first, from no maps; the plain one then starts with the maps
                # alive, as the recorded one ends: the difference is what recording adds.
                parts.maps = []
                capture_ratio = (
                    extra_peak_bytes(lambda: update(record=True)) - extra_peak_bytes(update)
                ) / one_map
                parts.maps = []
                single = small_slice(rollouts, slice(0, 1))
                capture_one = (
                    extra_peak_bytes(
                        lambda: capture_attention(
                            module.policy, single.input_ids, single.attention_mask, module.attention_layers
                        )
                    )
                    / 2**20
                )
                eager_one = extra_peak_bytes(lambda: eager_all_layers(module, single, slice(0, 1))) / 2**20
                update_ratio = statistics.median(recorded) / statistics.median(plain)
                row = dict(
                    length=length,
                    n=n,
                    step_s=step,
                    capture_s=capture,
                    solver_s=solver,
                    capture_share=capture / step,
                    solver_share=solver / step,
                    update_recorded_over_plain=update_ratio,
                    capture_per_map=capture_ratio,
                    capture_one_mib=capture_one,
                    eager_one_mib=eager_one,
                )
                if args.profile:
                    row["profile"] = profile_recording(lambda: update(record=True), cuda)
                rows.append(row)
                print(
                    f"{length:>5} {n:>4} {step:>8.2f} {capture:>9.3f} {solver:>8.3f} "
                    f"{100 * capture / step:>8.1f}% {100 * solver / step:>7.1f}% "
                    f"{update_ratio:>17.3f} {capture_ratio:>11.2f} {capture_one:>17.1f} {eager_one:>15.0f}",
                    flush=True,
                )
                if args.profile:
                    print(row["profile"]["summary"], row["profile"]["table"], sep="\n", flush=True)
                if args.out:  # after every row, so a run cut short by a time limit keeps what it measured
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(
                        json.dumps(
                            {
                                "shape": args.shape,
                                "device": device_name,
                                "step_includes_sampling": not args.no_sampling,
                                "rows": rows,
                            },
                            indent=2,
                        )
                    )


def profile_recording(fn, cuda: bool) -> dict:
    """One call of ``fn`` (a recorded update) under torch.profiler: the recording's ranges (calls,
    host time of the code inside them, device time of the kernels they launched) and the operators
    with the most self time. Host time well above device time means the recording is launch-bound."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize()
    averages = prof.key_averages()
    ranges = [event for event in averages if event.key == PROFILER_RANGE]
    calls = sum(event.count for event in ranges)
    host_ms = sum(event.cpu_time_total for event in ranges) / 1e3
    device_ms = sum(event.device_time_total for event in ranges) / 1e3
    summary = (
        f"  recording: {calls} layer calls, host {host_ms:.1f} ms, kernels {device_ms:.1f} ms"
        if cuda
        else f"  recording: {calls} layer calls, host {host_ms:.1f} ms"
    )
    table = averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=12)
    return dict(calls=calls, host_ms=host_ms, device_ms=device_ms, summary=summary, table=table)


def small_slice(rollouts: Rollouts, rows: slice) -> Rollouts:
    """The first micro-batch of a batch of rollouts (tensor fields sliced along responses)."""
    return Rollouts(
        **{
            k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() and k != "zero_std_groups" else v)
            for k, v in vars(rollouts).items()
        }
    )


if __name__ == "__main__":
    main()
