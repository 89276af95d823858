"""Which windows each batch holds: a pure function of (seed, global window index), so runs are reproducible,
resumable at the exact batch, and disjoint across DDP ranks and dataloader workers.

Global window ``w`` is the ``w``-th window of one stream shared by all ranks. Rank ``r`` of ``W`` takes,
for its ``k``-th batch, windows ``start + ((k*W + r)*B ... (k*W + r + 1)*B)``: ranks interleave batch-sized
chunks of the stream, so no window is used twice while an epoch lasts. Worker ``i`` of ``n`` on a rank
builds batches ``k = i, i+n, ...``; the DataLoader hands them out round-robin, i.e. in order ``k = 0, 1, 2``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from deepdelta.data.errors import DataError
from deepdelta.data.shards import open_tokens

SAMPLINGS = ("random", "sequential")


def distributed_context(trainer=None) -> tuple[int, int]:
    """``(rank, world_size)`` from the Lightning trainer if attached, else torch.distributed, else (0, 1)."""
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class WindowPlan:
    """Start offsets of global windows over a token stream of ``n_tokens`` (each window is ``block_size + 1``).

    random: each epoch draws an offset in [0, T) (so boundaries move between epochs) and a permutation of
    the non-overlapping slots after it; sequential: slot ``j`` starts at ``j*T``, epoch after epoch.
    """

    def __init__(self, n_tokens: int, block_size: int, seed: int, sampling: str = "random") -> None:
        if n_tokens < block_size + 1:
            raise DataError(
                f"the training split has {n_tokens} tokens, fewer than block_size + 1 = {block_size + 1}; "
                "use a bigger corpus or a smaller block_size"
            )
        self.n_tokens, self.block_size, self.seed, self.sampling = n_tokens, block_size, seed, sampling
        self.max_offset = min(block_size, n_tokens - block_size) if sampling == "random" else 1
        self.per_epoch = (n_tokens - block_size - self.max_offset) // block_size + 1
        self._epochs: dict[int, tuple[int, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:  # only the current and the next epoch are ever needed
                self._epochs.pop(min(self._epochs))
            rng = np.random.default_rng([self.seed, epoch, 0x5EED])
            self._epochs[epoch] = (int(rng.integers(self.max_offset)), rng.permutation(self.per_epoch))
        return self._epochs[epoch]

    def starts(self, windows: np.ndarray) -> np.ndarray:
        windows = np.asarray(windows, dtype=np.int64)
        if self.sampling == "sequential":
            return (windows % self.per_epoch) * self.block_size
        epochs, slots = np.divmod(windows, self.per_epoch)
        out = np.empty_like(windows)
        for e in np.unique(epochs):
            offset, perm = self._epoch(int(e))
            sel = epochs == e
            out[sel] = offset + perm[slots[sel]] * self.block_size
        return out


def gather(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` int64 (B, T) from windows of ``T + 1`` tokens; ``y`` is ``x`` shifted by one."""
    win = tokens[starts[:, None] + np.arange(block_size + 1)]  # one vectorised read from the memory map
    return torch.from_numpy(win[:, :-1].astype(np.int64)), torch.from_numpy(win[:, 1:].astype(np.int64))


class BatchStream(IterableDataset):
    """Yields ``batch(k)`` for this worker's share of ``k = 0, 1, ...`` (forever, or up to ``len(self)``)."""

    num_batches: int | None = None  # None: infinite

    def batch(self, k: int):
        raise NotImplementedError

    def __iter__(self):
        info = get_worker_info()
        k, step = (info.id, info.num_workers) if info is not None else (0, 1)
        while self.num_batches is None or k < self.num_batches:
            yield self.batch(k)
            k += step


class _Tokens:
    """Opens the memory map lazily in each process: pickling a memmap to a worker would copy the corpus."""

    def __init__(self, path: Path, dtype: np.dtype, n_tokens: int) -> None:
        self.path, self.dtype, self.n_tokens = Path(path), np.dtype(dtype), int(n_tokens)
        self._arr: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        if self._arr is None:
            self._arr = open_tokens(self.path, self.dtype, self.n_tokens)
        return self._arr

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arr": None}


def rank_windows(k: int, batch_size: int, rank: int, world_size: int, start_window: int = 0) -> np.ndarray:
    """Global window indices of a rank's ``k``-th training batch: step ``k`` takes the next
    ``world_size × batch_size`` windows after ``start_window`` and gives each rank its own slice, so
    ranks never share a window and the global order does not depend on the world size."""
    first = start_window + (k * world_size + rank) * batch_size
    return np.arange(first, first + batch_size, dtype=np.int64)


class TrainWindows(BatchStream):
    """Infinite training batches for one rank, starting at global window ``start_window`` (resume point)."""

    def __init__(
        self,
        path: Path,
        dtype: np.dtype,
        n_tokens: int,
        *,
        block_size: int,
        batch_size: int,
        seed: int,
        sampling: str = "random",
        rank: int = 0,
        world_size: int = 1,
        start_window: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.tokens = _Tokens(path, dtype, n_tokens)
        self.plan = WindowPlan(n_tokens, block_size, seed, sampling)
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size, self.start_window = rank, world_size, int(start_window)

    def windows(self, k: int) -> np.ndarray:
        return rank_windows(k, self.batch_size, self.rank, self.world_size, self.start_window)

    def starts(self, k: int) -> np.ndarray:
        return self.plan.starts(self.windows(k))

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return gather(self.tokens.array, self.starts(k), self.block_size)


def validation_starts(n_tokens: int, block_size: int, num_windows: int, world_size: int = 1) -> np.ndarray:
    """Fixed validation windows: ``num_windows`` non-overlapping windows spread evenly over the split.

    The set does not depend on the seed; it is trimmed to a multiple of ``world_size`` so ranks get equal shares.
    """
    available = (n_tokens - 1) // block_size
    count = min(num_windows, available)
    count -= count % world_size
    if count <= 0:
        raise DataError(
            f"the validation split has {n_tokens} tokens: {available} window(s) of block_size + 1 = "
            f"{block_size + 1} tokens, too few for {world_size} rank(s); raise val_fraction, lower block_size, "
            "or set val_fraction=0 to train without validation"
        )
    return (np.arange(count, dtype=np.int64) * available // count) * block_size


class ValWindows(BatchStream):
    """This rank's share (every ``world_size``-th window) of the fixed validation windows, in batches."""

    def __init__(
        self,
        path: Path,
        dtype: np.dtype,
        n_tokens: int,
        *,
        block_size: int,
        batch_size: int,
        num_windows: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.tokens = _Tokens(path, dtype, n_tokens)
        self.block_size, self.batch_size = block_size, batch_size
        self.my_starts = validation_starts(n_tokens, block_size, num_windows, world_size)[rank::world_size]
        self.num_batches = -(-len(self.my_starts) // batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def starts(self, k: int) -> np.ndarray:
        return self.my_starts[k * self.batch_size : (k + 1) * self.batch_size]

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return gather(self.tokens.array, self.starts(k), self.block_size)
