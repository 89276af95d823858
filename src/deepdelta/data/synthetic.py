"""Synthetic overwrite probes: tasks where the answer depends on the *last* write to a slot.

Two families, byte-tokenised, one example per line, packed into windows that start at a line start:

* ``rebind``: variable re-binding chains with value copies, e.g. ``c=3;a=c;c=7;a?3`` (``a`` copied the
  old value of ``c``, so the answer is 3 even though ``c`` was overwritten).
* ``recall``: associative recall with key updates, e.g. ``qx:4,mb:1,qx:8|qx?8`` (the latest value wins).

Each batch is ``(x, y, answer_mask)``: ``answer_mask[b, t]`` marks the targets ``y[b, t]`` that are
answer characters. Generation is infinite and a pure function of ``(seed, sample index)``.
``AnswerAccuracy`` scores whole answers (every character of an answer right), the exact-answer accuracy.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics import Metric

from deepdelta.data.errors import DataError, choose
from deepdelta.data.sampling import BatchStream, rank_windows

TASKS = ("rebind", "recall", "mix")
VAL_SEED = 0x5A11DA7E  # the validation set is fixed: identical for every training seed
_KEYS = [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]


@dataclass(frozen=True)
class SyntheticTask:
    """Settings of the generator: ``num_vars`` names per example, ``min_ops``..``max_ops`` writes each,
    values ``0..num_values-1``, ``copy_prob`` the chance a rebind write copies another variable."""

    task: str = "mix"
    num_vars: int = 4
    min_ops: int = 2
    max_ops: int = 8
    num_values: int = 10
    copy_prob: float = 0.4

    def __post_init__(self) -> None:
        choose("synthetic task", self.task, TASKS)
        if not 1 <= self.num_vars <= 26:
            raise DataError(f"synthetic num_vars must be in [1, 26], got {self.num_vars}")
        if not 1 <= self.min_ops <= self.max_ops:
            raise DataError(f"synthetic ops need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        if self.num_values < 2:
            raise DataError(f"synthetic num_values must be >= 2, got {self.num_values}")
        if not 0.0 <= self.copy_prob <= 1.0:
            raise DataError(f"synthetic copy_prob must be in [0, 1], got {self.copy_prob}")

    def max_line_length(self) -> int:
        """Longest possible example line (bytes, newline included)."""
        digits = len(str(self.num_values - 1))
        per_op = max(2 + max(1, digits), 3 + digits) + 1  # "a=b;" / "a=12;" or "ab:12,"
        return self.max_ops * per_op + 2 + 1 + digits + 1 + 1  # + "ab?" + answer + "\n" (+ separator slack)

    def line(self, rng: random.Random) -> tuple[str, str]:
        """One example: ``(prompt, answer)``; the text is ``prompt + answer + "\\n"``."""
        task = self.task if self.task != "mix" else rng.choice(("rebind", "recall"))
        n_ops = rng.randint(self.min_ops, self.max_ops)
        env: dict[str, int] = {}
        parts = []
        if task == "rebind":
            names = rng.sample(string.ascii_lowercase, self.num_vars)
            for _ in range(n_ops):
                v = rng.choice(names)
                others = [u for u in env if u != v]
                if others and rng.random() < self.copy_prob:
                    u = rng.choice(others)
                    env[v] = env[u]
                    parts.append(f"{v}={u}")
                else:
                    env[v] = rng.randrange(self.num_values)
                    parts.append(f"{v}={env[v]}")
            q = self._query(rng, env, parts[-1].split("=")[0])
            return ";".join(parts) + f";{q}?", str(env[q])
        keys = rng.sample(_KEYS, self.num_vars)
        for _ in range(n_ops):
            k = rng.choice(keys)
            env[k] = rng.randrange(self.num_values)
            parts.append(f"{k}:{env[k]}")
        q = self._query(rng, env, k)
        return ",".join(parts) + f"|{q}?", str(env[q])

    @staticmethod
    def _query(rng: random.Random, env: dict[str, int], last: str) -> str:
        # Never the slot written last (when another exists): "repeat the last value" must not solve the task,
        # the model has to find the latest write to *this* slot among later writes to others.
        candidates = sorted(v for v in env if v != last) or [last]
        return rng.choice(candidates)

    def sample(self, block_size: int, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Window ``index`` of the stream ``seed``: ``block_size + 1`` bytes and a mask of answer bytes."""
        h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
        rng = random.Random(int.from_bytes(h, "little"))
        buf = bytearray()
        spans = []
        while len(buf) < block_size + 1:
            prompt, answer = self.line(rng)
            start = len(buf) + len(prompt)
            buf += f"{prompt}{answer}\n".encode()
            spans.append((start, start + len(answer)))
        seq = np.frombuffer(bytes(buf[: block_size + 1]), dtype=np.uint8)
        mask = np.zeros(block_size, dtype=bool)  # over targets y = seq[1:]
        for start, end in spans:
            if end <= block_size + 1:  # the whole answer is inside the window
                mask[start - 1 : end - 1] = True
        return seq, mask


