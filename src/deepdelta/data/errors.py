"""The one error type of the data layer: bad input, reported before any compute."""

from __future__ import annotations


class DataError(ValueError):
    """A data configuration or input problem the user can fix (bad name, missing file, empty corpus...).

    Subclasses ValueError so generic handlers (and Hydra's instantiate wrapper) still catch it.
    """


def choose(kind: str, value: object, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a DataError naming both."""
    if value not in allowed:
        raise DataError(f"unknown {kind} {value!r}; choose one of: {', '.join(allowed)}")
    return str(value)
