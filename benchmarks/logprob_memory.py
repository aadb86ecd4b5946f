"""Peak memory (and optionally time) of the LM head plus the loss's log-probs (forward + backward), three
ways.

    python benchmarks/logprob_memory.py [--rows 4 --length 1024 --hidden 1536 --vocab 151936 --chunk-tokens N]
    python benchmarks/logprob_memory.py --rows 2 --length 129 --hidden 16 --repeats 7
        # time of the softmax passes
    python benchmarks/logprob_memory.py --rows 4 --length 256 --hidden 64 --repeats 5 --scored 0.5

From one micro-batch's final hidden states ``[rows, length, hidden]`` (bf16, as a bf16 policy
makes them) and a frozen bf16 head ``[vocab, hidden]``:
- ``fused``: ``token_logprobs_and_entropy(hidden, ..., head_weight=W)`` (what the module runs):
  the head is applied block by block, no ``[rows, length, vocab]`` logits exist;
- ``chunked``: the head's full bf16 logits, then the chunked log-softmax over them (the module's
  path for models whose logits are more than a plain head);
- ``log_softmax``: the head's logits, then plain ``log_softmax(logits.float())``.
Each runs in a fresh subprocess on the CPU; the figure is the growth of the process's peak RSS
over the inputs and the hidden states' gradient, which every method needs. With ``--repeats N``
each also reports the median seconds of N more forward + backward calls after the measured one
(a small ``--hidden`` leaves the head's products out of it: what remains is the passes over the
``[positions, vocab]`` blocks). With ``--scored F`` the fused head scores only the first F of each
row's positions (``positions=``, as the module passes the completion tokens before EOS). The default shape is
one micro-batch of the QLoRA 1.5B config.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch

from lightning_flow.loss import token_logprobs_and_entropy

METHODS = ["fused", "chunked", "log_softmax"]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(
    method: str,
    rows: int,
    length: int,
    hidden_size: int,
    vocab: int,
    chunk_tokens: int | None,
    repeats: int,
    scored: float,
) -> tuple[int, float]:
    """Extra peak bytes of one forward+backward beyond the inputs and the hidden states' gradient,
    and the median seconds of ``repeats`` more (NaN for none)."""
    hidden = torch.randn(rows, length, hidden_size, dtype=torch.bfloat16).requires_grad_(True)
    # no fp32 temporary to raise the baseline
    weight = torch.randn(vocab, hidden_size, dtype=torch.bfloat16).mul_(hidden_size**-0.5)
    targets = torch.randint(vocab, (rows, length))
    hidden.grad = torch.zeros_like(hidden)  # the gradient buffer exists in every method
    positions = (torch.arange(length) < round(scored * length)).expand(rows, length) if scored < 1 else None
    baseline = peak_rss_bytes()

    def forward_backward() -> None:
        if method == "fused":
            logps, _ = token_logprobs_and_entropy(
                hidden, targets, chunk_tokens=chunk_tokens, head_weight=weight, positions=positions
            )
        else:
            logits = torch.nn.functional.linear(hidden, weight)
            if method == "chunked":
                logps, _ = token_logprobs_and_entropy(logits, targets, chunk_tokens=chunk_tokens)
            else:
                logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
            del logits
        logps.sum().backward()

    forward_backward()
    extra = peak_rss_bytes() - baseline
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward_backward()
        seconds.append(time.perf_counter() - start)
    return extra, statistics.median(seconds) if seconds else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument(
        "--chunk-tokens",
        type=int,
        default=None,
        help="positions per log-prob block (default: the loss's, 2^25 / vocab)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="also time this many forward + backward calls per method (median)",
    )
    parser.add_argument(
        "--scored",
        type=float,
        default=1.0,
        help="fraction of each row's positions the fused head scores (the rest: padding after EOS)",
    )
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = [args.rows, args.length, args.hidden, args.vocab]
    if args.method:
        print(json.dumps(run(args.method, *shape, args.chunk_tokens, args.repeats, args.scored)))
        return
    logits_gib = args.rows * args.length * args.vocab * 2 / 2**30
    print(
        f"hidden [{args.rows}, {args.length}, {args.hidden}], head [{args.vocab}, {args.hidden}] bf16; "
        f"full logits would be {logits_gib:.2f} GiB"
        + (f"; fused scores {args.scored:.0%} of the positions" if args.scored < 1 else "")
    )
    for method in METHODS:
        chunk = [f"--chunk-tokens={args.chunk_tokens}"] if args.chunk_tokens else []
        cmd = [
            sys.executable,
            __file__,
            "--method",
            method,
            f"--repeats={args.repeats}",
            f"--scored={args.scored}",
            *(f"--{k}={v}" for k, v in zip(["rows", "length", "hidden", "vocab"], shape)),
            *chunk,
        ]
        extra, seconds = json.loads(
            subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        )
        timing = f", forward + backward {seconds:.3f} s (median of {args.repeats})" if args.repeats else ""
        print(f"{method:>12}: extra peak {extra / 2**30:.2f} GiB{timing}")


if __name__ == "__main__":
    main()
