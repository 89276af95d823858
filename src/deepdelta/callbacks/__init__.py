"""Lightning callbacks: mechanism probes (β, k, e_pre), token throughput, peak memory, a progress bar in steps."""

from deepdelta.callbacks.memory import PeakMemory
from deepdelta.callbacks.probe import MechanismProbe
from deepdelta.callbacks.progress import StepProgressBar
from deepdelta.callbacks.throughput import TokenThroughput

__all__ = ["MechanismProbe", "PeakMemory", "StepProgressBar", "TokenThroughput"]
