"""Lightning callbacks: mechanism probes (β, k, e_pre), token throughput, peak memory."""

from deepdelta.callbacks.memory import PeakMemory
from deepdelta.callbacks.probe import MechanismProbe
from deepdelta.callbacks.throughput import TokenThroughput

BetaMonitor = MechanismProbe  # the former name, for configs and checkpoints that still say it

__all__ = ["BetaMonitor", "MechanismProbe", "PeakMemory", "TokenThroughput"]