def _stack(task: SyntheticTask, block_size: int, seed: int, indices: np.ndarray):
    seqs, masks = zip(*(task.sample(block_size, seed, int(i)) for i in indices), strict=True)
    seq = torch.from_numpy(np.stack(seqs).astype(np.int64))
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous(), torch.from_numpy(np.stack(masks))


class SyntheticTrain(BatchStream):
    """Infinite ``(x, y, answer_mask)`` batches; windows are indexed exactly like ``TrainWindows``."""

    def __init__(
        self,
        task: SyntheticTask,
        *,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_window: int = 0,
    ) -> None:
        if task.max_line_length() > block_size + 1:
            raise DataError(
                f"synthetic examples can be {task.max_line_length()} bytes, longer than block_size + 1 = "
                f"{block_size + 1}; lower max_ops or raise block_size"
            )
        self.task, self.block_size, self.batch_size, self.seed = task, block_size, batch_size, seed
        self.rank, self.world_size, self.start_window = rank, world_size, int(start_window)

    def windows(self, k: int) -> np.ndarray:
        return rank_windows(k, self.batch_size, self.rank, self.world_size, self.start_window)

    def batch(self, k: int):
        return _stack(self.task, self.block_size, self.seed, self.windows(k))


class SyntheticVal(BatchStream):
    """A fixed validation set of ``num_windows`` windows (seed-independent), split evenly across ranks."""

    def __init__(
        self,
        task: SyntheticTask,
        *,
        block_size: int,
        batch_size: int,
        num_windows: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        count = num_windows - num_windows % world_size
        if count <= 0:
            raise DataError(f"synthetic validation: {num_windows} window(s) cannot be shared by {world_size} ranks")
        self.task, self.block_size, self.batch_size = task, block_size, batch_size
        self.indices = np.arange(count, dtype=np.int64)[rank::world_size]
        self.num_batches = -(-len(self.indices) // batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, k: int):
        return _stack(
            self.task, self.block_size, VAL_SEED, self.indices[k * self.batch_size : (k + 1) * self.batch_size]
        )


class AnswerAccuracy(Metric):
    """Exact-answer accuracy: the fraction of answers (maximal runs of ``answer_mask``) predicted entirely right.

    ``update(preds, targets, answer_mask)`` takes logits ``(B, T, V)`` or predicted ids ``(B, T)``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, targets: torch.Tensor, answer_mask: torch.Tensor) -> None:
        if preds.dim() == targets.dim() + 1:
            preds = preds.argmax(dim=-1)
        pad = torch.zeros_like(answer_mask[..., :1])  # separates rows so spans never join across them
        mask = torch.cat([answer_mask.bool(), pad], dim=-1).flatten()
        wrong = torch.cat([preds != targets, pad], dim=-1).flatten() & mask
        starts = mask & ~torch.roll(mask, 1)
        n = int(starts.sum())
        if n == 0:
            return
        span = torch.cumsum(starts.long(), 0) - 1
        wrong_per_span = torch.zeros(n, dtype=torch.long, device=mask.device).index_add_(
            0, span[mask], wrong[mask].long()
        )
        self.correct += (wrong_per_span == 0).sum()
        self.total += n

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)
