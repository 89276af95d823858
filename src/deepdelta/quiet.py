"""Library output that is noise on every run, silenced; warnings that inform stay."""

from __future__ import annotations

import logging
import warnings

# Lightning's advertisement for its cloud logger, printed by every Trainer (rank_zero_info)
_ADVERTS = ("💡 Tip: For seamless cloud logging",)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ADVERTS)


def silence_noise() -> None:
    """Drop Lightning's litlogger tip and the `_pytree` deprecation Lightning's own code triggers (a
    FutureWarning about Lightning's internals that no setting of ours can change)."""
    # rank_zero_info logs through whichever of these Lightning's imports set last
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning_utilities.core.rank_zero"):  # fmt: skip
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
