"""The training prompt order: reproducible per epoch, split across ranks by global batch, resumable."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DistributedSampler


class GlobalBatchSampler(DistributedSampler):
    """Shuffles with ``seed + epoch`` and cuts the order into global batches of
    ``batch_size × num_replicas`` prompts; rank r takes the r-th contiguous slice of each.

    So one process with batch 2b sees, step for step, the union of what two processes with
    batch b see, and every prompt's group is generated on one rank. A subclass of
    ``DistributedSampler`` so that Lightning keeps it instead of inserting its own, and calls
    ``set_epoch`` on it. ``skip=(epoch, n)`` leaves out the first n batches of that epoch: a run
    resumed mid-epoch goes on with the prompts it had not trained on yet.
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        skip: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size, self.skip = batch_size, skip
        self.num_batches = len(dataset) // (batch_size * num_replicas)
        if self.num_batches == 0:
            raise ValueError(
                f"{len(dataset)} prompts do not fill one global batch of {batch_size} x {num_replicas} ranks"
            )

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(
            len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch)
        ).tolist()
        width = self.batch_size * self.num_replicas
        first = self.skip[1] if self.skip is not None and self.skip[0] == self.epoch else 0
        for batch in range(first, self.num_batches):
            start = batch * width + self.rank * self.batch_size
            yield from order[start : start + self.batch_size]

    def __len__(self) -> int:
        # The whole epoch even when resuming: Lightning counts the batches already done itself.
        return self.num_batches * self.batch_size
