"""Lightning callbacks: mechanism probes (β, k, e_pre), token throughput, peak memory."""

from deepdelta.callbacks.memory import PeakMemory
from deepdelta.callbacks.probe import MechanismProbe
from deepdelta.callbacks.throughput import TokenThroughput

__all__ = ["MechanismProbe", "PeakMemory", "TokenThroughput"]
