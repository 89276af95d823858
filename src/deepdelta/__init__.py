"""deepdelta: an ablation platform for Deep Delta Learning residuals."""

__version__ = "0.1.0"
