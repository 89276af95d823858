"""Synthetic overwrite probes: answers checked by an independent interpreter, and the exact-answer metric."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from deepdelta.data import AnswerAccuracy, DataError, SyntheticTask, TokenDataModule


def solve(prompt: str) -> str:
    """Evaluate one example's prompt (everything before the answer) from its text alone."""
    if "|" in prompt:  # recall: k:v,k:v|q?
        writes, query = prompt.split("|")
        store = dict(w.split(":") for w in writes.split(","))
        return store[query.rstrip("?")]
    *writes, query = prompt.split(";")  # rebind: a=3;b=a;...;q?
    env: dict[str, str] = {}
    for w in writes:
        var, val = w.split("=")
        env[var] = env[val] if val.isalpha() else val  # copies take the value at that moment
    return env[query.rstrip("?")]


def spans(mask_row: np.ndarray) -> list[tuple[int, int]]:
    out, start = [], None
    for i, m in enumerate([*mask_row.tolist(), False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize("task", ["rebind", "recall", "mix"])
@pytest.mark.parametrize("num_values", [10, 1000])
def test_masked_targets_are_the_correct_answers(task, num_values):
    dm = TokenDataModule(source="synthetic", task=task, num_values=num_values, max_ops=6, block_size=96, batch_size=8)
    assert dm.vocab_size == 256
    checked = 0
    for x, y, mask in [dm.train_dataset().batch(k) for k in range(5)] + list(dm.val_dataloader()):
        assert x.dtype == y.dtype == torch.int64 and mask.dtype == torch.bool and mask.shape == x.shape
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in range(x.shape[0]):
            seq = bytes([int(x[row, 0]), *y[row].tolist()]).decode()
            found = spans(mask[row].numpy())
            # every whole example has its answer masked (the last one may end exactly at the window's end)
            assert seq.count("\n") <= len(found) <= seq.count("\n") + 1
            for s, e in found:
                a, b = s + 1, e + 1  # target index t is sequence index t + 1
                line_start = seq.rfind("\n", 0, a) + 1
                assert seq[a - 1] == "?" and (b == len(seq) or seq[b] == "\n")
                assert seq[a:b] == solve(seq[line_start:a])
                checked += 1
    assert checked > 100


def test_rebind_chains_really_require_overwriting():
    task = SyntheticTask(task="rebind", num_vars=3, min_ops=6, max_ops=8)
    rng = random.Random(0)
    lines = [task.line(rng) for _ in range(300)]
    overwritten = sum(1 for p, _ in lines if sum(w.startswith(p[-2] + "=") for w in p.split(";")[:-1]) > 1)
    copies = sum(1 for p, _ in lines if any(w.split("=")[1].isalpha() for w in p.split(";")[:-1]))
    assert overwritten > 150 and copies > 150


def test_generation_is_seeded_and_rank_disjoint():
    a = TokenDataModule(source="synthetic", seed=1, block_size=64, batch_size=4)
    b = TokenDataModule(source="synthetic", seed=1, block_size=64, batch_size=4)
    c = TokenDataModule(source="synthetic", seed=2, block_size=64, batch_size=4)
    assert torch.equal(a.train_dataset().batch(3)[0], b.train_dataset().batch(3)[0])
    assert not torch.equal(a.train_dataset().batch(3)[0], c.train_dataset().batch(3)[0])
    r0, r1 = a.train_dataset(0, 2), a.train_dataset(1, 2)
    assert not set(r0.windows(0)) & set(r1.windows(0))
    assert torch.equal(r1.batch(0)[0], a.train_dataset().batch(1)[0])
    # validation does not depend on the training seed
    assert torch.equal(next(iter(a.val_dataloader()))[0], next(iter(c.val_dataloader()))[0])


def test_block_too_small_for_an_example_is_a_clear_error():
    dm = TokenDataModule(source="synthetic", block_size=16, max_ops=8)
    with pytest.raises(DataError, match="lower max_ops or raise block_size"):
        dm.train_dataset()
    with pytest.raises(DataError, match="unknown synthetic task 'copy'"):
        TokenDataModule(source="synthetic", task="copy")


def test_answer_accuracy_scores_whole_answers():
    targets = torch.tensor([[5, 1, 2, 9, 7, 3], [4, 4, 8, 8, 6, 6]])
    mask = torch.tensor([[0, 1, 1, 0, 0, 1], [1, 0, 0, 1, 1, 0]], dtype=torch.bool)  # spans: "12", "3" | "4", "86"
    metric = AnswerAccuracy()
    metric.update(targets.clone(), targets, mask)
    assert metric.compute() == 1.0
    metric.reset()
    preds = targets.clone()
    preds[0, 2] = 0  # breaks the two-token answer "12"
    preds[1, 1] = 0  # outside every answer: ignored
    preds[1, 4] = 0  # breaks "86"
    metric.update(preds, targets, mask)
    assert metric.compute() == pytest.approx(2 / 4)
    # logits are accepted; answer at the end of row 0 and the start of row 1 stay separate answers
    logits = torch.nn.functional.one_hot(targets, 10).float()
    logits[1, 0] = 0.0
    logits[1, 0, 1] = 1.0  # wrong first answer of row 1
    metric.reset()
    metric.update(logits, targets, mask)
    assert metric.compute() == pytest.approx(3 / 4)


@pytest.mark.slow
def test_a_tiny_model_learns_the_task_well_above_chance():
    """Generator and metric are sound end to end: a 2-layer DDL model trained on the masked answers of recall
    examples goes from chance (10%) to about 50% exact-answer accuracy within 100 CPU steps (~10 s on 2 cores).

    The loss is taken on the answer characters only, so the signal does not drown in the random keys and
    values around them; ~50% is the plateau of locating the answer by position, reached by step 50 on every
    seed tried (0-10), under 1, 2 and 4 threads and with either ``impl`` (lowest seen at step 100: 0.37). The
    bar, 0.25, is far below that and far above chance; longer runs are the probe's business, not this test's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on 2 busy cores spin-wait: 150 s instead of 10 (the margin holds at 1-4)
    try:
        before, after = _train_recall_model()
    finally:
        torch.set_num_threads(threads)
    assert before < 0.2 and after > 0.25, (before, after)


def _train_recall_model() -> tuple[float, float]:
    """Exact-answer accuracy (before, after 100 steps) of the model and task of the test above."""
    import torch.nn.functional as F

    from deepdelta.model import DeltaTransformer, ModelConfig

    torch.manual_seed(0)
    dm = TokenDataModule(source="synthetic", task="recall", num_vars=2, min_ops=2, max_ops=3, num_values=10,
                         block_size=48, batch_size=64, val_batches=2)  # fmt: skip
    cfg = ModelConfig.preset("tiny", n_layer=2, d_model=64, n_head=2, head_dim=32, block_size=48)
    model = DeltaTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def accuracy() -> float:
        metric = AnswerAccuracy()
        model.eval()
        with torch.no_grad():
            for x, y, mask in dm.val_dataloader():
                metric.update(model(x), y, mask)
        model.train()
        return float(metric.compute())

    before = accuracy()
    stream = dm.train_dataset()
    for k in range(100):
        x, y, mask = stream.batch(k)
        loss = F.cross_entropy(model(x)[mask], y[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, accuracy()
