"""Lightning callbacks: β probes and token throughput."""

from deepdelta.callbacks.beta import BetaMonitor
from deepdelta.callbacks.throughput import TokenThroughput

__all__ = ["BetaMonitor", "TokenThroughput"]
