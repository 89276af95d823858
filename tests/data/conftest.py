"""Tiny corpora made on the fly: every data test runs offline in a temporary folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def make_text(seed: int, n_words: int) -> str:
    """Deterministic pseudo-prose, distinct per seed (so documents are recognisable by content)."""
    rng = random.Random(seed)
    return f"doc {seed}: " + " ".join(rng.choice(WORDS) for _ in range(n_words)) + "\n"


@pytest.fixture
def txt_corpus(tmp_path: Path) -> Path:
    """40 plain-text files (one document each) in nested folders."""
    root = tmp_path / "corpus"
    for i in range(40):
        f = root / f"part{i % 3}" / f"doc{i:02d}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(make_text(i, 60 + 7 * i))
    return root


@pytest.fixture
def jsonl_file(tmp_path: Path) -> Path:
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"body": make_text(100 + i, 80), "id": i}) + "\n" for i in range(30)))
    return f


@pytest.fixture
def parquet_file(tmp_path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"body": [make_text(200 + i, 80) for i in range(20)]}), f)
    return f


@pytest.fixture
def hf_disk(tmp_path: Path) -> Path:
    """A dataset saved with ``save_to_disk``: stands in for the hub."""
    import datasets

    path = tmp_path / "hf_ds"
    rows = {"text": [make_text(300 + i, 70) for i in range(50)], "n": list(range(50))}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(path))
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"
