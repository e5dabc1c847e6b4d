"""Which groups each data-parallel rank trains on at each optimizer step, resumable exactly."""

from __future__ import annotations

import random

from .errors import DataError


class GroupSampler:
    """An endless iterator of optimizer steps; each step yields this DP rank's ``[(group_index, epoch), ...]``.

    Every epoch is a permutation of all groups (seeded by (seed, epoch); identity when shuffle=False) cut into
    global batches of `global_batch` groups; the incomplete last batch is dropped. A global batch is split into
    `dp_size` contiguous equal slices, so concatenating the ranks' slices gives the dp_size=1 batch.

    Too few groups for one global batch is a ``DataError`` (``megarank.training.data.make_sampler`` says which file
    and key, before the model is built).
    """

    def __init__(self, num_groups: int, global_batch: int, dp_rank: int, dp_size: int, seed: int = 0,
                 shuffle: bool = True):
        if global_batch < 1 or dp_size < 1 or global_batch % dp_size:
            raise ValueError(f"global_batch ({global_batch}) must be a positive multiple of dp_size ({dp_size})")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, {dp_size})")
        if num_groups < global_batch:
            raise DataError(f"{num_groups} training groups cannot fill one global batch of {global_batch}")
        self.num_groups = num_groups
        self.global_batch = global_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = num_groups // global_batch
        self.epoch = 0
        self.step_in_epoch = 0
        self._cached_order: tuple[int, list[int]] | None = None  # (epoch, order): one shuffle per epoch

    def epoch_order(self, epoch: int) -> list[int]:
        """The group indices of `epoch` in training order."""
        if self._cached_order is None or self._cached_order[0] != epoch:
            order = list(range(self.num_groups))
            if self.shuffle:
                random.Random(f"megarank-sampler:{self.seed}:{epoch}").shuffle(order)
            self._cached_order = (epoch, order)
        return self._cached_order[1]

    def global_batch_at(self, epoch: int, step_in_epoch: int) -> list[int]:
        """All ranks' group indices for one step."""
        start = step_in_epoch * self.global_batch
        return self.epoch_order(epoch)[start : start + self.global_batch]

    def local_batch_at(self, epoch: int, step_in_epoch: int) -> list[tuple[int, int]]:
        """This rank's contiguous slice of the global batch, as (group_index, epoch) pairs."""
        per_rank = self.global_batch // self.dp_size
        start = self.dp_rank * per_rank
        return [(i, epoch) for i in self.global_batch_at(epoch, step_in_epoch)[start : start + per_rank]]

    def last_global_batch(self) -> list[int]:
        """All ranks' group indices of the step last handed out (every rank knows the whole global batch)."""
        return self.global_batch_at(self.epoch, self.step_in_epoch - 1)

    def __iter__(self) -> "GroupSampler":
        return self

    def __next__(self) -> list[tuple[int, int]]:
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        batch = self.local_batch_at(self.epoch, self.step_in_epoch)
        self.step_in_epoch += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """Position after the last batch handed out; loading it makes the next batch the one that follows."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after the saved position. An epoch now shorter than the saved step (a larger global batch, or
        fewer groups: changes a resume allows, see docs/checkpoints.md) is over: the next epoch starts."""
        if state["seed"] != self.seed:
            raise DataError(f"sampler state was saved with seed {state['seed']} but this run uses seed {self.seed}")
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        if epoch < 0 or step < 0:
            raise DataError(f"sampler state {state} is not a position (negative epoch or step)")
        if step > self.steps_per_epoch:
            epoch, step = epoch + 1, 0
        self.epoch, self.step_in_epoch = epoch, step
