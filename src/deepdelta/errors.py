"""Mistakes a user can fix, reported as their message and the way out, without a traceback.

``python src/train.py`` prints a `UserError` as ``error: <message>`` on stderr and exits with its
``exit_code`` (2 for configuration errors, caught before any compute); ``HYDRA_FULL_ERROR=1`` (Hydra's
own switch) or ``DEEPDELTA_DEBUG=1`` raises it with the full traceback instead.
"""

from __future__ import annotations

import os
import sys

CONFIG_EXIT = 2  # the usual status of a command-line usage error (argparse, getopt)


class UserError(Exception):
    """A mistake in what the user asked for or set up; the message names it and says what to do."""

    exit_code = 1


def show_tracebacks() -> bool:
    """True when the user asked for full tracebacks (``HYDRA_FULL_ERROR=1`` or ``DEEPDELTA_DEBUG=1``)."""
    return any(os.environ.get(k, "") not in ("", "0") for k in ("HYDRA_FULL_ERROR", "DEEPDELTA_DEBUG"))


def report(exc: BaseException) -> None:
    """Print a user error the way the CLI shows it: its message and how to see the traceback."""
    print(f"error: {exc}", file=sys.stderr)
    print("(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
