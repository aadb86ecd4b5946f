"""Flow credit at long responses: the credit path's memory, the graphs' size, solver time, and what pruning
changes.

    python benchmarks/flow_memory.py pruning --out docs/results/flow-pruning-cpu.json  # chooses the defaults
    python benchmarks/flow_memory.py memory --lengths 2048 8192 16384 --out docs/results/flow-memory-cpu.json

``pruning``: what the graphs keep for a grid of (keep_mass, max_in_degree): the share of the flow their
edges carry (per token with incoming flow, and in all), edges per token and graph bytes as a share of
the dense maps (N × T² × 4 B); and that the credit does not move: the boosted top-40 % tokens under
each setting against keep_mass 1 with no cap. On real attention of stories260K (512-token stories
it samples itself, answer = the last token as FlowCredit's fallback) and of a random tiny Llama at
2K and 8K positions.

For comparison, each row also gives the agreement of the other order (``prune_before_solve``): prune each
token's incoming edges by capacity (``keep_mass`` of its incoming capacity, at most ``max_in_degree``),
then solve the flow on the graphs that are left.

``memory``: one step's credit path as the training step runs it (``GRPOModule.first_pass`` per
micro-batch: the forward records the credited rows' maps, FlowCredit solves the flow on them, keeps
the edges carrying it, frees the map and assembles the graphs) on a random tiny Llama, N responses
in micro-batches of 2, T positions. Per
micro-batch, the peak of allocations during that pass minus the same forward's peak without
recording (torch.profiler's CPU memory events, or the CUDA allocator's peak), against one
micro-batch's map and the graphs kept so far; the kept graphs against N × T² × 4 B; the solve on
the maps (``solve_maps``) and the graphs' assembly (prune + assemble) against the dense solver this
project used before the graphs (``lightning_flow/flow`` at commit DENSE_COMMIT, read from git), and
how many boosted tokens the default credit shares with that dense solver's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flow_overhead import build_module, make_rollouts  # noqa: E402
from lightning_flow.callbacks.flow_credit import FlowCredit  # noqa: E402

from lightning_flow.capture import capture_attention, default_capture_layers  # noqa: E402
from lightning_flow.flow import (  # noqa: E402
    FlowConfig,
    answer_flow,
    credit_weights,
    edge_flow,
    flow_graphs,
    kept_flow,
    prune_edges,
    solve_graphs,
    solve_maps,
    solved_graphs,
)
from lightning_flow.policy import PolicyConfig, load_policy, position_ids_from_mask  # noqa: E402
from lightning_flow.tokenizer import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DENSE_COMMIT = "e6959bf"
"""The last commit whose credit ran the dense blocked solver on [N, T, T] capacities."""
GRID = [
    (1.0, None),
    (0.999, None),
    (0.99, None),
    (0.95, None),
    (0.9, None),
    (1.0, 256),
    (0.999, 256),
    (0.999, 128),
    (0.999, 64),
    (0.99, 64),
    (0.95, 64),
    (0.999, 32),
]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``fn`` over ``repeats`` calls, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        result = fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def peak_bytes(fn) -> int:
    """Peak of the tensor memory ``fn`` allocates on top of what exists when it starts (CUDA: the
    allocator's peak; CPU: the running sum of torch.profiler's allocation and free events)."""
    if torch.cuda.is_available():
        synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, nbytes in sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    ):
        live += nbytes
        peak = max(peak, live)
    return peak


def graph_bytes(graphs) -> int:
    """Bytes of every tensor a Batch of flow graphs holds."""
    return sum(value.numel() * value.element_size() for _, value in graphs if isinstance(value, torch.Tensor))


def dense_solver(source: Path | None = None):
    """``answer_flow`` of the dense solver as of DENSE_COMMIT: its graph.py and solver.py from
    ``source`` (a folder; for machines without the git history) or from git."""
    folder = Path(tempfile.mkdtemp()) / "dense_flow"
    folder.mkdir()
    for name in ("graph", "solver"):
        if source is not None:
            text = (source / f"{name}.py").read_text()
        else:
            text = subprocess.run(
                ["git", "show", f"{DENSE_COMMIT}:lightning_flow/flow/{name}.py"],
                cwd=REPO,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        (folder / f"{name}.py").write_text(text)
    (folder / "__init__.py").write_text("")
    spec = importlib.util.spec_from_file_location(
        "dense_flow", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["dense_flow"] = package
    spec.loader.exec_module(package)
    from dense_flow import graph, solver  # noqa: PLC0415

    return solver.answer_flow, graph.FlowConfig


def boosted(flow: torch.Tensor, degenerate: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """[N, T] bool: the top 40 % of each response's tokens by flow (FlowCredit's default)."""
    return credit_weights(flow, response, 0.4, 1.5, degenerate) != 1


def agreement(boosted_a: torch.Tensor, boosted_b: torch.Tensor) -> list[float]:
    """Per response, the share of b's boosted tokens that a boosts too."""
    both = (boosted_a & boosted_b).sum(-1).double()
    return (both / boosted_b.sum(-1).clamp_min(1)).tolist()


