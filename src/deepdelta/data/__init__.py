"""The data layer: document sources, tokenizers, cached token shards, window sampling, synthetic probes.

``TokenDataModule`` is the entry point (a LightningDataModule); ``python -m deepdelta.data prepare``
tokenises a corpus into the cache ahead of training.
"""

from deepdelta.data.datamodule import TokenDataModule
from deepdelta.data.errors import DataError
from deepdelta.data.shards import TokenShards, prepare_shards
from deepdelta.data.synthetic import AnswerAccuracy, SyntheticTask
from deepdelta.data.tokenizer import vocab_size_of

__all__ = [
    "AnswerAccuracy",
    "DataError",
    "SyntheticTask",
    "TokenDataModule",
    "TokenShards",
    "prepare_shards",
    "vocab_size_of",
]
