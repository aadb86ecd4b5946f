"""Peak memory of the loss's log-prob pass (forward + backward) versus plain log_softmax.

    python benchmarks/logprob_memory.py [--rows 4 --length 1024 --vocab 151936]

Each method runs in a fresh subprocess on the CPU; the figure is the growth of the process's
peak RSS over the logits themselves, which both methods must hold (bf16 logits, as a bf16
policy's LM head produces them). The default shape is one micro-batch of the QLoRA 1.5B config.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from lightning_flow.loss import token_logprobs_and_entropy


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(method: str, rows: int, length: int, vocab: int) -> int:
    """Extra peak bytes of one forward+backward beyond the logits and their gradient."""
    logits = torch.randn(rows, length, vocab, dtype=torch.bfloat16).requires_grad_(True)
    targets = torch.randint(vocab, (rows, length))
    logits.grad = torch.zeros_like(logits)  # the gradient buffer exists in both methods
    baseline = peak_rss_bytes()
    if method == "chunked":
        logps, _ = token_logprobs_and_entropy(logits, targets)
    else:
        logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    logps.sum().backward()
    return peak_rss_bytes() - baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--method", choices=["chunked", "log_softmax"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run(args.method, args.rows, args.length, args.vocab)))
        return
    logits_gib = args.rows * args.length * args.vocab * 2 / 2**30
    print(f"logits [{args.rows}, {args.length}, {args.vocab}] bf16: {logits_gib:.2f} GiB")
    for method in ["chunked", "log_softmax"]:
        cmd = [sys.executable, __file__, "--method", method, f"--rows={args.rows}", f"--length={args.length}", f"--vocab={args.vocab}"]
        extra = int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        print(f"{method:>12}: extra peak {extra / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