def flow_weighted_agreement(
    boosted_a: torch.Tensor, boosted_b: torch.Tensor, flow_b: torch.Tensor
) -> list[float]:
    """Per response, b's flow on a's boosted tokens over b's flow on its own: how much of what exact
    credit boosts the other set boosts, counting each token by its exact flow."""
    return ((flow_b * boosted_a).sum(-1) / (flow_b * boosted_b).sum(-1).clamp_min(1e-30)).double().tolist()


def graph_flow(maps, valid, prompt, answer, cfg: FlowConfig):
    """(flow [N, T], degenerate [N], graphs) of ``maps`` under ``cfg``."""
    result = answer_flow(maps, valid, prompt, answer, cfg)
    return result.flow, result.degenerate, result.graphs


def kept_flow_shares(graphs) -> tuple[float, float]:
    """(mean over tokens with incoming flow of the share their kept edges carry, the kept edges' flow over
    all incoming flow)."""
    flows = edge_flow(graphs)
    share = kept_flow(graphs, flows)
    entered = graphs.incoming_flow > 0
    return float(share[entered].mean()), float(flows.double().sum() / graphs.incoming_flow.sum())


# ---- pruning ------------------------------------------------------------------------------------
def stories(count: int, length: int, seed: int):
    """(maps [K, T, T], valid, prompt, answer) of ``count`` stories260K stories of ``length`` tokens."""
    folder = REPO.parent / "shared" / "data" / "models" / "stories260K" / "hf"
    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing: the pruning benchmark reads stories260K from ../shared")
    model, tokenizer = load_policy(PolicyConfig(str(folder), lora_rank=4)), load_tokenizer(str(folder))
    starts = [
        "Once upon a time",
        "Lily had a red ball",
        "The little dog ran",
        "One day, Tom saw a bird",
        "Sam and Mia went to the park",
        "There was a big tree",
        "A cat sat on the mat",
        "Ben wanted to fly",
    ]
    torch.manual_seed(seed)
    rows = []
    model.eval()
    for start in (starts * (count // len(starts) + 1))[:count]:
        ids = tokenizer(start, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                do_sample=True,
                min_new_tokens=length - ids.shape[1],
                max_new_tokens=length - ids.shape[1],
                pad_token_id=0,
            )
        rows.append((out[0], ids.shape[1]))
    ids = torch.stack([row for row, _ in rows])
    mask = torch.ones_like(ids)
    maps = capture_attention(
        model,
        ids,
        mask,
        default_capture_layers(model.config.num_hidden_layers),
        position_ids=position_ids_from_mask(mask),
    )
    valid = mask.bool()
    prompt = torch.zeros_like(valid)
    for n, (_, p) in enumerate(rows):
        prompt[n, :p] = True
    answer = torch.zeros_like(valid)
    answer[:, -1] = True
    return maps, valid, prompt, answer


def random_llama_maps(n: int, length: int, seed: int):
    """(maps, valid, prompt, answer) of a random tiny Llama (flow_overhead's) over random ids with a boxed
    answer."""
    module = build_module(
        argparse.Namespace(shape="tiny", qlora=False, micro_batch=n), Path(tempfile.mkdtemp())
    )
    rollouts = make_rollouts(module, n, 64, length - 64, seed=seed)
    mask = rollouts.attention_mask
    maps = capture_attention(
        module.policy,
        rollouts.input_ids,
        mask,
        module.attention_layers,
        position_ids=position_ids_from_mask(mask),
    )
    valid = mask.bool()
    prompt = torch.zeros_like(valid)
    prompt[:, :64] = True
    answer = torch.zeros_like(valid)
    answer[:, -4:-2] = True  # the boxed digit and its closing brace, before EOS
    return maps, valid, prompt, answer


def pruning_rows(name: str, inputs) -> list[dict]:
    maps, valid, prompt, answer = inputs
    response = valid & ~prompt
    dense = maps.shape[0] * maps.shape[1] ** 2 * 4
    exact_flow, exact_degenerate, _ = graph_flow(maps, valid, prompt, answer, FlowConfig())
    exact = boosted(exact_flow, exact_degenerate, response)
    rows = []
    for keep_mass, max_in_degree in GRID:
        cfg = FlowConfig(keep_mass=keep_mass, max_in_degree=max_in_degree)
        flow, degenerate, graphs = graph_flow(maps, valid, prompt, answer, cfg)
        pruned = boosted(flow, degenerate, response)
        shares, weighted = agreement(pruned, exact), flow_weighted_agreement(pruned, exact, exact_flow)
        first, first_degenerate, _ = graph_flow(
            maps, valid, prompt, answer, replace(cfg, prune_before_solve=True)
        )
        pruned_first = agreement(boosted(first, first_degenerate, response), exact)
        row = dict(
            data=name,
            keep_mass=keep_mass,
            max_in_degree=max_in_degree,
            positions=maps.shape[1],
            responses=maps.shape[0],
            top40_agreement_mean=statistics.mean(shares),
            top40_agreement_min=min(shares),
            top40_flow_weighted_mean=statistics.mean(weighted),
            top40_flow_weighted_min=min(weighted),
            **dict(zip(("kept_flow_token_mean", "kept_flow_total"), kept_flow_shares(graphs))),
            edges_per_token=graphs.num_edges / graphs.num_nodes,
            graph_share_of_dense=graph_bytes(graphs) / dense,
            max_abs_flow_change=float((flow - exact_flow).abs().max()),
            pruned_first_top40_agreement_mean=statistics.mean(pruned_first),
            pruned_first_top40_agreement_min=min(pruned_first),
        )
        rows.append(row)
        print(
            f"{name:>14} T {maps.shape[1]:>5}  keep_mass {keep_mass:<4} cap {str(max_in_degree):>4}: top-40% "
            "agreement mean "
            f"{row['top40_agreement_mean']:.4f} min {row['top40_agreement_min']:.4f} (flow-weighted "
            f"{row['top40_flow_weighted_mean']:.4f}); "
            f"kept flow per token {row['kept_flow_token_mean']:.3f}, in all {row['kept_flow_total']:.3f}; "
            f"edges/token {row['edges_per_token']:.1f}; graphs {100 * row['graph_share_of_dense']:.2f} % of "
            "the dense maps; "
            f"max |Δf| {row['max_abs_flow_change']:.4f}; solved after pruning by capacity: top-40% agreement "
            f"mean {row['pruned_first_top40_agreement_mean']:.4f} "
            f"min {row['pruned_first_top40_agreement_min']:.4f}",
            flush=True,
        )
    return rows


def run_pruning(args) -> dict:
    rows = pruning_rows("stories260K", stories(args.stories, 512, seed=0))
    for length in args.random_lengths:
        rows += pruning_rows("random-llama", random_llama_maps(2, length, seed=length))
    return {"part": "pruning", "rows": rows}


# ---- memory -------------------------------------------------------------------------------------
def memory_row(args, length: int, dense_answer_flow, DenseConfig, cuda: bool) -> dict:
    """One length's row: credit-path peaks over the measured micro-batches, then solver times on the first."""
    module = build_module(
        argparse.Namespace(shape=args.shape, qlora=False, micro_batch=args.micro_batch),
        Path(tempfile.mkdtemp()),
    )
    pruning = dict(keep_mass=args.keep_mass, max_in_degree=args.max_in_degree) if args.keep_mass else {}
    credit = FlowCredit(prune_before_solve=args.prune_before_solve, **pruning)
    module.trainer = SimpleNamespace(callbacks=[credit])  # what first_pass reads of the trainer
    credit.setup(module.trainer, module, "fit")
    rollouts = make_rollouts(
        module, args.responses, args.prompt_length, length - args.prompt_length, seed=length
    )
    t = rollouts.attention_mask.shape[1]
    micro_batches = module.micro_batches(rollouts)[: args.micro_batches or None]
    dense_maps = args.responses * t * t * 4
    peaks, maps_bytes, kept_before = [], [], []
    with torch.no_grad():
        for rows_ in micro_batches:
            plain = peak_bytes(lambda: module.completion_logps(rollouts, rows_))
            kept = sum(graph_bytes(graphs) for _, graphs in rollouts.flow_graphs)
            with module.first_pass_recording(rollouts) as recorder:
                with_credit = peak_bytes(lambda: module.first_pass(rollouts, rows_, recorder))
            k = int(rollouts.credited[rows_].sum())
            peaks.append(with_credit - plain)
            maps_bytes.append(k * t * t * 4)
            kept_before.append(kept)
    kept_total = sum(graph_bytes(graphs) for _, graphs in rollouts.flow_graphs)
    responses_done = sum(len(chunk) for chunk, _ in rollouts.flow_graphs)
    # Solver time, on the first micro-batch's maps: the solve on the maps and the graphs' assembly against the
    # dense solver.
    first = micro_batches[0]
    mask = rollouts.attention_mask[first]
    maps = capture_attention(
        module.policy,
        rollouts.input_ids[first],
        mask,
        module.attention_layers,
        position_ids=position_ids_from_mask(mask),
    )
    valid = mask.bool()
    prompt = torch.zeros_like(valid)
    prompt[:, : args.prompt_length] = True
    answer = torch.zeros_like(valid)
    answer[:, -4:-2] = True
    cfg = credit.flow_config
    if cfg.prune_before_solve:  # prune, assemble, then solve on the graphs
        prune_s, kept = timed(lambda: prune_edges(maps, valid, answer, cfg), args.repeats)
        assemble_s, graphs = timed(lambda: flow_graphs(kept, prompt, answer), args.repeats)
        solve_s, solution = timed(lambda: solve_graphs(graphs, kept, prompt, answer, cfg), args.repeats)
        build_s = prune_s + assemble_s
    else:  # solve on the maps, then prune and assemble
        solve_s, solution = timed(lambda: solve_maps(maps, valid, prompt, answer, cfg), args.repeats)
        build_s, _ = timed(
            lambda: solved_graphs(
                prune_edges(maps, valid, answer, cfg, solution), prompt, answer, cfg, solution
            ),
            args.repeats,
        )
    dense_s, dense = timed(
        lambda: dense_answer_flow(maps, valid, prompt, answer, DenseConfig()), args.repeats
    )
    response = valid & ~prompt
    exact_boosted = boosted(dense.flow, dense.degenerate, response)
    ours = boosted(solution.f.float(), solution.degenerate, response)
    shares, weighted = (
        agreement(ours, exact_boosted),
        flow_weighted_agreement(ours, exact_boosted, dense.flow),
    )
    row = dict(
        positions=t,
        responses=args.responses,
        micro_batch=args.micro_batch,
        micro_batches_measured=len(micro_batches),
        device=torch.cuda.get_device_name() if cuda else "cpu",
        keep_mass=cfg.keep_mass,
        max_in_degree=cfg.max_in_degree,
        prune_before_solve=cfg.prune_before_solve,
        micro_batch_map_mib=max(maps_bytes) / 2**20,
        dense_step_maps_mib=dense_maps / 2**20,
        credit_peak_mib=[p / 2**20 for p in peaks],
        kept_before_mib=[k / 2**20 for k in kept_before],
        peak_over_map=max((p - (kept_total - k)) / m for p, k, m in zip(peaks, kept_before, maps_bytes) if m)
        if any(maps_bytes)
        else None,
        kept_graphs_mib=kept_total / 2**20,
        kept_graphs_share_of_dense=kept_total / (responses_done * t * t * 4) if responses_done else None,
        build_s=build_s,
        solve_s=solve_s,
        dense_solver_s=dense_s,
        graph_over_dense=(build_s + solve_s) / dense_s,
        solve_over_dense=solve_s / dense_s,
        top40_agreement_with_dense_mean=statistics.mean(shares),
        top40_agreement_with_dense_min=min(shares),
        top40_flow_weighted_with_dense_mean=statistics.mean(weighted),
        credit_vs_dense_max_abs_flow=float((solution.f - dense.flow.double()).abs().max()),
    )
    return row


def run_memory(args) -> dict:
    dense_answer_flow, DenseConfig = dense_solver(args.dense_from)
    cuda = torch.cuda.is_available()
    rows = []
    for length in args.lengths:  # each row's model, maps and graphs are freed when memory_row returns
        row = memory_row(args, length, dense_answer_flow, DenseConfig, cuda)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"part": "memory", "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=["pruning", "memory"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--stories", type=int, default=8, help="pruning: stories260K stories of 512 tokens")
    parser.add_argument(
        "--random-lengths",
        type=int,
        nargs="+",
        default=[2048, 8192],
        help="pruning: random tiny Llama lengths",
    )
    parser.add_argument("--shape", default="tiny", help="memory: the model (flow_overhead's shapes)")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[2048, 8192, 16384], help="memory: positions T"
    )
    parser.add_argument("--responses", type=int, default=16, help="memory: N, responses per step")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=None,
        help="memory: measure only the first this many micro-batches",
    )
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument(
        "--keep-mass", type=float, default=None, help="memory: FlowCredit's keep_mass (default: its default)"
    )
    parser.add_argument("--max-in-degree", type=int, default=None)
    parser.add_argument(
        "--prune-before-solve",
        action="store_true",
        help="memory: prune by capacity, then solve on the graphs",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dense-from",
        type=Path,
        default=None,
        help="memory: a folder with the dense solver's graph.py and solver.py (default: git show "
        "DENSE_COMMIT)",
    )
    args = parser.parse_args()
    result = run_pruning(args) if args.part == "pruning" else run_memory(args)
    result.update(
        commit=subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        date=time.strftime("%Y-%m-%d"),
        command=" ".join(sys.argv),
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
