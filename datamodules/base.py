"""Shared machinery of the prompt DataModules: examples, prompt formatting, tokenizing, batching."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_flow.rewards import GoldParseError, parse_gold
from lightning_flow.tokenizer import load_tokenizer

from .sampler import GlobalBatchSampler

log = logging.getLogger(__name__)

Split = Literal["train", "val"]


class DataError(ValueError):
    """Bad input data: a malformed row, missing fields or an answer that cannot be used."""


@dataclass(frozen=True)
class MathExample:
    """One math problem with its final answer."""

    question: str
    """The problem statement shown to the policy."""
    gold: str
    """The reference final answer (e.g. "18" or "\\frac{14}{3}")."""
    solution: str | None = None
    """A worked solution ending in the answer, for SFT warm starts; None when unknown."""
    source: str = ""
    """Where the example came from, e.g. "data/test.jsonl:17" or "arithmetic:seed=0:i=3"."""


@dataclass(frozen=True)
class PromptItem:
    """A formatted, tokenized prompt ready for batching."""

    prompt: str
    """The formatted prompt text."""
    input_ids: list[int]
    """Token ids of ``prompt``, special tokens as the tokenizer adds them."""
    gold: str
    """The reference final answer."""
    source: str
    """The originating example's source."""


@dataclass(frozen=True)
class LeftPadCollator:
    """Stacks PromptItems into a left-padded batch (a class so worker processes can pickle it)."""

    pad_token_id: int
    """Id written into padding positions (always masked out)."""

    def __call__(self, items: list[PromptItem]) -> dict:
        width = max(len(item.input_ids) for item in items)
        ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            # Left padding keeps every prompt's last token in the final column, where generation starts.
            if item.input_ids:
                ids[row, width - len(item.input_ids) :] = torch.tensor(item.input_ids, dtype=torch.long)
                mask[row, width - len(item.input_ids) :] = 1
        return {
            "prompt_ids": ids,
            "prompt_mask": mask,
            "prompts": [item.prompt for item in items],
            "golds": [item.gold for item in items],
            "sources": [item.source for item in items],
        }


