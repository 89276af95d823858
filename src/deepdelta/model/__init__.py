"""The DDL Transformer: config, math, state, residual rules, backbone, accounting."""

from deepdelta.model.accounting import count_parameters, flops_per_token
from deepdelta.model.config import ModelConfig
from deepdelta.model.transformer import DeltaTransformer

__all__ = ["DeltaTransformer", "ModelConfig", "count_parameters", "flops_per_token"]
