"""Build the offline demo policy: a tiny Llama with a character tokenizer, warm-started by SFT.

    python -m lightning_flow.demo_policy --config configs/demo.yaml

reads the policy path and the arithmetic task from the demo config, trains a few hundred
supervised steps on worked solutions of the task's training split (so the policy starts RL with
some but not all answers right), and saves a transformers model folder there. Deterministic for
a seed on CPU.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import yaml

from lightning_flow.datamodules import ArithmeticDataModule, MathExample
from lightning_flow.tiny import build_char_tokenizer, build_tiny_llama

log = logging.getLogger(__name__)


def sft_batch(
    tokenizer, prompts: list[str], solutions: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+solution+EOS ids, attention mask, and labels that score the solution only."""
    rows, labels = [], []
    for prompt, solution in zip(prompts, solutions):
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        answer_ids = tokenizer(solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        labels.append([-100] * len(prompt_ids) + answer_ids)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    target = torch.full((len(rows), width), -100)
    for i, (row, label) in enumerate(zip(rows, labels)):
        ids[i, : len(row)], target[i, : len(label)] = torch.tensor(row), torch.tensor(label)
    mask = torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]
    return ids, mask.long(), target


def warm_start(
    model, tokenizer, data: ArithmeticDataModule, steps: int, lr: float, batch_size: int, seed: int
) -> list[float]:
    """Supervised steps on worked solutions of the training split; returns the loss curve."""
    examples: list[MathExample] = data.load_examples("train")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        picked = [
            examples[i] for i in torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        ]
        ids, mask, labels = sft_batch(
            tokenizer, [data.format_prompt(e.question) for e in picked], [e.solution for e in picked]
        )
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def demo_settings(config_path: str) -> tuple[str, dict]:
    """The policy folder and the data init args that the demo config trains with."""
    config = yaml.safe_load(Path(config_path).read_text())
    try:
        return config["model"]["policy"]["name_or_path"], dict(config["data"].get("init_args", {}))
    except (KeyError, TypeError) as error:
        raise ValueError(
            f"{config_path}: expected model.policy.name_or_path and data.init_args ({error})"
        ) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default="configs/demo.yaml", help="fit config whose policy path and data task to use"
    )
    parser.add_argument("--steps", type=int, default=300, help="supervised steps")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    out, data_args = demo_settings(args.config)
    if (Path(out) / "config.json").exists() and not args.force:
        log.info("demo policy already at %s (use --force to rebuild)", out)
        return
    torch.manual_seed(args.seed)
    tokenizer = build_char_tokenizer()
    data_args.pop("tokenizer", None)
    data = ArithmeticDataModule(**data_args)
    data.set_tokenizer(tokenizer)
    model = build_tiny_llama(tokenizer, seed=args.seed)
    start = time.perf_counter()
    losses = warm_start(model, tokenizer, data, args.steps, args.lr, args.batch_size, args.seed)
    log.info(
        "warm start: %d steps in %.0f s, loss %.3f -> %.3f",
        args.steps,
        time.perf_counter() - start,
        losses[0],
        losses[-1],
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("saved demo policy to %s", out)


if __name__ == "__main__":
    main()