class PromptDataModule(L.LightningDataModule):
    """Base DataModule: subclasses provide ``load_examples``; this class formats, checks and batches."""

    def __init__(
        self,
        tokenizer: str | None = None,
        batch_size: int = 8,
        val_batch_size: int = 16,
        instruction: str = "Put the final answer in \\boxed{}.",
        plain_template: str = "{question}\n{instruction}\n",
        max_prompt_length: int = 512,
        skip_invalid: bool = False,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            tokenizer: hub id or folder of the policy's tokenizer (the CLI links it from the policy's model
            path).
            batch_size: prompts per training step.
            val_batch_size: prompts per validation batch.
            instruction: appended to every question, telling the policy how to state its answer.
            plain_template: prompt layout for tokenizers without a chat template; fields {question} and
            {instruction}.
            max_prompt_length: prompts longer than this many tokens are dropped and counted.
            skip_invalid: count and skip malformed rows and unparseable golds instead of raising.
            seed: seed of the training shuffle (and of any random split or generation).
            num_workers: DataLoader worker processes.
        """
        super().__init__()
        for name, value in (
            ("batch_size", batch_size),
            ("val_batch_size", val_batch_size),
            ("max_prompt_length", max_prompt_length),
        ):
            if value < 1:
                raise ValueError(f"data.init_args.{name}={value} must be >= 1")
        try:
            plain_template.format(question="", instruction="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"plain_template {plain_template!r} may only use the fields {{question}} and {{instruction}} "
                f"({error!r})"
            ) from None
        self.tokenizer = tokenizer
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.instruction, self.plain_template = instruction, plain_template
        self.max_prompt_length, self.skip_invalid = max_prompt_length, skip_invalid
        self.seed, self.num_workers = seed, num_workers
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._items: dict[str, list[PromptItem]] = {}
        self.stats: dict[str, int] = self._empty_stats()
        """Counts from the last ``setup``: examples kept per split and rows skipped or dropped."""
        self.trained_batches: tuple[int, int] = (0, 0)
        """(epoch, training batches taken in it): saved in checkpoints so a resumed run skips them."""

    # ---- to implement ---------------------------------------------------------------------
    def load_examples(self, split: Split) -> list[MathExample]:
        """All examples of a split, before gold checks and length filtering."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_examples(split)")

    # ---- tokenizer and prompts ------------------------------------------------------------
    def set_tokenizer(self, tokenizer: str | PreTrainedTokenizerBase) -> None:
        """Use this tokenizer (a hub id, a folder, or a loaded tokenizer object) for prompts."""
        self._items = {}  # prompts tokenized by another tokenizer are stale
        if isinstance(tokenizer, str):
            self.tokenizer, self._tokenizer = tokenizer, None
            return
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token: set tokenizer.pad_token (e.g. to its eos_token) first"
            )
        self._tokenizer = tokenizer

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer object, loaded from ``tokenizer`` on first use."""
        if self._tokenizer is None:
            if not self.tokenizer:
                raise ValueError(
                    f"{type(self).__name__} has no tokenizer: set data.init_args.tokenizer (a hub id or "
                    "folder) "
                    "or call set_tokenizer() before setup()"
                )
            self._tokenizer = load_tokenizer(self.tokenizer)
        return self._tokenizer

    def format_prompt(self, question: str) -> str:
        """Prompt text for a question: the chat template when the tokenizer has one, else plain_template."""
        tokenizer = self.get_tokenizer()
        if getattr(tokenizer, "chat_template", None):
            content = f"{question}\n{self.instruction}" if self.instruction else question
            messages = [{"role": "user", "content": content}]
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.plain_template.format(question=question, instruction=self.instruction)

    # ---- setup ----------------------------------------------------------------------------
    @staticmethod
    def _empty_stats() -> dict[str, int]:
        keys = (
            "train_examples",
            "val_examples",
            "skipped_invalid",
            "unparseable_gold",
            "dropped_too_long",
            "duplicate_prompts",
        )
        return dict.fromkeys(keys, 0)

    def skip_or_raise(self, error: DataError) -> None:
        """Count and log a bad row when ``skip_invalid`` is set, else raise ``error``; for subclasses'
        loaders."""
        if not self.skip_invalid:
            raise error
        self.stats["skipped_invalid"] += 1
        log.warning("skipping invalid row: %s", error)

    def setup(self, stage: str | None = None) -> None:
        """Load both splits, check golds, format and tokenize prompts, drop over-long ones."""
        if stage == "fit":
            self.trained_batches = (0, 0)  # a fresh fit; a resumed one loads its count after setup
        if self._items:
            return
        tokenizer = self.get_tokenizer()
        self.stats = self._empty_stats()
        items = {split: self._prepare(split, tokenizer) for split in ("train", "val")}
        self._items = items
        log.info(
            "%s: %d train / %d val prompts (skipped %d invalid rows, %d unparseable golds; dropped %d "
            "prompts over %d tokens)",
            type(self).__name__,
            self.stats["train_examples"],
            self.stats["val_examples"],
            self.stats["skipped_invalid"],
            self.stats["unparseable_gold"],
            self.stats["dropped_too_long"],
            self.max_prompt_length,
        )

    def _prepare(self, split: Split, tokenizer: PreTrainedTokenizerBase) -> list[PromptItem]:
        examples = []
        for example in self.load_examples(split):
            try:
                parse_gold(example.gold)
            except GoldParseError:
                error = DataError(
                    f"{example.source}: math_verify cannot parse the gold answer {example.gold!r}"
                )
                if not self.skip_invalid:
                    raise error from None
                self.stats["unparseable_gold"] += 1
                log.warning("skipping row: %s", error)
                continue
            examples.append(example)
        prompts = [self.format_prompt(example.question) for example in examples]
        # A chat template writes any BOS itself; plain text gets whatever special tokens the tokenizer adds.
        add_special = not getattr(tokenizer, "chat_template", None)
        ids = tokenizer(prompts, add_special_tokens=add_special)["input_ids"] if prompts else []
        items, seen = [], set()
        for example, prompt, input_ids in zip(examples, prompts, ids):
            if len(input_ids) > self.max_prompt_length:
                self.stats["dropped_too_long"] += 1
                continue
            # Kept (a repeated problem is still a valid sample; each copy is sampled with its own
            # seed) but counted, so a file concatenated twice shows up in the data/* scalars.
            self.stats["duplicate_prompts"] += (prompt, example.gold) in seen
            seen.add((prompt, example.gold))
            items.append(
                PromptItem(prompt=prompt, input_ids=list(input_ids), gold=example.gold, source=example.source)
            )
        self.stats[f"{split}_examples"] = len(items)
        return items

    def longest_prompt(self) -> int:
        """Tokens of the longest prompt kept by ``setup``, over both splits."""
        return max((len(item.input_ids) for items in self._items.values() for item in items), default=0)

    # ---- loaders --------------------------------------------------------------------------
    def _split_items(self, split: Split) -> list[PromptItem]:
        if not self._items:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        if not self._items[split]:
            raise DataError(
                f"{type(self).__name__}: no {split} prompts left after filtering (stats: {self.stats})"
            )
        return self._items[split]

    def train_dataloader(self) -> DataLoader:
        items = self._split_items("train")
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if len(items) < self.batch_size * world:
            raise DataError(
                f"only {len(items)} train prompts for batch_size {self.batch_size} on {world} ranks: every "
                "batch would be dropped"
            )
        sampler = GlobalBatchSampler(
            items, self.batch_size, world, rank, self.seed, skip=self.trained_batches
        )
        # Its own generator: a DataLoader otherwise draws its workers' base seed from the global
        # RNG each epoch, which a resumed run would draw at another moment.
        return DataLoader(
            items,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=LeftPadCollator(self.get_tokenizer().pad_token_id),
            num_workers=self.num_workers,
        )

    # ---- resuming mid-epoch ----------------------------------------------------------------
    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Called once per batch the loop consumes (prefetched batches are not counted yet).
        if self.trainer is not None and self.trainer.training:
            epoch, taken = self.trained_batches
            current = self.trainer.current_epoch
            self.trained_batches = (current, taken + 1 if epoch == current else 1)
        return batch

    def state_dict(self) -> dict:
        return {"trained_batches": list(self.trained_batches)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.trained_batches = tuple(state_dict.get("trained_batches", (0, 0)))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self._split_items("val"),
            batch_size=self.val_batch_size,
            shuffle=False,
            collate_fn=LeftPadCollator(self.get_tokenizer().pad_token_id),
            num_workers=self.num_workers,
        )
